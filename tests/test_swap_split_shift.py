"""`/swap PERSON next` when an override splits the requester's next shift: a swap covers one unbroken stretch, so
the request is for the part before the override, and the answer says plainly that it is only part of the shift and
gives the request for the rest (before, the rest of the week silently stayed the requester's).

As in tests/test_swaps.py: Tuesday 24 Nov 2026, 04:00 UTC; dba-primary (weekly, Monday 09:00 Berlin) has Alice from
Monday 30 Nov; Dave (a manager) puts Carol on for Tuesday 1 Dec, 09:00 to 09:00.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bot.clock import FakeClock

from tests.botkit import running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, slack_config
from tests.test_swaps import BOB, DAVE, PEOPLE, ROTATIONS, directs, say, swaps


async def test_next_of_a_shift_an_override_splits_says_it_is_part_and_how_to_ask_for_the_rest(tmp_path: Path) -> None:
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
        s = Slack(h, fake)
        put = await say(s, "dba-primary carol 2026-12-01T09:00+01:00 2026-12-02T09:00+01:00", user=DAVE,
                        command="/override")
        assert put.startswith("Carol is on call for `dba-primary`")
        rest = (" That is only part of your shift, which Carol (override) covers from Tue 1 Dec 09:00 CET; the rest "
                "of it stays yours unless you ask for it too: `/swap bob dba-primary 2026-12-02T09:00` asks for the "
                "part from Wed 2 Dec 09:00 CET until Mon 7 Dec 09:00 CET.")
        assert await say(s, "bob next") == (
            "Asked Bob to take your `dba-primary` shift from Mon 30 Nov 09:00 CET until Tue 1 Dec 09:00 CET (swap #1); "
            "it expires Wed 25 Nov 05:00 CET. `/swap cancel 1` cancels it." + rest)
        assert (await directs(h, "alice"))[-1][1].endswith(rest)  # the "You asked" message (a direct chat's answer)
        assert await say(s, "bob dba-primary 2026-12-02T09:00") == (
            "Asked Bob to take your `dba-primary` shift from Wed 2 Dec 09:00 CET until Mon 7 Dec 09:00 CET (swap #2); "
            "it expires Wed 25 Nov 05:00 CET. `/swap cancel 2` cancels it.")
        assert [(w.starts_at.isoformat(), w.ends_at.isoformat()) for w in await swaps(h)] == [
            ("2026-11-30T08:00:00+00:00", "2026-12-01T08:00:00+00:00"),
            ("2026-12-02T08:00:00+00:00", "2026-12-07T08:00:00+00:00")]


NIGHTLY = """
rotations:
  - {id: ber, members: [bob, alice, carol], shift: 1d, handoff: "02:30", start: 2026-10-01, timezone: Europe/Berlin}
"""


async def test_the_request_for_the_rest_names_its_moment_in_the_repeated_hour_and_to_the_second(tmp_path: Path) -> None:
    """The request for the rest gave a bare wall time to the minute. Carol's cover ended at 02:45 CET, the second
    02:45 of the night the clocks go back: typed as given, `2026-10-25T02:45` read as 02:45 CEST, inside the cover,
    and the bot answered "You are not on call ... so there is no shift of yours to swap". A cover ending at 10:00:30
    was named from 10:00, inside it too. The time typed now carries the offset when the clock shows it twice, and its
    seconds when it has some."""
    clock = FakeClock(datetime(2026, 10, 24, 12, tzinfo=UTC))
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + NIGHTLY, people=PEOPLE, clock=clock) as h:
        s = Slack(h, fake)
        # Bob's shift: Sun 25 Oct 02:30 CEST to Mon 26 Oct 02:30 CET; Carol covers 02:45 CEST for an hour
        assert "until Sun 25 Oct 02:45 CET" in await say(s, "ber carol 2026-10-25T02:45 1h", user=BOB,
                                                         command="/override")
        first = await say(s, "alice ber 2026-10-25", user=BOB)
        assert "`/swap alice ber 2026-10-25T02:45+01:00` asks for the part from Sun 25 Oct 02:45 CET until Mon 26 Oct " \
               "02:30 CET." in first, first
        assert await say(s, "alice ber 2026-10-25T02:45+01:00", user=BOB) == (
            "Asked Alice to take your `ber` shift from Sun 25 Oct 02:45 CET until Mon 26 Oct 02:30 CET (swap #2); it "
            "expires Sun 25 Oct 13:00 CET. `/swap cancel 2` cancels it.")

        # Alice's: Mon 26 Oct 02:30 to Tue 27 Oct 02:30 CET; Carol covers 10:00:30 to 12:00:30
        assert "Override #2" in await say(s, "ber carol 2026-10-26T10:00:30 2h", user=BOB, command="/override")
        first = await say(s, "bob ber 2026-10-26")
        assert "`/swap bob ber 2026-10-26T12:00:30` asks for the part from Mon 26 Oct 12:00 CET" in first, first
        assert (await say(s, "bob ber 2026-10-26T12:00:30")).startswith(
            "Asked Bob to take your `ber` shift from Mon 26 Oct 12:00 CET until Tue 27 Oct 02:30 CET (swap #4)")
