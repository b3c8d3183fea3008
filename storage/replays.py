"""Requests already taken, kept in the store: a replay is refused by every replica, and after a restart.

Each process remembers the requests it took (bot.auth.ReplayGuard for signatures, the adapters' recent event
and update ids), which turns most copies away without asking the store. Memory alone missed two cases: replicas
sharing PostgreSQL each remember only their own requests, and a restarted bot has forgotten them all, so a signed
request captured on its way and sent again inside its window was taken twice. So each request is also claimed in
`seen_requests`, one row per (scope, key) until its window ends: the first claim wins; a claim whose window has
ended may be taken again; a job deletes the expired rows. An alert's claim is part of its intake transaction: a
request that fails is not taken. Alerts on SQLite, where one bot serves the store, are the exception: their
signatures are only logged (`alert_signatures`, appended in the intake transaction), and the ReplayGuard starts
from that log after a restart (a claim table cost intake a fifth of its throughput there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.clock import Clock
from storage.db import Database, StoreReplaced
from storage.models import AlertSignature, SeenRequest

log = logging.getLogger("chatops.replays")
SEEN = SeenRequest.__table__
SIGNATURES = AlertSignature.__table__
CLAIM_WAIT = 1.0  # seconds a claim may take before the request goes on without it (the log says so)
PURGE_CHUNK = 5000  # logged alert signatures deleted per transaction


def _claim(dialect: str, scope: str, windows: Mapping[str, datetime], now: datetime):  # type: ignore[no-untyped-def]
    """INSERT the claims (key -> until when); a key already claimed is taken over only if its window ended.
    RETURNING the keys won.

    In the order of the keys: two transactions claiming some of the same keys wait for each other in one order,
    never in a cycle."""
    rows = [{"scope": scope, "key": key, "expires_at": windows[key]} for key in sorted(windows)]
    statement = (pg_insert if dialect == "postgresql" else sqlite_insert)(SEEN).values(rows)
    return statement.on_conflict_do_update(
        index_elements=[SEEN.c.scope, SEEN.c.key], set_={"expires_at": statement.excluded.expires_at},
        where=SEEN.c.expires_at <= now).returning(SEEN.c.key)


def claim_in(conn: Connection, scope: str, windows: Mapping[str, datetime], now: datetime) -> set[str]:
    """Claim the keys of `windows` (key -> until when) inside the caller's transaction, in one statement: the keys
    it won (the others were taken by a request committed before, here or at another replica). A claim still
    uncommitted elsewhere is waited for. The claims commit, or roll back, with the caller's transaction."""
    if not windows:
        return set()
    return set(conn.execute(_claim(conn.dialect.name, scope, windows, now)).scalars())


class SharedReplays:
    """`claim(scope, key, window)` for the adapters, and `purge()` for the periodic job."""

    def __init__(self, db: Database, clock: Clock):
        self.db, self.clock = db, clock

    async def claim(self, scope: str, key: str, window: timedelta) -> bool:
        """True if this request is ours to handle: nobody claimed it, or their window ended. False: it was taken
        already (by this replica before a restart, or by another). With the store unreachable, or slower than
        CLAIM_WAIT (Slack wants its answer within 3 s), it says True and logs: the process's own guard still
        stands, and the request would fail on the store anyway."""
        # asyncio.wait, not wait_for: a claim stuck behind SQLite's write lock cannot be cancelled until SQLite's busy
        # timeout ends, and wait_for would wait for that. It is left to finish (or fail) on its own.
        task = asyncio.ensure_future(self._claim(scope, key, window))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, even if nobody waits
        done, _ = await asyncio.wait({task}, timeout=CLAIM_WAIT)
        problem = (f"no answer within {CLAIM_WAIT:g} s" if not done else
                   None if (exc := task.exception()) is None else str(exc) or type(exc).__name__)
        if problem is not None:
            log.warning("replays: cannot record a %s request as taken (%s); only this process will refuse a copy",
                        scope, problem)
            return True
        return task.result()

    async def _claim(self, scope: str, key: str, window: timedelta) -> bool:
        now = self.clock.now()
        async with self.db.transaction() as session:
            conn = await session.connection()
            return (await conn.execute(_claim(self.db.dialect, scope, {key: now + window}, now))).first() is not None

    async def purge(self) -> None:
        """Delete the claims, and the logged alert signatures (SQLite), whose window ended (the periodic job). The
        log in chunks of PURGE_CHUNK, oldest first, each in a transaction of its own: a busy intake logs thousands
        a second, and one long delete would hold its writer back."""
        now = self.clock.now()
        try:
            self.db.check_file()
        except StoreReplaced:  # said in the log already; nothing can be deleted from a lost file
            return
        async with self.db.transaction() as session:
            claims = (await session.execute(SEEN.delete().where(SEEN.c.expires_at <= now))).rowcount or 0
        logged = 0
        while True:
            oldest = (select(SIGNATURES.c.id).where(SIGNATURES.c.expires_at <= now).order_by(SIGNATURES.c.id)
                      .limit(PURGE_CHUNK).scalar_subquery())  # rows are appended: the expired ones come first
            async with self.db.transaction() as session:
                gone = (await session.execute(SIGNATURES.delete().where(SIGNATURES.c.id.in_(oldest)))).rowcount or 0
            logged += gone
            if gone < PURGE_CHUNK:
                break
        if claims or logged:
            log.debug("replays: %d claim(s) and %d signature(s) past their window deleted", claims, logged)
