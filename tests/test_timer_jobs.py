"""A periodic job (planning handoffs, the runbooks' sweep) still running when the bot stops: it is cut off, and the
log says so in a line. APScheduler logged it as an ERROR, "Job ... raised an exception", with a traceback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bot.clock import FakeClock
from bot.metrics import Metrics
from handlers.timers import TimerService
from storage.db import Database
from tests import botkit


async def test_a_job_running_when_the_bot_stops_is_cut_off_without_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await db.start()
    service = TimerService(db=db, clock=FakeClock(botkit.T0), metrics=Metrics())
    started = asyncio.Event()
    runs = []

    async def slow() -> None:
        runs.append(1)
        if len(runs) > 1:  # (the first, at start, is quick: the next, APScheduler's, is under way at the stop)
            started.set()
            await asyncio.sleep(30)

    service.add_job(slow, seconds=0.3, name="plan-handoffs")
    try:
        await service.start()
        await asyncio.wait_for(started.wait(), 5)
    finally:
        await service.stop()
        await asyncio.sleep(0.2)  # (APScheduler's callbacks for what it cancelled)
        await db.dispose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert "job plan-handoffs was cut off by the bot's stop; it runs again after the next start" in [
        r.getMessage() for r in caplog.records]
