"""With several replicas on one PostgreSQL database, one polls Telegram; when it goes, another takes over."""

from __future__ import annotations

import asyncio

from adapters.telegram import TelegramAdapter
from bot.render import Renderer
from storage.db import Database, Leader
from tests.fake_telegram import FakeTelegram
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
