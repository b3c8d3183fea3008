"""The audit log: an append-only hash chain, written inside the caller's transaction.

hash = HMAC-SHA256(key, prev_hash || canonical JSON of the event), or plain
SHA-256 without a key. Appends lock the head row (PostgreSQL `FOR UPDATE`;
SQLite's BEGIN IMMEDIATE already holds the database lock), so concurrent
writers, in one process or several, always extend one linear chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Text, bindparam, event, func, type_coerce
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import select

from bot.model import Actor
from storage.models import AuditEvent, AuditHead
from storage.rows import Rows, _encode_datetime, fast_encoder

_EVENTS = AuditEvent.__table__
_HEAD = AuditHead.__table__
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_HEAD_UPDATE = _HEAD.update().where(_HEAD.c.id == 1).values(seq=bindparam("seq"), hash=bindparam("hash"))
# The raw SQLite path (the writer thread): BEGIN IMMEDIATE already holds the database lock.
_SQLITE_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
_SQLITE_HEAD_UPDATE = "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1"
_EVENT_COLUMNS = ("seq", "at", "actor_person", "actor_platform", "actor_user_id", "action", "subject_type",
                  "subject_id", "incident_id", "details", "prev_hash", "hash")

# canonical(): json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str), built
# from its parts. JSON is compositional: an object with sorted keys is "{" + the sorted "key":value pairs
# + "}", each value encoded by the same encoder, so the concatenation below is the same bytes
# (tests/test_audit_canonical.py checks it against json.dumps for arbitrary values).
_canonical_value = fast_encoder(json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                                 default=str))
_string = json.encoder.encode_basestring  # what that encoder does with a str (ensure_ascii=False)
_stored = fast_encoder(json.JSONEncoder(default=str))  # json.dumps(details, default=str)
_dumps = fast_encoder(json.JSONEncoder())  # json.dumps(value): how the JSON column writes it
_scan = json.JSONDecoder().scan_once
_UNSET = object()


def _value(v: Any) -> str:
    """One value as the canonical encoder writes it (str, None and int without a call into the encoder)."""
    t = type(v)
    if t is str:
        return _string(v)
    if v is None:
        return "null"
    if t is int:
        return int.__repr__(v)
    return _canonical_value(v)


def _loads(text: str) -> Any:
    """json.loads(text) for text json.dumps wrote (one value, no surrounding space)."""
    value, end = _scan(text, 0)
    return value if end == len(text) else json.loads(text)


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _plain(value: Any) -> bool:
    """Only dicts with str keys, lists, str, int, float, bool and None (exact types): JSON that survives
    json.loads(json.dumps(value, default=str)) unchanged, so the round trip can be skipped."""
    t = type(value)
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or (type(v) not in _SCALARS and not _plain(v)):
                return False
        return True
    if t is list:
        for v in value:
            if type(v) not in _SCALARS and not _plain(v):
                return False
        return True
    return t in _SCALARS


def _details(details: dict[str, Any] | None) -> Any:
    """What the JSON column keeps of an entry's details: json.loads(json.dumps(details, default=str))."""
    if not details:
        return {}
    try:
        if _plain(details):
            return details
    except RecursionError:  # nested too deeply to check: json.dumps decides what happens
        pass
    return _loads(_stored(details))


try:  # a C HMAC object to copy per event: about half the cost of hmac.new() each time
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # pragma: no cover
    _hmac_new = None


@dataclass(frozen=True)
class Entry:
    """An event to record; `at` comes from the injected clock."""

    action: str
    actor: Actor
    subject_type: str
    subject_id: str
    at: datetime
    details: dict[str, Any] | None = None
    incident_id: int | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    head_hash: str
    problem: str | None = None


def canonical(e: AuditEvent) -> bytes:
    return canonical_fields(e.seq, e.at, e.actor_person, e.actor_platform, e.actor_user_id, e.action,
                            e.subject_type, e.subject_id, e.incident_id, e.details)


def canonical_fields(seq: int, at: datetime, actor_person: str | None, actor_platform: str, actor_user_id: str,
                     action: str, subject_type: str, subject_id: str, incident_id: int | None,
                     details: dict[str, Any]) -> bytes:
    return _canonical(seq, at.isoformat(timespec="microseconds"), actor_person, actor_platform, actor_user_id,
                      action, subject_type, subject_id, incident_id, _canonical_value(details)).encode()


def _canonical(seq: int, at: str, actor_person: str | None, actor_platform: str, actor_user_id: str, action: str,
               subject_type: str, subject_id: str, incident_id: int | None, details: str) -> str:
    """The canonical body with `at` already as ISO text and `details` already canonically encoded."""
    # Keys in sorted order: action, actor, at, details, incident_id, seq, subject.
    return "".join(('{"action":', _value(action), ',"actor":[', _value(actor_person), ",", _value(actor_platform),
                    ",", _value(actor_user_id), '],"at":', _value(at), ',"details":', details, ',"incident_id":',
                    _value(incident_id), ',"seq":', _value(seq), ',"subject":[', _value(subject_type), ",",
                    _value(subject_id), "]}"))


_APPENDED = "chatops.audit.appended"  # Session.info key: [events appended in its transaction, not yet counted]


def _count_when_committed(session: Session, n: int, counted: Callable[[int], None]) -> None:
    """`counted(total)` once the session's transaction commits; nothing if it rolls back."""
    pending = session.info.get(_APPENDED)
    if pending is not None:
        pending[0] += n
        return
    session.info[_APPENDED] = pending = [n]

    def committed(_session: Session) -> None:
        if session.info.get(_APPENDED) is pending:
            del session.info[_APPENDED]
            counted(pending[0])

    def rolled_back(_session: Session) -> None:
        if session.info.get(_APPENDED) is pending:
            del session.info[_APPENDED]

    event.listen(session, "after_commit", committed, once=True)
    event.listen(session, "after_rollback", rolled_back, once=True)


class AuditLog:
    def __init__(self, hmac_key: str | None):
        self._key = hmac_key.encode() if hmac_key else None
        # Told how many events append_many wrote, once their transaction committed (the bot's chatops_audit_events
        # counter). Intake appends with append_rows in its writer, and counts its own.
        self.counted: Callable[[int], None] | None = None
        self._hmac: Any = None
        if self._key and _hmac_new is not None:
            try:
                self._hmac = _hmac_new(self._key, digestmod="sha256")
            except ValueError:  # pragma: no cover - sha256 not offered by this OpenSSL
                self._hmac = None

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def digest(self, prev_hash: str, event: AuditEvent) -> str:
        return self._digest(prev_hash.encode() + canonical(event))

    def _digest(self, data: bytes) -> str:
        if self._hmac is not None:  # = hmac.new(key, data, sha256).hexdigest()
            h = self._hmac.copy()
            h.update(data)
            return h.hexdigest()
        if self._key:
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    async def append(self, session: AsyncSession | AsyncConnection, entry: Entry) -> AuditEvent:
        return AuditEvent(**(await self.append_many(session, [entry]))[0])

    async def append_many(self, session: AsyncSession | AsyncConnection, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Extend the chain inside the caller's transaction; commit is the caller's. Returns the rows written."""
        rows = await session.run_sync(self.append_rows, entries)
        if rows and self.counted is not None and isinstance(session, AsyncSession):
            _count_when_committed(session.sync_session, len(rows), self.counted)
        return rows

    def append_rows(self, conn: Connection | Session, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """The synchronous form, for work already running in a transaction (see Database.run_transaction).

        Core statements (one executemany), not ORM objects: intake appends
        thousands of events a second through here.
        """
        if not entries:
            return []
        if isinstance(conn, Session):
            conn = conn.connection()
        writer = Rows(conn)
        raw = writer.raw
        if raw is None:
            seq, prev = conn.execute(_HEAD_FOR_UPDATE).one()
        else:
            seq, prev = raw.execute(_SQLITE_HEAD).fetchone()
        digest = self._digest
        rows = []
        values = []
        last_at: Any = _UNSET
        last_actor: Any = _UNSET
        for entry in entries:
            seq += 1
            if entry.at is not last_at:  # a batch's events share one `at`: convert it once
                last_at = entry.at
                at = last_at.astimezone(UTC)
                at_text = ',"at":' + _value(at.isoformat(timespec="microseconds")) + ',"details":'
                at_stored = _encode_datetime(at) if raw is not None else None
            actor = entry.actor
            if actor is not last_actor:
                last_actor = actor
                person, platform, user_id = actor.person_id, actor.platform, actor.user_id
                actor_text = f',"actor":[{_value(person)},{_value(platform)},{_value(user_id)}]'
            action, subject_type, incident_id = entry.action, entry.subject_type, entry.incident_id
            details = _details(entry.details)
            subject_id = str(entry.subject_id)
            # canonical_fields(), from its parts (see _canonical)
            canonical_text = "".join(('{"action":', _value(action), actor_text, at_text, _canonical_value(details),
                                      ',"incident_id":', _value(incident_id), ',"seq":', _value(seq),
                                      ',"subject":[', _value(subject_type), ",", _value(subject_id), "]}"))
            h = digest(prev.encode() + canonical_text.encode())
            rows.append({"seq": seq, "at": at, "actor_person": person, "actor_platform": platform,
                         "actor_user_id": user_id, "action": action, "subject_type": subject_type,
                         "subject_id": subject_id, "incident_id": incident_id, "details": details,
                         "prev_hash": prev, "hash": h})
            if raw is not None:
                values.append((seq, at_stored, person, platform, user_id, action, subject_type, subject_id,
                               incident_id, _dumps(details), prev, h))
            prev = h
        if raw is None:
            writer.insert(_EVENTS, rows)
            conn.execute(_HEAD_UPDATE, {"seq": seq, "hash": prev})
        else:
            writer.insert_values(_EVENTS, _EVENT_COLUMNS, values)
            raw.execute(_SQLITE_HEAD_UPDATE, (seq, prev))
        return rows

    async def verify(self, session: AsyncSession, batch: int = 2000) -> Verdict:
        """Walk the chain in order; name the first event that does not fit (or cannot even be read).

        The chain is checked up to the head as it was when the walk began: a running bot appends meanwhile, and
        each batch is read in a statement of its own (PostgreSQL's READ COMMITTED sees what committed since), so
        a head read after the walk said "the newest events were deleted" of a busy chain. Events past that head
        are newer, unless the head still names it at the end: then they were added around the bot."""
        head = (await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))).one_or_none()
        walk = _Walk(upto=head.seq if head is not None else None)
        try:
            verdict = await self._walk(session, batch, walk)
        except (ValueError, TypeError, StatementError):  # a damaged row: walk on one at a time, to name it
            try:
                verdict = await self._walk(session, 1, walk)
            except (ValueError, TypeError, StatementError) as exc:
                seq = (await session.execute(select(AuditEvent.seq).where(AuditEvent.seq > walk.last)
                                             .order_by(AuditEvent.seq).limit(1))).scalar()
                return Verdict(False, walk.checked, walk.prev, f"audit event #{seq} cannot be read "
                               f"({type(exc).__name__}: {str(exc)[:120]}): the row was damaged")
        if verdict is not None:
            return verdict
        checked, prev = walk.checked, walk.prev
        if head is not None:
            # (in this order: the bot writes events and the head in one transaction, so a head read after the
            # newest event has moved past it, if the bot wrote it)
            beyond = (await session.execute(select(func.max(AuditEvent.seq)))).scalar() or 0
            now = (await session.execute(select(AuditHead.seq).where(AuditHead.id == 1))).scalar_one_or_none()
            if now == head.seq and beyond > head.seq:  # the bot did not write them: its head would have moved
                return Verdict(False, checked, prev, f"the chain ends at event #{beyond} but its head says "
                               f"#{head.seq}: the head was set back (or events were added around the bot)")
        if head is not None and head.seq != checked:
            return Verdict(False, checked, prev, f"the chain ends at event #{checked} but its head says "
                           f"#{head.seq}: " + ("the newest events were deleted" if head.seq > checked else
                                               "the head was set back (or events were added around the bot)"))
        if head is not None and head.hash != prev:
            return Verdict(False, checked, prev, f"the head names event #{checked} with a hash that is not that "
                           "event's: the head was modified")
        return Verdict(True, checked, prev)

    async def _walk(self, session: AsyncSession, batch: int, walk: _Walk) -> Verdict | None:
        """Check the events after `walk.last`, `batch` rows at a time, moving `walk` on; a Verdict at the first
        event that does not fit, None at the end."""
        async for event in _events(session, batch, after=walk.last, upto=walk.upto):
            where = f"audit event #{event.seq} ({event.action} at {event.at.isoformat()})"
            expected_seq = walk.checked + 1
            if event.seq != expected_seq:
                return Verdict(False, walk.checked, walk.prev, f"{where}: expected #{expected_seq} here; "
                               f"event #{expected_seq} was deleted or the events were renumbered")
            if event.prev_hash != walk.prev:
                return Verdict(False, walk.checked, walk.prev, f"{where}: does not link to the event before it; "
                               "an event was deleted, inserted or reordered")
            if self.digest(event.prev_hash, event) != event.hash:
                return Verdict(False, walk.checked, walk.prev, f"{where}: its hash does not match its contents; "
                               "the event was modified (or the audit key is not the one it was written with)")
            walk.prev, walk.last, walk.checked = event.hash, event.seq, walk.checked + 1
        return None

    @staticmethod
    async def events(
        session: AsyncSession, *, since: datetime | None = None, incident_id: int | None = None, batch: int = 2000
    ) -> AsyncIterator[AuditEvent | Damaged]:
        """Every event in order, for export and the timeline: one whose row cannot be read whole comes as Damaged,
        with what can be read of it, and the rest go on (a damaged row stopped the export where it was)."""
        async for event in _events(session, batch, since=since, incident_id=incident_id, damaged=True):
            yield event


@dataclass(frozen=True)
class Damaged:
    """An audit event whose row cannot be read whole (only SQLite lets such a value in). `event` holds what can be
    read of it, each column that cannot be decoded as its type as stored (`details` that is not JSON, as its text;
    an `at` that is no time, as its text); `problem` names those columns and why."""

    event: AuditEvent
    problem: str


_UNREADABLE = (ValueError, TypeError, StatementError)  # a stored value its column's type cannot decode


@dataclass
class _Walk:
    """How far `AuditLog.verify` got: events checked, the last one's seq and hash."""

    checked: int = 0
    last: int = 0
    prev: str = AuditHead.GENESIS
    upto: int | None = None  # the head's seq when the walk began: events after it are newer than the check


async def _events(
    session: AsyncSession, batch: int, *, since: datetime | None = None, incident_id: int | None = None,
    after: int = 0, upto: int | None = None, damaged: bool = False,
) -> AsyncIterator[Any]:
    """The events after `after`, `batch` rows a statement. A row that cannot be decoded raises, unless `damaged`:
    then that batch is read again one row at a time, and the row comes as Damaged."""
    last = after

    def chosen(query: Any) -> Any:
        query = query.where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        if upto is not None:
            query = query.where(AuditEvent.seq <= upto)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if incident_id is not None:
            query = query.where(AuditEvent.incident_id == incident_id)
        return query

    while True:
        rows: Sequence[AuditEvent | Damaged]
        try:
            rows = (await session.execute(chosen(select(AuditEvent)))).scalars().all()
        except _UNREADABLE:
            if not damaged:
                raise
            session.expunge_all()
            rows = [await _read_one(session, seq) for seq in (await session.execute(chosen(select(AuditEvent.seq))))
                    .scalars().all()]
        if not rows:
            return
        for row in rows:
            yield row
        last = rows[-1].event.seq if isinstance(rows[-1], Damaged) else rows[-1].seq
        session.expunge_all()


async def _read_one(session: AsyncSession, seq: int) -> AuditEvent | Damaged:
    """The event `seq`, or what can be read of it: each column on its own, one that cannot be decoded as stored."""
    try:
        return (await session.execute(select(AuditEvent).where(AuditEvent.seq == seq))).scalar_one()
    except _UNREADABLE:
        pass
    values: dict[str, Any] = {}
    problems = []
    for column in _EVENTS.c:
        try:
            values[column.name] = (await session.execute(select(column).where(_EVENTS.c.seq == seq))).scalar_one()
        except _UNREADABLE as exc:
            values[column.name] = (await session.execute(select(type_coerce(column, Text))
                                                         .where(_EVENTS.c.seq == seq))).scalar_one()
            problems.append(f"{column.name} ({type(exc).__name__}: {str(exc)[:120]})")
    return Damaged(AuditEvent(**values), "cannot read its " + (", ".join(problems) or "row"))
