"""Durable timers: rows with a due time, claimed by the tick (handlers/timers.py) and run exactly once.

Claiming is a short transaction that gives due rows a lease (`claimed_by`,
`lease_until`): `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so several
replicas never take one row; on SQLite the database lock does it. Each claimed
timer then runs in a transaction of its own, which marks it done only while
this replica still holds its lease: the effect and the completion commit
together, or neither does. A replica that dies holding leases loses them when
they expire, and another runs those timers then.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Timer

TIMERS = Timer.__table__
PENDING, DONE, CANCELLED, FAILED = "pending", "done", "cancelled", "failed"


def timer_row(kind: str, subject: str | int, due_at: datetime, now: datetime, *,
              payload: Mapping[str, Any] | None = None, key: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "subject": str(subject), "key": key, "due_at": due_at, "payload": dict(payload or {}),
            "status": PENDING, "attempt": 0, "claimed_by": None, "lease_until": None, "created_at": now,
            "fired_at": None, "last_error": None}


async def schedule(session: AsyncSession, kind: str, subject: str | int, due_at: datetime, now: datetime, *,
                   payload: Mapping[str, Any] | None = None, key: str | None = None) -> int | None:
    """Add a timer in the caller's transaction; its id. With `key`, nothing happens (None) when one exists."""
    row = timer_row(kind, subject, due_at, now, payload=payload, key=key)
    if key is None:
        return (await session.execute(TIMERS.insert().values(row).returning(TIMERS.c.id))).scalar_one()
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    statement = insert(TIMERS).values(row).on_conflict_do_nothing(index_elements=["key"]).returning(TIMERS.c.id)
    return (await session.execute(statement)).scalar_one_or_none()


def schedule_many(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Add timers (rows from `timer_row`) on a synchronous connection, in its transaction; their ids in order."""
    return [conn.execute(TIMERS.insert().values(row).returning(TIMERS.c.id)).scalar_one() for row in rows]


def schedule_unique(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Add timers that have a `key` on a synchronous connection, in its transaction; one whose key exists is left
    as it is."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(insert(TIMERS).on_conflict_do_nothing(index_elements=["key"]), rows)


async def cancel(session: AsyncSession, kind: str, subject: str | int, now: datetime) -> int:
    """Cancel the pending timers of one kind for one subject; how many."""
    result = await session.execute(update(TIMERS).where(
        TIMERS.c.kind == kind, TIMERS.c.subject == str(subject), TIMERS.c.status == PENDING
    ).values(status=CANCELLED, fired_at=now))
    return int(result.rowcount or 0)


async def claim(session: AsyncSession, replica: str, now: datetime, lease: timedelta, limit: int) -> list[Timer]:
    """Lease up to `limit` due timers to `replica` (in the caller's transaction), oldest due first."""
    query = (select(TIMERS.c.id).where(TIMERS.c.status == PENDING, TIMERS.c.due_at <= now, _free(now))
             .order_by(TIMERS.c.due_at, TIMERS.c.id).limit(limit))
    if session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list((await session.execute(query)).scalars())
    if not ids:
        return []
    await session.execute(update(TIMERS).where(TIMERS.c.id.in_(ids))
                          .values(claimed_by=replica, lease_until=now + lease))
    rows = (await session.execute(select(Timer).where(Timer.id.in_(ids)).order_by(Timer.due_at, Timer.id))).scalars()
    return list(rows)


def _free(now: datetime) -> Any:
    """No replica holds a live lease on the timer at `now`."""
    return or_(TIMERS.c.lease_until.is_(None), TIMERS.c.lease_until < now)


async def complete(session: AsyncSession, timer_id: int, replica: str, now: datetime) -> bool:
    """Mark a timer done, in the transaction of its effect; False when this replica no longer holds it."""
    result = await session.execute(update(TIMERS).where(
        TIMERS.c.id == timer_id, TIMERS.c.status == PENDING, TIMERS.c.claimed_by == replica,
        TIMERS.c.lease_until >= now,
    ).values(status=DONE, fired_at=now, lease_until=None))
    return result.rowcount == 1


async def retry_later(session: AsyncSession, timer_id: int, replica: str, due_at: datetime, error: str,
                      *, give_up: bool, now: datetime, counted: bool = True) -> None:
    """A timer whose effect failed: try again at `due_at`, or mark it failed. Not `counted`: the store itself could
    not do it then (down, locked, full), which says nothing of the timer: its attempts stay as they were."""
    values: dict[str, Any] = {"attempt": TIMERS.c.attempt + (1 if counted else 0), "last_error": error[:500],
                              "lease_until": None}
    values.update({"status": FAILED, "fired_at": now} if give_up else {"due_at": due_at})
    await session.execute(update(TIMERS).where(TIMERS.c.id == timer_id, TIMERS.c.claimed_by == replica,
                                               TIMERS.c.status == PENDING).values(**values))


async def release_leases(session: AsyncSession) -> int:
    """Free every lease (at start on SQLite, where only this process can hold them); how many."""
    result = await session.execute(update(TIMERS).where(TIMERS.c.status == PENDING,
                                                        TIMERS.c.lease_until.is_not(None)).values(lease_until=None))
    return int(result.rowcount or 0)


def peek(now: datetime) -> Select[tuple[datetime | None, datetime | None]]:
    """One read (for Database.read_row): (the earliest due time of a pending timer no replica holds a live lease
    on, as a claim at `now` would see them (a leased timer is being run elsewhere, and one whose lease lapses is
    taken back by a beat); the earliest of any pending timer). The tick claims only when the first has come, and
    counts overdue timers only when the second is older than the stalled threshold."""
    return select(func.min(case((_free(now), TIMERS.c.due_at))), func.min(TIMERS.c.due_at)).where(
        TIMERS.c.status == PENDING)


async def overdue(session: AsyncSession, before: datetime) -> int:
    """Pending timers that were due before `before` (the stalled check)."""
    return int((await session.execute(select(func.count()).select_from(TIMERS).where(
        and_(TIMERS.c.status == PENDING, TIMERS.c.due_at < before)))).scalar_one())
