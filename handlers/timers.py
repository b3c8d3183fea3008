"""The timer tick: APScheduler beats it, each beat runs every due timer exactly once (storage/timers.py).

A handler is registered per kind and gets the session of the timer's own
transaction: what it writes and the timer's completion commit together. A
handler that raises is retried with back-off and, after `max_attempts`, marked
failed (and logged). Nothing is dropped for being late: APScheduler only beats
(`misfire_grace_time=None`, coalesced); the due times live in the database, so
timers that fell due while the bot was down run at the first beat after start.

Between beats the tick sleeps until the next due time when that is sooner,
and `nudge()` runs a beat at once (after a change that queued a timer due now).
Timers overdue by more than `STALLED_AFTER` are counted in
`chatops_timers_overdue` and logged: the stalled-escalation check. A handler
can ask `lateness()` why its timer runs late (the bot was not running, its
rounds were failing), to say so where people read it; a beat that ran timers
which fell due before the bot started logs how many, of which kinds.

APScheduler plans its beats by the wall clock, and a wall clock stepped back (an hour, by NTP or a VM's
resume) left the beat, and every periodic job, waiting for that hour to pass again, and the timers with it.
A watch on the monotonic clock (`_watch_clock`) notices a step either way: after one back, every job is
planned again from the new time, and is logged; after one forward, a timer that fell due in the skipped
time says so (`lateness`), rather than "the bot was running behind".
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import Clock
from bot.metrics import Metrics
from bot.view import span
from storage import timers as store
from storage.db import Database, StoreReplaced, busy_store, explain_failure, store_unavailable
from storage.models import Timer

log = logging.getLogger("chatops.timers")
TimerHandler = Callable[[AsyncSession, Timer, datetime], Awaitable[None]]
STALLED_AFTER = timedelta(minutes=1)
LATE_AFTER = timedelta(minutes=1)  # a timer later than this is late; under it, the tick's own jitter
CLOCK_CHECK_EVERY = 1.0  # seconds (monotonic) between looks at the wall clock
CLOCK_STEP = 2.0  # seconds: the wall clock moving this much more, or less, than the monotonic one was stepped


def replica_name() -> str:
    """Who claims timers: host, process and a random part (a restarted process is another replica)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class TimerService:
    def __init__(self, *, db: Database, clock: Clock, metrics: Metrics, interval: float = 0.5, batch: int = 200,
                 lease: timedelta = timedelta(seconds=30), max_attempts: int = 5,
                 after_commit: Callable[[], None] | None = None, wall: Callable[[], float] = time.time):
        self.db, self.clock, self.metrics = db, clock, metrics
        self.wall = wall  # the clock APScheduler plans by (tests step it)
        self._clock_seen: tuple[float, float] | None = None  # (wall, monotonic) at start, or when a step was dealt with
        self._clock_watch: asyncio.TimerHandle | None = None
        self._skipped: list[tuple[float, float]] = []  # wall-clock spans a step forward skipped (the last few)
        self.interval, self.batch, self.lease, self.max_attempts = interval, batch, lease, max_attempts
        self.after_commit = after_commit  # e.g. wake the outbox worker when a timer queued chat work
        self.replica = replica_name()
        self.handlers: dict[str, TimerHandler] = {}
        self._scheduler: AsyncIOScheduler | None = None
        self._lock = asyncio.Lock()
        self._failing = False  # the beats have failed since the last one that worked
        self._failure_said: tuple[float, str] | None = None  # when the log last said a beat failed, and what failed
        self._unsaid = 0  # failures since that line
        self._again = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticks: set[asyncio.Task[None]] = set()  # beats a nudge started, not done yet (see settled)
        self._wakeup: asyncio.TimerHandle | None = None
        self._claimed_at: datetime | None = None  # the `now` of the last claim
        self._peeked_at = clock.now()  # the `now` of the last peek
        self._stalled_logged = 0.0
        self._running = False
        self.started_at = clock.now()  # timers due before this fell due while the bot was not running
        self._failed_at: datetime | None = None  # the `now` of the last round that failed
        self._overdue: dict[str, int] = {}  # kind -> timers due before the start run since the last log of them
        self._overdue_most = timedelta(0)  # the latest of those
        self._jobs: list[tuple[Callable[[], Awaitable[None]], float, str]] = []

    def handler(self, kind: str) -> Callable[[TimerHandler], TimerHandler]:
        def register(fn: TimerHandler) -> TimerHandler:
            self.handlers[kind] = fn
            return fn
        return register

    def add_job(self, fn: Callable[[], Awaitable[None]], *, seconds: float, name: str) -> None:
        """A periodic job beside the tick (e.g. planning handoff notices): at start, then every `seconds`."""
        self._jobs.append((fn, seconds, name))
        if self._scheduler is not None:
            self._start_job(fn, seconds, name)

    def _start_job(self, fn: Callable[[], Awaitable[None]], seconds: float, name: str) -> None:
        assert self._scheduler is not None
        self._scheduler.add_job(self._guarded(fn, name), "interval", seconds=seconds, id=name, name=name,
                                max_instances=1)
        self._spawn(self._guarded(fn, name)())

    @staticmethod
    def _guarded(fn: Callable[[], Awaitable[None]], name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await fn()
            except asyncio.CancelledError:  # the bot stopping (APScheduler cancels what runs): no fault, no traceback
                log.info("job %s was cut off by the bot's stop; it runs again after the next start", name)
            except Exception as exc:  # a failing job logs and runs again at its next beat
                busy = busy_store(exc)
                if busy is not None:  # expected now and then (another writer held the store): a line, no traceback
                    log.warning("job %s found the store busy (%s); it runs again at its next beat", name, busy)
                else:
                    log.exception("job %s failed; it runs again at its next beat", name)
        return run

    async def start(self) -> None:
        if not self.db.is_postgres:  # one replica on SQLite: leases still held were this process's before a restart
            async with self.db.transaction() as session:
                freed = await store.release_leases(session)
            if freed:
                log.info("took back %d timer lease(s) held when the bot last stopped", freed)
        self._running = True
        self.started_at = self.clock.now()
        self._scheduler = AsyncIOScheduler(job_defaults={"misfire_grace_time": None, "coalesce": True})
        self._scheduler.add_job(self._beat, "interval", seconds=self.interval, id="timer-tick", max_instances=1)
        self._scheduler.start()
        for fn, seconds, name in self._jobs:
            self._start_job(fn, seconds, name)
        self._clock_seen = None
        self._watch_clock()
        self.nudge()

    def _watch_clock(self) -> None:
        """Every CLOCK_CHECK_EVERY seconds (and at each beat: see tick), has the wall clock been stepped since the
        last look? (A loop held up moves both clocks alike; a suspended machine's wall clock moves alone, which reads
        as a step forward.)"""
        try:
            self._look_at_clock()
        finally:
            if self._running:
                self._clock_watch = asyncio.get_running_loop().call_later(CLOCK_CHECK_EVERY, self._watch_clock)

    def _look_at_clock(self) -> None:
        """Against the clocks as they were when the last step was dealt with (or at start), not at the last look:
        steps each under CLOCK_STEP add up (1.5 s back every second held the beat back without a word)."""
        wall, mono = self.wall(), time.monotonic()
        if self._clock_seen is None:
            self._clock_seen = (wall, mono)
            return
        step = (wall - self._clock_seen[0]) - (mono - self._clock_seen[1])
        if step <= -CLOCK_STEP:
            self._stepped_back(-step)
        elif step >= CLOCK_STEP:
            self._skipped = [*self._skipped[-9:], (wall - step, wall)]
            log.warning("the system clock jumped forward by %s (or the machine was suspended); timers due in "
                        "that time run now, late", span(timedelta(seconds=round(step))))
        else:
            return
        self._clock_seen = (wall, mono)

    def _stepped_back(self, by: float) -> None:
        """Every APScheduler job planned `by` seconds earlier, by the wall clock's new time, as it was due by the old
        one (a job planned every 10 min still runs 10 min after its last run, not at once). Timers keep the due times
        they were given: a wall clock an hour back runs them an hour late."""
        if self._scheduler is None:
            return
        for job in self._scheduler.get_jobs():
            if job.next_run_time is not None:
                job.modify(next_run_time=job.next_run_time - timedelta(seconds=by))
        log.warning("the system clock went back by %s; the timer beat and the periodic jobs were planned again from "
                    "the new time (timers due meanwhile run at their own due times, by the new clock)",
                    span(timedelta(seconds=round(by))))

    async def stop(self) -> None:
        self._running = False
        if self._clock_watch is not None:
            self._clock_watch.cancel()
            self._clock_watch = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _beat(self) -> None:  # a coroutine, so APScheduler runs it on the event loop (not in a thread)
        self.nudge()

    def nudge(self) -> None:
        """Run a beat now (or right after the one running)."""
        if not self._running:
            return
        if self._lock.locked():
            self._again = True
            return
        tick = self._spawn(self.tick())
        self._ticks.add(tick)
        tick.add_done_callback(self._ticks.discard)

    async def settled(self, timeout: float = 2.0) -> None:
        """Once the beat a nudge asked for has run (at most `timeout` seconds): what a click made due now, such as the
        step an Escalate asked for, has fired, and a card drawn after this shows it."""
        async def quiet() -> None:
            if self._ticks:
                await asyncio.wait(list(self._ticks))
            if self._lock.locked():  # a beat that took the nudge (it runs another round for it)
                async with self._lock:
                    pass

        try:
            await asyncio.wait_for(quiet(), timeout)
        except asyncio.TimeoutError:
            pass

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def tick(self) -> int:
        """Run what is due now; returns how many timers fired.

        A beat first peeks (one read): with nothing due it neither claims (a write transaction) nor counts
        overdue timers, and plans the next wakeup from what it read. An idle bot pays one query a beat. Nothing
        while the SQLite file is lost (Database.check_file says why, once): what a timer did could not be recorded."""
        try:
            self.db.check_file()
        except StoreReplaced:
            return 0
        if self._running:  # (a step forward is known before the timers it skipped run, for `lateness`)
            self._look_at_clock()
        fired = 0
        async with self._lock:
            self._again = False
            try:
                peeked: tuple[datetime | None, datetime | None] | None = await self._peek()
                self._failing = False  # (the store answered)
            except Exception:  # e.g. the database went away: claim anyway, which says what is wrong
                peeked = None
            # A nudge during the peek (a commit it may not have seen) claims anyway.
            if peeked is None or self._again or (peeked[0] is not None and peeked[0] <= self._peeked_at):
                while True:
                    self._again = False
                    try:
                        n, full = await self._round()
                    except Exception as exc:  # the beat must outlive any one bad round; the timers stay pending
                        self._failed_at = self.clock.now()
                        self._said_failure(exc, "timer tick failed; retrying at the next beat")
                        break
                    self._failing = False
                    fired += n
                    if not (full or self._again) or not self._running:
                        break
                peeked = None  # what was read before the round is stale
                self._said_overdue()
            try:
                await self._plan_wakeup(peeked)
            except Exception as exc:  # e.g. the database went away: the next beat plans again
                self._said_failure(exc, "timer tick: cannot plan the next wakeup; the next beat will")
        return fired

    def lateness(self, due_at: datetime, now: datetime) -> str | None:
        """Why a timer due at `due_at` runs only at `now`, in words, when it is more than LATE_AFTER late (else
        None): it fell due before the bot (this process) started, or while its rounds were failing, or the bot
        was behind (a slow database, a long backlog)."""
        if now - due_at <= LATE_AFTER:
            return None
        if due_at < self.started_at:
            return "the bot was not running"
        if self._failed_at is not None and self._failed_at >= due_at:
            return "the bot could not run its timers (its log says why)"
        stamp = due_at.timestamp()
        if any(start <= stamp <= end for start, end in self._skipped):
            return "the system clock jumped forward past it"
        return "the bot was running behind"

    def _said_overdue(self) -> None:
        """Log the timers that fell due before the bot started and ran in this beat: how many, of which kinds (an
        escalation step among them paged late, and its thread says so)."""
        if not self._overdue:
            return
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self._overdue.items()))
        log.warning("ran %d timer(s) that fell due while the bot was not running (%s), up to %s late",
                    sum(self._overdue.values()), kinds, span(self._overdue_most))
        self._overdue, self._overdue_most = {}, timedelta(0)

    def _said_failure(self, exc: Exception, what: str) -> None:
        """Log a failing beat: at most one line a minute, however the beats fail (a database down for a minute logged
        a traceback every beat, twice a second: the round's failure and the next wakeup's took turns), saying how many
        failed since the line before; the traceback when the failure is not the one the last line said (a new fault
        shows whole), else "still failing" (or "failing again" after beats that worked). A store busy for a moment
        (another writer held it) is expected now and then: a warning line, no traceback (as _guarded's jobs)."""
        now = time.monotonic()
        said, self._unsaid = self._failure_said, self._unsaid + 1
        if said is not None and now - said[0] < 60:
            return  # (counted)
        kind = explain_failure(exc, self.db.wait)[:300]
        more = (f"; {self._unsaid - 1} more failure(s) since the last line, unlogged" if self._unsaid > 1 else "")
        self._failure_said, self._unsaid = (now, kind), 0
        busy = busy_store(exc)
        if busy is not None:
            log.warning("%s (the store was busy: %s%s)", what, busy, more)
        elif said is None or said[1] != kind:
            log.error("%s%s", what, f" ({more.removeprefix('; ')})" if more else "", exc_info=exc)
        else:
            log.error("%s (%s: %s%s)", what, "still failing" if self._failing else "failing again", kind,
                      more)
        self._failing = True

    async def _peek(self) -> tuple[datetime | None, datetime | None]:
        now = self._peeked_at = self.clock.now()
        row = await self.db.read_row(store.peek(now))
        return row[0], row[1]

    async def _round(self) -> tuple[int, bool]:
        now = self._claimed_at = self.clock.now()
        async with self.db.transaction() as session:
            claimed = await store.claim(session, self.replica, now, self.lease, self.batch)
        fired = 0
        for timer in claimed:
            fired += await self._run(timer)
        return fired, len(claimed) == self.batch

    async def _run(self, timer: Timer) -> int:
        kind, timer_id, attempt, due_at = timer.kind, timer.id, timer.attempt, timer.due_at
        assert timer_id is not None
        handler = self.handlers.get(kind)
        now = self.clock.now()
        try:
            async with self.db.transaction() as session:
                if not await store.complete(session, timer_id, self.replica, now):
                    raise _LostLease()
                if handler is None:
                    raise LookupError(f"no handler for timer kind {kind!r}")
                await handler(session, timer, now)
        except _LostLease:
            log.warning("timer %s (%s): lease lost before it ran; another replica has it", timer_id, kind)
            return 0
        except Exception as exc:
            # The store unable to do it now (a lock held by a maintenance job, an outage, a full disk) is no fault of
            # the timer's: it is tried again, its tries not counted (so at the first back-off), and never given up
            # for it (an escalation's step was given up for good after a minute's lock, and nobody was told).
            unavailable = store_unavailable(exc) and not isinstance(exc, LookupError)
            give_up = not unavailable and (attempt + 1 >= self.max_attempts or isinstance(exc, LookupError))
            delay = timedelta(seconds=min(300, 2 ** (attempt + 1)))
            why = explain_failure(exc, self.db.wait)  # (a bare TimeoutError says nothing by itself)
            (log.error if give_up else log.warning)(
                "timer %s (%s %s) failed%s: %s", timer_id, kind, timer.subject,
                " for good" if give_up else f"; retrying in {delay.total_seconds():.0f}s", why,
                exc_info=not isinstance(exc, LookupError))
            async with self.db.transaction() as session:
                await store.retry_later(session, timer_id, self.replica, now + delay, why, give_up=give_up, now=now,
                                        counted=not unavailable)
            self.metrics.timers_fired.labels(kind, "failed" if give_up else "retry").inc()
            return 0
        late = (now - due_at).total_seconds()
        if due_at < self.started_at and now - due_at > LATE_AFTER:
            self._overdue[kind] = self._overdue.get(kind, 0) + 1
            self._overdue_most = max(self._overdue_most, now - due_at)
        self.metrics.timers_fired.labels(kind, "ok").inc()
        self.metrics.timer_lateness.observe(max(0.0, late))
        if self.after_commit is not None:
            self.after_commit()
        return 1

    async def _plan_wakeup(self, peeked: tuple[datetime | None, datetime | None] | None = None) -> None:
        """Sleep until the next due time when it comes before the next beat; report stalled timers.

        `peeked`: what this beat's peek read (no round ran since), else it reads afresh.
        A timer that fell due after the last claim (while this beat ran its timers) runs at once, not at the
        next beat. One that was already due at the last claim and still is not taken (its claim failed, its lease
        lapsed mid-run) waits for the beat, so the tick never spins on a timer it cannot take."""
        if not self._running:
            return
        if peeked is None:
            peeked = await self._peek()
        now = self._peeked_at
        upcoming, earliest = peeked
        stalled = 0
        if earliest is not None and earliest < now - STALLED_AFTER:  # only then can any be overdue: count them
            async with self.db.sessions() as session:
                stalled = await store.overdue(session, now - STALLED_AFTER)
        self.metrics.timers_overdue.set(stalled)
        if stalled and time.monotonic() - self._stalled_logged > 60:
            self._stalled_logged = time.monotonic()
            log.error("%d timer(s) are more than %s overdue: escalations may be stalled (is the database slow, "
                      "or a timer failing? see `chatops_timers_fired_total{outcome=\"failed\"}`)",
                      stalled, STALLED_AFTER)
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if upcoming is not None:
            delay = (upcoming - now).total_seconds()
            fresh = self._claimed_at is None or upcoming > self._claimed_at
            if delay < self.interval and (delay > 0 or fresh):
                self._wakeup = asyncio.get_running_loop().call_later(max(0.0, delay), self.nudge)


class _LostLease(Exception):
    pass
