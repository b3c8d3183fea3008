"""`/override` and `/oncall take` refusals are sentences: a capital (or the quoted word they are about) at the start,
a full stop at the end, then the usage. They read "an override can last 90 days at most. Usage: ..." and "give FROM
and UNTIL Usage: ..." before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.botkit import running_bot
from tests.fake_slack import FakeSlack
from tests.test_oncall import PEOPLE, ROTATIONS
from tests.test_slack_flow import Slack, slack_config

OVERRIDE = ("Usage: `/override ROTATION PERSON FROM UNTIL`; times are `now`, `2026-12-24T18:00` or `2026-12-24 18:00` "
            "(your time zone), or for UNTIL a length such as `8h`.")
TAKE = OVERRIDE.replace("/override ROTATION PERSON FROM UNTIL", "/oncall take [ROTATION] [FROM] [UNTIL]")


@pytest.fixture
async def slack(tmp_path: Path) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS, people=PEOPLE) as h:
        yield Slack(h, fake)


@pytest.mark.parametrize(("command", "text", "expected"), [
    ("/override", "dba-primary carol now 100d", f"An override can last 90 days at most. {OVERRIDE}"),
    ("/override", "dba-primary carol now", f"Give both FROM and UNTIL. {OVERRIDE}"),
    # (it said "Give both FROM and UNTIL.", which it was given)
    ("/override", "dba-primary carol now 1h extra", f"Too many arguments: extra. {OVERRIDE}"),
    # both in the hour the clocks skip, each read as the moment of the skip: it said "UNTIL must come after FROM."
    ("/override", "dba-primary carol 2027-03-28T02:10 2027-03-28T02:50",
     "`2027-03-28T02:10` and `2027-03-28T02:50` do not exist in Europe/Berlin: the clocks go forward over them that "
     f"night. Give times before or after the jump. {OVERRIDE}"),
    # ... with UNTIL given its offset too
    ("/override", "dba-primary carol 2027-03-28T02:30 2027-03-28T03:00+02:00",
     "`2027-03-28T02:30` does not exist in Europe/Berlin: the clocks go forward over it that night. Give times before "
     f"or after the jump. {OVERRIDE}"),
    # ... but an UNTIL before FROM is that, whichever hour FROM is in
    ("/override", "dba-primary carol 2027-03-28T02:30 2027-03-27T09:00", f"UNTIL must come after FROM. {OVERRIDE}"),
    ("/oncall", "take dba-primary now 1h extra", f"Too many arguments: extra. {TAKE}"),
    ("/override", "dba-primary carol 2026-11-20T09:00 2026-11-21T09:00",
     f"That stretch is over already (it ended Sat 21 Nov 09:00 CET). {OVERRIDE}"),
    ("/oncall", "take dba-primary now 59s", f"A cover lasts a minute at least. {TAKE}"),
    ("/override", "dba-primary carol 9999-01-01 1h",
     f"'9999-01-01' is too far away: give a year from 1970 to 9000. {OVERRIDE}"),
    ("/override", "dba-primary carol tomorrow 1h", f"'tomorrow' is not a time. {OVERRIDE}"),
    ("/override", "dba-primary carol now 99999999999d",
     f"'99999999999d' from then is too far away: give a length of 90 days at most. {OVERRIDE}"),
    ("/override", "dba-primary carol 2026-11-25T09:00 2026-11-25T08:00", f"UNTIL must come after FROM. {OVERRIDE}"),
    # `now` as UNTIL is the present (it was read as FROM: "UNTIL must come after FROM")
    ("/override", "dba-primary carol 2026-11-24T04:00 now",
     f"That stretch is over already (it ended Tue 24 Nov 05:00 CET). {OVERRIDE}"),
    ("/override", "dba-primary carol 2026-11-25T09:00 now", f"UNTIL must come after FROM. {OVERRIDE}"),
])
async def test_a_refused_cover_is_told_in_sentences(slack: Slack, command: str, text: str, expected: str) -> None:
    user = "U02BOB" if command == "/override" else "U01ALICE"
    assert (await slack.answer(await slack.command(command, text, user=user)))["text"] == expected


async def test_a_swap_date_far_away_is_a_sentence(slack: Slack) -> None:
    answer = (await slack.answer(await slack.command("/swap", "bob dba-primary 9999-01-01", user="U01ALICE")))["text"]
    assert answer == "'9999-01-01' is too far away: give a year from 1970 to 9000."
