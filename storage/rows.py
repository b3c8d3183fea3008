"""Plain-dict reads and executemany writes inside one transaction, for the hot write paths.

Intake and the audit chain write several rows per alert, thousands of alerts a
second. SQLAlchemy's per-statement and per-parameter processing cost more than
SQLite's own work there, so on SQLite these helpers talk to the driver's cursor
directly, encoding values exactly as the models' SQLAlchemy types do (aware
datetimes as UTC text `YYYY-MM-DD HH:MM:SS.ffffff`, JSON as text, booleans as
0/1); rows written here read back the same through the ORM, and the other way
round (tests/test_rows.py checks both directions). On PostgreSQL, and on SQLite
through aiosqlite, they build Core statements.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Connection, DateTime, Table, bindparam, func, select
from sqlalchemy.types import TypeDecorator

Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (encode for SQLite, decode from SQLite)


def _same(value: Any) -> Any:
    return value


def _encode_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ValueError("datetime values must have timezone information")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _decode_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _encode_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _decode_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _encode_bool(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _decode_bool(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def _codec(column_type: Any) -> Codec:
    base = column_type.impl if isinstance(column_type, TypeDecorator) else column_type
    if isinstance(base, DateTime):
        if base is column_type:
            raise TypeError("naive DateTime columns are not supported here; use sqlmodel's UTC datetime")
        return _encode_datetime, _decode_datetime
    if isinstance(base, JSON):
        return _encode_json, _decode_json
    if isinstance(base, Boolean):
        return _encode_bool, _decode_bool
    return _same, _same


class _TableCodec:
    def __init__(self, table: Table):
        self.table = table
        self.columns = [c.name for c in table.columns]
        codecs = {c.name: _codec(c.type) for c in table.columns}
        self.encode = {name: enc for name, (enc, _) in codecs.items()}
        self.decoder = {name: dec for name, (_, dec) in codecs.items()}


_CODECS: dict[str, _TableCodec] = {}


def _codec_of(table: Table) -> _TableCodec:
    codec = _CODECS.get(table.name)
    if codec is None:
        codec = _CODECS[table.name] = _TableCodec(table)
    return codec


class Rows:
    """Reads and writes of whole rows as dicts, inside the caller's transaction (`conn`)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        # The synchronous sqlite3 driver only (the writer thread's); through aiosqlite, Core statements.
        self.raw = conn.connection.driver_connection if conn.dialect.driver == "pysqlite" else None

    def select_in(self, table: Table, column: str, values: Iterable[Any], *, exclude: tuple[str, Any] | None = None,
                  order_by: str | None = None, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows whose `column` is one of `values` (and, with `exclude`, whose column differs from a value).

        `columns` limits what is read (decoding JSON columns nobody looks at is most of a read's cost).
        """
        values = list(values)
        if not values:
            return []
        codec = _codec_of(table)
        names = list(columns) if columns else codec.columns
        if self.raw is None:
            query = select(*(table.c[n] for n in names)).where(table.c[column].in_(bindparam("values", expanding=True)))
            if exclude:
                query = query.where(table.c[exclude[0]] != exclude[1])
            if order_by:
                query = query.order_by(table.c[order_by])
            return [dict(r) for r in self.conn.execute(query, {"values": values}).mappings()]
        decode = [(n, codec.decoder[n]) for n in names]
        sql = f"SELECT {', '.join(names)} FROM {table.name} WHERE {column} IN ({', '.join('?' * len(values))})"
        params = list(values)
        if exclude:
            sql += f" AND {exclude[0]} != ?"
            params.append(exclude[1])
        if order_by:
            sql += f" ORDER BY {order_by}"
        return [{name: dec(v) for (name, dec), v in zip(decode, row)} for row in self.raw.execute(sql, params)]

    def max_id_by(self, table: Table, column: str, values: Iterable[Any]) -> dict[Any, int]:
        """{value: the largest id among rows with that value in `column`}."""
        values = list(values)
        if not values:
            return {}
        if self.raw is None:
            query = (select(table.c[column], func.max(table.c.id)).where(table.c[column].in_(values))
                     .group_by(table.c[column]))
            return dict(self.conn.execute(query).all())  # type: ignore[arg-type]
        sql = (f"SELECT {column}, max(id) FROM {table.name} WHERE {column} IN ({', '.join('?' * len(values))}) "
               f"GROUP BY {column}")
        return dict(self.raw.execute(sql, values).fetchall())

    def insert(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows that all have the same keys, in one executemany."""
        if not rows:
            return
        if self.raw is None:
            self.conn.execute(table.insert(), list(rows))
            return
        names = list(rows[0])
        encode = [_codec_of(table).encode[n] for n in names]
        sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        self.raw.executemany(sql, [[enc(row[n]) for n, enc in zip(names, encode)] for row in rows])

    def insert_returning_ids(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert rows (without `id`) and return their new ids, in order."""
        if not rows:
            return []
        if self.raw is None:
            statement = table.insert().returning(table.c.id, sort_by_parameter_order=True)
            return list(self.conn.execute(statement, list(rows)).scalars().all())
        names = list(rows[0])
        encode = [_codec_of(table).encode[n] for n in names]
        sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        ids = []
        for row in rows:
            cursor = self.raw.execute(sql, [enc(row[n]) for n, enc in zip(names, encode)])
            ids.append(cursor.lastrowid)
        return ids

    def update_by_id(self, table: Table, changes: Sequence[tuple[Any, Mapping[str, Any]]]) -> None:
        """Apply (id, {column: value}) changes; rows changing the same columns share one executemany."""
        groups: dict[tuple[str, ...], list[tuple[Any, Mapping[str, Any]]]] = {}
        for row_id, values in changes:
            if values:
                groups.setdefault(tuple(sorted(values)), []).append((row_id, values))
        for names, group in groups.items():
            if self.raw is None:
                statement = table.update().where(table.c.id == bindparam("_id"))
                self.conn.execute(statement, [{"_id": row_id, **values} for row_id, values in group])
                continue
            encode = [_codec_of(table).encode[n] for n in names]
            sql = f"UPDATE {table.name} SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
            self.raw.executemany(sql, [[*(enc(values[n]) for n, enc in zip(names, encode)), row_id]
                                       for row_id, values in group])
