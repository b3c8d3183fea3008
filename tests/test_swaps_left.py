"""A swap whose requester left: called off, as one whose counterpart left is (tests/test_swaps.py), rather than left
pending where nobody can cancel it, blocking the stretch until it expires; and the refusal of an overlapping request
offers `/swap cancel` only to whoever can use it.

As in tests/test_swaps.py: Tuesday 24 Nov 2026, 04:00 UTC; dba-primary (weekly, Monday 09:00 Berlin) has Bob this
week and Alice from Monday 30 Nov. Then app.yaml loses Alice (the bot restarts): dba-primary is Erin and Bob, and the
week from 30 Nov is Erin's.
"""

from __future__ import annotations

from pathlib import Path

from storage.models import OutboxItem
from tests.botkit import Harness, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, slack_config
from tests.test_swaps import ALICE_NEXT, BOB, CAROL, DAVE, PEOPLE, ROTATIONS, audit, directs, say, swaps

ERIN = "U05ERIN"
WITHOUT_ALICE = PEOPLE.replace("  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}\n",
                               "")
ERIN_FOR_ALICE = ROTATIONS.replace("members: [alice, bob]", "members: [erin, bob]")
CALLED_OFF = ("alice, who asked for swap #1, is no longer in app.yaml, so it is called off: Bob does not take that "
              "`dba-primary` stretch, and it is not blocked for other swaps any more.")


async def _asked_then_alice_removed(tmp_path: Path, fake: FakeSlack) -> str:
    """Alice asks Bob to take her next week (swap #1); the bot's store, for a bot started without her."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with running_bot(url, slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
        assert (await say(Slack(h, fake), "bob next")).startswith("Asked Bob")
    assert WITHOUT_ALICE != PEOPLE and ERIN_FOR_ALICE != ROTATIONS
    return url


def _again(h: Harness, fake: FakeSlack) -> Slack:
    """Slack's side for the restarted bot: its commands' answers go where the first bot's did not."""
    s = Slack(h, fake)
    s.clicks = 100
    return s


async def _rows(h: Harness, person: str) -> int:
    async with h.bot.db.sessions() as session:
        return len((await session.execute(OutboxItem.__table__.select().where(
            OutboxItem.__table__.c.channel == f"@{person}"))).all())


async def test_declining_a_swap_whose_requester_left_calls_it_off_and_tells_nobody_gone(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        url = await _asked_then_alice_removed(tmp_path, fake)
        async with running_bot(url, slack_config(fake) + ERIN_FOR_ALICE, people=WITHOUT_ALICE) as h:
            s = _again(h, fake)
            before = await _rows(h, "alice")
            assert await say(s, "decline 1", user=BOB) == CALLED_OFF
            assert await _rows(h, "alice") == before  # no message for someone the bot cannot reach
            assert [w.status for w in await swaps(h)] == ["cancelled"]
            [(action, actor, details)] = [e for e in await audit(h) if e[0] == "swap.cancelled"]
            assert (actor, details["reason"], details["noticed_by"]) == (None, "requester_left_rotation", "bob")
            assert await say(s, "decline 1", user=BOB) == "Swap #1 was called off: alice is no longer in app.yaml."


async def test_cancel_by_the_counterpart_of_a_swap_whose_requester_left_calls_it_off(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        url = await _asked_then_alice_removed(tmp_path, fake)
        async with running_bot(url, slack_config(fake) + ERIN_FOR_ALICE, people=WITHOUT_ALICE) as h:
            assert await say(_again(h, fake), "cancel 1", user=BOB) == CALLED_OFF
            assert [w.status for w in await swaps(h)] == ["cancelled"]


async def test_a_swap_whose_requester_left_does_not_block_the_stretch(tmp_path: Path) -> None:
    """Erin now holds the week Alice asked Bob to take: her own request for it is not refused for Alice's, which
    nobody could cancel; Alice's is called off, and Bob, who was asked, is told."""
    async with FakeSlack() as fake:
        url = await _asked_then_alice_removed(tmp_path, fake)
        async with running_bot(url, slack_config(fake) + ERIN_FOR_ALICE, people=WITHOUT_ALICE) as h:
            asked = await say(_again(h, fake), "bob next", user=ERIN)
            assert asked.startswith(f"Asked Bob to take your `dba-primary` shift {ALICE_NEXT} (swap #2)"), asked
            assert [w.status for w in await swaps(h)] == ["cancelled", "pending"]
            assert (await directs(h, "bob"))[-2][:2] == (
                "swap.cancelled", f"Swap #1 (alice's `dba-primary` shift {ALICE_NEXT}) is called off: alice is no "
                "longer in app.yaml. Nothing to do.")


async def test_an_overlapping_request_offers_cancel_only_to_whoever_asked(tmp_path: Path) -> None:
    """Alice asked Bob to take her week; Dave then put Carol on for its Tuesday. Carol's request for that day overlaps
    Alice's swap, which only Alice can cancel: Carol is told to wait or ask Alice, not to `/swap cancel 1`."""
    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake) + ROTATIONS,
                               people=PEOPLE) as h:
            s = Slack(h, fake)
            await say(s, "bob next")
            put = await say(s, "dba-primary carol 2026-12-01T09:00+01:00 2026-12-02T09:00+01:00", user=DAVE,
                            command="/override")
            assert put.startswith("Carol is on call for `dba-primary`")
            clash = ("That overlaps swap #1 (Alice asked Bob to take `dba-primary` from Mon 30 Nov 09:00 CET until "
                     "Mon 7 Dec 09:00 CET), which is still waiting for an answer. ")
            assert await say(s, "bob dba-primary 2026-12-01", user=CAROL) == clash + (
                "Wait for it (it expires Wed 25 Nov 05:00 CET), or ask Alice, who asked for it, to cancel it.")
            assert await say(s, "bob dba-primary 2026-12-03") == clash + (
                "Wait for it, or cancel it with `/swap cancel 1`.")
