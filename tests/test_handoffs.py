"""Handoff notices and reminders: planned with unique keys, fired once by the durable timers, restart-safe.

`web` hands over every 12 hours at 09:00 and 21:00 New York time between Bob, Carol and Alice. On the
harness's clock (Tuesday 24 Nov 2026, 04:00 UTC = Monday 23:00 EST) Carol is on call; then Alice at
Tue 09:00 EST (14:00 UTC), Bob at 21:00 EST (Wed 02:00 UTC), Carol at Wed 09:00, Alice at Wed 21:00.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import delete, select, update

from bot.clock import FakeClock
from bot.rotations import Override, Schedule
from handlers.handoffs import handoffs_between
from storage.models import AuditEvent, OutboxItem, Timer
from tests.botkit import T0, Harness, bot_on, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, slack_config, text_of
from tests.test_swaps import press, say

PEOPLE = """
people:
  - {id: alice, name: Alice, slack: U01ALICE, timezone: Europe/Berlin}
  - {id: bob, name: Bob, slack: U02BOB}
  - {id: carol, name: Carol, slack: U03CAROL}
"""
ROTATIONS = """
rotations:
  - {id: web, members: [bob, carol, alice], shift: 12h, handoff: "09:00", start: 2026-11-20,
     timezone: America/New_York, channel: ops-slack}
  - {id: quiet, members: [bob, carol], shift: 1d, handoff: "09:00", start: 2026-11-20, timezone: UTC, reminder: 0s}
"""
TUE_0900 = datetime(2026, 11, 24, 14, tzinfo=UTC)  # 09:00 EST
TUE_2100 = datetime(2026, 11, 25, 2, tzinfo=UTC)
WED_0900 = datetime(2026, 11, 25, 14, tzinfo=UTC)
WED_2100 = datetime(2026, 11, 26, 2, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
async def bot(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake) + ROTATIONS,
                                           people=PEOPLE) as h:
        yield Slack(h, fake)


async def timers(h: Harness, kind: str) -> list[tuple[str | None, datetime, str]]:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(Timer).where(Timer.kind == kind).order_by(Timer.due_at, Timer.id))).scalars()
        return [(t.key, t.due_at, t.status) for t in rows]


async def sent(h: Harness) -> list[tuple[str, str, str]]:
    """Handoff notices and reminders queued: (channel, event, text)."""
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).where(OutboxItem.event.in_(["handoff.notice", "handoff.reminder"]))
                                      .order_by(OutboxItem.id))).scalars().all()
    return [(r.channel, r.event, r.details["text"]) for r in rows]


async def audited(h: Harness) -> list[tuple[str, dict[str, Any]]]:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(AuditEvent).where(AuditEvent.action.like("oncall.handoff%"))
                                      .order_by(AuditEvent.seq))).scalars().all()
    return [(e.action, e.details) for e in rows]


async def at(h: Harness, when: datetime, expected: int) -> list[tuple[str, str, str]]:
    """Move the clock, run the due timers, wait until `expected` messages are queued in all."""
    h.clock.set(when)
    await h.bot.timers.tick()
    deadline = asyncio.get_running_loop().time() + 5
    while len(got := await sent(h)) < expected:
        assert asyncio.get_running_loop().time() < deadline, f"only {got}"
        await h.bot.timers.tick()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # anything more would have been queued in the same beat
    return await sent(h)


async def test_planning_twice_adds_each_notice_and_reminder_once(bot: Slack) -> None:
    h = bot.h
    await h.bot.handoffs.plan()
    await h.bot.handoffs.plan()
    assert await h.bot.handoffs.plan() == 0
    handoffs = [TUE_0900, TUE_2100, WED_0900, WED_2100]
    assert await timers(h, "handoff.notice") == [(f"handoff:web:{t.isoformat()}", t, "pending") for t in handoffs]
    incoming = ["alice", "bob", "carol", "alice"]
    assert await timers(h, "handoff.reminder") == [
        (f"reminder:web:{t.isoformat()}:{who}", t - timedelta(hours=1), "pending") for t, who in zip(handoffs, incoming)]
    # `quiet` has no channel and no reminder: nothing to plan for it


async def test_the_reminder_and_the_notice_fire_once_each_across_replanning_and_a_restart(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            await h.bot.handoffs.plan()
            got = await at(h, TUE_0900 - timedelta(hours=1), 1)
            assert got == [("@alice", "handoff.reminder", "You are on call for `web` from Tue 24 Nov 15:00 CET until "
                                                          "Wed 25 Nov 03:00 CET; then Bob.")]  # in Alice's time zone
            await h.bot.handoffs.plan()
        # the bot restarts just before the handoff and plans again at start
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE,
                               clock=FakeClock(TUE_0900 - timedelta(minutes=1))) as h:
            await h.bot.handoffs.plan()
            got = await at(h, TUE_0900, 2)
            assert got[1] == ("ops-slack", "handoff.notice",
                              "Alice is now on call for `web` until Tue 24 Nov 21:00 EST, next is Bob.")
            await h.bot.handoffs.plan()
            h.clock.advance(timedelta(minutes=5))
            await h.bot.timers.tick()
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE,
                               clock=FakeClock(TUE_0900 + timedelta(minutes=10))) as h:
            await h.bot.handoffs.plan()
            await h.bot.timers.tick()
            await asyncio.sleep(0.1)
            assert len(await sent(h)) == 2  # nothing twice
            assert [a for a, _ in await audited(h)] == ["oncall.handoff_reminder", "oncall.handoff"]
            assert (await audited(h))[1][1]["person"] == "alice"


async def test_a_one_person_rotation_says_until_the_end_of_the_shift(tmp_path: Path) -> None:
    solo = ('rotations:\n  - {id: solo, members: [carol], shift: 1w, handoff: "mon 09:00", start: 2026-11-30, '
            'timezone: UTC, channel: ops-slack}\n')
    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake) + solo,
                               people=PEOPLE, clock=FakeClock(datetime(2026, 11, 30, 7, tzinfo=UTC))) as h:
            await h.bot.handoffs.plan()
            got = await at(h, datetime(2026, 11, 30, 9, tzinfo=UTC), 2)
    assert got == [("@carol", "handoff.reminder", "You are on call for `solo` from Mon 30 Nov 09:00 UTC until "
                                                  "Mon 7 Dec 09:00 UTC."),
                   ("ops-slack", "handoff.notice", "Carol is now on call for `solo` until Mon 7 Dec 09:00 UTC.")]


async def test_timers_that_fell_due_while_the_bot_was_down_fire_once_and_stale_ones_are_dropped(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            await h.bot.handoffs.plan()
        # down from Monday night until Wednesday 10:00 EST: Alice's and Bob's stretches are over, Carol's is on
        back = WED_0900 + timedelta(hours=1)
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE, clock=FakeClock(back)) as h:
            got = await at(h, back, 2)
            assert got == [
                ("@carol", "handoff.reminder", "You are on call for `web` from Wed 25 Nov 09:00 EST until "
                                               "Wed 25 Nov 21:00 EST; then Alice."),
                ("ops-slack", "handoff.notice", "Carol is now on call for `web` until Wed 25 Nov 21:00 EST, "
                                                "next is Alice.")]
            done = [(key, status) for key, due, status in await timers(h, "handoff.notice") if due <= back]
            assert done == [(f"handoff:web:{t.isoformat()}", "done") for t in (TUE_0900, TUE_2100, WED_0900)]


async def test_a_reminder_days_ahead_is_planned_before_it_is_due_and_sent_then(tmp_path: Path) -> None:
    """`reminder: 3d` on a weekly rotation: planned by the run just before it falls due (not when the handoff
    enters the usual 48 h), so Bob hears three days ahead, on Friday, of his Monday 09:00 handoff."""
    weekly = """
rotations:
  - {id: dba, members: [bob, alice], shift: 1w, handoff: "mon 09:00", start: 2026-11-02, timezone: Europe/Berlin,
     reminder: 3d}
"""
    handoff = datetime(2026, 11, 30, 8, tzinfo=UTC)  # Monday 09:00 CET: Bob takes over from Alice
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake, running_bot(url, slack_config(fake) + weekly, people=PEOPLE,
                                                 clock=FakeClock(handoff - timedelta(days=3, minutes=5))) as h:
        await h.bot.handoffs.plan()
        assert await timers(h, "handoff.reminder") == [
            (f"reminder:dba:{handoff.isoformat()}:bob", handoff - timedelta(days=3), "pending")]
        got = await at(h, handoff - timedelta(days=3), 1)
        assert got == [("@bob", "handoff.reminder", "You are on call for `dba` from Mon 30 Nov 09:00 CET until "
                                                    "Mon 7 Dec 09:00 CET; then Alice.")]


async def test_back_from_an_outage_longer_than_the_horizon_the_stretch_under_way_is_announced(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            await h.bot.handoffs.plan()  # Tuesday 04:00 UTC: notices planned until Thursday 04:00 UTC
        # down until Friday 10:00 EST: Thursday's two handoffs and Friday's 09:00 (Alice) were never planned
        back = datetime(2026, 11, 27, 15, tzinfo=UTC)
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE, clock=FakeClock(back)) as h:
            await h.bot.handoffs.plan()
            got = await at(h, back, 1)
            assert [g for g in got if g[1] == "handoff.notice"] == [
                ("ops-slack", "handoff.notice", "Alice is now on call for `web` until Fri 27 Nov 21:00 EST, "
                                                "next is Bob.")]  # the stale ones (Bob's, Carol's) are dropped


async def test_only_the_first_planning_of_a_process_looks_back(tmp_path: Path) -> None:
    """Later runs look back 10 minutes: a past handoff they never planned (its time moved in app.yaml, say)
    is not announced late. Shown by forgetting a planned notice: the running bot leaves it, a restart plans it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    old_key = f"handoff:web:{TUE_0900.isoformat()}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
            await h.bot.handoffs.plan()
            h.clock.set(TUE_2100 - timedelta(hours=1))  # Alice on since 09:00; the 09:00 notice is history
            async with h.bot.db.transaction() as session:
                await session.execute(delete(Timer).where(Timer.key == old_key))
                await session.execute(update(Timer).where(Timer.kind == "handoff.notice").values(
                    due_at=TUE_0900 - timedelta(days=1)))  # the newest planned notice: before the outage window
            await h.bot.handoffs.plan()
            assert old_key not in [key for key, _, _ in await timers(h, "handoff.notice")]
            async with h.bot.db.transaction() as session:  # as if it had last planned before a long outage
                await session.execute(update(Timer).where(Timer.kind == "handoff.notice").values(
                    due_at=TUE_0900 - timedelta(days=1)))
        async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE,
                               clock=FakeClock(TUE_2100 - timedelta(hours=1))) as h:
            await h.bot.handoffs.plan()
            assert old_key in [key for key, _, _ in await timers(h, "handoff.notice")]


async def test_a_fresh_bot_announces_no_handoff_from_before_it_started(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    started = TUE_0900 + timedelta(hours=1)  # Alice has been on call for an hour when the bot first starts
    async with FakeSlack() as fake, running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE,
                                                 clock=FakeClock(started)) as h:
        await h.bot.handoffs.plan()
        assert [key for key, _, _ in await timers(h, "handoff.notice")][0] == f"handoff:web:{TUE_2100.isoformat()}"


async def test_a_swap_taken_after_planning_is_respected(bot: Slack) -> None:
    s, h = bot, bot.h
    await h.bot.handoffs.plan()
    asked = await say(s, "bob web 2026-11-24")  # Alice asks Bob to take her day shift on Tuesday
    assert asked.startswith("Asked Bob to take your `web` shift from Tue 24 Nov 15:00 CET until Wed 25 Nov 03:00 CET")
    assert (await press(s, "swok:1", "U02BOB")).startswith("Accepted")  # the swap replans the handoffs at once
    got = await at(h, TUE_0900 - timedelta(hours=1), 1)
    assert got == [("@bob", "handoff.reminder", "You are on call for `web` from Tue 24 Nov 09:00 EST until "
                                                "Wed 25 Nov 09:00 EST; then Carol.")]  # Bob's override, then his own
    got = await at(h, TUE_0900, 2)
    assert got[1] == ("ops-slack", "handoff.notice", "Bob is now on call for `web` until Wed 25 Nov 09:00 EST, "
                                                     "next is Carol.")
    await s.fake.wait_for(lambda: any("Bob is now on call for `web`" in text_of(p) for p in s.posts()), timeout=5)
    await s.fake.wait_for(lambda: any("You are on call for `web` from" in text_of(p) for p in s.posts("D02BOB")),
                          timeout=5)  # the reminder, in Bob's direct conversation
    # 21:00 is no handoff any more (Bob stays on): the notice planned for it says nothing, and nobody is reminded
    h.clock.set(TUE_2100)
    await h.bot.timers.tick()
    await asyncio.sleep(0.1)
    await h.bot.timers.tick()
    assert len(await sent(h)) == 2
    assert (f"handoff:web:{TUE_2100.isoformat()}", TUE_2100, "done") in await timers(h, "handoff.notice")
    got = await at(h, WED_0900, 4)  # Carol's reminder at 08:00 and notice at 09:00
    assert got[-1] == ("ops-slack", "handoff.notice", "Carol is now on call for `web` until Wed 25 Nov 21:00 EST, "
                                                      "next is Alice.")
    assert [a for a, _ in await audited(h)] == ["oncall.handoff_reminder", "oncall.handoff",
                                                 "oncall.handoff_reminder", "oncall.handoff"]


async def test_someone_put_back_on_call_after_their_reminder_was_dropped_is_reminded_once(bot: Slack) -> None:
    """Alice's Tuesday day shift goes to Bob; at 08:00 her reminder comes due and is dropped (Bob takes over).
    At 08:20 Bob undoes the swap: Alice is on again, and hears of it at once, once."""
    s, h = bot, bot.h
    await h.bot.handoffs.plan()
    await say(s, "bob web 2026-11-24")
    assert (await press(s, "swok:1", "U02BOB")).startswith("Accepted")
    got = await at(h, TUE_0900 - timedelta(hours=1), 1)
    assert [(to, event) for to, event, _ in got] == [("@bob", "handoff.reminder")]  # Alice's, due too, is dropped
    h.clock.set(TUE_0900 - timedelta(minutes=40))
    assert (await say(s, "undo 1", user="U02BOB")).startswith("Undone: Alice is on call for `web`")
    got = await at(h, TUE_0900 - timedelta(minutes=40), 2)
    assert got[1] == ("@alice", "handoff.reminder", "You are on call for `web` from Tue 24 Nov 15:00 CET until "
                                                    "Wed 25 Nov 03:00 CET; then Bob.")
    await h.bot.handoffs.plan()  # planning again, and the handoff itself, send her nothing more
    got = await at(h, TUE_0900, 3)
    assert [g for g in got if g[0] == "@alice"] == [got[1]]
    assert got[2] == ("ops-slack", "handoff.notice", "Alice is now on call for `web` until Tue 24 Nov 21:00 EST, "
                                                     "next is Bob.")


async def test_a_cover_taken_now_is_announced_at_once_and_so_is_the_way_back(bot: Slack) -> None:
    """`/oncall take web now 30m` replans the notices as a swap does (and `/override` too): Alice's cover is
    announced at once, not at the next planning run (by which a cover this short would be over), and Carol,
    back on at its end, is reminded."""
    s, h = bot, bot.h
    await h.bot.handoffs.plan()  # the planning job has just run
    took = await s.answer(await s.command("/oncall", "take web now 30m", user="U01ALICE"))
    assert took["text"].startswith("Alice is on call for `web` from Tue 24 Nov 05:00 CET until Tue 24 Nov 05:30 CET")
    got = await at(h, T0, 2)
    assert sorted(got) == [
        ("@carol", "handoff.reminder", "You are on call for `web` from Mon 23 Nov 23:30 EST until Tue 24 Nov 09:00 EST; "
                                       "then Alice."),
        ("ops-slack", "handoff.notice", "Alice is now on call for `web` until Mon 23 Nov 23:30 EST, next is Carol.")]
    got = await at(h, T0 + timedelta(minutes=30), 3)
    assert got[2] == ("ops-slack", "handoff.notice", "Carol is now on call for `web` until Tue 24 Nov 09:00 EST, "
                                                     "next is Alice.")


def test_handoffs_between_names_each_change_of_person_and_skips_same_person_shifts() -> None:
    schedule = Schedule("web", ("bob", "carol", "alice"), timedelta(hours=12), time(9), date(2026, 11, 20),
                        ZoneInfo("America/New_York"))
    # Bob covers Alice's Tuesday day shift: no handoff at 21:00 (Bob follows Bob)
    cover = Override("web", "bob", TUE_0900, TUE_2100, T0, 1)
    got = handoffs_between(schedule, [cover], T0, T0 + timedelta(hours=48))
    assert got == [(TUE_0900, "bob"), (WED_0900, "carol"), (WED_2100, "alice")]
    assert [p for _, p in handoffs_between(schedule, [], T0, T0 + timedelta(hours=48))] == ["alice", "bob", "carol",
                                                                                           "alice"]
