"""The end of a maintenance window, end to end on a fake clock: an incident a silence muted speaks when the window
ends while its alerts still fire, without waiting for the source to send them again (Alertmanager does only after
its repeat_interval, 4 h by default; a generic sender may never). The real bot, slack-bolt and python-telegram-bot
against the fake Slack and Telegram servers; the window's end is a durable timer, so a restart does not lose it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.clock import FakeClock
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


async def test_only_an_open_incident_whose_alerts_still_fire_speaks_when_the_window_ends(tmp_path: Path) -> None:
    """#1's alert stopped during the window (its source resolved it), #2 was acknowledged by Alice from
    `/incident show`: neither is posted or pages anyone at the end. #3 still fires: it speaks."""
    async with world(tmp_path, T, base=BASE) as w:
        for asset in ("db-01", "db-02", "db-03"):
            await w.h.post("open", db_alert(asset))
        await w.h.post("open", {**db_alert("db-01"), "status": "resolved"})
        answer = await w.slack.answer(await w.slack.command("/incident", "ack 2", user="U01ALICE"))
        assert "cknowledged" in answer["text"]
        await at(w, END)
        await until(lambda: cards(w), "#3 is posted")
        await asyncio.sleep(0.5)
        assert len(cards(w)) == 1 and "db-03" in text_of(cards(w)[0])
        assert [e.incident_id for e in await w.audit("incident.unsilenced")] == [3]
        assert [e.incident_id for e in await w.audit("escalation.step")] == [3]
        assert [i.silenced for i in await w.h.incidents()] == [True, True, False]


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
