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

A click, command or event is handled after its claim commits, by whatever it stands for, in transactions of its own.
A claim for its whole window at once outlived a bot killed in between: the platform's retry was refused as a copy
for an hour, and the person's click was lost. So it is claimed for a lease first (LEASE), renewed while it is handled,
and kept for its window once handled (`begin`, `Handling`); a handling that failed before it acted gives its claim
back. A bot killed in between leaves the lease to lapse, and the platform's retry, at any replica, is then handled;
a retry that comes while another replica still handles it waits to see that one end, and is handled only if it did
not. Settled and leased claims are the same rows, told apart by how far ahead they end (SETTLED).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import TypeVar

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
LEASE = timedelta(seconds=60)  # how long a claim being handled holds past the last renewal by its handler
RENEW_EVERY = 20.0  # seconds between a handler's renewals of its lease
# A claim that holds longer than this was settled (handled): a lease never reaches this far ahead, even at a replica
# whose clock runs a little ahead. One that ends sooner is being handled, or its window is about to end.
SETTLED = 2 * LEASE
WAIT_POLL = 1.0  # seconds between a copy's looks at a claim that another replica is handling
WON, SETTLED_ELSEWHERE, BUSY = "won", "settled", "busy"  # what a claim for a lease found
T = TypeVar("T")


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
    """`begin(scope, key, window)` for the adapters (a click, command or event to handle once), and `purge()` for the
    periodic job."""

    def __init__(self, db: Database, clock: Clock):
        self.db, self.clock = db, clock

    async def begin(self, scope: str, key: str, window: timedelta) -> Handling | None:
        """A click, command or event to handle once: None if it was handled already (by this replica before a
        restart, or by another; a copy), else its `Handling`, whose `ready()` says whether to handle it. Claimed
        for a lease, so that a bot killed before it acted leaves it to be handled when the platform retries. With
        the store unreachable, or slower than CLAIM_WAIT (Slack wants its answer within 3 s), it is ours, and the
        log says so: the process's own guard still stands, and the request would fail on the store anyway."""
        state = await self._bounded(self._begin(scope, key), f"cannot record a {scope} request as taken (%s); only "
                                    "this process will refuse a copy")
        if state == SETTLED_ELSEWHERE:
            return None
        return Handling(self, scope, key, window, ours=state != BUSY)

    async def _bounded(self, work: Awaitable[T], warning: str) -> T | None:
        """`work`'s result, or None if the store failed it or took longer than CLAIM_WAIT (`warning`, with why, in
        the log)."""
        # asyncio.wait, not wait_for: a claim stuck behind SQLite's write lock cannot be cancelled until SQLite's busy
        # timeout ends, and wait_for would wait for that. It is left to finish (or fail) on its own.
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, even if nobody waits
        done, _ = await asyncio.wait({task}, timeout=CLAIM_WAIT)
        problem = (f"no answer within {CLAIM_WAIT:g} s" if not done else
                   None if (exc := task.exception()) is None else str(exc) or type(exc).__name__)
        if problem is not None:
            log.warning("replays: " + warning, problem)
            return None
        return task.result()

    async def _begin(self, scope: str, key: str) -> str:
        """Claim `key` for a lease: WON, SETTLED_ELSEWHERE, or BUSY while another replica handles it (or while its
        window is about to end)."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            conn = await session.connection()
            if (await conn.execute(_claim(self.db.dialect, scope, {key: now + LEASE}, now))).first() is not None:
                return WON
            ends = (await conn.execute(select(SEEN.c.expires_at).where(SEEN.c.scope == scope, SEEN.c.key == key))
                    ).scalar_one_or_none()
        return SETTLED_ELSEWHERE if ends is not None and ends - now > SETTLED else BUSY

    async def _renew(self, scope: str, key: str) -> None:
        """The lease of a request still being handled, LEASE from now again (a settled claim is left alone)."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            await session.execute(SEEN.update().where(SEEN.c.scope == scope, SEEN.c.key == key,
                                                      SEEN.c.expires_at <= now + LEASE).values(expires_at=now + LEASE))

    async def _settle(self, scope: str, key: str, window: timedelta) -> None:
        now = self.clock.now()
        async with self.db.transaction() as session:
            conn = await session.connection()
            statement = (pg_insert if self.db.dialect == "postgresql" else sqlite_insert)(SEEN).values(
                scope=scope, key=key, expires_at=now + window)
            await conn.execute(statement.on_conflict_do_update(
                index_elements=[SEEN.c.scope, SEEN.c.key], set_={"expires_at": statement.excluded.expires_at}))

    async def _release(self, scope: str, key: str) -> None:
        now = self.clock.now()
        async with self.db.transaction() as session:  # only a lease: one settled meanwhile elsewhere stays
            await session.execute(SEEN.delete().where(SEEN.c.scope == scope, SEEN.c.key == key,
                                                      SEEN.c.expires_at <= now + LEASE))

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


class Handling:
    """A click, command or event this replica is to handle (`SharedReplays.begin`). `ready()` first: True at once
    when its lease was won; when another replica was handling it, it waits for that one to end: False once it is
    settled there, True if its lease lapsed (its bot died) and this replica won it. Then, inside `async with`, the
    lease is renewed while the work runs; `settle()` once what it stands for is done (a copy is a replay for the
    window from then on), `release()` if it failed before it acted (a copy is handled). Leaving the block settles
    it, unless it raised (or was cancelled): then nobody knows how far it got, and the lease is left to lapse."""

    def __init__(self, replays: SharedReplays, scope: str, key: str, window: timedelta, *, ours: bool):
        self.replays, self.scope, self.key, self.window = replays, scope, key, window
        self.ours = ours
        self.released = False
        self._ended = False
        self._renewing: asyncio.Task[None] | None = None

    async def ready(self) -> bool:
        """Whether this replica handles it; waits while another replica handles it (at most its window)."""
        started = self.replays.clock.now()
        while not self.ours:
            if self.replays.clock.now() - started > self.window:
                log.warning("replays: a %s request was being handled elsewhere for longer than %s; left to it",
                            self.scope, self.window)
                return False
            await asyncio.sleep(WAIT_POLL)
            try:
                state = await self.replays._begin(self.scope, self.key)
            except Exception as exc:  # the store in trouble: look again
                log.warning("replays: cannot look at a %s request handled elsewhere (%s)", self.scope, exc)
                continue
            if state == SETTLED_ELSEWHERE:
                return False
            self.ours = state == WON
        return True

    async def __aenter__(self) -> Handling:
        if self.ours:
            self._renewing = asyncio.get_running_loop().create_task(self._renew())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop_renewing()
        if kind is None:
            await self.settle()

    async def settle(self) -> None:
        """Handled: kept for its window, so a copy is a replay."""
        if self._end():
            await self.replays._bounded(self.replays._settle(self.scope, self.key, self.window),
                                        f"cannot record a {self.scope} request as handled (%s); a copy after "
                                        f"{LEASE.total_seconds():g} s is handled again, unless this process has it")

    async def release(self) -> None:
        """Failed before it acted: a copy, here or at another replica, is handled (`released` tells the adapter
        to forget it too)."""
        if self._end():
            self.released = True
            await self.replays._bounded(self.replays._release(self.scope, self.key),
                                        f"cannot give back the claim of a failed {self.scope} request (%s); a copy "
                                        f"at another replica is handled after {LEASE.total_seconds():g} s")

    def _end(self) -> bool:
        """Whether this call ends the claim: the first settle or release of one this replica won."""
        if self._ended or not self.ours:
            return False
        self._ended = True
        self._stop_renewing()
        return True

    def _stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self.replays._renew(self.scope, self.key)
            except Exception as exc:  # the next renewal may get through before the lease lapses
                log.warning("replays: cannot renew the lease of a %s request being handled (%s)", self.scope, exc)
