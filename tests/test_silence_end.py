"""The end of a maintenance window, end to end on a fake clock: an incident a silence muted speaks when the window
ends while its alerts still fire, without waiting for the source to send them again (Alertmanager does only after
its repeat_interval, 4 h by default; a generic sender may never). The real bot, slack-bolt and python-telegram-bot
against the fake Slack and Telegram servers; the window's end is a durable timer, so a restart does not lose it."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from bot.clock import Clock, FakeClock
from bot.server import Bot
from storage.db import Database
from storage.models import Timer
from tests.botkit import running_bot
from tests.conftest import drop_schema, postgres_url
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_escalation import PEOPLE, TG_SECRET, World, thread_texts, until, world
from tests.test_slack_flow import Slack, button_values, slack_config, text_of

ALICE_TG, BOB_TG = 111111, 222222
BASE = """
timezone: Europe/Berlin
business_hours: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "18:00"}
audit: {hmac_key: silence-end-key-0123456789ab}
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
sources:
  - {id: open, kind: generic, auth: none}
silences:
  - {id: sunday-maint, matchers: {team: dba}, weekly: {days: [sun], start: "01:00", end: "03:30", timezone: Europe/Berlin}, comment: weekly maintenance}
  - {id: long-haul, matchers: {pod: long}, starts: 2026-10-24T00:00:00Z, ends: 2026-10-25T04:00:00Z}
  - {id: forever, matchers: {pod: forever}, starts: 2026-01-01T00:00:00Z}
escalation_policies:
  - id: dba
    steps:
      - {notify: {people: [alice]}, wait: 5m}
      - {notify: {people: [bob]}, wait: 5m}
routes:
  - {match: {}, channels: [ops-slack], escalation: dba}
"""
# Sunday 25 Oct 2026, Berlin: at 03:00 CEST the clocks go back to 02:00 CET. The 01:00-03:30 window lasts 3.5 hours
# and ends at 03:30 CET, 02:30 UTC; 03:30 CEST (01:30 UTC) is an hour too early.
T = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, inside the window (after hours: pages go to Telegram)
END = datetime(2026, 10, 25, 2, 30, tzinfo=UTC)
LINE = ("Maintenance window sunday-maint (weekly maintenance) ended and 1 alert still fires: paging now, from step 1 "
        "of escalation policy dba.")


def db_alert(asset: str = "db-01", **labels: str) -> dict[str, Any]:
    return {"asset_name": asset, "signature": "DbDown", "severity": "critical", "message": f"{asset} is down",
            "tool_source": "zabbix", "labels": {"team": "dba", **labels}}


def cards(w: World) -> list[dict[str, Any]]:
    return w.slack.posts()  # the incident messages in C0OPS (not its thread lines)


async def unsilenced(w: World) -> list[dict[str, Any]]:
    return [e.details for e in await w.audit("incident.unsilenced")]


async def at(w: World, when: datetime) -> None:
    """The clock at `when`; the due timers run, and what they started (an escalation's first step) too."""
    w.h.clock.set(when)
    await w.tick()
    await w.tick()
    await asyncio.sleep(0.3)


async def test_a_weekly_window_that_ends_after_the_clocks_go_back_unsilences_its_incident(tmp_path: Path) -> None:
    """The incident stayed muted after the window, for as long as its alert fired, and nobody was paged unless the
    source sent the alert again. Now at 03:30 CET (not 03:30 CEST, an hour earlier) its card is posted as firing,
    the thread says the window ended, Alice is paged (step 1), and the audit says why."""
    async with world(tmp_path, T, base=BASE) as w:
        status, answer, _ = await w.h.post("open", db_alert())
        assert status == 200 and answer["results"][0]["change"] == "opened"
        [inc] = await w.h.incidents()
        assert inc.silenced
        for when in (T + timedelta(hours=1), END - timedelta(seconds=1)):  # 02:30 CET, 03:29:59 CET: still inside
            await at(w, when)
            assert not cards(w) and not w.pages(ALICE_TG), when
            assert (await w.h.incidents())[0].silenced

        await at(w, END)
        await until(lambda: cards(w), "the card is posted when the window ends")
        [card] = cards(w)
        assert "Firing" in text_of(card) and "Silenced" not in text_of(card)
        assert [v.split(":")[0] for v in button_values(card)] == ["ack", "esc", "res"]  # Escalate is back
        await until(lambda: LINE in thread_texts(w.slack), "the thread says the window ended")
        await until(lambda: w.pages(ALICE_TG), "Alice is paged: step 1")
        assert not w.pages(BOB_TG)
        [inc] = await w.h.incidents()
        assert not inc.silenced and inc.status == "triggered"
        assert await unsilenced(w) == [{"reason": "maintenance window sunday-maint (weekly maintenance) ended",
                                        "silence": "sunday-maint", "firing": 1,
                                        "note": "the maintenance window ended while its alerts still fired"}]
        assert [e.details["step"] for e in await w.audit("escalation.step")] == [1]
        await at(w, END + timedelta(minutes=5))
        await until(lambda: w.pages(BOB_TG), "step 2 after its wait, as any escalation")


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_window_that_ended_while_the_bot_was_down_unsilences_at_start(
        tmp_path: Path, pg_schema: str, database: str) -> None:
    """The bot is stopped during the window and started after it ended: the durable timer fires at start, once."""
    url = postgres_url() if database == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    schema = pg_schema if database == "postgres" else None
    try:
        async with FakeSlack() as fake, FakeTelegram() as tg:
            extra = slack_config(fake) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                          f"api_url: '{tg.api_url}'}}\n")
            async with running_bot(url, extra, schema=schema, clock=FakeClock(T), people=PEOPLE, base=BASE) as h:
                w = World(h, Slack(h, fake), tg)
                await w.h.post("open", db_alert())
                await w.h.post("open", db_alert())  # sent again: still one timer for the window's end
                await at(w, T + timedelta(minutes=30))
                assert not cards(w) and not w.pages(ALICE_TG)
            async with running_bot(url, extra, schema=schema, clock=FakeClock(END + timedelta(hours=1)),
                                   people=PEOPLE, base=BASE) as h:
                w = World(h, Slack(h, fake), tg)
                await until(lambda: cards(w), "posted at start: the window ended while the bot was down")
                await until(lambda: LINE in thread_texts(w.slack), "the thread line")
                await until(lambda: w.pages(ALICE_TG), "Alice is paged")
                assert len(await unsilenced(w)) == 1 and len(w.pages(ALICE_TG)) == 1
                async with h.bot.db.sessions() as s:
                    timers = (await s.execute(select(Timer.status).where(Timer.kind == "silence.end"))).scalars()
                    assert list(timers) == ["done"]
    finally:
        if schema:
            await drop_schema(url, schema)


async def test_only_an_open_incident_whose_alerts_still_fire_pages_when_the_window_ends(tmp_path: Path) -> None:
    """#1's alert stopped during the window (its source resolved it), #2 was acknowledged by Alice from
    `/incident show`: neither pages anyone at the end. #3 still fires: it speaks. None stays muted: #2 and #1 stayed
    so for good (#2's Escalate said a maintenance window muted it, a reopen of #1 stayed muted and paged nobody, both
    listed as silenced), and #2 was never posted: it is, saying Alice is on it."""
    async with world(tmp_path, T, base=BASE) as w:
        for asset in ("db-01", "db-02", "db-03"):
            await w.h.post("open", db_alert(asset))
        await w.h.post("open", {**db_alert("db-01"), "status": "resolved"})
        answer = await w.slack.answer(await w.slack.command("/incident", "ack 2", user="U01ALICE"))
        assert "cknowledged" in answer["text"]
        await at(w, END)
        await until(lambda: len(cards(w)) == 2, "#2 and #3 are posted")
        await asyncio.sleep(0.5)
        [second] = [text_of(c) for c in cards(w) if "db-02" in text_of(c)]
        [third] = [text_of(c) for c in cards(w) if "db-03" in text_of(c)]
        assert "Acknowledged" in second and "Firing" in third
        assert sorted(e.incident_id for e in await w.audit("incident.unsilenced")) == [1, 2, 3]
        assert [e.incident_id for e in await w.audit("escalation.step")] == [3]
        assert [i.silenced for i in await w.h.incidents()] == [False, False, False]
        line = ("Maintenance window sunday-maint (weekly maintenance) ended and 1 alert still fires: acknowledged "
                "while muted, so nobody is paged.")
        await until(lambda: line in thread_texts(w.slack), "#2's line")
        answer = await w.slack.answer(await w.slack.command("/incident", "escalate 2", user="U01ALICE"))
        assert answer["text"] == "Escalating #2 to step 1 of 2 now."  # (it said a maintenance window muted it)
        def steps_of_2(events: list[Any]) -> list[int]:
            return [e.details["step"] for e in events if e.incident_id == 2]

        for _ in range(50):
            await w.tick()
            if steps_of_2(await w.audit("escalation.step")) == [1, 2]:
                break
            await asyncio.sleep(0.1)
        # its first step ran (Alice's, who asked for help, so on to Bob's at once)
        assert steps_of_2(await w.audit("escalation.step")) == [1, 2]
        # #1, resolved while muted, reopened now: its policy starts (it stayed muted, and paged nobody)
        answer = await w.slack.answer(await w.slack.command("/incident", "reopen 1", user="U01ALICE"))
        assert answer["text"] == "Reopened #1."
        for _ in range(50):
            await w.tick()
            if any(e.incident_id == 1 for e in await w.audit("escalation.step")):
                break
            await asyncio.sleep(0.1)
        assert [e.details["step"] for e in await w.audit("escalation.step") if e.incident_id == 1] == [1]


async def test_another_window_still_covering_the_alerts_keeps_it_muted_until_that_one_ends(tmp_path: Path) -> None:
    """sunday-maint ends at 02:30 UTC, but long-haul covers the alert until 04:00 UTC: it speaks then, and the
    thread names the window that ended last."""
    async with world(tmp_path, T, base=BASE) as w:
        await w.h.post("open", db_alert(pod="long"))
        await at(w, END)
        assert not cards(w) and not await unsilenced(w)
        await at(w, datetime(2026, 10, 25, 4, 0, tzinfo=UTC))
        await until(lambda: cards(w), "posted when the last window covering it ends")
        line = "Maintenance window long-haul ended and 1 alert still fires: paging now, from step 1 of escalation policy dba."
        await until(lambda: line in thread_texts(w.slack), "the thread line")
        await until(lambda: w.pages(ALICE_TG), "Alice is paged")


async def test_an_open_ended_silence_writes_no_timer_and_keeps_the_incident_muted(tmp_path: Path) -> None:
    async with world(tmp_path, T, base=BASE) as w:
        await w.h.post("open", {**db_alert(pod="forever"), "labels": {"pod": "forever"}})
        async with w.h.bot.db.sessions() as s:
            assert not list((await s.execute(select(Timer).where(Timer.kind == "silence.end"))).scalars())
        await at(w, END + timedelta(days=1))
        assert not cards(w) and (await w.h.incidents())[0].silenced


async def test_an_incident_an_unsilenced_alert_woke_first_is_not_woken_again_at_the_window_end(tmp_path: Path) -> None:
    """An alert no silence covers joined it during the window (intake unsilenced it and started its escalation):
    the window's end changes nothing, and its escalation is not started over."""
    async with world(tmp_path, T, base=BASE) as w:
        await w.h.post("open", db_alert())
        await w.h.post("open", {**db_alert(), "tool_source": "nagios", "labels": {"team": "web"}})  # not silenced
        await at(w, T + timedelta(minutes=1))
        await until(lambda: w.pages(ALICE_TG), "Alice is paged once the incident speaks")
        await at(w, END)
        await asyncio.sleep(0.5)
        assert [e.details.get("fingerprint") is not None for e in await w.audit("incident.unsilenced")] == [True]
        assert [e.details["step"] for e in await w.audit("escalation.step")] == [1, 2]  # its own pace, not restarted
        assert len(cards(w)) == 1 and len(w.pages(ALICE_TG)) == 1


# -- at start: incidents muted by an older version (no timer), and windows app.yaml changed while the bot was down --

WINDOW_END_KEY = f"silence.end:1:{END.isoformat()}"
WITHOUT_SUNDAY_MAINT = "\n".join(line for line in BASE.splitlines() if "sunday-maint" not in line)


@asynccontextmanager
async def restarted(store: tuple[str, str | None], fake: FakeSlack, tg: FakeTelegram, when: datetime,
                    base: str = BASE) -> AsyncIterator[World]:
    """The bot on this store and these fakes, started at `when` with `base` as its app.yaml."""
    url, schema = store
    extra = slack_config(fake) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                  f"api_url: '{tg.api_url}'}}\n")
    async with running_bot(url, extra, schema=schema, clock=FakeClock(when), people=PEOPLE, base=base) as h:
        yield World(h, Slack(h, fake), tg)


@asynccontextmanager
async def a_store(database: str, tmp_path: Path, pg_schema: str) -> AsyncIterator[tuple[str, str | None]]:
    if database == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", None
        return
    try:
        yield postgres_url(), pg_schema
    finally:
        await drop_schema(postgres_url(), pg_schema)


async def end_timers(w: World) -> list[tuple[int | None, str | None, datetime, str, dict[str, Any]]]:
    async with w.h.bot.db.sessions() as s:
        rows = (await s.execute(select(Timer).where(Timer.kind == "silence.end").order_by(Timer.id))).scalars()
        return [(t.id, t.key, t.due_at.astimezone(UTC), t.status, t.payload) for t in rows]


def said_at_start(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "chatops.silences"]
    caplog.clear()
    return lines


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_an_incident_an_older_version_muted_without_a_timer_gets_one_at_start(
        tmp_path: Path, pg_schema: str, database: str, caplog: pytest.LogCaptureFixture) -> None:
    """An older bot wrote no timer at the window's end: the incident stayed muted until its source sent an alert
    no silence covers. Started again inside the window, the bot writes the timer at its end (03:30 CET), and the
    incident speaks then; a second start changes nothing."""
    caplog.set_level(logging.INFO, logger="chatops.silences")
    async with a_store(database, tmp_path, pg_schema) as store, FakeSlack() as fake, FakeTelegram() as tg:
        async with restarted(store, fake, tg, T) as w:
            await w.h.post("open", db_alert())
            async with w.h.bot.db.transaction() as s:  # as an older version left it
                await s.execute(delete(Timer).where(Timer.kind == "silence.end"))
        caplog.clear()
        async with restarted(store, fake, tg, T + timedelta(minutes=30)) as w:
            [timer] = await end_timers(w)
            assert timer[1:] == (WINDOW_END_KEY, END, "pending", {"silence": "sunday-maint",
                                                                   "comment": "weekly maintenance"})
            assert said_at_start(caplog) == [
                "checked 1 muted incident(s) at start: 0 unsilenced (their firing alerts are not all covered by a "
                "silence in app.yaml any more), 1 given a timer at the end of the window covering them"]
            await asyncio.sleep(0.3)
            assert not cards(w) and not w.pages(ALICE_TG) and (await w.h.incidents())[0].silenced
        async with restarted(store, fake, tg, T + timedelta(minutes=40)) as w:
            assert said_at_start(caplog) == [
                "checked 1 muted incident(s) at start: 0 unsilenced (their firing alerts are not all covered by a "
                "silence in app.yaml any more), 0 given a timer at the end of the window covering them"]
            assert await end_timers(w) == [timer]  # the same row, not another
            await at(w, END)
            await until(lambda: cards(w), "the card is posted when the window ends")
            await until(lambda: LINE in thread_texts(w.slack), "the thread says the window ended")
            await until(lambda: w.pages(ALICE_TG), "Alice is paged: step 1")
            assert len(await unsilenced(w)) == 1 and len(cards(w)) == 1


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_an_incident_whose_window_was_removed_from_app_yaml_while_the_bot_was_down_pages_at_start(
        tmp_path: Path, pg_schema: str, database: str, caplog: pytest.LogCaptureFixture) -> None:
    """sunday-maint muted the incident, with a timer at 03:30 CET; the operator removed the window from app.yaml
    while the bot was down. At start its card is posted, the thread says why, Alice is paged and the audit records
    it; it did not wait for the old end. A second start, and the old timer at the old end, change nothing."""
    caplog.set_level(logging.INFO, logger="chatops.silences")
    async with a_store(database, tmp_path, pg_schema) as store, FakeSlack() as fake, FakeTelegram() as tg:
        async with restarted(store, fake, tg, T) as w:
            await w.h.post("open", db_alert())
            assert [t[1] for t in await end_timers(w)] == [WINDOW_END_KEY]
        caplog.clear()
        async with restarted(store, fake, tg, T + timedelta(minutes=30), WITHOUT_SUNDAY_MAINT) as w:
            await until(lambda: cards(w), "posted at start")
            assert said_at_start(caplog) == [
                "checked 1 muted incident(s) at start: 1 unsilenced (their firing alerts are not all covered by a "
                "silence in app.yaml any more), 0 given a timer at the end of the window covering them"]
            [card] = cards(w)
            assert "Firing" in text_of(card) and "Silenced" not in text_of(card)
            # (it did not end: its window runs on, in a version of app.yaml that is gone; the thread said "ended")
            gone = LINE.replace(" ended and", " is no longer in app.yaml and")
            await until(lambda: gone in thread_texts(w.slack), "the thread line names the window that muted it")
            await until(lambda: w.pages(ALICE_TG), "Alice is paged: step 1")
            assert await unsilenced(w) == [{
                "reason": "maintenance window sunday-maint (weekly maintenance) is no longer in app.yaml",
                "silence": "sunday-maint", "firing": 1,
                "note": "the maintenance window is no longer in app.yaml while its alerts still fired"}]
            [inc] = await w.h.incidents()
            assert not inc.silenced and inc.status == "triggered"
        async with restarted(store, fake, tg, T + timedelta(minutes=31), WITHOUT_SUNDAY_MAINT) as w:
            await asyncio.sleep(0.5)
            assert said_at_start(caplog) == []  # no muted incident: nothing to say
            assert len(await unsilenced(w)) == 1 and len(cards(w)) == 1 and len(w.pages(ALICE_TG)) == 1
            assert [e.details["step"] for e in await w.audit("escalation.step")] == [1]
            await at(w, END)  # the old timer runs, and finds nothing to do
            assert [t[1:4] for t in await end_timers(w)] == [(WINDOW_END_KEY, END, "done")]
            assert len(await unsilenced(w)) == 1 and len(cards(w)) == 1 and len(w.pages(ALICE_TG)) == 1


async def test_a_window_shortened_while_the_bot_was_down_ends_at_its_new_end(tmp_path: Path) -> None:
    """long-haul covered the alert until 04:00 UTC; app.yaml now ends it at 01:30 UTC. Started at 01:00 UTC, the
    incident stays muted, with a timer at the new end: it speaks at 01:30, not at 04:00."""
    shortened = BASE.replace("ends: 2026-10-25T04:00:00Z", "ends: 2026-10-25T01:30:00Z")
    store = (f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", None)
    new_end = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    async with FakeSlack() as fake, FakeTelegram() as tg:
        async with restarted(store, fake, tg, T) as w:
            await w.h.post("open", {**db_alert(), "labels": {"pod": "long"}})
        async with restarted(store, fake, tg, datetime(2026, 10, 25, 1, 0, tzinfo=UTC), shortened) as w:
            assert [t[2:4] for t in await end_timers(w)] == [
                (datetime(2026, 10, 25, 4, 0, tzinfo=UTC), "pending"), (new_end, "pending")]
            await at(w, new_end - timedelta(seconds=1))
            assert not cards(w) and (await w.h.incidents())[0].silenced
            await at(w, new_end)
            await until(lambda: cards(w), "posted at the window's new end")
            line = ("Maintenance window long-haul ended and 1 alert still fires: paging now, from step 1 of "
                    "escalation policy dba.")
            await until(lambda: line in thread_texts(w.slack), "the thread line")
            await until(lambda: w.pages(ALICE_TG), "Alice is paged")


async def test_replicas_that_check_the_muted_incidents_at_once_on_postgres_do_it_once(
        tmp_path: Path, pg_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two replicas start together (their start-up checks race on the same PostgreSQL): #1, whose window was
    removed, is posted and pages once; #2, muted by an older version without a timer, gets one timer."""
    caplog.set_level(logging.INFO, logger="chatops.silences")

    def two_replicas(bot: Bot) -> None:
        check = bot.silence_ends.at_start

        async def together(db: Database, clock: Clock) -> None:
            await asyncio.gather(check(db, clock), check(db, clock))
        bot.silence_ends.at_start = together  # type: ignore[method-assign]

    long_haul_end = datetime(2026, 10, 25, 4, 0, tzinfo=UTC)
    async with a_store("postgres", tmp_path, pg_schema) as (url, schema), FakeSlack() as fake, FakeTelegram() as tg:
        extra = slack_config(fake) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                      f"api_url: '{tg.api_url}'}}\n")
        async with restarted((url, schema), fake, tg, T) as w:
            await w.h.post("open", db_alert())
            await w.h.post("open", {**db_alert("db-02"), "labels": {"pod": "long"}})
            async with w.h.bot.db.transaction() as s:
                await s.execute(delete(Timer).where(Timer.kind == "silence.end", Timer.subject == "2"))
        caplog.clear()
        async with running_bot(url, extra, schema=schema, clock=FakeClock(T + timedelta(minutes=30)), people=PEOPLE,
                               base=WITHOUT_SUNDAY_MAINT, prepare=two_replicas) as h:
            w = World(h, Slack(h, fake), tg)
            await until(lambda: w.pages(ALICE_TG), "Alice is paged for #1")
            await asyncio.sleep(0.5)
            assert [e.incident_id for e in await w.audit("incident.unsilenced")] == [1]
            assert len(cards(w)) == 1 and len(w.pages(ALICE_TG)) == 1
            assert [e.incident_id for e in await w.audit("escalation.step")] == [1]
            assert [t[1:4] for t in await end_timers(w) if t[1] != WINDOW_END_KEY] == [
                (f"silence.end:2:{long_haul_end.isoformat()}", long_haul_end, "pending")]
            assert [i.silenced for i in await w.h.incidents()] == [False, True]
            # Each replica says what it did; which one did what is the race's (one both, or one each), the sum is not.
            said = said_at_start(caplog)
            pattern = re.compile(r"checked 2 muted incident\(s\) at start: (\d) unsilenced \(their firing alerts are not "
                                 r"all covered by a silence in app.yaml any more\), (\d) given a timer at the end of the "
                                 r"window covering them")
            done = [pattern.fullmatch(line) for line in said]
            assert len(said) == 2 and all(done), said
            assert [sum(int(m.group(i)) for m in done if m) for i in (1, 2)] == [1, 1], said
