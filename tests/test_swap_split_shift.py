"""`/swap PERSON next` when an override splits the requester's next shift: a swap covers one unbroken stretch, so
the request is for the part before the override, and the answer says plainly that it is only part of the shift and
gives the request for the rest (before, the rest of the week silently stayed the requester's).

As in tests/test_swaps.py: Tuesday 24 Nov 2026, 04:00 UTC; dba-primary (weekly, Monday 09:00 Berlin) has Alice from
Monday 30 Nov; Dave (a manager) puts Carol on for Tuesday 1 Dec, 09:00 to 09:00.
"""

from __future__ import annotations

from pathlib import Path

from tests.botkit import running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, slack_config
from tests.test_swaps import DAVE, PEOPLE, ROTATIONS, directs, say, swaps


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
