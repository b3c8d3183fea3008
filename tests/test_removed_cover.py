"""Someone an override (a taken swap's cover, a manager's /override) puts on call, taken out of app.yaml before it
ends (the bot restarted on the new app.yaml): the rotation reaches nobody for that stretch. The bot says so where
it would otherwise announce or page them: a WARNING at start naming the override and what to do, the handoff notice
in the rotation's channel, and the escalation step on that rotation (in the thread, the log and the audit event),
which then moves on at once as before.

Tuesday 24 Nov 2026, 04:00 UTC (05:00 in Berlin, after hours). `primary` (weekly, Monday 09:00) has Bob this week;
an override puts Carol on from 05:00 UTC until Thursday 05:00 UTC. Then Carol leaves app.yaml.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from storage.models import OutboxItem, Override
from tests.botkit import T0
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_escalation import ALICE_TG, NIGHT, World, bot_in, thread_texts
from tests.test_escalation_removed import seen, steps_audited

BASE = """
timezone: Europe/Berlin
business_hours: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "18:00"}
audit: {hmac_key: escalation-key-0123456789ab}
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
  - {id: ops-telegram, platform: telegram, chat: "-100123"}
sources:
  - {id: open, kind: generic, auth: none}
rotations:
  - {id: primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02, channel: ops-slack,
     reminder: 0s}
escalation_policies:
  - id: standard
    steps:
      - {notify: {rotation: primary}, wait: 5m}
      - {notify: {people: [alice]}, wait: 5m}
routes:
  - {match: {}, channels: [ops-slack], escalation: standard}
"""
PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder, manager], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [responder], slack: U02BOB, telegram: 222222}
  - {id: carol, name: Carol, roles: [responder], slack: U03CAROL, telegram: 333333}
"""
WITHOUT_CAROL = PEOPLE.replace("  - {id: carol, name: Carol, roles: [responder], slack: U03CAROL, telegram: 333333}\n",
                               "")
COVER_FROM, COVER_UNTIL = NIGHT + timedelta(hours=1), NIGHT + timedelta(days=2)


@asynccontextmanager
async def carol_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[World]:
    """The bot, at 04:00 UTC, restarted on the app.yaml without Carol over a store with her cover."""
    caplog.set_level(logging.INFO, logger="chatops")
    assert WITHOUT_CAROL != PEOPLE
    async with FakeSlack() as slack, FakeTelegram() as tg:
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=PEOPLE) as w:
            async with w.h.bot.db.transaction() as session:
                session.add(Override(rotation="primary", person="carol", starts_at=COVER_FROM, ends_at=COVER_UNTIL,
                                     created_at=T0, created_by="bob", reason="swap #3: Carol covers for Bob"))
        caplog.clear()
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=WITHOUT_CAROL) as w:
            yield w


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_at_start_a_cover_by_someone_no_longer_in_app_yaml_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with carol_gone(tmp_path, caplog) as w:
        await seen(w, lambda: _warnings(caplog, "chatops.handoffs"), "the warning at start")
        assert _warnings(caplog, "chatops.handoffs") == [
            "override #1 (swap #3: Carol covers for Bob) puts carol, who is no longer in app.yaml, on call for "
            "primary from 2026-11-24T06:00+01:00 until 2026-11-26T05:00+01:00: nobody is paged for primary then. "
            "Put someone else on for that stretch: /override primary PERSON 2026-11-24T06:00+01:00 "
            "2026-11-26T05:00+01:00"]


async def test_the_handoff_to_someone_no_longer_in_app_yaml_says_so_rather_than_announce_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with carol_gone(tmp_path, caplog) as w:
        await seen(w, lambda: "handoff notice(s)" in caplog.text, "the handoffs planned at start")
        await w.tick(timedelta(hours=1))  # 05:00 UTC: the cover starts
        async with w.h.bot.db.sessions() as session:
            notices = (await session.execute(select(OutboxItem).where(OutboxItem.event == "handoff.notice")
                                             .order_by(OutboxItem.id))).scalars().all()
        assert [n.details["text"] for n in notices] == [
            "carol is no longer in app.yaml, yet an override puts them on call for `primary` until Thu 26 Nov "
            "05:00 CET, so nobody is paged for `primary` until then; Bob is next. Someone with the `manager` role "
            "can `/override primary` that stretch to someone else."]


async def test_an_escalation_step_on_the_rotation_says_why_it_paged_nobody_and_moves_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with carol_gone(tmp_path, caplog) as w:
        w.h.clock.advance(timedelta(hours=1))
        await w.alert("critical")
        await w.tick()
        await seen(w, lambda: "Step 1 of 2: carol, on call for primary through a swap or an override, is no "
                              "longer in app.yaml" in thread_texts(w.slack), "the thread says why step 1 paged nobody")
        await w.tick()
        await seen(w, lambda: w.pages(ALICE_TG), "step 2 pages Alice at once")
        steps = await steps_audited(w)
        assert [(s["step"], s["people"]) for s in steps] == [(1, []), (2, ["alice"])]
        assert steps[0]["removed"] == {"cover": {"person": "carol", "rotation": "primary", "override": 1}}
    warned = _warnings(caplog, "chatops.escalation")
    assert any("step 1 of 2" in m and "carol, on call for primary through a swap or an override, is no longer in "
               "app.yaml" in m for m in warned), warned


async def test_the_schedule_and_the_feed_mark_someone_no_longer_in_app_yaml(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/oncall and the .ics feed listed the override's person by their bare id, as if they covered the stretch."""
    async with carol_gone(tmp_path, caplog) as w:
        w.h.clock.advance(timedelta(hours=1))  # 05:00 UTC: the cover is under way
        answer = await w.slack.answer(await w.slack.command("/oncall", "primary", user="U01ALICE"))
        said = json.dumps(answer)
        assert "carol (override; no longer in app.yaml)" in said and "carol (override)" not in said, said
        resp = await w.h.client.get("/oncall/primary.ics")
        feed = (await resp.text()).replace("\r\n ", "")  # (long lines folded)
        assert resp.status == 200 and "SUMMARY:On call: carol (no longer in app.yaml) (primary)" in feed, feed
