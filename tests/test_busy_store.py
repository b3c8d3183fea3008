"""A click or command that meets a busy store is answered, politely, and acts on nothing.

Another replica's transaction (or a stuck one, an operator's psql, a chatops command beside the bot on SQLite) holds
what an action needs: PostgreSQL gives up waiting for the lock after LOCK_WAIT, SQLite after its busy timeout. The
person who clicked or typed is told the store is busy, nothing was changed, and to try again; never "something went
wrong", and the platform is not asked to send the click again (Telegram's copy, acting later behind the person's back,
could undo what they did meanwhile). The log says what held it up. Both waits are cut to a second here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import storage.db
from storage.models import SwapRequest
from tests.botkit import bot_on
from tests.conftest import postgres_url
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_slack_flow import Slack, slack_config
from tests.test_swaps_telegram import ROTATIONS
from tests.test_telegram_flow import TG_SECRET, Both, posted_on_both

BUSY = ("The incident store is busy (another bot replica, or a long transaction, holds what this needs), so nothing "
        "was changed. Try again in a moment.")
PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [responder], slack: U02BOB, telegram: 222222}
"""


@dataclass
class Store:
    """The bot with Slack and Telegram on one backend, and the means to hold what its actions need."""

    backend: str
    both: Both
    path: Path
    schema: str

    @contextlib.asynccontextmanager
    async def held(self, row: str) -> AsyncIterator[None]:
        """`row` (PostgreSQL: `incidents WHERE id = 1`, locked FOR UPDATE by another session; SQLite: the whole
        database, in a write transaction of another process) held until the block ends."""
        if self.backend == "sqlite":
            # (in a thread: the bot's transaction it may queue behind is ended by the event loop)
            other = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()
            return
        engine = create_async_engine(postgres_url())
        try:
            async with engine.connect() as conn:
                await conn.begin()
                await conn.execute(text(f'SELECT 1 FROM "{self.schema}".{row} FOR UPDATE'))
                yield
                await conn.rollback()
        finally:
            await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Store]:
    monkeypatch.setattr(storage.db, "LOCK_WAIT", 1.0)  # read as each Database is made, and as a failure is explained
    monkeypatch.setattr(storage.db, "SQLITE_BUSY_TIMEOUT_MS", 1000)  # read as each connection is opened
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n") + ROTATIONS
        async with bot_on(request.param, tmp_path, pg_schema, extra, people=PEOPLE) as h:
            yield Store(request.param, Both(h, Slack(h, slack), tg), tmp_path / "bot.db", pg_schema)


def told(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatops.dispatch" and "busy" in r.getMessage()]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the handling of clicks and commands logged with a traceback ("slack: the dispatcher failed", as any
    unexpected failure is). (The background workers', meeting the same lock, are theirs to say.)"""
    return [r.getMessage() for r in caplog.records
            if r.exc_info and r.name in ("chatops.slack", "chatops.telegram", "chatops.dispatch")]


async def test_clicks_and_commands_on_a_held_incident_are_told_the_store_is_busy_and_change_nothing(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    b = store.both
    ts, message_id = await posted_on_both(b)
    caplog.set_level(logging.INFO)
    async with store.held("incidents WHERE id = 1"):
        _, _, click = await b.slack.click("ack:1", ts)
        assert (await b.slack.answer(click))["text"] == BUSY
        assert (await b.slack.answer(await b.slack.command("/incident", "resolve 1")))["text"] == BUSY
        tap = await b.tap("esc:1", message_id)  # 200: Telegram is not to send it again
        assert [c.params.get("text") for c in b.tg.called("answerCallbackQuery")] == [BUSY]
        assert await b.type("/ack 1") == BUSY
    [incident] = await b.h.incidents()
    assert (incident.status, incident.acknowledged_by) == ("triggered", None)
    assert not {"incident.acknowledged", "incident.resolved", "incident.escalated"} & set(await b.h.actions(1))
    why = ("LockNotAvailableError: a lock was not granted within 1 s (held by another replica's transaction: is one "
           "stuck or very slow?)" if store.backend == "postgres" else
           "OperationalError: the database stayed locked for 1 s (another process's write transaction: a chatops "
           "command, or one stuck?)")
    assert told(caplog) == [
        f"slack: Acknowledge (ack:1) by alice not done, the store is busy ({why}); they were told to try again",
        f"slack: /incident resolve 1 by alice not done, the store is busy ({why}); they were told to try again",
        f"telegram: Escalate (esc:1) by alice not done, the store is busy ({why}); they were told to try again",
        f"telegram: /ack 1 by alice not done, the store is busy ({why}); they were told to try again"]
    assert tracebacks(caplog) == []

    assert await b.deliver(tap) == 200  # a copy of the busy tap, once the store is free: it was answered, not redone
    assert "incident.escalated" not in await b.h.actions(1)
    _, _, click = await b.slack.click("ack:1", ts)  # the person tries again: it works
    assert (await b.slack.answer(click))["text"] == "Acknowledged #1."


async def test_a_swap_asked_while_a_stuck_transaction_holds_the_audit_log_is_told_the_store_is_busy(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Not only incidents: every write appends to the audit log, whose head a stuck transaction may hold."""
    b = store.both
    caplog.set_level(logging.INFO)
    async with store.held("audit_head WHERE id = 1"):
        assert await b.type("/swap bob next") == BUSY
    assert await b.h.count(SwapRequest) == 0
    [said] = told(caplog)
    assert said.startswith("telegram: /swap bob next by alice not done, the store is busy (") and not tracebacks(caplog)


async def test_a_periodic_job_that_finds_the_store_busy_says_so_in_a_line(caplog: pytest.LogCaptureFixture,
                                                                          tmp_path: Path) -> None:
    """While another writer held SQLite, each periodic job (purging seen requests, planning handoff notices) logged a
    whole traceback every beat for an expected condition; any other failure still gets its traceback."""
    from sqlalchemy.exc import OperationalError

    from handlers.timers import TimerService

    holder = sqlite3.connect(tmp_path / "held.db", isolation_level=None)
    holder.execute("CREATE TABLE seen (id INTEGER)")
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
    job = sqlite3.connect(tmp_path / "held.db", timeout=0)

    async def busy() -> None:
        try:
            job.execute("DELETE FROM seen")
        except sqlite3.OperationalError as exc:  # SQLite's own "database is locked", with its error code
            raise OperationalError("DELETE FROM seen", {}, exc) from exc

    async def broken() -> None:
        raise ValueError("a bug")

    await TimerService._guarded(busy, "purge-seen-requests")()
    await TimerService._guarded(broken, "plan-handoffs")()
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records if "job " in r.getMessage()]
    assert said == [
        ("WARNING", "job purge-seen-requests found the store busy (OperationalError: the database stayed locked for "
                    "10 s (another process's write transaction: a chatops command, or one stuck?)); it runs again at "
                    "its next beat", False),
        ("ERROR", "job plan-handoffs failed; it runs again at its next beat", True)]
