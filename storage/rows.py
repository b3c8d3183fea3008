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
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Connection, DateTime, Table, bindparam, func, select
from sqlalchemy.types import TypeDecorator

try:
    from _json import make_encoder as c_make_encoder
except ImportError:  # pragma: no cover - CPython always has it
    c_make_encoder = None

Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (encode for SQLite, decode from SQLite)


def fast_encoder(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """`encoder.encode`, byte for byte, without building the C encoder anew for every call.

    JSONEncoder.encode makes a fresh C encoder (and a circular-reference table)
    each time; this one is made once, without that table: a circular value
    recurses until RecursionError, and is then handed to `encoder.encode`,
    which raises exactly what json.dumps raises.
    """
    if c_make_encoder is None or encoder.indent is not None:  # pragma: no cover
        return encoder.encode
    strings = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    c_encode = c_make_encoder(None, encoder.default, strings, encoder.indent, encoder.key_separator,
                              encoder.item_separator, encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)
    join = "".join

    def encode(value: Any) -> str:
        try:
            return join(c_encode(value, 0))
        except RecursionError:
            return encoder.encode(value)

    return encode


_dumps = fast_encoder(json.JSONEncoder())  # json.dumps(value), as SQLAlchemy's JSON type writes it
_scan = json.JSONDecoder().scan_once


class Json:
    """A JSON column's value as the text SQLite keeps (json.dumps of it), not decoded.

    Only on the raw SQLite path: `select_in(..., json_text=True)` returns JSON
    columns this way, and writes pass the text through unchanged, so a value
    that is compared or copied never needs json.loads/json.dumps again.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def decode(self) -> Any:
        """json.loads(text): the C scanner directly when the text is one value (as json.dumps writes it)."""
        text = self.text
        try:
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except StopIteration:
            pass
        return json.loads(text)

    def __repr__(self) -> str:
        return f"Json({self.text!r})"


def json_text(value: Any) -> Json:
    """`value` encoded as its JSON column keeps it."""
    return Json(_dumps(value))


def _same(value: Any) -> Any:
    return value


_last_datetime: tuple[Any, str | None] = (None, None)  # (the last datetime encoded, its text): a batch repeats `now`


def _encode_datetime(value: datetime | None) -> str | None:
    global _last_datetime
    if value is None:
        return None
    last = _last_datetime
    if last[0] is value:
        return last[1]
    if value.utcoffset() is None:
        raise ValueError("datetime values must have timezone information")
    text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    _last_datetime = (value, text)
    return text


def _decode_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _encode_json(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is Json:
        return value.text
    return _dumps(value)


def _decode_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _encode_bool(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _decode_bool(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def _json_text(value: str | None) -> Json | None:
    return None if value is None else Json(value)


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
        self.json = {c.name for c in table.columns if codecs[c.name][1] is _decode_json}
        self.sql: dict[Any, Any] = {}  # statement text (and codecs) by shape: built once, not per batch


_CODECS: dict[str, _TableCodec] = {}


def _codec_of(table: Table) -> _TableCodec:
    codec = _CODECS.get(table.name)
    if codec is None:
        codec = _CODECS[table.name] = _TableCodec(table)
    return codec


def _marks(n: int) -> str:
    return ", ".join("?" * n)


# Rows per multi-row statement: a batch is cut into these sizes (largest first), so each table needs at most
# seven statement texts (the driver caches prepared statements), and stays under SQLite's oldest limit of
# 999 parameters. One multi-row statement is one sqlite3_step, where executemany steps (and releases and
# takes back the GIL) once per row.
_CHUNKS = (64, 32, 16, 8, 4, 2, 1)
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)  # UPDATE ... FROM (VALUES ...)


def _chunked(rows: Sequence[Any]) -> Iterable[tuple[int, Sequence[Any]]]:
    i, n = 0, len(rows)
    for size in _CHUNKS:
        while n - i >= size:
            yield size, rows[i:i + size]
            i += size


class Rows:
    """Reads and writes of whole rows as dicts, inside the caller's transaction (`conn`)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        # The synchronous sqlite3 driver only (the writer thread's); through aiosqlite, Core statements.
        self.raw = conn.connection.driver_connection if conn.dialect.driver == "pysqlite" else None

    def select_in(self, table: Table, column: str, values: Iterable[Any], *, exclude: tuple[str, Any] | None = None,
                  order_by: str | None = None, columns: Sequence[str] | None = None,
                  also_in: tuple[str, Iterable[Any]] | None = None, json_text: bool = False,
                  lock: bool = False) -> list[dict[str, Any]]:
        """Rows whose `column` is one of `values` (and, with `exclude`, whose column differs from a value).

        `lock`: read them `FOR UPDATE` (PostgreSQL: a row another transaction is changing is read, and judged by the
        WHERE, as that one commits it; SQLite's writer already holds the database).

        `columns` limits what is read (decoding JSON columns nobody looks at is most of a read's cost).
        `also_in` (column, values) narrows further to rows whose column is one of those values too:
        it lets an index whose first column that is serve the lookup (a table scan otherwise).
        With `json_text`, on the raw SQLite path JSON columns come back undecoded, as `Json`
        (elsewhere they are decoded as always).
        """
        values = list(values)
        if not values:
            return []
        also = list(also_in[1]) if also_in else []
        if also_in and not also:
            return []
        codec = _codec_of(table)
        names = tuple(columns) if columns else tuple(codec.columns)
        if self.raw is None:
            query = select(*(table.c[n] for n in names)).where(table.c[column].in_(bindparam("values", expanding=True)))
            params = {"values": values}
            if also_in:
                query = query.where(table.c[also_in[0]].in_(bindparam("also", expanding=True)))
                params["also"] = also
            if exclude:
                query = query.where(table.c[exclude[0]] != exclude[1])
            if order_by:
                query = query.order_by(table.c[order_by])
            if lock and self.conn.dialect.name == "postgresql":
                query = query.with_for_update()
            return [dict(r) for r in self.conn.execute(query, params).mappings()]
        key = ("select", column, names, exclude[0] if exclude else None, order_by, json_text,
               also_in[0] if also_in else None)
        shape = codec.sql.get(key)
        if shape is None:
            head = f"SELECT {', '.join(names)} FROM {table.name} WHERE {column} IN ("
            middle = f") AND {also_in[0]} IN (" if also_in else ""
            tail = (f") AND {exclude[0]} != ?" if exclude else ")") + (f" ORDER BY {order_by}" if order_by else "")
            decode = tuple((i, n, _json_text if json_text and n in codec.json else codec.decoder[n])
                           for i, n in enumerate(names) if codec.decoder[n] is not _same)
            shape = codec.sql[key] = (head, middle, tail, decode, {})
        head, middle, tail, decode, texts = shape
        sql = texts.get((len(values), len(also)))
        if sql is None:
            sql = texts[(len(values), len(also))] = (
                head + _marks(len(values)) + (middle + _marks(len(also)) if also_in else "") + tail)
        if also_in:
            values.extend(also)
        if exclude:
            values.append(exclude[1])
        out = []
        for row in self.raw.execute(sql, values):
            d = dict(zip(names, row))
            for i, n, dec in decode:
                d[n] = dec(row[i])
            out.append(d)
        return out

    def max_id_by(self, table: Table, column: str, values: Iterable[Any]) -> dict[Any, int]:
        """{value: the largest id among rows with that value in `column`}."""
        values = list(values)
        if not values:
            return {}
        if self.raw is None:
            query = (select(table.c[column], func.max(table.c.id)).where(table.c[column].in_(values))
                     .group_by(table.c[column]))
            return dict(self.conn.execute(query).all())  # type: ignore[arg-type]
        sql = (f"SELECT {column}, max(id) FROM {table.name} WHERE {column} IN ({_marks(len(values))}) "
               f"GROUP BY {column}")
        return dict(self.raw.execute(sql, values).fetchall())

    def _insert_shape(self, table: Table, names: tuple[str, ...]) -> tuple[str, tuple[Callable[[Any], Any], ...]]:
        codec = _codec_of(table)
        key = ("insert", names)
        shape = codec.sql.get(key)
        if shape is None:
            sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({_marks(len(names))})"
            shape = codec.sql[key] = (sql, tuple(codec.encode[n] for n in names))
        return shape

    def insert(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows that all have the same keys, in one executemany."""
        if not rows:
            return
        if self.raw is None:
            self.conn.execute(table.insert(), list(rows))
            return
        names = tuple(rows[0])
        encode = self._insert_shape(table, names)[1]
        self.insert_values(table, names, [[enc(row[n]) for n, enc in zip(names, encode)] for row in rows])

    def insert_values(self, table: Table, names: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows given as value tuples in the order of `names`, already encoded for SQLite (raw path only).

        In order, as multi-row INSERTs (see _CHUNKS): the same rows and ids as executemany.
        """
        if not rows:
            return
        assert self.raw is not None
        codec = _codec_of(table)
        for size, chunk in _chunked(rows):
            key = ("insert_rows", names, size)
            sql = codec.sql.get(key)
            if sql is None:
                row = f"({_marks(len(names))})"
                sql = codec.sql[key] = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {', '.join([row] * size)}"
            self.raw.execute(sql, [v for values in chunk for v in values])

    def insert_returning_ids(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert rows (without `id`) and return their new ids, in order."""
        if not rows:
            return []
        if self.raw is None:
            statement = table.insert().returning(table.c.id, sort_by_parameter_order=True)
            return list(self.conn.execute(statement, list(rows)).scalars().all())
        names = tuple(rows[0])
        sql, encode = self._insert_shape(table, names)
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
                names = tuple(sorted(values))
                group = groups.get(names)
                if group is None:
                    groups[names] = [(row_id, values)]
                else:
                    group.append((row_id, values))
        for names, group in groups.items():
            if self.raw is None:
                statement = table.update().where(table.c.id == bindparam("_id"))
                self.conn.execute(statement, [{"_id": row_id, **values} for row_id, values in group])
                continue
            codec = _codec_of(table)
            key = ("update", names)
            shape = codec.sql.get(key)
            if shape is None:
                shape = codec.sql[key] = (f"UPDATE {table.name} SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                                          tuple(codec.encode[n] for n in names))
            sql, encode = shape
            if not _UPDATE_FROM or len({row_id for row_id, _ in group}) < len(group):  # a row twice: in order
                self.raw.executemany(sql, [[*[enc(values[n]) for n, enc in zip(names, encode)], row_id]
                                           for row_id, values in group])
                continue
            for size, chunk in _chunked(group):
                key = ("update_rows", names, size)
                sql = codec.sql.get(key)
                if sql is None:  # the VALUES columns are column1 (the id), column2, ... in the order of `names`
                    row = f"({_marks(len(names) + 1)})"
                    sets = ", ".join(f"{n} = v.column{i}" for i, n in enumerate(names, start=2))
                    sql = codec.sql[key] = (f"UPDATE {table.name} SET {sets} FROM (VALUES {', '.join([row] * size)}) "
                                            f"AS v WHERE {table.name}.id = v.column1")
                params: list[Any] = []
                for row_id, values in chunk:
                    params.append(row_id)
                    params.extend([enc(values[n]) for n, enc in zip(names, encode)])
                self.raw.execute(sql, params)
