"""Requests already taken, shared by the replicas of one PostgreSQL store: a replay is refused at every replica.

Each process remembers the requests it took (bot.auth.ReplayGuard for signatures, the adapters' recent event
and update ids). On SQLite that is the whole story: one bot serves a store (`chatops serve` locks it). Replicas
sharing PostgreSQL each remember only their own, so a signed request captured on its way and sent again to
another replica inside its window was taken twice there. On PostgreSQL each request is also claimed in
`seen_requests`, one row per (scope, key) until its window ends: the first claim wins; a claim whose window has
ended may be taken again; a job deletes the expired rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert

from bot.clock import Clock
from storage.db import Database
from storage.models import SeenRequest

log = logging.getLogger("chatops.replays")
SEEN = SeenRequest.__table__


def _claim(scope: str, keys: Iterable[str], now: datetime, until: datetime):  # type: ignore[no-untyped-def]
    """INSERT the claims; a key already claimed is taken over only if its window ended. RETURNING the keys won.

    Sorted: two transactions claiming some of the same keys wait for each other in one order, never in a cycle."""
    rows = [{"scope": scope, "key": key, "expires_at": until} for key in sorted(set(keys))]
    statement = pg_insert(SEEN).values(rows)
    return statement.on_conflict_do_update(
        index_elements=[SEEN.c.scope, SEEN.c.key], set_={"expires_at": statement.excluded.expires_at},
        where=SEEN.c.expires_at <= now).returning(SEEN.c.key)


def claim_in(conn: Connection, scope: str, keys: Iterable[str], now: datetime, until: datetime) -> set[str]:
    """Claim `keys` inside the caller's PostgreSQL transaction, for `until`: the keys it won (the others were taken
    by a request committed before, here or at another replica). A claim still uncommitted elsewhere is waited
    for. The claims commit, or roll back, with the caller's transaction: a request that fails is not taken."""
    keys = list(keys)
    if not keys:
        return set()
    return set(conn.execute(_claim(scope, keys, now, until)).scalars())


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
        replica (or this one) already took it. With the store unreachable it says True and logs: the process's own
        guard still stands, and the request would fail on the store anyway."""
        if not self.shared:
            return True
        now = self.clock.now()
        try:
            async with self.db.engine.begin() as conn:
                won = (await conn.execute(_claim(scope, [key], now, now + window))).first()
        except Exception as exc:
            log.warning("replays: cannot record a %s request as taken (%s); only this replica will refuse a copy",
                        scope, exc)
            return True
        return won is not None

    async def purge(self) -> int:
        """Delete the claims whose window ended; how many."""
        if not self.shared:
            return 0
        async with self.db.engine.begin() as conn:
            result = await conn.execute(SEEN.delete().where(SEEN.c.expires_at <= self.clock.now()))
        return result.rowcount or 0
