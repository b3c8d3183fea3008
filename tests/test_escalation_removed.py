"""A running escalation keeps its policy as it was when the incident opened, while app.yaml may have changed since
(and the bot restarted on it): a person or a channel a step names may no longer be there. Such a step says so in
the thread and the log, and the escalation goes on as it does for a rotation no longer in app.yaml; the outbox
rows left for a channel no longer in app.yaml are given up (dead, saying why), not left pending for ever."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.settings import SETTINGS_MODELS
from bot.clock import FakeClock
from bot.config import parse_config
from bot.metrics import Metrics
from handlers.outbox import OutboxWorker
from storage.db import Database
from storage.models import OutboxItem
from tests.botkit import T0
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_escalation import ALICE_TG, CAROL_TG, NIGHT, World, bot_in, thread_texts

BASE = """
timezone: Europe/Berlin
business_hours: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "18:00"}
audit: {hmac_key: escalation-key-0123456789ab}
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
  - {id: ops-telegram, platform: telegram, chat: "-100123"}
sources:
  - {id: open, kind: generic, auth: none}
escalation_policies:
  - id: trio
    steps:
      - {notify: {people: [alice]}, wait: 5m}
      - {notify: {people: [bob]}, wait: 5m}
      - {notify: {people: [carol]}, wait: 5m}
  - id: pair
    steps:
      - {notify: {people: [alice]}, wait: 5m}
      - {notify: {people: [bob, carol]}, wait: 5m}
  - id: loud
    steps:
      - {notify: {people: [alice]}, wait: 5m}
      - {notify: {channel: ops-telegram}, wait: 5m}
routes:
  - {match: {team: pair}, channels: [ops-slack], escalation: pair}
  - {match: {team: loud}, channels: [ops-slack, ops-telegram], escalation: loud}
  - {match: {}, channels: [ops-slack], escalation: trio}
"""
PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [responder], slack: U02BOB, telegram: 222222}
  - {id: carol, name: Carol, roles: [responder], slack: U03CAROL, telegram: 333333}
"""
# Bob left: app.yaml no longer lists him, and its policies name Carol instead (as they must, to be valid).
WITHOUT_BOB = PEOPLE.replace("  - {id: bob, name: Bob, roles: [responder], slack: U02BOB, telegram: 222222}\n", "")
BASE_WITHOUT_BOB = BASE.replace("people: [bob]", "people: [carol]").replace("people: [bob, carol]", "people: [carol]")
# The Telegram group is no longer one of the bot's channels (Telegram itself stays on: pages go there).
BASE_WITHOUT_GROUP = (BASE.replace('  - {id: ops-telegram, platform: telegram, chat: "-100123"}\n', "")
                      .replace("channels: [ops-slack, ops-telegram]", "channels: [ops-slack]")
                      .replace("{channel: ops-telegram}", "{channel: ops-slack}"))


async def seen(w: World, predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Until `predicate()` holds (or fail saying `what`), a second on the clock at a time: a line Slack answered with
    a rate limit waits for the clock to pass its Retry-After (1 s), and the clock here moves only when told."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out waiting; {what}"
        w.h.clock.advance(timedelta(seconds=1))
        w.h.bot.outbox.nudge()
        await asyncio.sleep(0.5)


async def rows_in(w: World, channel: str) -> list[OutboxItem]:
    async with w.h.bot.db.sessions() as s:
        return list((await s.execute(select(OutboxItem).where(OutboxItem.channel == channel)
                                     .order_by(OutboxItem.id))).scalars().all())


async def given_up(w: World, channel: str, *, more_than: int, timeout: float = 10.0) -> list[OutboxItem]:
    """The channel's outbox rows, once there are more than `more_than` and none is pending any more (or fail)."""
    started = time.monotonic()
    while True:
        rows = await rows_in(w, channel)
        if len(rows) > more_than and all(r.status != "pending" for r in rows):
            return rows
        assert time.monotonic() - started < timeout, [(r.id, r.kind, r.status, r.last_error) for r in rows]
        w.h.bot.outbox.nudge()
        await asyncio.sleep(0.1)


async def steps_audited(w: World) -> list[dict[str, object]]:
    return [e.details for e in await w.audit("escalation.step")]


async def test_a_step_naming_a_person_no_longer_in_app_yaml_says_so_and_moves_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Alice is paged, and her page promises Bob in 5 min. Bob is then taken out of app.yaml and the bot restarted:
    step 2 (Bob, in the policy as the incident keeps it) pages nobody. The thread and the log say why, the audit
    event names him as removed, and Carol's step follows at once, as after a rotation no longer in app.yaml."""
    caplog.set_level(logging.INFO, logger="chatops")
    async with FakeSlack() as slack, FakeTelegram() as tg:
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=PEOPLE) as w:
            await w.alert("critical")
            await seen(w, lambda: "Paged Alice on Telegram. Bob in 5 min if nobody acknowledges." in thread_texts(
                w.slack), "step 1's line")
        async with bot_in(tmp_path, slack, tg, NIGHT + timedelta(minutes=5), base=BASE_WITHOUT_BOB,
                          people=WITHOUT_BOB) as w:
            await w.tick()
            await seen(w, lambda: "Step 2 of 3: bob is no longer in app.yaml" in thread_texts(w.slack),
                       "the thread says why step 2 paged nobody")
            await w.tick()
            await seen(w, lambda: w.pages(CAROL_TG), "step 3 pages Carol at once")
            await seen(w, lambda: any(t.startswith("Paged Carol on Telegram") for t in thread_texts(w.slack)),
                       "Carol's line")
            steps = await steps_audited(w)
            assert [(s["step"], s["people"]) for s in steps] == [(1, ["alice"]), (2, []), (3, ["carol"])]
            assert steps[1]["removed"] == {"people": ["bob"]}
            assert "removed" not in steps[0] and "removed" not in steps[2]
    warned = [r.getMessage() for r in caplog.records if r.name == "chatops.escalation" and r.levelno == logging.WARNING]
    assert any("#1" in m and "step 2 of 3" in m and "bob is no longer in app.yaml" in m for m in warned), warned


async def test_a_step_naming_several_people_pages_those_still_in_app_yaml_and_says_who_it_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Step 2 names Bob and Carol; Bob is no longer in app.yaml: Carol is paged, the thread says Bob was skipped,
    and the step's wait stands (someone was paged)."""
    caplog.set_level(logging.INFO, logger="chatops")
    async with FakeSlack() as slack, FakeTelegram() as tg:
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=PEOPLE) as w:
            await w.alert("critical", team="pair")
            await seen(w, lambda: w.pages(ALICE_TG), "step 1 pages Alice")
        async with bot_in(tmp_path, slack, tg, NIGHT + timedelta(minutes=5), base=BASE_WITHOUT_BOB,
                          people=WITHOUT_BOB) as w:
            await w.tick()
            await seen(w, lambda: w.pages(CAROL_TG), "step 2 pages Carol")
            await seen(w, lambda: "Step 2 of 2: skipped bob, no longer in app.yaml" in thread_texts(w.slack),
                       "the thread says who was skipped")
            await seen(w, lambda: any(t.startswith("Paged Carol on Telegram") for t in thread_texts(w.slack)),
                       "Carol's line")
            steps = await steps_audited(w)
            assert [(s["step"], s["people"], s.get("removed")) for s in steps] == [
                (1, ["alice"], None), (2, ["carol"], {"people": ["bob"]})]
            await w.tick(timedelta(minutes=4))
            assert (await w.escalation()).state == "active"  # Carol's 5 minutes run
    assert any("skipped bob, no longer in app.yaml" in r.getMessage() for r in caplog.records
               if r.name == "chatops.escalation" and r.levelno == logging.WARNING)


async def test_a_channel_step_whose_channel_is_no_longer_in_app_yaml_says_so_in_the_remaining_threads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The incident is routed to Slack and the Telegram group, and step 2 asks the group. The group is taken out of
    app.yaml and the bot restarted: step 2 queues nothing for it (the outbox would never send it), the Slack thread
    says the step's channel is no longer in app.yaml, the log warns, and the policy goes on (here: it finishes)."""
    caplog.set_level(logging.INFO, logger="chatops")
    async with FakeSlack() as slack, FakeTelegram() as tg:
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=PEOPLE) as w:
            await w.alert("critical", team="loud")
            await seen(w, lambda: any(t.startswith("Paged Alice on Telegram") for t in thread_texts(w.slack)),
                       "step 1's line")
        async with bot_in(tmp_path, slack, tg, NIGHT + timedelta(minutes=5), base=BASE_WITHOUT_GROUP,
                          people=PEOPLE) as w:
            await w.tick()
            await seen(w, lambda: "Step 2 of 2: channel ops-telegram is no longer in app.yaml" in thread_texts(w.slack),
                       "the Slack thread says why step 2 asked nobody")
            await w.tick()
            await seen(w, lambda: any("finished" in t for t in thread_texts(w.slack)), "the policy finishes")
            step = (await steps_audited(w))[1]
            assert (step["channel"], step["removed"]) == (None, {"channel": "ops-telegram"})
            rows = await rows_in(w, "ops-telegram")
            assert not [r for r in rows if r.event.startswith("escalation.")
                        and r.details.get("line", "").startswith("Step 2")]
            assert not [c for c in tg.called("sendMessage") if c.params["chat_id"] == "-100123"
                        and "Step 2" in c.params.get("text", "")]
    assert any("#1" in r.getMessage() and "channel ops-telegram is no longer in app.yaml" in r.getMessage()
               for r in caplog.records if r.name == "chatops.escalation" and r.levelno == logging.WARNING)


async def test_deliveries_for_a_channel_no_longer_in_app_yaml_are_given_up_saying_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The Telegram group is down (502) while an incident routed there opens: its card and lines wait, pending. The
    group is then taken out of app.yaml and the bot restarted: no loop serves that channel any more, so they would
    wait for ever, and stopping would say they go after the next start. They are marked dead at start, saying why,
    with one warning counting them; what the running bot queues for it later (the incident's redraws) goes the same
    way, and stopping counts none of them as still to go."""
    caplog.set_level(logging.INFO, logger="chatops")
    async with FakeSlack() as slack, FakeTelegram() as tg:
        tg.fail("sendMessage", "Bad Gateway", 502, times=1000)
        async with bot_in(tmp_path, slack, tg, NIGHT, base=BASE, people=PEOPLE) as w:
            await w.alert("critical", team="loud")
            await seen(w, lambda: any(t.startswith("Could not page Alice") or t.startswith("Paged Alice")
                                    for t in thread_texts(w.slack)), "step 1's line in Slack")
            waiting = [r for r in await rows_in(w, "ops-telegram") if r.status == "pending"]
            assert waiting, "the group's card waits"
        caplog.clear()
        async with bot_in(tmp_path, slack, tg, NIGHT + timedelta(minutes=1), base=BASE_WITHOUT_GROUP,
                          people=PEOPLE) as w:
            gone = "channel ops-telegram is no longer in app.yaml"
            rows = await given_up(w, "ops-telegram", more_than=0)
            assert rows and all((r.status, r.last_error) == ("dead", gone) for r in rows), [
                (r.id, r.status, r.last_error) for r in rows]
            warned = [r.getMessage() for r in caplog.records if r.name == "chatops.outbox"
                      and r.levelno == logging.WARNING and "ops-telegram" in r.getMessage()]
            assert len(warned) == 1 and f"{len(rows)} " in warned[0] and "no longer in app.yaml" in warned[0], warned
            # The running bot redraws the incident in every channel it was routed to: the group's redraw is given up too
            ack = await w.slack.answer(await w.slack.command("/incident", "ack 1", user="U01ALICE"))
            assert ack["text"] == "Acknowledged #1."
            later = await given_up(w, "ops-telegram", more_than=len(rows))
            assert all((r.status, r.last_error) == ("dead", gone) for r in later)
            caplog.clear()
            await w.h.bot.outbox.stop(drain=1.0)
    assert "still queued" not in caplog.text and "after the next start" not in caplog.text, caplog.text


async def test_rows_for_a_channel_no_longer_in_app_yaml_wait_out_a_rolling_deploy_on_postgresql(db: Database) -> None:
    """With several replicas, a rolling deploy that adds a channel runs replicas on the new app.yaml (which queue
    for it) beside a leader still on the old one, to which the channel is unknown: on PostgreSQL its rows are given
    up only once they have waited 10 minutes; on SQLite one bot serves the store, and gives them up at once."""
    loaded = parse_config(BASE + PEOPLE, adapter_models=SETTINGS_MODELS, env={})
    clock = FakeClock(T0)
    worker = OutboxWorker(db=db, config=loaded.config, adapters={}, clock=clock, metrics=Metrics())
    async with db.transaction() as session:
        for channel, age in (("ops-new", 1), ("ops-new", 11), ("ops-slack", 11)):
            session.add(OutboxItem(created_at=T0 - timedelta(minutes=age), due_at=T0 - timedelta(minutes=age),
                                   channel=channel, kind="reply", event="note", details={}))
    assert await worker._give_up_gone(T0) == (1 if db.is_postgres else 2)
    async with db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).order_by(OutboxItem.id))).scalars().all()
    states = [(r.channel, r.status) for r in rows]
    assert states == [("ops-new", "pending" if db.is_postgres else "dead"), ("ops-new", "dead"),
                      ("ops-slack", "pending")], states
    clock.advance(timedelta(minutes=9, seconds=1))
    assert await worker._give_up_gone(clock.now()) == (1 if db.is_postgres else 0)
