"""Requests already taken, shared by the replicas of one PostgreSQL store: a replay is refused at every replica.

Each process remembers the requests it took (bot.auth.ReplayGuard for signatures, the adapters' recent event
and update ids). On SQLite that is the whole story: one bot serves a store (`chatops serve` locks it). Replicas
sharing PostgreSQL each remember only their own, so a signed request captured on its way and sent again to
another replica inside its window was taken twice there. On PostgreSQL each request is also claimed in
`seen_requests`, one row per (scope, key) until its window ends: the first claim wins; a claim whose window has
ended may be taken again; a job deletes the expired rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert

from bot.clock import Clock
from storage.db import Database
from storage.models import SeenRequest

log = logging.getLogger("chatops.replays")
SEEN = SeenRequest.__table__
CLAIM_WAIT = 1.0  # seconds a claim may take before the request goes on without it


def _claim(scope: str, windows: Mapping[str, datetime], now: datetime):  # type: ignore[no-untyped-def]
    """INSERT the claims (key -> until when); a key already claimed is taken over only if its window ended.
    RETURNING the keys won.

    In the order of the keys: two transactions claiming some of the same keys wait for each other in one order,
    never in a cycle."""
    rows = [{"scope": scope, "key": key, "expires_at": windows[key]} for key in sorted(windows)]
    statement = pg_insert(SEEN).values(rows)
    return statement.on_conflict_do_update(
        index_elements=[SEEN.c.scope, SEEN.c.key], set_={"expires_at": statement.excluded.expires_at},
        where=SEEN.c.expires_at <= now).returning(SEEN.c.key)


def claim_in(conn: Connection, scope: str, windows: Mapping[str, datetime], now: datetime) -> set[str]:
    """Claim the keys of `windows` (key -> until when) inside the caller's PostgreSQL transaction, in one statement:
    the keys it won (the others were taken by a request committed before, here or at another replica). A claim
    still uncommitted elsewhere is waited for. The claims commit, or roll back, with the caller's transaction: a
    request that fails is not taken."""
    if not windows:
        return set()
    return set(conn.execute(_claim(scope, windows, now)).scalars())


class SharedReplays:
    """`claim(scope, key, window)` for the adapters, and `purge()` for the periodic job. Only on PostgreSQL; on
    SQLite every claim is granted (the process's own memory is the guard there)."""

    def __init__(self, db: Database, clock: Clock):
        self.db, self.clock = db, clock

    @property
    def shared(self) -> bool:
        return self.db.is_postgres

    async def claim(self, scope: str, key: str, window: timedelta) -> bool:
        """True if this request is ours to handle: nobody claimed it, or their window ended. False: another
        replica (or this one) already took it. With the store unreachable, or slower than CLAIM_WAIT (Slack wants
        its answer within 3 s), it says True and logs: the process's own guard still stands."""
        if not self.shared:
            return True
        try:
            return await asyncio.wait_for(self._claim(scope, key, window), CLAIM_WAIT)
        except Exception as exc:  # TimeoutError too
            log.warning("replays: cannot record a %s request as taken (%s); only this replica will refuse a copy",
                        scope, str(exc) or type(exc).__name__)
            return True

    async def _claim(self, scope: str, key: str, window: timedelta) -> bool:
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            return (await conn.execute(_claim(scope, {key: now + window}, now))).first() is not None

    async def purge(self) -> None:
        """Delete the claims whose window ended (the periodic job)."""
        if not self.shared:
            return
        async with self.db.engine.begin() as conn:
            result = await conn.execute(SEEN.delete().where(SEEN.c.expires_at <= self.clock.now()))
        if result.rowcount:
            log.debug("replays: %d claim(s) past their window deleted", result.rowcount)
