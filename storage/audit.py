"""The audit log: an append-only hash chain, written inside the caller's transaction.

hash = HMAC-SHA256(key, prev_hash || canonical JSON of the event), or plain
SHA-256 without a key. Appends lock the head row (PostgreSQL `FOR UPDATE`;
SQLite's BEGIN IMMEDIATE already holds the database lock), so concurrent
writers, in one process or several, always extend one linear chain.

Every writer must hold the key the chain was written with: one event hashed with another key (or none) breaks the
chain for good, since verify can no longer tell it from tampering. `key_problem` is checked before a writer
appends; the key is changed on purpose with an `audit.rekeyed` event (`chatops audit rekey`), hashed with the new
key, whose details record where the old key ended and a fingerprint of each key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Text, bindparam, cast, event, func, type_coerce
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
_REKEYED_AT = select(_EVENTS.c.details).where(_EVENTS.c.seq == bindparam("seq"), _EVENTS.c.action == "audit.rekeyed")
_SQLITE_REKEYED_AT = "SELECT details FROM audit_events WHERE seq = ? AND action = 'audit.rekeyed'"
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
    # Events written with an earlier key that was not given: their links were checked, not their contents.
    unchecked: int = 0
    notes: tuple[str, ...] = ()  # how each stretch written with an earlier key (or none) was checked
    # Set when not one event hashed with the chain's current key verifies with the key in hand: that key is not the
    # chain's (or none is set where the chain has one), and what to set, said. The chain was then not checked, which
    # is no finding of tampering: one modified event leaves the others verifying.
    wrong_key: str | None = None
    # The wrong_key above is a possibility, not a proof: no event verifies with this key, and nothing the chain records
    # tells a key that is not its own from every event modified (a chain's first key leaves no fingerprint in it).
    # Proven are a key set here on a chain that verifies without one, and a key the chain's newest rekey names.
    key_unproven: bool = False


REKEYED = "audit.rekeyed"  # the chain's key changes here: this event and those after it are hashed with the new key
_FINGERPRINT_LABEL = b"chatops audit key fingerprint"


def key_fingerprint(key: str | None) -> str | None:
    """What is recorded and said of a key: 16 hex digits of an HMAC with it, which tell keys apart without giving
    one away. None for no key."""
    if not key:
        return None
    return hmac.new(key.encode(), _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def said_key(fingerprint: str | None) -> str:
    return f"the key with fingerprint {fingerprint}" if fingerprint else "no key"


class KeyMismatch(Exception):
    """The chain was written with another key than the one in hand (or none, or with one): appending would break it."""


def rekeyed_away(new_key: str | None, seq: int, fingerprint: str | None) -> str:
    """What is said when the chain was changed to another key than the one in hand (`new_key`, recorded at `seq`)."""
    here = (f"this audit.hmac_key has fingerprint {fingerprint}" if fingerprint else "no audit.hmac_key is set here "
            "(is the environment variable it reads set where this runs?)")
    return (f"the audit chain was rekeyed to {f'another key (fingerprint {new_key})' if new_key else 'no key'} at event #{seq} by `chatops audit "
            f"rekey`, and {here}: events hashed here would break the chain for good; restart this bot (every "
            "replica, and run chatops from every shell) with that key")


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
        self.fingerprint = key_fingerprint(hmac_key)
        # Told how many events append_many wrote, once their transaction committed (the bot's chatops_audit_events
        # counter). Intake appends with append_rows in its writer, and counts its own.
        self.counted: Callable[[int], None] | None = None
        self._hmac: Any = None
        # The head hash this log last wrote or found to be no change of key to another: an append that finds it
        # there skips the look at the head event (see _check_head).
        self._known_head: str | None = None
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
        if seq and prev != self._known_head and entries[0].action != REKEYED:  # (a rekey checked the chain itself)
            self._check_head(conn, raw, seq, prev)
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
        self._known_head = prev
        return rows

    def _check_head(self, conn: Connection, raw: Any, seq: int, prev: str) -> None:
        """KeyMismatch if the head event changed the chain's key to another than this one: `chatops audit rekey`
        ran while this process was running (PostgreSQL lets it, beside replicas), and an event hashed with the
        old key after it would break the chain for good. Only when the head is not what this log last wrote or
        checked (another process appended): a look at one row by its key, in the head's lock."""
        if raw is None:
            try:
                found = conn.execute(_REKEYED_AT, {"seq": seq}).first()
            except _UNREADABLE:  # a damaged row tells nothing of the key; `audit verify` names it
                return
            details = found.details if found is not None else None
        else:
            found = raw.execute(_SQLITE_REKEYED_AT, (seq,)).fetchone()
            try:
                details = json.loads(found[0]) if found is not None and found[0] is not None else None
            except (ValueError, TypeError):
                return
        if found is not None:
            new_key = _recorded(details, "new_key")
            if new_key is not _UNSET and new_key != self.fingerprint:
                raise KeyMismatch(rekeyed_away(new_key, seq, self.fingerprint))
        self._known_head = prev

    async def key_problem(self, session: AsyncSession, *, lock: bool = False) -> str | None:
        """Why appending with this key would break the chain, or None: its newest event is hashed again with the key
        in hand (an empty chain has nothing to check). With `lock` (in a write transaction) the head is locked as an
        append locks it, so that nothing is appended between this check and the caller's append."""
        query = _HEAD_FOR_UPDATE if lock else select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1)
        head = (await session.execute(query)).one_or_none()
        if head is None or not head.seq:
            return None
        try:
            newest = (await session.execute(select(AuditEvent).where(AuditEvent.seq <= head.seq)
                                            .order_by(AuditEvent.seq.desc()).limit(1))).scalar_one_or_none()
        except _UNREADABLE:  # a damaged row tells nothing of the key; `audit verify` names it
            return None
        if newest is None:
            return None
        fits = self.digest(newest.prev_hash, newest) == newest.hash
        try:
            rekey = (await session.execute(select(AuditEvent.seq, AuditEvent.details)
                                           .where(AuditEvent.action == REKEYED, AuditEvent.seq <= head.seq)
                                           .order_by(AuditEvent.seq.desc()).limit(1))).one_or_none()
        except _UNREADABLE:
            rekey = None
        new_key = _recorded(rekey.details, "new_key") if rekey is not None else _UNSET
        if new_key is not _UNSET and new_key != self.fingerprint:
            # (even if the newest event fits this key: a bot that kept the old key wrote after the change)
            problem = rekeyed_away(new_key, rekey.seq, self.fingerprint)
            if fits and newest.seq > rekey.seq:
                problem += (f"; events after it (up to #{newest.seq}) were hashed with this old key, by a bot that "
                            "kept running with it: the chain is broken there, as `chatops audit verify` says")
            return problem
        if fits:
            return None
        if new_key is not _UNSET:  # this is the key the chain was changed to: what follows the change is not
            if newest.seq == rekey.seq:
                return (f"the audit chain was rekeyed to this audit.hmac_key (fingerprint {self.fingerprint}) at "
                        f"event #{rekey.seq}, but that event does not verify with it: it was modified; `chatops "
                        "audit verify` tells")
            return (f"the audit chain was rekeyed to this audit.hmac_key (fingerprint {self.fingerprint}) at event "
                    f"#{rekey.seq}, but its newest event, #{newest.seq}, does not verify with it: events after the "
                    "rekey were written with another key (a bot that kept running with the old key), or modified; "
                    "the chain is broken there, as `chatops audit verify` says. Events hashed now would carry on "
                    "from a broken chain")
        same = "every replica of the bot and every shell that runs chatops needs that one key"
        if not self.keyed:
            return ("the audit chain was written with a key, and no audit.hmac_key "
                    "is set here (is the environment variable it reads set where this runs?): events hashed without "
                    f"it would break the chain for good. Set audit.hmac_key to the key the chain was written with "
                    f"({same}). (If the chain was written without a key, its newest event, #{newest.seq}, was "
                    "modified: `chatops audit verify` tells)")
        if AuditLog(None).digest(newest.prev_hash, newest) == newest.hash:
            return ("the audit chain was written without a key, and audit.hmac_key is set here: events hashed with "
                    "the key would break the chain for good. Leave audit.hmac_key unset, as it is where the chain "
                    f"was written ({same}); or, to introduce the key on purpose, stop the bot and run `chatops audit "
                    "rekey --from-no-key` once with audit.hmac_key set, then start the bot with it")
        return (f"the audit chain was written with another key than this audit.hmac_key (fingerprint "
                f"{self.fingerprint}): events hashed with it would break "
                f"the chain for good. Set audit.hmac_key to the key the chain was written with ({same}); or, to "
                "change the key on purpose, stop the bot and run `chatops audit rekey --old-key-env VAR` once, VAR "
                "holding the old key and audit.hmac_key the new one, then start the bot with the new key. (If this "
                f"is the key the chain was written with, its newest event, #{newest.seq}, was modified: `chatops "
                "audit verify` tells)")

    async def check_key(self, session: AsyncSession) -> None:
        """KeyMismatch (saying what to do) if appending with this key would break the chain."""
        problem = await self.key_problem(session)
        if problem is not None:
            raise KeyMismatch(problem)

    async def rekey(self, session: AsyncSession, old: AuditLog, actor: Actor, at: datetime,
                    verified: Verdict) -> dict[str, Any]:
        """Change the chain's key from `old`'s to this one: the `audit.rekeyed` event, hashed with this key, in the
        caller's write transaction. `verified` is the chain's verdict with `old`; KeyMismatch if it was not intact,
        or if the chain moved on since (a bot still writing with the old key would break it right after)."""
        if old.fingerprint == self.fingerprint:
            raise KeyMismatch(f"the old key and the new one are the same ({said_key(self.fingerprint)}): nothing to "
                              "change")
        if not verified.ok:
            raise KeyMismatch(f"the audit chain does not verify with the old key ({said_key(old.fingerprint)}): "
                              f"{verified.problem}")
        seq, prev = (await session.execute(_HEAD_FOR_UPDATE)).one()
        if (seq, prev) != (verified.checked, verified.head_hash):
            raise KeyMismatch(f"the audit chain moved on while it was checked (to event #{seq}): a bot is still "
                              "writing it; stop every replica of the bot, then run this again")
        details = {"after": seq, "old_key": old.fingerprint, "new_key": self.fingerprint}
        [row] = await self.append_many(session, [Entry(REKEYED, actor, "audit", "key", at, details)])
        return row

    async def _stretches(self, session: AsyncSession, upto: int | None,
                         old_keys: Mapping[str, str]) -> tuple[list[_Stretch], list[str]]:
        """The chain cut where its key changed (its `audit.rekeyed` events), each stretch with what its hashes can be
        checked with: the last with this key; an earlier one with the old key given whose fingerprint its rekey
        recorded, plain SHA-256 if it recorded none, else None (its links only). Also the labels of old keys given
        that match no stretch."""
        rekeys = [AuditEvent.action == REKEYED] + ([AuditEvent.seq <= upto] if upto is not None else [])
        try:
            rows = [(seq, details) for seq, details in (await session.execute(
                select(AuditEvent.seq, AuditEvent.details).where(*rekeys).order_by(AuditEvent.seq))).all()]
        except _UNREADABLE:  # a damaged rekey: where the key changed is still known; the walk names the damage
            rows = [(seq, None) for seq in (await session.execute(
                select(AuditEvent.seq).where(*rekeys).order_by(AuditEvent.seq))).scalars()]
        if not rows:
            return [_Stretch(1, self, self.fingerprint)], list(old_keys)
        keys: dict[str | None, tuple[AuditLog, str | None]] = {None: (AuditLog(None), None)}
        if self.keyed:  # (a key changed back to one used before)
            keys[self.fingerprint] = (self, "audit.hmac_key")
        for label, key in old_keys.items():
            keys[key_fingerprint(key)] = (AuditLog(key), label)
        firsts = [1] + [seq for seq, _ in rows]
        prints = [_recorded(rows[0][1], "old_key")] + [_recorded(details, "new_key") for _, details in rows]
        stretches = []
        for first, fingerprint in zip(firsts[:-1], prints[:-1]):
            log, label = keys.get(fingerprint, (None, None)) if fingerprint is not _UNSET else (None, None)
            stretches.append(_Stretch(first, log, fingerprint, label))
        stretches.append(_Stretch(firsts[-1], self, prints[-1]))
        used = {s.given for s in stretches}
        return stretches, [label for label in old_keys if label not in used]

    async def verify(self, session: AsyncSession, batch: int = 2000,
                     old_keys: Mapping[str, str] | None = None) -> Verdict:
        """Walk the chain in order; name the first event that does not fit (or cannot even be read).

        Where the key changed (`audit.rekeyed`), the events before are checked with the old key given in
        `old_keys` (label: key) whose fingerprint the rekey recorded, as plain SHA-256 if they were written without
        a key, or else only for their links (counted in `unchecked`, said in `notes`).

        The chain is checked up to the head as it was when the walk began: a running bot appends meanwhile, and
        each batch is read in a statement of its own (PostgreSQL's READ COMMITTED sees what committed since), so
        a head read after the walk said "the newest events were deleted" of a busy chain. Events past that head
        are newer, unless the head still names it at the end: then they were added around the bot."""
        head = (await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))).one_or_none()
        walk = _Walk(upto=head.seq if head is not None else None)
        walk.stretches, unmatched = await self._stretches(session, walk.upto, old_keys or {})
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
        twice = await _key_stored_twice(session, batch, walk.upto)
        if twice is not None:
            return Verdict(False, checked, prev, twice)
        outside = (await session.execute(select(func.min(AuditEvent.seq)))).scalar()
        if outside is not None and outside < 1:  # (the walk starts at #1: such a row is in no chain, yet a reader sees it)
            return Verdict(False, checked, prev, f"audit event #{outside} is numbered before the chain's first (#1): "
                           "it was added around the bot")
        odd = await _time_not_as_written(session, walk.upto)
        if odd is not None:
            return Verdict(False, checked, prev, odd)
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
        return Verdict(True, checked, prev, unchecked=walk.unchecked, notes=_notes(walk.stretches, checked, unmatched))

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
            stretches = walk.stretches
            while walk.at + 1 < len(stretches) and stretches[walk.at + 1].first <= event.seq:
                walk.at += 1
                if walk.at > 1 and _recorded(event.details, "old_key") != stretches[walk.at - 1].fingerprint:
                    # (each change records the key before it: the change before said otherwise)
                    return Verdict(False, walk.checked, walk.prev, f"{where}: the key it changes from is not the "
                                   f"one the change at event #{stretches[walk.at - 1].first} changed to; one of the "
                                   "two was modified or inserted")
            log = stretches[walk.at].log
            if log is None:  # written with an earlier key that is not in hand: its link is all that can be checked
                walk.unchecked += 1
            elif log.digest(event.prev_hash, event) != event.hash:
                why = "the event was modified (or the audit key is not the one it was written with)"
                if event.action == REKEYED and _recorded(event.details, "new_key") is not _UNSET:
                    why = (f"the event was modified, or the key it was checked with ({said_key(log.fingerprint)}) is "
                           f"not the one the chain changed to here ({said_key(_recorded(event.details, 'new_key'))})")
                wrong = (await self._wrong_key(session, batch, walk, event) if log is self
                         and event.seq == stretches[walk.at].first else None)
                return Verdict(False, walk.checked, walk.prev, f"{where}: its hash does not match its contents; {why}",
                               wrong_key=wrong[0] if wrong else None, key_unproven=bool(wrong and not wrong[1]))
            walk.prev, walk.last, walk.checked = event.hash, event.seq, walk.checked + 1
        return None

    async def _wrong_key(self, session: AsyncSession, batch: int, walk: _Walk, first: AuditEvent
                         ) -> tuple[str, bool] | None:
        """`first`, the first event hashed with the chain's current key (its first event, or its newest change of
        key), does not verify with this key: why this key may not be the chain's, if none of the events from there
        verifies with it either (a cron job's environment without the key's variable looks like that), said with
        what to set, and whether that is proven (see Verdict.key_unproven); None if one does (then `first` was
        modified)."""
        count = 0
        async for event in _events(session, batch, after=first.seq - 1, upto=walk.upto, damaged=True):
            if isinstance(event, Damaged):
                continue
            if self.digest(event.prev_hash, event) == event.hash:
                return None
            count += 1
        if not count:
            return None
        here = (f"this audit.hmac_key (fingerprint {self.fingerprint})" if self.keyed else "no audit.hmac_key is set "
                "here (is the environment variable it reads set where this runs?)")
        changed_to = _recorded(first.details, "new_key") if first.action == REKEYED else _UNSET
        if first.seq > 1 and changed_to is not _UNSET:
            if changed_to == self.fingerprint:  # the key the chain changed to: its events were modified
                return None
            return (f"the chain was rekeyed to {f'another key (fingerprint {changed_to})' if changed_to else 'no key'}"
                    f" at event #{first.seq} by `chatops audit rekey`, and {here}: none of the {count} event(s) "
                    f"from #{first.seq} on verifies with it. Set audit.hmac_key to "
                    + ("that key" if changed_to else "nothing (leave it unset)") + " and run this again"), True
        events = f"none of its {count} event(s)" if first.seq == 1 else f"none of the {count} from #{first.seq} on"
        if not self.keyed:
            return (f"{events} verifies without a key: the chain was written with a key, and {here}, or every one "
                    "of them was modified. Set audit.hmac_key to the key the chain was written with (the bot's) and "
                    "run this again"), False
        if AuditLog(None).digest(first.prev_hash, first) == first.hash:
            return (f"the chain was written without a key, and audit.hmac_key is set here (fingerprint "
                    f"{self.fingerprint}): {events} verifies with it. Leave audit.hmac_key unset, as it is where the "
                    "chain was written, and run this again (a key is introduced on purpose with `chatops audit "
                    "rekey --from-no-key`)"), True
        return (f"{events} verifies with {here}: the chain was written with another key, or every one of them was "
                "modified. If the key is not the bot's, set audit.hmac_key to the key the chain was written with and "
                "run this again"), False

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
    stretches: list[_Stretch] = field(default_factory=list)  # the chain cut where its key changed
    at: int = 0  # the stretch of the last event checked
    unchecked: int = 0  # events whose links were checked but not their hashes (their key is not in hand)


@dataclass
class _Stretch:
    """Events written with one key: from `first` to the next stretch's first (or the end)."""

    first: int
    log: AuditLog | None  # what their hashes are checked with; None: only their links
    fingerprint: Any  # of their key, as the rekey recorded it (None: no key; _UNSET: not recorded)
    given: str | None = None  # the label of the old key they are checked with


def _recorded(details: Any, name: str) -> Any:
    """A key's fingerprint as an `audit.rekeyed` event's details record it: hex, None (no key), or _UNSET."""
    value = details.get(name, _UNSET) if isinstance(details, dict) else _UNSET
    return value if value is None or value is _UNSET or isinstance(value, str) else _UNSET


def _notes(stretches: list[_Stretch], checked: int, unmatched: list[str]) -> tuple[str, ...]:
    """How each stretch of a chain whose key changed was checked, in words."""
    notes = []
    for stretch, after in zip(stretches, stretches[1:]):
        last = min(after.first - 1, checked)
        if last < stretch.first:
            continue
        which = f"event #{stretch.first}" if last == stretch.first else f"events #{stretch.first}-#{last}"
        if stretch.log is not None and stretch.fingerprint is None:
            notes.append(f"{which}, written without a key before one was introduced at event #{after.first}: "
                         "checked as plain SHA-256 (evident of accidents, not of deliberate edits)")
        elif stretch.log is not None:
            notes.append(f"{which}, written with the earlier key {stretch.fingerprint} (fingerprint), given in "
                         f"{stretch.given}: checked fully")
        elif stretch.fingerprint is _UNSET:
            notes.append(f"{which}, written before the key changed at event #{after.first} with a key it does not "
                         "record: checked only for continuity (each event links to the one before it), not their "
                         "contents")
        else:
            notes.append(f"{which}, written with the earlier key {stretch.fingerprint} (fingerprint), not given: "
                         "checked only for continuity (each event links to the one before it), not their contents; "
                         "give that key with --old-key-env VAR to check them fully")
    if len(stretches) > 1 and stretches[-1].first <= checked:
        first = stretches[-1].first
        notes.append(f"event{'s' if checked > first else ''} #{first}" + (f"-#{checked}" if checked > first else "")
                     + f", since the key changed at event #{first} (audit.rekeyed): checked fully with "
                     f"{said_key(stretches[-1].log.fingerprint if stretches[-1].log else None)}")
    notes += [f"the key in {label} is not one this chain records: it checked nothing" for label in unmatched]
    return tuple(notes)


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


class _Twice(ValueError):
    pass


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(key)
        seen[key] = value
    return seen


# How the bot writes an event's time in SQLite (storage/rows.py, SQLAlchemy's DateTime): one text, compared as text
_STORED_TIME = "[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]"


async def _time_not_as_written(session: AsyncSession, upto: int | None) -> str | None:
    """SQLite: an event whose time is not stored as the bot writes it, said; None if none. The walk decodes it to
    the same instant and the hash holds, but queries compare the text (the report's first acknowledgement, the
    export's --since): `2026-11-24T04:07:00` sorts after `2026-11-24 05:00:00.000000`."""
    if session.bind.dialect.name != "sqlite":  # (a timestamp column: compared as times)
        return None
    query = select(AuditEvent.seq, cast(AuditEvent.at, Text)).where(
        cast(AuditEvent.at, Text).op("NOT GLOB")(_STORED_TIME)).order_by(AuditEvent.seq).limit(1)
    if upto is not None:
        query = query.where(AuditEvent.seq <= upto)
    row = (await session.execute(query)).first()
    if row is None:
        return None
    return (f"audit event #{row[0]}: its time is stored as {str(row[1])[:40]!r}, not as the bot writes it "
            "('YYYY-MM-DD HH:MM:SS.ffffff'), so the report and the export, which compare the stored text, would place "
            "it elsewhere: the row was modified")


async def _key_stored_twice(session: AsyncSession, batch: int, upto: int | None) -> str | None:
    """An event whose stored details hold a key twice, said; None if none does. The hash covers the details as
    read, where the last of the two wins, while another reader of the row (SQLite's json_extract, a person) may
    take the first: an edit that adds `"to": "resolved"` after `"to": "acknowledged"` verified. The bot writes
    details with json.dumps: a row whose text is its value written again is as written, and a decoded value holds
    each key once (a fast look); only another one (reformatted, or edited) is read key by key."""
    text = cast(AuditEvent.details, Text)  # (the column as stored, not decoded: asyncpg decodes a json column itself)
    last = 0
    while True:
        query = select(AuditEvent.seq, text).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        if upto is not None:
            query = query.where(AuditEvent.seq <= upto)
        rows = (await session.execute(query)).all()
        if not rows:
            return None
        for seq, stored in rows:
            try:
                if not isinstance(stored, str) or stored == _dumps(json.loads(stored)):
                    continue
                json.loads(stored, object_pairs_hook=_no_key_twice)
            except _Twice as twice:
                return (f"audit event #{seq}: its stored details hold the key {twice.args[0]!r} twice, so readers "
                        "may disagree on its value: the row was modified")
            except ValueError:  # (not JSON: the walk names such a row first)
                continue
        last = rows[-1][0]


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
