"""Shift swaps end to end: `/swap` and its buttons through the fake Slack, on the harness's fake clock.

The clock starts on Tuesday 24 Nov 2026, 04:00 UTC. dba-primary (weekly, Monday 09:00 Berlin) has Bob
this week and Alice from Monday 30 Nov; web (12 hours from 09:00 New York, swaps need a `manager`'s
approval) has Carol tonight. Dave is a manager outside both rotations; Erin is in none.

Direct messages are outbox rows (`kind` direct, `channel` @person) queued in the transaction of the
change; the tests read them there, with their buttons, as the outbox worker will deliver them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlmodel import select

from bot.actions import encode
from bot.clock import FakeClock
from storage import timers as timer_store
from storage.models import AuditEvent, OutboxItem, Override, SwapRequest, Timer
from tests.botkit import T0, Harness, bot_on, running_bot
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_outbox import drain
from tests.test_slack_flow import CLICK, Slack, button_values, slack_config, text_of

PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [manager], slack: U02BOB}
  - {id: carol, name: Carol, slack: U03CAROL}
  - {id: dave, name: Dave, roles: [manager], slack: U04DAVE, timezone: Asia/Tokyo}
  - {id: erin, name: Erin, slack: U05ERIN}
"""
ROTATIONS = """
rotations:
  - {id: dba-primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02,
     timezone: Europe/Berlin, channel: ops-slack, reminder: 0s}
  - {id: web, members: [bob, carol], shift: 12h, handoff: "09:00", start: 2026-11-20, timezone: America/New_York,
     swap_approval: manager, swap_expiry: 2h, reminder: 0s}
"""
ALICE, BOB, CAROL, DAVE, ERIN = "U01ALICE", "U02BOB", "U03CAROL", "U04DAVE", "U05ERIN"
ALICE_NEXT = "from Mon 30 Nov 09:00 CET until Mon 7 Dec 09:00 CET"


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake) + ROTATIONS,
                                           people=PEOPLE) as h:
        yield Slack(h, fake)


@pytest.fixture
async def on_sqlite(tmp_path: Path) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
        yield Slack(h, fake)


# -- the test's hands and eyes ----------------------------------------------------------------------------

async def say(s: Slack, text: str, user: str = ALICE, command: str = "/swap") -> str:
    return (await s.answer(await s.command(command, text, user=user)))["text"]


async def press(s: Slack, value: str, user: str, *, message_ts: str | None = None) -> str:
    """A click on a button of a direct message (`message_ts`: which one the bot posted; else a made-up one),
    signed the way Slack signs it; the ephemeral answer."""
    s.clicks += 1
    key = f"dm-click{s.clicks}"
    payload: dict[str, Any] = json.loads(json.dumps(CLICK))
    dm = "D" + user[1:]
    payload["user"] = {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"}
    payload["channel"] = {"id": dm, "name": "directmessage"}
    payload["container"].update(channel_id=dm, message_ts=message_ts or f"1700000500.{s.clicks:06d}")
    payload["message"]["ts"] = payload["container"]["message_ts"]
    payload["response_url"] = s.fake.response_url(key)
    action = payload["actions"][0]
    action["value"], action["action_id"] = value, f"chatops:{value.split(':')[0]}"
    action["action_ts"] = f"1700000500.{s.clicks:06d}"
    status, _ = await s.event(urlencode({"payload": json.dumps(payload)}))
    assert status == 200
    answer = await s.answer(key)
    assert answer["response_type"] == "ephemeral"
    return answer["text"]


async def directs(h: Harness, person: str) -> list[tuple[str, str, list[str]]]:
    """Direct messages queued for a person: (event, text, button values)."""
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "direct",
                                                               OutboxItem.channel == f"@{person}")
                                      .order_by(OutboxItem.id))).scalars().all()
    return [(r.event, r.details["text"], [encode(b["action"], b["id"], b.get("arg") or "") for b in r.details["buttons"]])
            for r in rows]


async def notices(h: Harness) -> list[tuple[str, str, str]]:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "notice")
                                      .order_by(OutboxItem.id))).scalars().all()
    return [(r.channel, r.event, r.details["text"]) for r in rows]


async def swaps(h: Harness) -> list[SwapRequest]:
    async with h.bot.db.sessions() as session:
        return list((await session.execute(select(SwapRequest).order_by(SwapRequest.id))).scalars().all())


async def overrides(h: Harness) -> list[Override]:
    async with h.bot.db.sessions() as session:
        return list((await session.execute(select(Override).order_by(Override.id))).scalars().all())


async def audit(h: Harness, prefix: str = "swap.") -> list[tuple[str, str | None, dict[str, Any]]]:
    async with h.bot.db.sessions() as session:
        events = (await session.execute(select(AuditEvent).order_by(AuditEvent.seq))).scalars().all()
    return [(e.action, e.actor_person, e.details) for e in events
            if e.action.startswith(prefix) or (prefix == "swap." and e.action == "oncall.override")]


async def expiry_timers(h: Harness) -> list[tuple[str, str, datetime]]:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(Timer).where(Timer.kind == "swap.expire").order_by(Timer.id))).scalars().all()
    return [(t.subject, t.status, t.due_at) for t in rows]


def table_rows(text: str) -> list[list[str]]:
    block = text.split("```")[1].strip("\n")
    return [re.split(r"\s{2,}", line.strip()) for line in block.splitlines()]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- the flows ----------------------------------------------------------------------------------------------

async def test_a_swap_is_asked_in_a_dm_accepted_with_its_button_and_changes_who_is_on_call(slack: Slack) -> None:
    s, h = slack, slack.h
    asked = await say(s, "<@U02BOB|bob> dba-primary next")
    assert asked == (f"Asked Bob to take your `dba-primary` shift {ALICE_NEXT} (swap #1); it expires "
                     "Wed 25 Nov 05:00 CET. `/swap cancel 1` cancels it.")
    [(event, text, buttons)] = await directs(h, "bob")
    assert (event, buttons) == ("swap.requested", ["swok:1", "swno:1"])
    assert text == (f"Alice asks you to take their `dba-primary` shift {ALICE_NEXT} (swap #1). "
                    "Please answer by Wed 25 Nov 05:00 CET.")
    [(_, mine, cancel)] = await directs(h, "alice")
    assert cancel == ["swcx:1"] and mine.startswith("You asked Bob to take your `dba-primary` shift")
    # the outbox worker delivers it: Bob's direct conversation with the bot, with the buttons
    await s.fake.wait_for(lambda: s.posts("D02BOB") and s.posts("D01ALICE"), timeout=5)
    [dm] = s.posts("D02BOB")
    assert button_values(dm) == ["swok:1", "swno:1"] and "Alice asks you to take their" in text_of(dm)
    [swap] = await swaps(h)
    assert (swap.status, swap.requester, swap.counterpart, swap.requested_on) == ("pending", "alice", "bob", "slack")
    assert (swap.starts_at, swap.ends_at) == (datetime(2026, 11, 30, 8, tzinfo=UTC), datetime(2026, 12, 7, 8, tzinfo=UTC))
    assert await expiry_timers(h) == [("1", "pending", T0 + timedelta(hours=24))]
    assert await overrides(h) == []

    assert await press(s, "swok:1", ALICE) == "Only Bob can accept swap #1."
    accepted = await press(s, "swok:1", BOB)
    assert accepted == (f"Accepted: you are on call for `dba-primary` {ALICE_NEXT} instead of Alice (swap #1).")
    [override] = await overrides(h)
    assert (override.person, override.rotation, override.starts_at, override.ends_at, override.cancelled_at) == (
        "bob", "dba-primary", swap.starts_at, swap.ends_at, None)
    [swap] = await swaps(h)
    assert (swap.status, swap.decided_by, swap.override_ids) == ("accepted", "bob", [override.id])
    assert await expiry_timers(h) == [("1", "cancelled", T0 + timedelta(hours=24))]
    table = table_rows(await say(s, "dba-primary", user=CAROL, command="/oncall"))
    assert table[2][:3] == ["Bob (override)", "Mon 30 Nov 09:00 CET", "Mon 7 Dec 09:00 CET"]
    assert "swap #1: Bob covers for Alice" in table[2][3]
    # both are told, with an Undo button, and so is the rotation's channel
    assert (await directs(h, "alice"))[-1] == (
        "swap.accepted", f"Bob takes your `dba-primary` shift {ALICE_NEXT} (swap #1). Either of you can undo it "
        "before it starts: the button, or `/swap undo 1`.", ["swun:1"])
    assert (await directs(h, "bob"))[-1] == (
        "swap.accepted", f"You are on call for `dba-primary` {ALICE_NEXT} instead of Alice (swap #1).", ["swun:1"])
    assert await notices(h) == [("ops-slack", "swap.notice",
                                 f"Bob covers `dba-primary` for Alice {ALICE_NEXT} (swap #1).")]
    await s.fake.wait_for(lambda: s.posts() and len(s.posts("D01ALICE")) == 2, timeout=5)
    assert f"Bob covers `dba-primary` for Alice {ALICE_NEXT} (swap #1)." in text_of(s.posts()[-1])
    assert button_values(s.posts("D01ALICE")[-1]) == ["swun:1"]
    assert [(a, who) for a, who, _ in await audit(h)] == [
        ("swap.requested", "alice"), ("swap.accepted", "bob"), ("oncall.override", "bob")]
    assert await press(s, "swok:1", BOB) == "You already accepted swap #1."  # a second click changes nothing
    assert len(await overrides(h)) == 1

    listed = await say(s, "list", user=BOB)
    assert table_rows(listed)[1] == ["#1", "dba-primary", "Bob for Alice", "Mon 30 Nov 09:00 CET",
                                     "Mon 7 Dec 09:00 CET", "taken"]


async def test_an_accepted_swap_waits_for_a_manager_who_is_not_part_of_it(slack: Slack) -> None:
    s, h = slack, slack.h
    asked = await say(s, "bob web 2026-11-25", user=CAROL)  # the shift of Carol's that starts that day: the night
    assert asked.startswith("Asked Bob to take your `web` shift from Wed 25 Nov 21:00 EST until Thu 26 Nov 09:00 EST "
                            "(swap #1); it expires Tue 24 Nov 01:00 EST.")  # swap_expiry: 2h
    [(_, text, _)] = await directs(h, "bob")
    assert "Once you accept, someone with the `manager` role approves it." in text
    h.clock.advance(timedelta(hours=1))
    accepted = await press(s, "swok:1", BOB)
    assert accepted == "Accepted swap #1. It needs approval by someone with the `manager` role (Dave); " \
                       "I will tell you when it is approved."
    [swap] = await swaps(h)
    assert swap.status == "awaiting_approval" and await overrides(h) == []
    assert swap.expires_at == T0 + timedelta(hours=3)  # the approvers get a fresh window
    assert [(subject, status) for subject, status, _ in await expiry_timers(h)] == [("1", "cancelled"), ("1", "pending")]
    [(event, text, buttons)] = await directs(h, "dave")  # Bob has the role too, but he is part of the swap
    assert (event, buttons) == ("swap.approval", ["swapv:1", "swrej:1"])
    assert "Bob agreed to take Carol's `web` shift from Thu 26 Nov 11:00 JST" in text  # Dave reads Tokyo time
    assert (await directs(h, "carol"))[-1][0] == "swap.accepted"

    async with h.bot.db.transaction() as session:  # a stray expiry timer due before the new deadline does nothing
        await timer_store.schedule(session, "swap.expire", 1, h.clock.now(), h.clock.now(), payload={"swap": 1})
    await h.bot.timers.tick()
    assert [status for _, status, _ in await expiry_timers(h)] == ["cancelled", "pending", "done"]
    assert (await swaps(h))[0].status == "awaiting_approval"

    assert await press(s, "swapv:1", BOB) == ("You are part of swap #1, so someone else with the `manager` role "
                                               "approves it (Dave).")
    assert await press(s, "swapv:1", CAROL) == ("Only someone with the `manager` role can approve swap #1, and Carol "
                                                 "has no roles.")
    assert await press(s, "swok:1", BOB) == "Swap #1 was accepted by Bob and is waiting for approval."
    approved = await press(s, "swapv:1", DAVE)
    assert approved == ("Approved swap #1: Bob covers `web` for Carol from Thu 26 Nov 11:00 JST until "
                        "Thu 26 Nov 23:00 JST.")
    [override] = await overrides(h)
    assert (override.person, override.starts_at) == ("bob", datetime(2026, 11, 26, 2, tzinfo=UTC))
    [swap] = await swaps(h)
    assert (swap.status, swap.approval_by) == ("approved", "dave")
    assert [(a, who) for a, who, _ in await audit(h)] == [
        ("swap.requested", "carol"), ("swap.accepted", "bob"), ("swap.approved", "dave"), ("oncall.override", "dave")]
    approval = (await audit(h))[2][2]
    assert (approval["self_approved"], approval["role"]) == (False, "manager")
    assert "approved" in (await directs(h, "carol"))[-1][1] and (await directs(h, "carol"))[-1][2] == ["swun:1"]
    assert await press(s, "swapv:1", DAVE) == "You already approved swap #1."
    assert await press(s, "swapv:1", BOB) == "Swap #1 was already approved by Dave."


async def test_a_manager_can_reject_and_an_unapproved_swap_expires(slack: Slack) -> None:
    s, h = slack, slack.h
    await say(s, "bob web 2026-11-25", user=CAROL)
    await press(s, "swok:1", BOB)
    assert await press(s, "swrej:1", DAVE) == "Rejected swap #1; Carol and Bob are told."
    [swap] = await swaps(h)
    assert (swap.status, swap.approval_by) == ("declined", "dave") and await overrides(h) == []
    assert (await directs(h, "carol"))[-1][1].startswith("Dave did not approve swap #1: Carol stays on call for `web`")

    await say(s, "bob web 2026-11-25", user=CAROL)  # again; this time nobody approves in time
    await press(s, "swok:2", BOB)
    h.clock.advance(timedelta(hours=2, seconds=1))
    await h.bot.timers.tick()
    await until(lambda: _status(h, 2, "expired"))
    assert (await directs(h, "carol"))[-1][1].startswith("Swap #2 expired: nobody with the `manager` role approved it")
    assert (await directs(h, "bob"))[-1][0] == "swap.expired"
    assert await press(s, "swapv:2", DAVE) == "Swap #2 expired Tue 24 Nov 15:00 JST."
    assert [a for a, _, _ in await audit(h)][-1] == "swap.expired" and await overrides(h) == []


async def _status(h: Harness, swap_id: int, status: str) -> bool:
    return any(sw.id == swap_id and sw.status == status for sw in await swaps(h))


async def test_declining_tells_the_requester_and_changes_nothing(slack: Slack) -> None:
    s, h = slack, slack.h
    await say(s, "bob next")  # Alice is in one rotation with Bob: dba-primary
    assert await press(s, "swno:1", ALICE) == "Only Bob can decline swap #1."
    assert await press(s, "swno:1", BOB) == "Declined swap #1; Alice is told."
    assert (await directs(h, "alice"))[-1] == (
        "swap.declined", f"Bob declined to take your `dba-primary` shift {ALICE_NEXT} (swap #1). It stays yours.", [])
    [swap] = await swaps(h)
    assert (swap.status, swap.decided_by) == ("declined", "bob")
    assert await overrides(h) == [] and (await expiry_timers(h))[0][1] == "cancelled"
    assert await press(s, "swok:1", BOB) == "You already declined swap #1."
    assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.declined"]


async def test_only_the_requester_cancels_by_button_or_command(slack: Slack) -> None:
    s, h = slack, slack.h
    await say(s, "bob next")
    assert await say(s, "cancel 1", user=BOB) == "Only Alice, who asked, can cancel swap #1 (you can decline it)."
    assert await press(s, "swcx:1", ALICE) == "Cancelled swap #1; Bob is told."
    assert (await directs(h, "bob"))[-1][0:2] == (
        "swap.cancelled", f"Alice cancelled swap #1 (their `dba-primary` shift {ALICE_NEXT}): nothing to do.")
    assert await press(s, "swok:1", BOB) == "Swap #1 was cancelled by Alice."
    assert await say(s, "cancel #1") == "You already cancelled swap #1."
    await say(s, "bob next")  # a cancelled request no longer blocks a new one
    assert await say(s, "cancel 2") == "Cancelled swap #2; Bob is told."
    assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.cancelled", "swap.requested", "swap.cancelled"]
    assert await overrides(h) == []


async def test_either_side_undoes_a_taken_swap_before_it_starts_and_not_after(slack: Slack) -> None:
    s, h = slack, slack.h
    await say(s, "bob next")
    await press(s, "swok:1", BOB)
    assert await say(s, "undo 1", user=CAROL) == "Only Alice or Bob can undo swap #1."
    assert await say(s, "undo 1") == f"Undone: Alice is on call for `dba-primary` {ALICE_NEXT} again (swap #1)."
    [override] = await overrides(h)
    assert override.cancelled_at == T0
    assert table_rows(await say(s, "dba-primary", command="/oncall"))[2][0] == "Alice"
    assert (await directs(h, "bob"))[-1][0:2] == (
        "swap.undone", f"Alice undid swap #1: Alice is on call for `dba-primary` {ALICE_NEXT} again, not Bob.")
    assert (await notices(h))[-1] == ("ops-slack", "swap.notice",
                                      f"Swap #1 is undone: Alice is on call for `dba-primary` {ALICE_NEXT} again.")
    assert await press(s, "swun:1", BOB) == "Swap #1 was undone by Alice."
    undone = [d for a, _, d in await audit(h) if a == "swap.undone"]
    assert undone == [{"rotation": "dba-primary", "requester": "alice", "counterpart": "bob",
                       "from": "2026-11-30T08:00:00+00:00", "until": "2026-12-07T08:00:00+00:00",
                       "overrides": [override.id]}]

    # Bob's own shift is under way: a swap of it covers the rest from when it is taken, and cannot be undone
    asked = await say(s, "alice dba-primary 2026-11-24", user=BOB)
    assert "from Tue 24 Nov 05:00 CET until Mon 30 Nov 09:00 CET (swap #2)" in asked
    h.clock.advance(timedelta(minutes=30))
    assert (await press(s, "swok:2", ALICE)).startswith(
        "Accepted: you are on call for `dba-primary` from Tue 24 Nov 05:30 CET until Mon 30 Nov 09:00 CET")
    assert table_rows(await say(s, "", command="/oncall"))[1][1] == "Alice (override)"
    _, told, buttons = (await directs(h, "bob"))[-1]  # no Undo is offered for a cover that starts at once
    assert told.startswith("Alice takes your `dba-primary` shift") and "undo" not in told and buttons == []
    assert (await directs(h, "alice"))[-1][2] == []
    assert await press(s, "swun:2", BOB) == ("Swap #2 started Tue 24 Nov 05:30 CET, so it can no longer be undone; "
                                             "someone with the `manager` role can still `/override` the rest.")


async def test_an_unanswered_request_expires_and_the_requester_is_told(slack: Slack) -> None:
    s, h = slack, slack.h
    await say(s, "bob next")
    h.clock.advance(timedelta(hours=23, minutes=59))
    await h.bot.timers.tick()
    assert (await swaps(h))[0].status == "pending"
    h.clock.advance(timedelta(minutes=1))
    await h.bot.timers.tick()
    await until(lambda: _status(h, 1, "expired"))
    assert (await directs(h, "alice"))[-1] == (
        "swap.expired", "Your swap #1 expired: Bob did not answer by Wed 25 Nov 05:00 CET. Your `dba-primary` shift "
        f"{ALICE_NEXT} stays yours.", [])
    [expired] = [(who, d) for a, who, d in await audit(h) if a == "swap.expired"]
    assert expired[0] is None and expired[1]["was"] == "pending"
    assert await press(s, "swok:1", BOB) == "Swap #1 expired Wed 25 Nov 05:00 CET."
    assert await overrides(h) == []


async def test_a_click_after_the_deadline_expires_the_request_even_before_its_timer_runs(on_sqlite: Slack) -> None:
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob next")
    await h.bot.timers.stop()  # the tick is late (a slow database, a restart under way)
    h.clock.advance(timedelta(hours=25))
    assert await press(s, "swok:1", BOB) == "Swap #1 expired Wed 25 Nov 05:00 CET; Alice can ask again."
    assert (await swaps(h))[0].status == "expired" and await overrides(h) == []
    assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.expired"]


async def test_a_decline_after_the_deadline_expires_the_request_even_before_its_timer_runs(on_sqlite: Slack) -> None:
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob next")
    await h.bot.timers.stop()
    h.clock.advance(timedelta(hours=25))
    assert await press(s, "swno:1", BOB) == "Swap #1 expired Wed 25 Nov 05:00 CET; there is nothing left to decline."
    assert (await swaps(h))[0].status == "expired" and await overrides(h) == []
    assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.expired"]
    assert [e for e, _, _ in await directs(h, "alice")] == ["swap.asked", "swap.expired"]  # not "declined"


async def test_a_request_past_its_deadline_does_not_block_a_new_one_before_its_timer_runs(on_sqlite: Slack) -> None:
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob next")
    await h.bot.timers.stop()
    h.clock.advance(timedelta(hours=25))
    asked = await say(s, "bob next")  # it said "That overlaps swap #1 ..., which is still waiting for an answer"
    assert asked.startswith("Asked Bob to take your `dba-primary` shift") and "(swap #2)" in asked, asked
    assert [w.status for w in await swaps(h)] == ["expired", "pending"]
    assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.expired", "swap.requested"]


async def test_a_restart_between_request_and_expiry_still_expires_it_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            await say(Slack(h, fake), "bob next")
        later = FakeClock(T0 + timedelta(hours=30))  # the bot was down when the request fell due
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE, clock=later) as h:
            await until(lambda: _status(h, 1, "expired"))  # the first beat after start runs it
            await h.bot.timers.tick()
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE, clock=later) as h:
            await h.bot.timers.tick()
            assert [a for a, _, _ in await audit(h)] == ["swap.requested", "swap.expired"]
            assert [e for e, _, _ in await directs(h, "alice")] == ["swap.asked", "swap.expired"]
            assert await expiry_timers(h) == [("1", "done", T0 + timedelta(hours=24))]


async def test_swap_list_shows_mine_and_what_i_may_approve(slack: Slack) -> None:
    s = slack
    assert (await say(s, "list")).startswith("You have no open or upcoming swaps.")
    await say(s, "bob next")
    await say(s, "bob web 2026-11-25", user=CAROL)
    await press(s, "swok:2", BOB)
    mine = table_rows(await say(s, "list"))
    assert mine == [["swap", "rotation", "who", "from", "until", "state"],
                    ["#1", "dba-primary", "Bob for Alice", "Mon 30 Nov 09:00 CET", "Mon 7 Dec 09:00 CET",
                     "waiting for Bob until Wed 25 Nov 05:00 CET"]]
    dave_sees = table_rows(await say(s, "list", user=DAVE))
    assert dave_sees[1:] == [["#2", "web", "Bob for Carol", "Thu 26 Nov 11:00 JST", "Thu 26 Nov 23:00 JST",
                         "waiting for approval (manager) until Tue 24 Nov 15:00 JST"]]
    assert [r[0] for r in table_rows(await say(s, "list", user=BOB))[1:]] == ["#2", "#1"]  # by start


# -- precise answers to mistakes ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "user", "expected"), [
    ("zed next", ALICE, "I don't know 'zed' (people in app.yaml: alice, bob, carol, dave, erin)."),
    ("bob nightly next", ALICE, "There is no rotation `nightly`. Known rotations: `dba-primary`, `web`."),
    ("bob dba-primary 2026-11-20", ALICE, "2026-11-20 is in the past (today is 2026-11-24 in Europe/Berlin)."),
    ("bob dba-primary 2026-11-25", ALICE,
     "You are not on call for `dba-primary` on Wed 25 Nov (Bob is), so there is no shift of yours to swap. "
     "Your next `dba-primary` shift starts Mon 30 Nov 09:00 CET (`next`)."),
    ("bob dba-primary 2026-11-30T08:00", ALICE,
     "You are not on call for `dba-primary` at Mon 30 Nov 08:00 CET (Bob is), so there is no shift of yours to swap. "
     "Your next `dba-primary` shift starts Mon 30 Nov 09:00 CET (`next`)."),
    ("carol web 2026-11-23", BOB, "Your `web` shift on Mon 23 Nov is over already (it ended Mon 23 Nov 21:00 EST)."),
    ("alice next", ALICE, "You cannot swap with yourself: name the person who should take your shift."),
    ("<@U01ALICE> next", ALICE, "You cannot swap with yourself: name the person who should take your shift."),
    ("carol dba-primary next", ALICE,
     "Carol is not a member of `dba-primary` (members: alice, bob), so they cannot take a shift in it."),
    ("erin next", ALICE, "Erin is not a member of any of your rotations (yours: `dba-primary`)."),
    ("bob next", ERIN, "You are not a member of any rotation; name one: `/swap bob ROTATION DATE`. "
                       "Known rotations: `dba-primary`, `web`."),
    ("bob dba-primary tomorrow", ALICE,
     "'tomorrow' is not a date: give DATE as `2026-12-24` (a day in Europe/Berlin), a time such as "
     "`2026-12-24T09:00`, or `next` for your next shift."),
    ("bob", ALICE, "Usage: `/swap PERSON [ROTATION] DATE|next | /swap list | /swap cancel ID | /swap undo ID`"),
    ("cancel x", ALICE, "Usage: `/swap cancel ID`, with the swap's number (`/swap list` shows yours)."),
    ("cancel \u00b2", ALICE, "Usage: `/swap cancel ID`, with the swap's number (`/swap list` shows yours)."),  # a traceback
    ("cancel " + "9" * 5000, ALICE, "Usage: `/swap cancel ID`, with the swap's number"),  # too long for int()
    ("undo 99", ALICE, "There is no swap #99."),
    ("z" * 12_000 + " next", ALICE, f"I don't know '{'z' * 79}\u2026' (people in app.yaml:"),  # not echoed whole
    ("bob dba-primary " + "z" * 12_000, ALICE, f"'{'z' * 79}\u2026' is not a date: give DATE"),
])
async def test_mistakes_get_a_precise_answer_and_change_nothing(on_sqlite: Slack, text: str, user: str,
                                                                expected: str) -> None:
    answer = await say(on_sqlite, text, user=user)
    assert answer.startswith(expected), answer
    assert await swaps(on_sqlite.h) == [] and await audit(on_sqlite.h) == []
    assert await directs(on_sqlite.h, "bob") == []


async def test_a_day_two_others_share_names_both(tmp_path: Path) -> None:
    """"(Alice, Bob is)" was said of a day with a handoff between two others."""
    trio = ("  - {id: trio, members: [alice, bob, carol], shift: 1d, handoff: '09:00', start: 2026-11-02, "
            "timezone: Europe/Berlin}\n")
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS + trio, people=PEOPLE) as h:
        answer = await say(Slack(h, fake), "alice trio 2026-11-27", user=CAROL)
    assert answer.startswith("You are not on call for `trio` on Fri 27 Nov (Alice and Bob are), so there is no shift "
                             "of yours to swap."), answer


@pytest.mark.parametrize(("user", "example", "expiry"), [
    (ALICE, "/swap bob dba-primary 2026-11-30", "1d"),  # her next shift, with the one she shares the rotation with
    (CAROL, "/swap bob web 2026-11-24", "2h"),  # tonight's 21:00 New York shift: the day in the rotation's zone
    (ERIN, "/swap alice dba-primary 2026-11-25", "1d"),  # in no rotation: a real one, someone else, and tomorrow
])
async def test_the_usage_example_is_made_of_app_yaml_and_works_when_copied(on_sqlite: Slack, user: str, example: str,
                                                                          expiry: str) -> None:
    who = example.split()[1].capitalize()
    assert await say(on_sqlite, "", user=user) == (
        "Usage: `/swap PERSON [ROTATION] DATE|next | /swap list | /swap cancel ID | /swap undo ID`.\n"
        f"`{example}` asks {who} to take your `{example.split()[2]}` shift on that day (`next`: your next shift; "
        f"ROTATION may be left out when you are in one rotation with them). {who} gets Accept and Decline buttons; "
        f"the request expires after the rotation's `swap_expiry` ({expiry}). `/swap accept|decline|approve|reject ID` "
        "do what the buttons do.")
    assert f", for example `{example}` or `/swap {who.lower()} next` (a name" in await say(on_sqlite, "bob", user=user)
    if user != ERIN:
        assert (await say(on_sqlite, example.removeprefix("/swap "), user=user)).startswith(
            f"Asked {who} to take your `{example.split()[2]}` shift from")


async def test_without_rotations_the_usage_says_so_rather_than_show_one_that_is_not_there(tmp_path: Path) -> None:
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake),
                                                people=PEOPLE) as h:
        answer = await say(Slack(h, fake), "help")
    assert "No rotations are configured, so there is no shift to swap yet" in answer and "dba-primary" not in answer


async def test_a_swap_number_past_what_the_store_holds_is_no_swap_not_an_error(slack: Slack) -> None:
    # PostgreSQL's id columns hold 32 bits; 2147483648 was an error from the database there
    for text in ("cancel 2147483648", "undo 2147483648", "accept #99999999999", "approve 2147483648"):
        number = text.split()[1].lstrip("#")
        assert await say(slack, text) == f"There is no swap #{number}.", text
    assert await swaps(slack.h) == [] and await audit(slack.h) == []


async def test_a_request_overlapping_a_pending_one_is_refused(on_sqlite: Slack) -> None:
    s = on_sqlite
    await say(s, "bob next")
    again = await say(s, "<@U02BOB|bob> dba-primary 2026-12-02")  # a day inside the same shift
    assert again == ("That overlaps swap #1 (Alice asked Bob to take `dba-primary` from Mon 30 Nov 09:00 CET until "
                     "Mon 7 Dec 09:00 CET), which is still waiting for an answer. Wait for it, or cancel it with "
                     "`/swap cancel 1`.")
    assert len(await swaps(s.h)) == 1
    assert (await say(s, "bob dba-primary 2026-12-14")).startswith("Asked Bob")  # the shift after that is free


async def test_overlapping_requests_at_the_same_moment_store_one(slack: Slack) -> None:
    """Six /swap requests for the same shift at once (on PostgreSQL, six transactions in parallel): one is
    stored, the others are told it overlaps."""
    s = slack
    keys = await asyncio.gather(*(s.command("/swap", "bob next") for _ in range(6)))
    answers = [(await s.answer(k))["text"] for k in keys]
    assert sum(a.startswith("Asked Bob") for a in answers) == 1, answers
    assert sum(a.startswith("That overlaps swap #") for a in answers) == 5, answers
    assert [(w.requester, w.status) for w in await swaps(s.h)] == [("alice", "pending")]
    assert [e[0] for e in await audit(s.h)] == ["swap.requested"]


async def test_a_request_the_counterpart_never_gets_is_told_to_the_requester(slack: Slack) -> None:
    s = slack
    # Slack refuses Bob's direct conversation (his alone: Alice's may be opened first, and took the refusal once)
    s.fake.fail("conversations.open", "user_not_found", when=lambda params: params.get("users") == BOB)
    assert (await say(s, "bob next")).startswith("Asked Bob")
    await s.fake.wait_for(lambda: len(s.posts("D01ALICE")) == 2, timeout=5)
    assert s.posts("D02BOB") == []
    told = text_of(s.posts("D01ALICE")[-1])
    assert told.startswith("I could not deliver your swap #1 request to Bob, so they have not seen it. Ask them "
                           "yourself (they can answer with `/swap accept 1`), or cancel it with `/swap cancel 1`. (")
    assert "user_not_found" in told

    async def settled() -> list[tuple[str, str, str]]:
        async with s.h.bot.db.sessions() as session:
            rows = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "direct")
                                          .order_by(OutboxItem.id))).scalars().all()
        return [(r.channel, r.event, r.status) for r in rows]

    expected = [("@bob", "swap.requested", "dead"), ("@alice", "swap.asked", "sent"),
                ("@alice", "swap.requested.undeliverable", "sent")]
    await until(lambda: _same(settled(), expected))  # marked sent just after Slack took it
    assert [w.status for w in await swaps(s.h)] == ["pending"]  # Bob can still answer with /swap accept 1


async def test_a_direct_message_whose_question_is_answered_loses_its_buttons(slack: Slack) -> None:
    s = slack
    await say(s, "bob next")
    await s.fake.wait_for(lambda: s.posts("D02BOB") and s.posts("D01ALICE"), timeout=5)
    [bob_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D02BOB"]
    [alice_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D01ALICE"]

    def buttons(chat: str, ts: str) -> list[str]:
        return [e["value"] for b in s.fake.messages[(chat, ts)].get("blocks", []) if b["type"] == "actions"
                for e in b["elements"]]

    assert buttons("D02BOB", bob_ts) == ["swok:1", "swno:1"] and buttons("D01ALICE", alice_ts) == ["swcx:1"]
    asked = s.fake.messages[("D01ALICE", alice_ts)]["text"]
    accepted = await press(s, "swok:1", BOB, message_ts=bob_ts)
    assert accepted.startswith("Accepted: you are on call for `dba-primary`")
    await s.fake.wait_for(lambda: not buttons("D02BOB", bob_ts), timeout=5)
    assert s.fake.messages[("D02BOB", bob_ts)]["text"] == accepted  # the question now says how it was answered
    # Alice's Cancel no longer does anything: her message says what became of her request, without it (it kept
    # offering Cancel after Bob had accepted).
    await s.fake.wait_for(lambda: not buttons("D01ALICE", alice_ts), timeout=5)
    asked_then = asked
    asked = s.fake.messages[("D01ALICE", alice_ts)]["text"]
    assert asked == f"{asked_then}\n\nAccepted by Bob."
    await asyncio.sleep(0.3)
    assert s.fake.messages[("D02BOB", bob_ts)]["text"] == accepted  # (the one Bob clicked keeps its answer)
    # A double tap: the second press changes nothing, and is answered only to Bob; the message keeps the answer the
    # first one left there (it became "Swap #1 was already accepted by Bob.", without the shift).
    updates = len(s.fake.called("chat.update"))
    assert await press(s, "swok:1", BOB, message_ts=bob_ts) == "You already accepted swap #1."
    # Alice's Cancel, pressed before its redraw reached her, says why, only to her, and changes nothing either.
    told = await press(s, "swcx:1", ALICE, message_ts=alice_ts)
    assert told.startswith("Swap #1 was already accepted by Bob.")
    await asyncio.sleep(0.3)
    assert len(s.fake.called("chat.update")) == updates
    assert s.fake.messages[("D02BOB", bob_ts)]["text"] == accepted
    assert s.fake.messages[("D01ALICE", alice_ts)]["text"] == asked
    # A press that decides nothing leaves the buttons where they are.
    await say(s, "bob dba-primary 2026-12-14")  # swap #2, Bob's DM with Accept / Decline
    await s.fake.wait_for(lambda: len([1 for (chat, _) in s.fake.messages if chat == "D02BOB"]) >= 3, timeout=5)
    second = max(ts for (chat, ts) in s.fake.messages if chat == "D02BOB" and buttons(chat, ts) == ["swok:2", "swno:2"])
    assert (await press(s, "swok:2", ALICE, message_ts=second)) == "Only Bob can accept swap #2."
    assert buttons("D02BOB", second) == ["swok:2", "swno:2"]


async def test_a_request_cancelled_by_command_takes_the_buttons_off_both_messages(slack: Slack) -> None:
    """Cancelled with `/swap cancel`, the request went on offering Bob Accept and Decline (a press said only that it
    was cancelled) and Alice her Cancel."""
    s = slack
    await say(s, "bob next")
    await s.fake.wait_for(lambda: s.posts("D02BOB") and s.posts("D01ALICE"), timeout=5)
    [bob_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D02BOB"]
    [alice_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D01ALICE"]
    before = {chat: s.fake.messages[(chat, ts)]["text"] for chat, ts in (("D02BOB", bob_ts), ("D01ALICE", alice_ts))}
    assert (await say(s, "cancel 1")).startswith("Cancelled swap #1")

    def redrawn() -> bool:
        return all(not any(b["type"] == "actions" for b in s.fake.messages[(chat, ts)].get("blocks", []))
                   for chat, ts in (("D02BOB", bob_ts), ("D01ALICE", alice_ts)))
    await s.fake.wait_for(redrawn, timeout=5)
    assert s.fake.messages[("D02BOB", bob_ts)]["text"] == f"{before['D02BOB']}\n\nCancelled by Alice."
    assert s.fake.messages[("D01ALICE", alice_ts)]["text"] == f"{before['D01ALICE']}\n\nCancelled by Alice."


async def test_an_approval_takes_the_cancel_buttons_off_the_requesters_messages(on_sqlite: Slack) -> None:
    """Approved by Dave, Carol's two messages (her request, and Bob's acceptance) still offered Cancel request."""
    s = on_sqlite
    await say(s, "bob web next", user=CAROL)
    await s.fake.wait_for(lambda: s.posts("D02BOB") and s.posts("D03CAROL"), timeout=5)
    [bob_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D02BOB"]
    assert (await press(s, "swok:1", BOB, message_ts=bob_ts)).startswith("Accepted swap #1.")
    await s.fake.wait_for(lambda: s.posts("D04DAVE") and len(s.posts("D03CAROL")) == 2, timeout=5)
    carol = [ts for (chat, ts) in s.fake.messages if chat == "D03CAROL"]
    [dave_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D04DAVE"]
    said = {ts: s.fake.messages[("D03CAROL", ts)]["text"] for ts in carol}

    def values(chat: str, ts: str) -> list[str]:
        return [e["value"] for b in s.fake.messages[(chat, ts)].get("blocks", []) if b["type"] == "actions"
                for e in b["elements"]]
    assert [values("D03CAROL", ts) for ts in carol] == [["swcx:1"], ["swcx:1"]]  # (waiting for approval: both do)
    approved = await press(s, "swapv:1", DAVE, message_ts=dave_ts)
    assert approved.startswith("Approved swap #1"), approved
    await s.fake.wait_for(lambda: not any(values("D03CAROL", ts) for ts in carol), timeout=5)
    assert [s.fake.messages[("D03CAROL", ts)]["text"] for ts in carol] == [
        f"{said[ts]}\n\nApproved by Dave." for ts in carol]


async def test_a_clicked_message_keeps_its_clicks_answer_through_later_changes(on_sqlite: Slack) -> None:
    """Bob's Accept, once answered ("Accepted: you are on call ..."), was written back to Alice's question with
    "Undone by Alice." under it when she undid the swap: a later change took it for a message still asking."""
    s = on_sqlite
    await say(s, "bob next")
    await s.fake.wait_for(lambda: s.posts("D02BOB") and s.posts("D01ALICE"), timeout=5)
    [bob_ts] = [ts for (chat, ts) in s.fake.messages if chat == "D02BOB"]
    accepted = await press(s, "swok:1", BOB, message_ts=bob_ts)
    assert accepted.startswith("Accepted: you are on call")
    await drain(s.h)
    assert (await say(s, "undo 1")).startswith("Undone: Alice is on call")
    await drain(s.h)

    def undos() -> list[str]:
        return [ts for (chat, ts), m in s.fake.messages.items() if chat in ("D01ALICE", "D02BOB")
                and any(b["type"] == "actions" for b in m.get("blocks", []))]
    await s.fake.wait_for(lambda: not undos(), timeout=5)  # (the Undo buttons of the swap taken went with it)
    await asyncio.sleep(0.3)
    assert s.fake.messages[("D02BOB", bob_ts)]["text"] == accepted


async def test_a_request_settled_before_its_message_dies_tells_the_requester_nothing(slack: Slack) -> None:
    s = slack
    s.fake.fail("conversations.open", "ratelimited", status=500, times=100)  # Bob's DM keeps failing, retried
    await say(s, "bob next")
    await until(lambda: _attempted(s.h, "@bob"))
    assert (await say(s, "cancel 1")).startswith("Cancelled swap #1")
    s.fake._failures.clear()
    async with s.h.bot.db.transaction() as session:  # Bob's message gives up now
        row = (await session.execute(select(OutboxItem).where(OutboxItem.channel == "@bob",
                                                              OutboxItem.event == "swap.requested"))).scalar_one()
    await s.h.bot.outbox._failed([row], "slack: user_not_found", None, permanent=True)
    async with s.h.bot.db.sessions() as session:
        events = (await session.execute(select(OutboxItem.event).where(OutboxItem.channel == "@alice")
                                        .order_by(OutboxItem.id))).scalars().all()
    assert "swap.requested.undeliverable" not in events, events  # the swap was cancelled: nothing to tell


async def _attempted(h: Harness, channel: str) -> bool:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).where(OutboxItem.channel == channel))).scalars().all()
    return any(r.attempts for r in rows)


async def _same(rows: Any, expected: Any) -> bool:
    return await rows == expected


async def test_people_are_found_by_id_name_mention_and_platform_id(on_sqlite: Slack) -> None:
    swaps_ = on_sqlite.h.bot.swaps
    found = {text: (p.id if p else None) for text in ("bob", "@Bob", "BOB", "<@U02BOB|bob>", "<@U02BOB>", "U02BOB",
                                                       "111111", "@111111", "nobody", "<@U09NOBODY>")
             for p in [swaps_.resolve(text)]}
    assert found == {"bob": "bob", "@Bob": "bob", "BOB": "bob", "<@U02BOB|bob>": "bob", "<@U02BOB>": "bob",
                     "U02BOB": "bob", "111111": "alice", "@111111": "alice", "nobody": None, "<@U09NOBODY>": None}


async def test_when_only_the_two_of_them_hold_the_role_one_of_them_may_approve(tmp_path: Path) -> None:
    people = """
people:
  - {id: alice, name: Alice, slack: U01ALICE}
  - {id: bob, name: Bob, roles: [lead], slack: U02BOB}
"""
    rotations = """
rotations:
  - {id: dba-primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02,
     timezone: Europe/Berlin, swap_approval: lead, reminder: 0s}
"""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + rotations, people=people) as h:
        s = Slack(h, fake)
        await say(s, "bob next")
        assert (await press(s, "swok:1", BOB)).startswith("Accepted swap #1. It needs approval by someone with the "
                                                          "`lead` role (Bob)")
        assert (await press(s, "swapv:1", BOB)).startswith("Approved swap #1")
        [approved] = [d for a, _, d in await audit(h) if a == "swap.approved"]
        assert approved["self_approved"] is True


async def test_a_schedule_changed_since_the_request_is_not_silently_overridden(on_sqlite: Slack) -> None:
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob next")
    put = await say(s, "dba-primary erin 2026-12-01 09:00 8h", user=BOB, command="/override")
    assert put.startswith("Erin is on call for `dba-primary`")
    answer = await press(s, "swok:1", BOB)
    assert answer.startswith("The schedule changed since swap #1 was asked for: Erin (override) is on call for "
                             "`dba-primary` from Tue 1 Dec 09:00 CET, not Alice. Nothing was changed")
    assert (await swaps(h))[0].status == "pending" and len(await overrides(h)) == 1
    # Alice, whose request stays open (and blocks another for that stretch), is told, and what to do
    assert [(event, text) for event, text, _ in await directs(h, "alice") if event == "swap.refused"] == [(
        "swap.refused", "Bob could not accept swap #1. The schedule changed since swap #1 was asked for: Erin "
                        "(override) is on call for `dba-primary` from Tue 1 Dec 09:00 CET, not Alice. Nothing was "
                        "changed; `/swap cancel 1` and ask again.")]


async def test_a_refused_approval_records_no_approver(on_sqlite: Slack) -> None:
    """Dave's approval is refused (the schedule changed): he approved nothing, so when Bob then declines, the swap
    was declined by Bob, not by Dave."""
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob web 2026-11-25", user=CAROL)
    await say(s, "accept 1", user=BOB)
    await say(s, "web dave 2026-11-25T22:00 2026-11-25T23:00", user=BOB, command="/override")
    assert (await say(s, "approve 1", user=DAVE)).startswith("The schedule changed since swap #1 was asked for")
    [swap] = await swaps(h)
    assert (swap.status, swap.approval_by, swap.approval_at) == ("awaiting_approval", None, None)
    await say(s, "decline 1", user=BOB)
    assert await say(s, "accept 1", user=BOB) == "You already declined swap #1."
    assert await say(s, "cancel 1", user=CAROL) == "Swap #1 was declined by Bob."


async def test_taking_a_shift_where_swaps_need_approval_is_left_to_a_swap_or_a_manager(on_sqlite: Slack) -> None:
    """web's swaps need a manager's approval: Carol cannot take Bob's day shift with `/oncall take` (nobody would
    approve, and Bob would not even be asked). Her own shift she holds already, so taking it changes nothing; a
    manager, who could `/override` it anyway, may take someone's, and they are told."""
    s, h = on_sqlite, on_sqlite.h
    refused = await say(s, "take web 2026-11-24T09:00", user=CAROL, command="/oncall")
    assert refused == ("Shifts in `web` change hands only with the approval of someone with the `manager` role, so "
                       "you cannot take Bob's shift from Tue 24 Nov 09:00 EST until Tue 24 Nov 21:00 EST yourself. "
                       "Ask Bob to `/swap` it to you (you accept, then it is approved), or someone with the `manager` "
                       "role to `/override` it.")
    assert await overrides(h) == [] and await directs(h, "bob") == [] and await notices(h) == []
    # recorded as a refusal, as a command refused for a role is (it left no trace)
    assert await audit(h, "access.") == [("access.refused", "carol", {
        "what": "/oncall take", "needs": "manager", "roles": [], "rotation": "web", "holders": ["bob"]})]
    mine = await say(s, "take web 2026-11-24T21:00", user=CAROL, command="/oncall")
    assert mine == "You are already on call for `web` from Tue 24 Nov 21:00 EST until Wed 25 Nov 09:00 EST; nothing changed."
    assert await overrides(h) == []
    took = await say(s, "take web 2026-11-26T21:00", user=BOB, command="/oncall")  # Thursday night: Carol's
    assert took.startswith("Bob is on call for `web` from Thu 26 Nov 21:00 EST until Fri 27 Nov 09:00 EST")
    assert await directs(h, "carol") == [("oncall.override", "Bob took over your `web` shift from Thu 26 Nov 21:00 EST "
                                                             "until Fri 27 Nov 09:00 EST.", [])]
    assert await directs(h, "bob") == []


async def test_whoever_a_take_or_an_override_displaces_is_told_who_covers_which_stretch(on_sqlite: Slack) -> None:
    s, h = on_sqlite, on_sqlite.h
    # Thursday 20:00 to Friday 10:00 New York time: the end of Bob's day, Carol's night, the start of Bob's next day
    put = await say(s, "web erin 2026-11-26T20:00-05:00 2026-11-27T10:00-05:00", user=DAVE, command="/override")
    assert put.startswith("Erin is on call for `web` from Fri 27 Nov 10:00 JST until Sat 28 Nov 00:00 JST")
    assert await directs(h, "bob") == [(
        "oncall.override", "Dave put Erin on call for `web` instead of you from Thu 26 Nov 20:00 EST until "
                           "Thu 26 Nov 21:00 EST and from Fri 27 Nov 09:00 EST until Fri 27 Nov 10:00 EST.", [])]
    assert await directs(h, "carol") == [(
        "oncall.override", "Dave put Erin on call for `web` instead of you from Thu 26 Nov 21:00 EST until "
                           "Fri 27 Nov 09:00 EST.", [])]
    assert await directs(h, "erin") == [] and await directs(h, "dave") == []
    # Erin's override is hers to work now: a manager taking part of it tells her
    await say(s, "take web 2026-11-26T23:00 2026-11-27T01:00", user=BOB, command="/oncall")
    assert await directs(h, "erin") == [("oncall.override", "Bob took over your `web` shift from Thu 26 Nov 23:00 EST "
                                                            "until Fri 27 Nov 01:00 EST.", [])]


async def test_changes_to_one_rotation_run_one_at_a_time(slack: Slack) -> None:
    """PostgreSQL: an accept waits while another change to the rotation (an override, an undo, on this replica or
    another) holds its schedule, so it judges the schedule as that one leaves it."""
    s, h = slack, slack.h
    if not h.bot.db.is_postgres:
        pytest.skip("SQLite runs one write transaction at a time already")
    assert (await say(s, "bob dba-primary next", user=ALICE)).startswith("Asked Bob")
    async with h.bot.db.transaction() as session:  # another change to dba-primary, under way
        await h.bot.db.lock_for_transaction(session, "swap:dba-primary")
        accepting = asyncio.create_task(say(s, "accept 1", user=BOB))
        await asyncio.sleep(0.5)
        assert not accepting.done() and [w.status for w in await swaps(h)] == ["pending"]
    assert (await accepting).startswith("Accepted: you are on call for `dba-primary`")
    assert [w.status for w in await swaps(h)] == ["accepted"]


async def test_a_swap_another_builds_on_is_not_undone_alone(tmp_path: Path) -> None:
    """Bob covers Carol's week (#1), then passes a day of it on to Alice (#2). Undoing #1 alone would leave Alice
    on call while everyone is told Carol is: it is refused, naming #2; once #2 is undone, #1 is."""
    three = "  - {id: r3, members: [alice, bob, carol], shift: 1w, handoff: 'mon 09:00', start: 2026-11-02, timezone: Europe/Berlin}\n"
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS + three, people=PEOPLE) as h:
        s = Slack(h, fake)
        await say(s, "bob r3 next", user=CAROL)
        await say(s, "accept 1", user=BOB)
        await say(s, "alice r3 2026-12-08", user=BOB)
        await say(s, "accept 2", user=ALICE)
        assert await say(s, "undo 1", user=CAROL) == (
            "Swap #2 builds on this one: Alice took part of Bob's cover. Undo swap #2 first (Bob or Alice can), "
            "then this one.")
        assert [w.status for w in await swaps(h)] == ["accepted", "accepted"]
        assert (await say(s, "undo 2", user=ALICE)).startswith("Undone: Bob is on call for `r3`")
        assert (await say(s, "undo 1", user=CAROL)).startswith("Undone: Carol is on call for `r3` from Mon 7 Dec")


@pytest.mark.parametrize("when", ["9999-12-31", "9999-12-31T10:00", "0001-01-01T00:00+01:00"])
async def test_a_date_far_away_is_refused_not_a_crash(on_sqlite: Slack, when: str) -> None:
    assert await say(on_sqlite, f"bob dba-primary {when}") == f"'{when}' is too far away: give a year from 1970 to 9000."


async def test_a_direct_message_slack_took_without_answering_is_not_sent_again_elsewhere(tmp_path: Path) -> None:
    """The connection to Slack was reset after Slack took Alice's swap question: it may have arrived, so it is
    neither posted again nor sent on her next platform (Telegram), where she would read it twice. The requester
    is not told it never arrived either, since it may have."""
    async with FakeSlack() as fake, FakeTelegram() as tg:
        extra = (slack_config(fake) + f"  telegram: {{bot_token: '{tg.token}', webhook_secret: tg-swap-secret, "
                                      f"api_url: '{tg.api_url}'}}\n" + ROTATIONS)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE) as h:
            s = Slack(h, fake)
            fake.lose_answer("chat.postMessage", reset=True, when=lambda params: params.get("channel") == "D01ALICE")
            assert (await say(s, "alice dba-primary next", user=BOB)).startswith("Asked Alice")

            async def settled() -> bool:
                async with h.bot.db.sessions() as session:
                    rows = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "direct"))).scalars().all()
                return all(r.status not in ("pending", "sending") for r in rows) and len(rows) == 2

            await until(settled)
            h.clock.advance(timedelta(minutes=10))  # past any retry the row could have had
            h.bot.outbox.nudge()
            await asyncio.sleep(1.0)
            assert len(s.posts("D01ALICE")) == 1  # Slack took it once (its answer was lost)
            assert [c.params["text"] for c in tg.called("sendMessage")] == []  # and Telegram never had it
            async with h.bot.db.sessions() as session:
                [row] = (await session.execute(select(OutboxItem).where(OutboxItem.channel == "@alice"))).scalars().all()
            assert row.status == "dead" and row.last_error.startswith("outcome unknown: Slack took it but never "
                                                                      "confirmed it, so the message may have arrived")
            assert [event for event, _, _ in await directs(h, "bob")] == ["swap.asked"]  # no "could not deliver"


async def test_someone_who_left_the_rotation_cannot_take_a_swap_and_it_is_called_off(tmp_path: Path) -> None:
    """Bob was asked for two swaps, then app.yaml took him out of both rotations (the bot restarted). His accept
    and a manager's approval would make him the one on call (and paged) for a rotation he is no longer in: both are
    refused, the swaps are called off, and the requesters (and Bob, and the other approvers) are told."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            s = Slack(h, fake)
            await say(s, "bob dba-primary next")
            await say(s, "bob web 2026-11-25", user=CAROL)
            assert (await say(s, "accept 2", user=BOB)).startswith("Accepted swap #2. It needs approval")
        without_bob = ROTATIONS.replace("members: [alice, bob]", "members: [alice, erin]").replace(
            "members: [bob, carol]", "members: [carol, erin]")
        async with running_bot(url, slack_config(fake) + without_bob, people=PEOPLE) as h:
            clicks, s = s.clicks, Slack(h, fake)
            s.clicks = clicks
            assert await say(s, "accept 1", user=BOB) == (
                "You are no longer a member of `dba-primary`, so you cannot take its shifts: swap #1 is called off, "
                "and Alice is told. If that is a mistake, ask whoever maintains app.yaml to add you back; then Alice "
                "can ask you again.")
            assert (await directs(h, "alice"))[-1] == (
                "swap.cancelled", "Swap #1 is called off: Bob is no longer a member of `dba-primary`, so they cannot "
                f"take your shift {ALICE_NEXT}. It stays yours; ask someone else with `/swap`.", [])
            assert await press(s, "swapv:2", DAVE) == (
                "Bob is no longer a member of `web`, so they cannot take its shifts: swap #2 is called off, and "
                "Carol is told; they can ask someone else.")
            assert (await directs(h, "carol"))[-1][:2] == (
                "swap.cancelled", "Swap #2 is called off: Bob is no longer a member of `web`, so they cannot take "
                "your shift from Wed 25 Nov 21:00 EST until Thu 26 Nov 09:00 EST. It stays yours; ask someone else "
                "with `/swap`.")
            assert (await directs(h, "bob"))[-1][:2] == (
                "swap.cancelled", "Swap #2 (Carol's `web` shift from Wed 25 Nov 21:00 EST) is called off: you are no "
                "longer a member of `web`, so you cannot take its shifts.")
            assert [d[0] for d in await directs(h, "dave")] == ["swap.approval"]  # he pressed: his answer says it
            assert await overrides(h) == []
            assert [(w.status, w.decided_by, w.approval_by) for w in await swaps(h)] == [
                ("cancelled", None, None), ("cancelled", None, None)]
            assert [(a, who, d.get("reason"), d.get("noticed_by")) for a, who, d in await audit(h)][-2:] == [
                ("swap.cancelled", None, "counterpart_left_rotation", "bob"),
                ("swap.cancelled", None, "counterpart_left_rotation", "dave")]
            assert await say(s, "accept 1", user=BOB) == "Swap #1 was called off: Bob had left `dba-primary`."
            assert (await say(s, "erin next")).startswith("Asked Erin")  # Alice's week is free to ask for again


async def test_undoing_a_swap_a_later_override_covers_says_who_is_on_call_then(on_sqlite: Slack) -> None:
    """Bob takes Alice's week; then Dave puts Carol on for its first three days. Undoing the swap gives Alice the
    last four back, not the week: the answer, Bob's message and the channel say who is on call, as /oncall does."""
    s, h = on_sqlite, on_sqlite.h
    await say(s, "bob next")
    await say(s, "accept 1", user=BOB)
    put = await say(s, "dba-primary carol 2026-11-30T09:00+01:00 2026-12-03T09:00+01:00", user=DAVE, command="/override")
    assert put.startswith("Carol is on call for `dba-primary`")
    stretches = ("Carol (override #2) from Mon 30 Nov 09:00 CET until Thu 3 Dec 09:00 CET; Alice from Thu 3 Dec 09:00 "
                 "CET until Mon 7 Dec 09:00 CET")
    assert await say(s, "undo 1") == (
        f"Undone (swap #1): Bob no longer covers `dba-primary` for Alice {ALICE_NEXT}, but a later override still "
        f"applies. On call then: {stretches}.")
    assert (await directs(h, "bob"))[-1][:2] == (
        "swap.undone", f"Alice undid swap #1: Bob no longer covers `dba-primary` for Alice {ALICE_NEXT}, but a later "
        f"override still applies. On call then: {stretches}.")
    assert (await notices(h))[-1] == (
        "ops-slack", "swap.notice", f"Swap #1 is undone: Bob no longer covers `dba-primary` for Alice {ALICE_NEXT}. "
        f"On call then: {stretches}.")
    table = table_rows(await say(s, "dba-primary", command="/oncall"))
    assert [row[:3] for row in table[2:4]] == [["Carol (override)", "Mon 30 Nov 09:00 CET", "Thu 3 Dec 09:00 CET"],
                                               ["Alice", "Thu 3 Dec 09:00 CET", "Mon 7 Dec 09:00 CET"]]


async def test_approvers_learn_that_a_swap_waiting_for_them_ended_without_them(on_sqlite: Slack) -> None:
    """Dave was asked to approve; then Bob withdrew, Carol cancelled, or nobody approved in time: each time Dave is
    told it needs nothing more from him, rather than finding out when he presses Approve."""
    s, h = on_sqlite, on_sqlite.h
    shift = "Carol's `web` shift from Thu 26 Nov 11:00 JST until Thu 26 Nov 23:00 JST"
    await say(s, "bob web 2026-11-25", user=CAROL)
    await say(s, "accept 1", user=BOB)
    assert await say(s, "decline 1", user=BOB) == "Declined swap #1; Carol is told."
    assert (await directs(h, "dave"))[-1] == (
        "swap.declined", f"Swap #1 (Bob taking {shift}) was withdrawn by Bob; it needs nothing more from you.", [])
    await say(s, "bob web 2026-11-25", user=CAROL)
    await say(s, "accept 2", user=BOB)
    assert await say(s, "cancel 2", user=CAROL) == "Cancelled swap #2; Bob is told."
    assert (await directs(h, "dave"))[-1] == (
        "swap.cancelled", f"Swap #2 (Bob taking {shift}) was cancelled by Carol; it needs nothing more from you.", [])
    await say(s, "bob web 2026-11-25", user=CAROL)
    await say(s, "accept 3", user=BOB)
    h.clock.advance(timedelta(hours=2))
    await h.bot.timers.tick()
    await until(lambda: _status(h, 3, "expired"))
    assert (await directs(h, "dave"))[-1] == (
        "swap.expired", f"Swap #3 (Bob taking {shift}) expired before anyone approved it; it needs nothing more from "
        "you.", [])
    assert [event for event, _, _ in await directs(h, "dave")] == ["swap.approval", "swap.declined", "swap.approval",
                                                                   "swap.cancelled", "swap.approval", "swap.expired"]


async def test_a_request_that_expires_as_its_shift_ends_does_not_say_the_shift_stays_yours(on_sqlite: Slack) -> None:
    """A request made in the last hour of Carol's night expires when the night ends: she is told it ended without
    anyone taking it (it said the shift 'stays yours', an hour after it ended); so for one waiting for approval."""
    s, h = on_sqlite, on_sqlite.h
    h.clock.set(datetime(2026, 11, 24, 13, tzinfo=UTC))  # Tuesday 08:00 New York time: Carol's night ends at 09:00
    assert "(swap #1); it expires Tue 24 Nov 09:00 EST." in await say(s, "bob web 2026-11-24T08:30", user=CAROL)
    h.clock.advance(timedelta(hours=1))
    await h.bot.timers.tick()
    await until(lambda: _status(h, 1, "expired"))
    assert (await directs(h, "carol"))[-1][1] == (
        "Your swap #1 expired: Bob did not answer by Tue 24 Nov 09:00 EST. Your `web` shift from Tue 24 Nov 08:00 EST "
        "until Tue 24 Nov 09:00 EST ended without anyone taking it.")

    h.clock.set(datetime(2026, 11, 25, 13, tzinfo=UTC))  # the next night's last hour; Bob accepts this time
    await say(s, "bob web 2026-11-25T08:30", user=CAROL)
    assert (await say(s, "accept 2", user=BOB)).startswith("Accepted swap #2. It needs approval")
    h.clock.advance(timedelta(hours=1))
    await h.bot.timers.tick()
    await until(lambda: _status(h, 2, "expired"))
    for person in ("carol", "bob"):
        assert (await directs(h, person))[-1][1] == (
            "Swap #2 expired: nobody with the `manager` role approved it by Wed 25 Nov 09:00 EST. The `web` shift from "
            "Wed 25 Nov 08:00 EST until Wed 25 Nov 09:00 EST ended without it: Carol stayed on call.")


async def test_a_request_that_goes_out_after_it_was_cancelled_goes_without_its_buttons(on_sqlite: Slack) -> None:
    """Bob's direct message held up (Slack failing), then Alice cancels: it went with Accept and Decline."""
    s = on_sqlite
    s.fake.fail("conversations.open", "ratelimited", status=500, times=100)
    await say(s, "bob next")
    await until(lambda: _attempted(s.h, "@bob"))
    assert (await say(s, "cancel 1")).startswith("Cancelled swap #1")
    s.fake._failures.clear()
    await drain(s.h)
    [message] = [m for (chat, _), m in s.fake.messages.items() if chat == "D02BOB" and m["text"].startswith(
        "Alice asks you to take their `dba-primary` shift")]
    assert message["text"].endswith("\n\nCancelled by Alice.")
    assert not [b for b in message.get("blocks", []) if b["type"] == "actions"]
