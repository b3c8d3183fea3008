"""The wall clock stepped while the bot runs (NTP, a VM resumed): the timer beat goes on.

APScheduler plans its beats by the wall clock: one stepped back an hour left the beat, and every escalation
step with it, waiting for that hour to pass again, with nothing in the log. One stepped forward made a timer
due in the skipped time say "the bot was running behind"."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import apscheduler.schedulers.base
import apscheduler.triggers.interval
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import FakeClock
from bot.metrics import Metrics
from handlers import timers as timers_module
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.db import Database
from storage.models import Timer
from tests import botkit


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The wall clock's offset from the real one, in seconds, as APScheduler reads it (tests step it)."""
    offset = [0.0]

    class Stepped(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return datetime.now(tz) + timedelta(seconds=offset[0])

    monkeypatch.setattr(apscheduler.schedulers.base, "datetime", Stepped)
    monkeypatch.setattr(apscheduler.triggers.interval, "datetime", Stepped)
    monkeypatch.setattr(timers_module, "CLOCK_CHECK_EVERY", 0.2)
    return offset


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await db.start()
    yield db
    await db.dispose()


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def beating(store: Database, wall: list[float]) -> tuple[FakeClock, TimerService, list[str]]:
    """A timer service beating every 0.2 s by the stepped wall clock, on a fake clock of its own for due times; the
    subjects of the escalation steps it fires, in order."""
    clock = FakeClock(botkit.T0)
    service = TimerService(db=store, clock=clock, metrics=Metrics(), interval=0.2, wall=lambda: time.time() + wall[0])
    fired: list[str] = []

    @service.handler("escalation")
    async def step(session: AsyncSession, timer: Timer, now: datetime) -> None:
        fired.append(timer.subject)

    return clock, service, fired


async def test_a_clock_stepped_back_an_hour_does_not_stop_the_timers(
        wall: list[float], store: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "chatops.timers")
    clock, service, fired = beating(store, wall)
    await service.start()
    try:
        await asyncio.sleep(0.5)
        wall[0] = -3600.0
        await asyncio.sleep(1.0)  # the watch looks every 0.2 s here
        # A step falls due (written as intake writes it, with no nudge): only the beat can run it.
        async with store.transaction() as session:
            await timer_store.schedule(session, "escalation", "7", clock.now(), clock.now())
        assert await until(lambda: fired == ["7"], 3), "the beat stopped when the clock went back"
        said = [r.getMessage() for r in caplog.records if "went back" in r.getMessage()]
        assert said == ["the system clock went back by 1 h; the timer beat and the periodic jobs were planned again "
                        "from the new time (timers due meanwhile run at their own due times, by the new clock)"]
        # and it goes on beating: a second step, later
        async with store.transaction() as session:
            await timer_store.schedule(session, "escalation", "8", clock.now(), clock.now())
        assert await until(lambda: fired == ["7", "8"], 3)
    finally:
        await service.stop()


async def test_a_periodic_job_runs_on_after_the_clock_went_back(wall: list[float], store: Database) -> None:
    service = TimerService(db=store, clock=FakeClock(botkit.T0), metrics=Metrics(), interval=0.2,
                           wall=lambda: time.time() + wall[0])
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.monotonic())

    service.add_job(job, seconds=0.3, name="plan-handoffs")
    await service.start()
    try:
        assert await until(lambda: len(runs) >= 2, 3)
        wall[0] = -3600.0
        await asyncio.sleep(0.5)
        before = len(runs)
        assert await until(lambda: len(runs) >= before + 2, 3), "the periodic job stopped when the clock went back"
    finally:
        await service.stop()


async def test_a_timer_due_in_time_a_step_forward_skipped_says_so(wall: list[float], store: Database,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "chatops.timers")
    service = TimerService(db=store, clock=FakeClock(botkit.T0), metrics=Metrics(),
                           wall=lambda: time.time() + wall[0])
    await service.start()
    try:
        before = datetime.now(UTC)
        wall[0] = 3600.0
        assert await until(lambda: any("jumped forward" in r.getMessage() for r in caplog.records), 3)
        now = datetime.now(UTC) + timedelta(hours=1)
        # due half an hour into the skipped hour: late, for that reason
        assert service.lateness(before + timedelta(minutes=30), now) == "the system clock jumped forward past it"
        # due ten minutes before the step (the bot started before that): no step explains it
        assert service.lateness(before - timedelta(minutes=10), now) == "the bot was running behind"
        said = [r.getMessage() for r in caplog.records if "jumped forward" in r.getMessage()]
        assert said == ["the system clock jumped forward by 1 h (or the machine was suspended); timers due in that "
                        "time run now, late"]
    finally:
        await service.stop()


async def test_a_step_timer_the_step_forward_skipped_says_so_when_it_runs(
        wall: list[float], store: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step was noticed by the watch, every second; the beat (every 0.5 s) mostly ran the timers it skipped
    first, and they said "the bot was running behind". The beat looks at the clock before it runs them."""
    monkeypatch.setattr(timers_module, "CLOCK_CHECK_EVERY", 30.0)  # (the watch would not notice in time)

    class Wall:  # the bot's clock is the wall clock, as in production
        def now(self) -> datetime:
            return datetime.now(UTC) + timedelta(seconds=wall[0])

    service = TimerService(db=store, clock=Wall(), metrics=Metrics(), interval=0.2,
                           wall=lambda: time.time() + wall[0])
    said: list[str | None] = []

    @service.handler("escalation")
    async def step(session: AsyncSession, timer: Timer, now: datetime) -> None:
        said.append(service.lateness(timer.due_at, now))

    await service.start()
    try:
        async with store.transaction() as session:
            now = Wall().now()
            await timer_store.schedule(session, "escalation", "7", now + timedelta(minutes=30), now)
        await asyncio.sleep(0.5)
        wall[0] = 3600.0
        assert await until(lambda: bool(said), 5)
        assert said == ["the system clock jumped forward past it"]
    finally:
        await service.stop()


async def test_a_clock_stepped_back_keeps_each_periodic_jobs_pace(wall: list[float], store: Database) -> None:
    """Stepped back, every periodic job ran at once (purging, planning handoffs, every few seconds of NTP's
    corrections): each is planned as far ahead as it was."""
    service = TimerService(db=store, clock=FakeClock(botkit.T0), metrics=Metrics(), wall=lambda: time.time() + wall[0])
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.monotonic())

    service.add_job(job, seconds=600, name="plan-handoffs")
    await service.start()
    try:
        assert await until(lambda: len(runs) == 1, 3)  # (at start)
        wall[0] = -30.0
        await asyncio.sleep(1.0)  # the watch looks every 0.2 s here, and the beat every 0.5 s
        assert len(runs) == 1
        assert service._scheduler is not None
        [planned] = [j.next_run_time for j in service._scheduler.get_jobs() if j.id == "plan-handoffs"]
        ahead = planned.timestamp() - (time.time() + wall[0])
        assert 590 < ahead <= 600
    finally:
        await service.stop()


async def test_small_steps_back_that_add_up_are_dealt_with(wall: list[float], store: Database,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """1.5 s back again and again, each under the 2 s a step must be: compared with the last look, none was one,
    and the beat fell further behind with each, without a word."""
    caplog.set_level(logging.WARNING, "chatops.timers")
    clock, service, fired = beating(store, wall)
    await service.start()
    try:
        for _ in range(4):
            wall[0] -= 1.5
            await asyncio.sleep(0.45)
        said = [r.getMessage() for r in caplog.records if "went back" in r.getMessage()]
        # (by 3 s when the watch looked between the steps, as it does every 0.2 s here; more on a slow machine)
        assert said and re.match(r"the system clock went back by [3-6] s;", said[0]), said
        async with store.transaction() as session:
            await timer_store.schedule(session, "escalation", "9", clock.now(), clock.now())
        assert await until(lambda: fired == ["9"], 3), "the beat fell behind the small steps"
    finally:
        await service.stop()
