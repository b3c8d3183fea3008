"""With several replicas on one PostgreSQL database, one polls Telegram; when it goes, another takes over."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.telegram import TelegramAdapter
from bot.render import Renderer
from storage.db import Database, Leader
from tests.fake_telegram import FakeTelegram
from tests.botkit import running_bot
from tests.recording import RecordingDispatcher
from tests.test_telegram_adapter import fixture, settings


async def test_one_replica_leads_and_another_takes_over_when_it_goes(db: Database) -> None:
    other = Database(db.url, schema=db.schema)
    first, second = Leader(db, "telegram-polling"), Leader(other, "telegram-polling")
    try:
        assert await first.held() is True
        assert await second.held() is (not db.is_postgres)  # SQLite means one replica: always the leader
        assert await first.held() is True  # asking again keeps it
        await first.close()  # the leading replica stops (or dies: its connection goes with it)
        assert await second.held() is True
    finally:
        await first.close()
        await second.close()
        await other.dispose()


async def test_a_replica_that_does_not_lead_does_not_poll() -> None:
    async with FakeTelegram() as tg:
        leading = asyncio.Event()

        async def may_poll() -> bool:
            return leading.is_set()

        dispatcher = RecordingDispatcher()
        adapter = TelegramAdapter(settings(tg, mode="polling"), renderer=Renderer(), dispatcher=dispatcher)
        adapter.poll_timeout, adapter.follower_wait, adapter.may_poll = 1, 0.05, may_poll
        await adapter.start()
        try:
            tg.push_update(fixture("command_group.json"))
            await asyncio.sleep(0.3)
            assert tg.called("getUpdates") == [] and dispatcher.commands == []
            leading.set()  # the leader went away and this replica took the lock
            await tg.wait_for(lambda: dispatcher.commands)
            assert [c.name for c in dispatcher.commands] == ["ack"]
        finally:
            await adapter.stop()


async def test_a_database_that_does_not_answer_is_said_once_not_at_every_question(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """During a PostgreSQL outage a replica that never led said "lost the outbox lock" several times a second, and
    the timer beat logged a traceback twice a second: thousands of lines a minute, hiding what mattered."""
    db = Database("postgresql+asyncpg://postgres@127.0.0.1:1/x", wait=1)  # nothing listens there
    try:
        leader = Leader(db, "outbox")
        for _ in range(5):
            assert not await leader.held()
    finally:
        await db.dispose()
    said = [r.getMessage() for r in caplog.records if "lock" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("cannot ask for the outbox lock"), said

    caplog.clear()
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        async def broken() -> tuple[int, bool]:
            raise ConnectionRefusedError("the database is down")

        h.bot.timers._peek = h.bot.timers._round = broken  # type: ignore[method-assign,assignment]
        for _ in range(10):
            await h.bot.timers.tick()
    failures = [r for r in caplog.records if r.getMessage().startswith("timer tick failed")]
    assert len(failures) == 1 and failures[0].exc_info is not None  # the first, with its traceback
