"""With several replicas on one PostgreSQL database, one polls Telegram; when it goes, another takes over."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.telegram import TelegramAdapter
from bot.render import Renderer
from storage.db import Database, Leader
from tests.fake_telegram import FakeTelegram
from tests import botkit
from tests.botkit import running_bot
from tests.conftest import ROOT, drop_schema, postgres_url
from tests.fake_slack import FakeSlack
from tests.test_outbox import parents
from tests.test_slack_flow import slack_config
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

        async def unplanned(_peeked: object) -> None:
            raise ConnectionResetError("unexpected connection_lost() call")  # the next wakeup's question fails too

        h.bot.timers._peek = h.bot.timers._round = broken  # type: ignore[method-assign,assignment]
        h.bot.timers._plan_wakeup = unplanned  # type: ignore[method-assign,assignment]
        for _ in range(10):
            await h.bot.timers.tick()
        failures = [r for r in caplog.records if r.name == "chatops.timers" and r.levelno >= logging.WARNING]
        assert len(failures) == 1 and failures[0].exc_info is not None, [r.getMessage() for r in failures]
        assert failures[0].getMessage().startswith("timer tick")  # the first, with its traceback
        said = h.bot.timers._failure_said
        assert said is not None
        h.bot.timers._failure_said = (said[0] - 61, said[1])  # a minute on
        await h.bot.timers.tick()
        [again] = [r for r in caplog.records if r.name == "chatops.timers"][1:]
        # (the round's failure and the next wakeup's differ: the one said now has its traceback if the first was the
        # other; at most one line a minute all the same)
        assert again.getMessage().startswith("timer tick"), again.getMessage()
        assert re.search(r"(\(|; )\d+ more failure\(s\) since the last line, unlogged\)$", again.getMessage()), again


# A replica that leads delivery (and here only holds the lock, delivering nothing), beating every 0.2 s. With a
# third argument, `in-transaction`: it asks one question on the lock's connection and never commits it, as a leader
# stopped between its heartbeat's question and that question's commit (two round trips) is left.
HOLDER = textwrap.dedent("""
    import asyncio, logging, sys
    from sqlalchemy import text
    from storage.db import Database, Leader

    async def main():
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        db = Database(sys.argv[1], schema=sys.argv[2])
        await db.start()
        leader = Leader(db, "outbox")
        leader.heartbeat = 0.2
        if sys.argv[3:] == ["in-transaction"]:
            assert await leader.held()
            await leader._conn.execute(text("SELECT 1"))  # and no commit: idle in transaction
            print("in a transaction", flush=True)
            await asyncio.sleep(3600)
        while await leader.held():
            await asyncio.sleep(0.2)
        print("not leading", flush=True)

    asyncio.run(main())
""")


def _holder(url: str, schema: str, *how: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, url, schema, *how], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def _line(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)).strip()


async def test_a_stopped_leader_is_taken_over_and_a_live_one_is_not(pg_schema: str) -> None:
    """Replicas on PostgreSQL: the one leading delivery is stopped (SIGSTOP, a stalled VM) and keeps its database
    connection, so the lock stayed with it and no card was posted any more, on any replica, until it ran again.
    Now another replica ends its silent connection and delivers; the stopped one, continued, has stopped leading.
    A leader that lives, though it delivers nothing for a while, is not taken over."""
    url = postgres_url()
    holder = _holder(url, pg_schema)
    try:
        assert await _line(holder) == "this replica leads outbox"

        def quick_takeover(bot: Any) -> None:
            for leader in bot.leaders:
                leader.takeover_after, leader.heartbeat = 1.5, 0.5

        async with FakeSlack() as fake:
            async with running_bot(url, slack_config(fake), schema=pg_schema, prepare=quick_takeover) as h:
                assert (await h.post("am", botkit.fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
                await asyncio.sleep(3)  # twice takeover_after: the live leader keeps it, and delivers nothing here
                assert parents(fake) == [] and await h.count_pending() > 0
                holder.send_signal(signal.SIGSTOP)
                await fake.wait_for(lambda: parents(fake), timeout=15)
                assert "#1" in parents(fake)[0]
                holder.send_signal(signal.SIGCONT)
                assert (await _line(holder)).startswith("lost the outbox lock")
                assert await _line(holder) == "not leading"
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
        await drop_schema(url, pg_schema)


async def test_a_leader_stopped_inside_a_transaction_is_taken_over(pg_schema: str) -> None:
    """The leader's connection is idle in a transaction when it stops between a question and its commit: the
    takeover looked for idle connections only, and cards waited for good (seen as a flaky test under load)."""
    url = postgres_url()
    holder = _holder(url, pg_schema, "in-transaction")
    try:
        assert await _line(holder) == "this replica leads outbox"
        assert await _line(holder) == "in a transaction"
        holder.send_signal(signal.SIGSTOP)

        def quick_takeover(bot: Any) -> None:
            for leader in bot.leaders:
                leader.takeover_after, leader.heartbeat = 1.5, 0.5

        async with FakeSlack() as fake:
            async with running_bot(url, slack_config(fake), schema=pg_schema, prepare=quick_takeover) as h:
                assert (await h.post("am", botkit.fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
                await fake.wait_for(lambda: parents(fake), timeout=15)
                assert "#1" in parents(fake)[0]
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
        await drop_schema(url, pg_schema)
