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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import select

from bot.model import Actor
from storage.models import AuditEvent, AuditHead
from storage.rows import Rows

_EVENTS = AuditEvent.__table__
_HEAD = AuditHead.__table__
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()


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
    body = {
        "seq": seq,
        "at": at.isoformat(timespec="microseconds"),
        "actor": [actor_person, actor_platform, actor_user_id],
        "action": action,
        "subject": [subject_type, subject_id],
        "incident_id": incident_id,
        "details": details,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


class AuditLog:
    def __init__(self, hmac_key: str | None):
        self._key = hmac_key.encode() if hmac_key else None

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def digest(self, prev_hash: str, event: AuditEvent) -> str:
        return self._digest(prev_hash.encode() + canonical(event))

    def _digest(self, data: bytes) -> str:
        if self._key:
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    async def append(self, session: AsyncSession | AsyncConnection, entry: Entry) -> AuditEvent:
        return AuditEvent(**(await self.append_many(session, [entry]))[0])

    async def append_many(self, session: AsyncSession | AsyncConnection, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Extend the chain inside the caller's transaction; commit is the caller's. Returns the rows written."""
        return await session.run_sync(self.append_rows, entries)

    def append_rows(self, conn: Connection | Session, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """The synchronous form, for work already running in a transaction (see Database.run_transaction).

        Core statements (one executemany), not ORM objects: intake appends
        thousands of events a second through here.
        """
        if not entries:
            return []
        if isinstance(conn, Session):
            conn = conn.connection()
        seq, prev = conn.execute(_HEAD_FOR_UPDATE).one()
        rows = []
        for entry in entries:
            seq += 1
            actor = entry.actor
            at = entry.at.astimezone(UTC)
            details = json.loads(json.dumps(entry.details or {}, default=str))  # exactly what the JSON column keeps
            subject_id = str(entry.subject_id)
            digest = self._digest(prev.encode() + canonical_fields(
                seq, at, actor.person_id, actor.platform, actor.user_id, entry.action, entry.subject_type,
                subject_id, entry.incident_id, details))
            rows.append({"seq": seq, "at": at, "actor_person": actor.person_id, "actor_platform": actor.platform,
                         "actor_user_id": actor.user_id, "action": entry.action, "subject_type": entry.subject_type,
                         "subject_id": subject_id, "incident_id": entry.incident_id, "details": details,
                         "prev_hash": prev, "hash": digest})
            prev = digest
        Rows(conn).insert(_EVENTS, rows)
        conn.execute(_HEAD.update().where(_HEAD.c.id == 1).values(seq=seq, hash=prev))
        return rows

    async def verify(self, session: AsyncSession, batch: int = 2000) -> Verdict:
        """Walk the chain in order; name the first event that does not fit."""
        expected_seq, prev, checked = 1, AuditHead.GENESIS, 0
        async for event in _events(session, batch):
            where = f"audit event #{event.seq} ({event.action} at {event.at.isoformat()})"
            if event.seq != expected_seq:
                return Verdict(False, checked, prev, f"{where}: expected #{expected_seq} here; "
                               f"event #{expected_seq} was deleted or the events were renumbered")
            if event.prev_hash != prev:
                return Verdict(False, checked, prev, f"{where}: does not link to the event before it; "
                               "an event was deleted, inserted or reordered")
            if self.digest(event.prev_hash, event) != event.hash:
                return Verdict(False, checked, prev, f"{where}: its hash does not match its contents; "
                               "the event was modified (or the audit key is not the one it was written with)")
            prev, expected_seq, checked = event.hash, expected_seq + 1, checked + 1
        head = (await session.execute(select(AuditHead).where(AuditHead.id == 1))).scalar_one_or_none()
        if head is not None and (head.seq, head.hash) != (checked, prev):
            return Verdict(False, checked, prev, f"the chain ends at event #{checked} but its head says "
                           f"#{head.seq}: the newest events were deleted")
        return Verdict(True, checked, prev)

    @staticmethod
    async def events(
        session: AsyncSession, *, since: datetime | None = None, incident_id: int | None = None, batch: int = 2000
    ) -> AsyncIterator[AuditEvent]:
        async for event in _events(session, batch, since=since, incident_id=incident_id):
            yield event


async def _events(
    session: AsyncSession, batch: int, *, since: datetime | None = None, incident_id: int | None = None
) -> AsyncIterator[AuditEvent]:
    last = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if incident_id is not None:
            query = query.where(AuditEvent.incident_id == incident_id)
        rows = (await session.execute(query)).scalars().all()
        if not rows:
            return
        for row in rows:
            yield row
        last = rows[-1].seq
        session.expunge_all()
