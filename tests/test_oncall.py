"""Who is on call, end to end: `/oncall` through the fake Slack, the iCalendar feed, `chatops oncall`.

The running bot on the harness's fake clock (Tuesday 24 Nov 2026, 04:00 UTC), with two rotations:
dba-primary (weekly, Monday 09:00 Berlin: Bob this week) and web (12 hours from 09:00 New York: Carol
tonight). Overrides are rows written straight into the store, as the swap flows will write them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from bot.cli import main
from bot.clock import FakeClock
from storage.models import AuditEvent, Override
from tests.botkit import T0, Harness, bot_on, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, slack_config
from tests.test_swaps import directs

CAROL = "Carol Ångström-Łukasiewicz; nights, weekends"  # long, not ASCII, with ; and , to escape in the feed
PEOPLE = f"""
# Alice reads times in New York
people:
  - {{id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111, timezone: America/New_York}}
  - {{id: bob, name: Bob, roles: [manager], slack: U02BOB}}
  - {{id: carol, name: "{CAROL}", slack: U03CAROL}}
"""
ROTATIONS = """
rotations:
  - {id: dba-primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02, timezone: Europe/Berlin}
  - {id: web, members: [bob, carol], shift: 12h, handoff: "09:00", start: 2026-11-20, timezone: America/New_York}
"""


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake) + ROTATIONS,
                                           people=PEOPLE) as h:
        yield Slack(h, fake)


async def add_override(h: Harness, person: str, start: datetime, end: datetime, *, created: datetime = T0,
                       rotation: str = "dba-primary", reason: str = "", cancelled: datetime | None = None) -> int:
    async with h.bot.db.transaction() as session:
        row = Override(rotation=rotation, person=person, starts_at=start, ends_at=end, created_at=created,
                       created_by="alice", reason=reason, cancelled_at=cancelled)
        session.add(row)
        await session.flush()
        assert row.id is not None
        return row.id


async def ask(s: Slack, text: str, user: str = "U02BOB") -> str:
    return (await s.answer(await s.command("/oncall", text, user=user)))["text"]


def rows(text: str) -> list[list[str]]:
    """The table inside a reply's ``` block, as cells (split on two or more spaces)."""
    block = text.split("```")[1].strip("\n")
    return [re.split(r"\s{2,}", line.strip()) for line in block.splitlines()]


# -- /oncall --------------------------------------------------------------------------------------------------

async def test_oncall_shows_every_rotation_now_with_the_next_handoff(slack: Slack) -> None:
    text = await ask(slack, "")
    assert text.startswith("On call now (times in each rotation's time zone):")
    assert rows(text) == [
        ["rotation", "on call", "since", "until", "next"],
        ["dba-primary", "Bob", "Mon 23 Nov 09:00 CET", "Mon 30 Nov 09:00 CET", "Alice"],
        ["web", CAROL, "Mon 23 Nov 21:00 EST", "Tue 24 Nov 09:00 EST", "Bob"],
    ]
    in_new_york = await ask(slack, "", user="U01ALICE")  # Alice has a time zone: everything in hers
    assert "times in America/New_York" in in_new_york
    assert rows(in_new_york)[1] == ["dba-primary", "Bob", "Mon 23 Nov 03:00 EST", "Mon 30 Nov 03:00 EST", "Alice"]


async def test_oncall_rotation_shows_the_current_and_next_three_shifts(slack: Slack) -> None:
    text = await ask(slack, "dba-primary")
    assert text.startswith("`dba-primary`: 1w shifts, handoff mon 09:00 Europe/Berlin, from 2026-11-02. "
                           "Times in Europe/Berlin.")
    assert rows(text) == [
        ["who", "from", "until", "note"],
        ["Bob", "Mon 23 Nov 09:00 CET", "Mon 30 Nov 09:00 CET", "now"],
        ["Alice", "Mon 30 Nov 09:00 CET", "Mon 7 Dec 09:00 CET"],
        ["Bob", "Mon 7 Dec 09:00 CET", "Mon 14 Dec 09:00 CET"],
        ["Alice", "Mon 14 Dec 09:00 CET", "Mon 21 Dec 09:00 CET"],
    ]
    slack.h.clock.set(datetime(2026, 11, 30, 8, tzinfo=UTC))  # the handoff itself: Alice's
    assert rows(await ask(slack, "dba-primary"))[1][:2] == ["Alice", "Mon 30 Nov 09:00 CET"]


async def test_oncall_schedule_is_a_table_for_n_weeks_and_bad_input_says_what_to_type(slack: Slack) -> None:
    text = await ask(slack, "schedule web --weeks 1")
    assert text.startswith("`web` for the next 1 week (12h shifts, handoff 09:00 America/New_York")
    table = rows(text)
    assert table[0] == ["from", "until", "length", "who", "note"]
    assert table[1] == ["Mon 23 Nov 21:00 EST", "Tue 24 Nov 09:00 EST", "12h", CAROL, "now"]
    assert len(table) == 1 + 15 and {r[2] for r in table[1:]} == {"12h"}
    assert len(rows(await ask(slack, "schedule dba-primary"))) == 1 + 5  # 4 weeks by default
    assert (await ask(slack, "schedule DBA-primary \u2014weeks 2")).startswith("`dba-primary` for the next 2 weeks")
    long = await ask(slack, "schedule web --weeks 6")  # 85 shifts: as many as fit a message, and where the rest are
    shown = len(rows(long)) - 1
    assert len(long) <= 3800 and 40 <= shown < 60  # Carol's long name: fewer than the 60 rows short names allow
    assert long.endswith(f"{85 - shown} more shifts: ask for fewer weeks, or subscribe to "
                         "http://127.0.0.1:8080/oncall/web.ics")
    assert (await ask(slack, "schedule dba-primary --weeks=2")).startswith("`dba-primary` for the next 2 weeks")
    for bad in ("schedule", "schedule dba-primary --weeks 0", "schedule dba-primary --weeks x", "schedule a b",
                "schedule dba-primary --weeks " + "9" * 5000):  # more digits than int() takes
        assert (await ask(slack, bad)).startswith("Usage: `/oncall schedule ROTATION [--weeks N]`"), bad
    assert await ask(slack, "schedule nope") == "There is no rotation `nope`. Known rotations: `dba-primary`, `web`."
    assert await ask(slack, "nope") == "There is no rotation `nope`. Known rotations: `dba-primary`, `web`."
    assert (await ask(slack, "help")).startswith("Usage: `/oncall [ROTATION]")
    stranger = await ask(slack, "", user="U09NOBODY")
    assert "I don't know you yet" in stranger


async def test_an_override_in_the_store_shows_in_oncall_and_a_cancelled_one_does_not(slack: Slack) -> None:
    h = slack.h
    oid = await add_override(h, "alice", T0 - timedelta(hours=1), T0 + timedelta(days=1), reason="Bob at the dentist")
    await add_override(h, "carol", T0 - timedelta(hours=2), T0 + timedelta(days=3), cancelled=T0)
    assert rows(await ask(slack, ""))[1] == ["dba-primary", "Alice (override)", "Tue 24 Nov 04:00 CET",
                                              "Wed 25 Nov 05:00 CET", "Bob"]
    table = rows(await ask(slack, "dba-primary"))
    assert table[1] == ["Alice (override)", "Tue 24 Nov 04:00 CET", "Wed 25 Nov 05:00 CET",
                        f"now; override #{oid} by Alice: Bob at the dentist"]
    assert table[2] == ["Bob", "Wed 25 Nov 05:00 CET", "Mon 30 Nov 09:00 CET"]  # the rest of Bob's week
    newer = await add_override(h, "carol", T0 + timedelta(hours=2), T0 + timedelta(hours=4),
                               created=T0 + timedelta(minutes=1))
    h.clock.advance(timedelta(hours=3))
    assert rows(await ask(slack, ""))[1][:2] == ["dba-primary", f"{CAROL} (override)"]
    assert newer > oid


async def test_oncall_says_since_when_the_person_has_been_on_call_across_back_to_back_stretches(slack: Slack) -> None:
    """Alice covers Sunday from 09:00 and her own week follows on Monday: on Monday she has been on call since
    Sunday 09:00 (it said since Monday 09:00), as "until" already joins a cover and the shift it runs into."""
    h = slack.h
    await add_override(h, "alice", datetime(2026, 11, 29, 8, tzinfo=UTC), datetime(2026, 11, 30, 8, tzinfo=UTC))
    h.clock.set(datetime(2026, 11, 30, 11, tzinfo=UTC))
    assert rows(await ask(slack, ""))[1] == ["dba-primary", "Alice", "Sun 29 Nov 09:00 CET", "Mon 7 Dec 09:00 CET",
                                             "Bob"]


# -- the iCalendar feed ---------------------------------------------------------------------------------------

def parse_ics(body: bytes) -> tuple[list[str], list[dict[str, str]]]:
    """Our own strict reading: CRLF everywhere, no line over 75 octets, folds undone, TEXT unescaped."""
    text = body.decode("utf-8")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    physical = text.split("\r\n")[:-1]
    assert max(len(line.encode()) for line in physical) <= 75
    lines: list[str] = []
    for line in physical:
        if line.startswith(" "):
            lines[-1] += line[1:]
        else:
            lines.append(line)
    events: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in lines:
        name, _, value = line.partition(":")
        if line == "BEGIN:VEVENT":
            current = {}
        elif line == "END:VEVENT":
            assert current is not None
            events.append(current)
            current = None
        elif current is not None:
            current[name] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)
    return lines, events


def utc_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


async def feed(h: Harness, rotation: str) -> tuple[int, bytes, Any]:
    resp = await h.client.get(f"/oncall/{rotation}.ics")
    return resp.status, await resp.read(), resp.headers


async def test_the_feed_is_the_effective_schedule_as_rfc5545_events(slack: Slack) -> None:
    h = slack.h
    oid = await add_override(h, "carol", T0 + timedelta(days=1), T0 + timedelta(days=2), reason="swap; see #ops")
    status, body, headers = await feed(h, "dba-primary")
    assert status == 200 and headers["Content-Type"] == "text/calendar; charset=utf-8"
    lines, events = parse_ics(body)
    assert lines[:2] == ["BEGIN:VCALENDAR", "VERSION:2.0"] and lines[-1] == "END:VCALENDAR"
    assert any(line.startswith("PRODID:") for line in lines)
    starts = [utc_time(e["DTSTART"]) for e in events]
    ends = [utc_time(e["DTEND"]) for e in events]
    # four weeks back reaches before the rotation's start (Monday 2 Nov, 09:00 Berlin): nobody, no event
    assert starts[0] == datetime(2026, 11, 2, 8, tzinfo=UTC) and ends[-1] >= T0 + timedelta(weeks=12)
    assert all(e == s for e, s in zip(ends, starts[1:]))  # back to back: one person at any time
    assert len({e["UID"] for e in events}) == len(events)
    assert {e["DTSTAMP"] for e in events} == {"20261124T040000Z"}
    by_start = {utc_time(e["DTSTART"]): e for e in events}
    carol = by_start[T0 + timedelta(days=1)]
    assert carol["SUMMARY"] == f"On call: {CAROL} (dba-primary)"
    assert carol["DESCRIPTION"] == f"{CAROL} covers dba-primary (override #{oid}, made by Alice)"
    assert "swap; see #ops" not in body.decode()  # the feed is unauthenticated: reasons stay in chat
    assert utc_time(carol["DTEND"]) == T0 + timedelta(days=2)
    assert by_start[datetime(2026, 11, 23, 8, tzinfo=UTC)]["SUMMARY"] == "On call: Bob (dba-primary)"
    assert by_start[T0 + timedelta(days=2)]["SUMMARY"] == "On call: Bob (dba-primary)"  # the rest of his week
    raw = body.decode()
    assert "Carol Ångström-Łukasiewicz\\; nights\\, weekends" in raw.replace("\r\n ", "")
    assert any(len(line.encode()) > 60 for line in raw.split("\r\n"))  # folding was needed and done

    h.clock.advance(timedelta(days=3))  # a day later the same shifts keep their UIDs
    _, later, _ = await feed(h, "dba-primary")
    again = {e["DTSTART"]: e["UID"] for e in parse_ics(later)[1]}
    before = {e["DTSTART"]: e["UID"] for e in events}
    shared = set(again) & set(before)
    assert len(shared) > 10 and all(again[k] == before[k] for k in shared)


async def test_the_feed_parses_with_the_icalendar_library(slack: Slack) -> None:
    icalendar = pytest.importorskip("icalendar", reason="the icalendar package is not installed")
    _, body, _ = await feed(slack.h, "web")
    calendar = icalendar.Calendar.from_ical(body)
    events = list(calendar.walk("VEVENT"))
    assert events and all(ev.decoded("DTSTART").tzinfo is not None for ev in events)
    names = {str(ev.get("SUMMARY")) for ev in events}
    assert names == {"On call: Bob (web)", f"On call: {CAROL} (web)"}
    lengths = {ev.decoded("DTEND") - ev.decoded("DTSTART") for ev in events}
    assert lengths == {timedelta(hours=12)}  # no DST change inside the window, the first begins at the start


async def test_the_feed_of_a_rotation_that_starts_later_shows_its_first_shifts(tmp_path: Path) -> None:
    """RFC 5545 wants at least one event; the calendar of a rotation starting next summer shows when it starts."""
    later = ('rotations:\n  - {id: future, members: [alice, bob], shift: 1w, handoff: "tue 09:00", start: 2027-06-01, '
             'timezone: UTC}\n')
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", later, people=PEOPLE) as h:
        status, body, _ = await feed(h, "future")
    _, events = parse_ics(body)
    assert status == 200 and events
    assert utc_time(events[0]["DTSTART"]) == datetime(2027, 6, 1, 9, tzinfo=UTC)
    assert [e["SUMMARY"] for e in events[:2]] == ["On call: Alice (future)", "On call: Bob (future)"]


async def test_the_feed_of_a_rotation_that_starts_later_shows_its_overrides_as_the_schedule_does(
        tmp_path: Path) -> None:
    """The rotation starts 14 weeks ahead, past the twelve the feed looks ahead of now, so the feed draws from
    its start; Bob's override in its first week is in `/oncall schedule` and in the feed alike."""
    later = "  - {id: later, members: [alice, carol], shift: 1d, handoff: '09:00', start: 2027-03-01, timezone: Europe/Berlin}\n"
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS + later, people=PEOPLE) as h:
        s = Slack(h, fake)
        put = await s.answer(await s.command("/override", "later bob 2027-03-05 09:00 1d", user="U02BOB"))
        assert put["text"].startswith("Bob is on call for `later` from Fri 5 Mar 2027 09:00 CET")
        table = rows(await ask(s, "schedule later --weeks 16"))
        assert [r[3] for r in table if r[0] == "Fri 5 Mar 2027 09:00 CET"] == ["Bob (override)"]
        _, body, _ = await feed(h, "later")
    summaries = {utc_time(e["DTSTART"]): e["SUMMARY"] for e in parse_ics(body)[1]}
    assert summaries[datetime(2027, 3, 5, 8, tzinfo=UTC)] == "On call: Bob (later)"
    assert summaries[datetime(2027, 3, 6, 8, tzinfo=UTC)] == "On call: Carol Ångström-Łukasiewicz; nights, weekends (later)"


async def test_covers_made_within_a_second_of_each_other_give_no_event_that_ends_as_it_starts(slack: Slack) -> None:
    """A manager's /override from now, then someone's own /oncall take 0.4 s later: the first cover lasts 0.4 s
    before the second takes over, and cut to the feed's whole seconds it ended as it started (RFC 5545 wants DTEND
    after DTSTART; calendar apps refuse or hide such an event). It is left out, and the feed has no gap."""
    s = slack
    s.h.clock.set(T0 + timedelta(seconds=4.318051))
    put = await s.answer(await s.command("/override", "dba-primary carol now 8h", user="U02BOB"))
    assert put["text"].startswith(f"{CAROL} is on call for `dba-primary` from Tue 24 Nov 05:00 CET")
    s.h.clock.advance(timedelta(seconds=0.4))
    took = await s.answer(await s.command("/oncall", "take dba-primary now 2h", user="U01ALICE"))
    assert took["text"].startswith("Alice is on call for `dba-primary` from Mon 23 Nov 23:00 EST")
    _, body, _ = await feed(s.h, "dba-primary")
    events = parse_ics(body)[1]
    assert [(e["DTSTART"], e["DTEND"]) for e in events if e["DTEND"] <= e["DTSTART"]] == []
    assert all(e["DTEND"] == f["DTSTART"] for e, f in zip(events, events[1:]))  # back to back still
    now = [(e["DTSTART"], e["DTEND"], e["SUMMARY"]) for e in events if "20261124T04" <= e["DTSTART"] < "20261125"]
    assert now == [("20261124T040004Z", "20261124T060004Z", "On call: Alice (dba-primary)"),  # her own take
                   ("20261124T060004Z", "20261124T120004Z", f"On call: {CAROL} (dba-primary)"),  # Bob's 8h, on
                   ("20261124T120004Z", "20261130T080000Z", "On call: Bob (dba-primary)")]  # then his own week


async def test_an_unknown_rotation_is_a_404_naming_the_known_ones(slack: Slack) -> None:
    status, body, _ = await feed(slack.h, "nope")
    assert status == 404 and "unknown rotation 'nope' (known: dba-primary, web)" in body.decode()
    status, body, _ = await feed(slack.h, "DBA-Primary")  # case does not matter, as for /oncall
    assert status == 200 and body.startswith(b"BEGIN:VCALENDAR")


# -- chatops oncall -------------------------------------------------------------------------------------------

async def test_chatops_oncall_prints_tables_from_the_same_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: '{url}'}}\ntimezone: Europe/Berlin\n" + PEOPLE + ROTATIONS, encoding="utf-8")
    async with running_bot(url, ROTATIONS, people=PEOPLE) as h:
        await add_override(h, "carol", T0 - timedelta(hours=1), T0 + timedelta(hours=5))
        code = await asyncio.to_thread(main, ["oncall", "-c", str(config), "--at", "2026-11-24T04:00:00Z"])
        out = capsys.readouterr().out
        assert code == 0
        table = [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]
        assert table[0] == ["ROTATION", "ON CALL", "SINCE", "UNTIL", "NEXT"]
        assert table[1] == ["dba-primary", f"{CAROL} (override)", "Tue 24 Nov 04:00 CET", "Tue 24 Nov 10:00 CET", "Bob"]
        assert table[2][:2] == ["web", CAROL]

        code = await asyncio.to_thread(main, ["oncall", "dba-primary", "-c", str(config), "--at", "2026-12-01T12:00:00+01:00"])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("dba-primary: 1w shifts")
        lines = out.strip().splitlines()
        assert lines[1].split() == ["WHO", "FROM", "UNTIL", "NOTE"]
        assert lines[2].startswith("Alice") and "Mon 30 Nov 09:00 CET" in lines[2] and lines[2].endswith("at --at")
        assert len(lines) == 2 + 6  # the current shift and the next five

        code = await asyncio.to_thread(main, ["oncall", "nope", "-c", str(config)])
        captured = capsys.readouterr()
        assert code == 2 and "unknown rotation 'nope' (known: dba-primary, web)" in captured.err
        with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for every command's bad arguments
            await asyncio.to_thread(main, ["oncall", "-c", str(config), "--at", "yesterday"])
        assert exited.value.code == 2 and "not an ISO 8601 time" in capsys.readouterr().err


# -- covering shifts: /oncall take and /override ------------------------------------------------------------

async def test_an_override_puts_on_a_rotation_that_escalations_page_only_someone_who_can_acknowledge(
        tmp_path: Path) -> None:
    paged = "escalation_policies:\n  - {id: dba, steps: [{notify: {rotation: dba-primary}, wait: 5m}]}\n"
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS + paged, people=PEOPLE) as h:
        s = Slack(h, fake)
        refused = await s.answer(await s.command("/override", "dba-primary carol 2026-11-25 09:00 8h", user="U02BOB"))
        assert refused["text"] == (f"{CAROL} has no `responder` role, so they could not acknowledge the pages "
                                   "`dba-primary` gets; add it to their `roles` in app.yaml first, or put a responder on.")
        put = await s.answer(await s.command("/override", "web carol 2026-11-25 09:00 8h", user="U02BOB"))
        assert put["text"].startswith(f"{CAROL} is on call for `web`")  # nothing pages web



async def test_taking_the_current_shift_and_a_managers_override_change_who_is_on_call(slack: Slack) -> None:
    s = slack
    took = await s.answer(await s.command("/oncall", "take dba-primary", user="U01ALICE"))
    assert took["text"] == ("Alice is on call for `dba-primary` from Mon 23 Nov 23:00 EST until Mon 30 Nov 03:00 EST "
                            "(America/New_York). Override #1: `/oncall cancel 1` undoes it.")
    assert took["response_type"] == "in_channel"
    assert rows(await ask(s, "dba-primary"))[1][:3] == ["Alice (override)", "Tue 24 Nov 05:00 CET", "Mon 30 Nov 09:00 CET"]
    assert await directs(s.h, "bob") == [("oncall.override", "Alice took over your `dba-primary` shift from "
                                                             "Tue 24 Nov 05:00 CET until Mon 30 Nov 09:00 CET.", [])]

    put = await s.answer(await s.command("/override", "dba-primary carol 2026-11-25 09:00 8h", user="U02BOB"))
    assert put["text"] == (f"{CAROL} is on call for `dba-primary` from Wed 25 Nov 09:00 CET until Wed 25 Nov 17:00 CET "
                           "(Europe/Berlin). Override #2: `/override cancel 2` undoes it.")
    assert await directs(s.h, "alice") == [(  # her cover, in her time zone; Bob, who made the override, is not told
        "oncall.override", f"Bob put {CAROL} on call for `dba-primary` instead of you from Wed 25 Nov 03:00 EST until "
                           "Wed 25 Nov 11:00 EST.", [])]
    assert len(await directs(s.h, "bob")) == 1
    s.h.clock.set(datetime(2026, 11, 25, 12, tzinfo=UTC))
    assert rows(await ask(s, "dba-primary"))[1][0] == f"{CAROL} (override)"
    async with s.h.bot.db.sessions() as session:
        audited = (await session.execute(select(AuditEvent).where(AuditEvent.action == "oncall.override")
                                          .order_by(AuditEvent.seq))).scalars().all()
    assert [(e.actor_person, e.details["person"]) for e in audited] == [("alice", "alice"), ("bob", "carol")]


async def test_an_override_is_cancelled_by_a_manager_or_by_whoever_took_it(slack: Slack) -> None:
    """An `/override` or `/oncall take` typed wrong could only be covered by more overrides: `/override cancel ID`
    (a manager, any override) and `/oncall cancel ID` (your own) undo one. One not started no longer counts; one under
    way ends now, so the time it covered stays as it was. Whoever covered is told; a swap's is left to `/swap undo`."""
    s = slack
    put = await s.answer(await s.command("/override", "dba-primary carol 2026-11-25 09:00 8h", user="U02BOB"))
    assert put["text"].endswith("Override #1: `/override cancel 1` undoes it.")
    refused = await s.answer(await s.command("/oncall", "cancel 1", user="U01ALICE"))
    assert refused["text"] == "There is no override #1 of yours. A manager can `/override cancel` anyone's."
    took = await s.answer(await s.command("/oncall", "take dba-primary", user="U01ALICE"))
    assert took["text"].endswith("Override #2: `/oncall cancel 2` undoes it.")

    cancelled = await s.answer(await s.command("/override", "cancel 1", user="U02BOB"))
    assert cancelled["text"] == (f"Cancelled override #1: {CAROL} is no longer on call for `dba-primary` from Wed 25 Nov "
                                 "09:00 CET until Wed 25 Nov 17:00 CET; `/oncall dba-primary` shows who is.")
    assert cancelled["response_type"] == "in_channel"
    assert await directs(s.h, "carol") == [("oncall.override_cancelled", "Bob cancelled override #1: you are no longer "
                                            "on call for `dba-primary` from Wed 25 Nov 09:00 CET until Wed 25 Nov 17:00 "
                                            "CET.", [])]
    again = await s.answer(await s.command("/override", "cancel #1", user="U02BOB"))
    assert again["text"] == "Override #1 was cancelled already."

    s.h.clock.advance(timedelta(hours=1))
    ended = await s.answer(await s.command("/oncall", "cancel 2", user="U01ALICE"))
    assert ended["text"] == ("Cancelled override #2: Alice is no longer on call for `dba-primary` from now until Wed 25 "
                             "Nov 03:00 EST; `/oncall dba-primary` shows who is.")  # (her take ran up to Carol's cover)
    assert rows(await ask(s, "dba-primary"))[1][0] == "Bob"  # his shift again, and he is told so
    assert (await directs(s.h, "bob"))[-1] == ("oncall.override_cancelled", "Alice cancelled override #2: you are on "
                                               "call for `dba-primary` from now until Wed 25 Nov 09:00 CET again.", [])
    assert (await s.answer(await s.command("/oncall", "cancel 2", user="U01ALICE")))["text"] == (
        "Override #2 was cancelled already.")  # (ended early, not "over already")
    assert (await s.answer(await s.command("/oncall", "cancel 1", user="U02BOB")))["text"] == (
        "There is no override #1 of yours. A manager can `/override cancel` anyone's.")  # made for Carol: a manager's
    async with s.h.bot.db.sessions() as session:
        two = await session.get(Override, 2)
        assert two is not None and two.cancelled_at is None and two.ends_at == s.h.clock.now()  # her hour stays hers
        audited = (await session.execute(select(AuditEvent).where(AuditEvent.action == "oncall.override_cancelled")
                                          .order_by(AuditEvent.seq))).scalars().all()
    assert [(e.actor_person, e.details["override"], e.details["ended_early"]) for e in audited] == [
        ("bob", 1, False), ("alice", 2, True)]

    swap = await add_override(s.h, "carol", T0 + timedelta(days=2), T0 + timedelta(days=3), reason="swap #4: Carol covers")
    assert (await s.answer(await s.command("/override", f"cancel {swap}", user="U02BOB")))["text"] == (
        f"Override #{swap} is swap #4's: the two in it can `/swap undo 4` before it starts; once it started, "
        "`/override` the rest to someone.")
    assert (await s.answer(await s.command("/override", "cancel 99", user="U02BOB")))["text"] == (
        "There is no override #99.")
    assert (await s.answer(await s.command("/override", "cancel soon", user="U02BOB")))["text"].startswith(
        "Usage: `/override cancel ID`")


async def test_a_cover_under_a_minute_or_of_ones_own_time_writes_nothing(slack: Slack) -> None:
    """Half a second (a typing slip) would be an override and a message to Bob; taking the shift Bob already holds
    would be an override that changes nothing. Both are answered, and nothing is written or sent."""
    s = slack
    tiny = await s.answer(await s.command("/oncall", "take dba-primary 2026-11-24T05:00 2026-11-24T05:00:00.5",
                                          user="U01ALICE"))
    assert tiny["text"].startswith("A cover lasts a minute at least. Usage: `/oncall take [ROTATION] [FROM] [UNTIL]`")
    short = await s.answer(await s.command("/oncall", "take dba-primary now 59s", user="U01ALICE"))
    assert short["text"].startswith("A cover lasts a minute at least.")
    # a word that is no rotation, by someone in one rotation, was read as a time: "'nope' is not a time."
    nope = await s.answer(await s.command("/oncall", "take nope", user="U01ALICE"))
    assert nope["text"].startswith("'nope' is neither a rotation nor a time. Known rotations: `dba-primary`"), nope
    assert (await s.answer(await s.command("/oncall", "take dba-primary nope", user="U01ALICE")))["text"].startswith(
        "'nope' is not a time.")
    own = await s.answer(await s.command("/oncall", "take dba-primary", user="U02BOB"))
    assert own["text"] == ("You are already on call for `dba-primary` from Tue 24 Nov 05:00 CET until "
                           "Mon 30 Nov 09:00 CET; nothing changed.")
    async with s.h.bot.db.sessions() as session:
        assert (await session.execute(select(Override))).scalars().all() == []
        assert (await session.execute(select(AuditEvent).where(AuditEvent.action == "oncall.override"))).all() == []
    assert await directs(s.h, "bob") == []
    minute = await s.answer(await s.command("/oncall", "take dba-primary now 1m", user="U01ALICE"))
    assert minute["text"].startswith("Alice is on call for `dba-primary` from Mon 23 Nov 23:00 EST until "
                                     "Mon 23 Nov 23:01 EST")


async def test_an_override_note_names_its_author_once(slack: Slack) -> None:
    """It read "override #1 by Bob: override by Bob"; rows written that way before still show the author once."""
    s = slack
    await s.answer(await s.command("/override", "dba-primary carol 2026-11-25 09:00 8h", user="U02BOB"))
    old = await add_override(s.h, "carol", datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 26, 16, tzinfo=UTC),
                             reason="override by Alice")
    notes = [row[4] for row in rows(await ask(s, "schedule dba-primary --weeks 1")) if row[3] == f"{CAROL} (override)"]
    assert notes == ["override #1 by Bob", f"override #{old} by Alice"]


async def test_a_cover_that_runs_into_the_same_persons_shift_is_one_stretch_in_oncall(slack: Slack) -> None:
    """Bob takes Carol's night on web; his own day shift follows at 09:00: /oncall says he is on call until that
    shift ends and that Carol is next (it said until 09:00, then Bob)."""
    s = slack
    await s.answer(await s.command("/oncall", "take web", user="U02BOB"))
    assert rows(await ask(s, ""))[2] == ["web", "Bob (override)", "Mon 23 Nov 23:00 EST", "Tue 24 Nov 21:00 EST", CAROL]


async def test_taking_a_time_before_the_rotation_starts_needs_until_and_one_digit_hours_and_seconds_read(tmp_path: Path) -> None:
    later = "  - {id: later, members: [alice, bob], shift: 1w, handoff: 'mon 09:00', start: 2027-01-04, timezone: Europe/Berlin}\n"
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                slack_config(fake) + ROTATIONS + later, people=PEOPLE) as h:
        s = Slack(h, fake)
        took = await s.answer(await s.command("/oncall", "take later 2026-12-01T10:00", user="U02BOB"))
        assert took["text"].startswith("Nobody is on call for `later` at Tue 1 Dec 10:00 CET (the rotation has not "
                                       "started then), so there is no shift to take; give UNTIL too. Usage:")
        async with h.bot.db.sessions() as session:
            assert not (await session.execute(select(Override))).scalars().all()
        took = await s.answer(await s.command("/oncall", "take web 2026-11-25 9:00 2026-11-25 17:00", user="U03CAROL"))
        assert took["text"] == (f"{CAROL} is on call for `web` from Wed 25 Nov 09:00 EST until Wed 25 Nov 17:00 EST "
                                "(America/New_York). Override #1: `/oncall cancel 1` undoes it.")
        # with seconds, as the `T` form takes them: one time, not a date and a stray word ("Too many arguments: 2h")
        took = await s.answer(await s.command("/oncall", "take web 2026-11-26 9:00:00 2h", user="U03CAROL"))
        assert took["text"] == (f"{CAROL} is on call for `web` from Thu 26 Nov 09:00 EST until Thu 26 Nov 11:00 EST "
                                "(America/New_York). Override #2: `/oncall cancel 2` undoes it.")
        # with an offset (the second of a repeated time is typed so): one time too
        took = await s.answer(await s.command("/oncall", "take web 2026-11-27 9:00-05:00 1h", user="U03CAROL"))
        assert took["text"] == (f"{CAROL} is on call for `web` from Fri 27 Nov 09:00 EST until Fri 27 Nov 10:00 EST "
                                "(America/New_York). Override #3: `/oncall cancel 3` undoes it.")


async def test_an_override_length_is_elapsed_time_across_a_clock_change_and_a_skipped_time_is_the_skip(
        slack: Slack) -> None:
    """Berlin springs forward on Sunday 28 March 2027 at 02:00 (to 03:00). 8h from midnight is 09:00 CEST,
    8 real hours; 02:30 that night does not exist and starts at the skip, 03:00 CEST (as handoffs do)."""
    s = slack
    put = await s.answer(await s.command("/override", "dba-primary carol 2027-03-28 00:00 8h", user="U02BOB"))
    assert "from Sun 28 Mar 2027 00:00 CET until Sun 28 Mar 2027 09:00 CEST (Europe/Berlin)." in put["text"]
    put = await s.answer(await s.command("/override", "dba-primary carol 2027-03-28 02:30 1h", user="U02BOB"))
    assert "from Sun 28 Mar 2027 03:00 CEST until Sun 28 Mar 2027 04:00 CEST (Europe/Berlin)." in put["text"]
    async with s.h.bot.db.sessions() as session:
        stored = (await session.execute(select(Override).order_by(Override.id))).scalars().all()
    assert [(o.starts_at, o.ends_at - o.starts_at) for o in stored] == [
        (datetime(2027, 3, 27, 23, tzinfo=UTC), timedelta(hours=8)), (datetime(2027, 3, 28, 1, tzinfo=UTC), timedelta(hours=1))]


@pytest.mark.parametrize(("command", "text", "expected"), [
    ("/oncall", "x" * 12_000, "There is no rotation `{cut}`. Known rotations:"),
    ("/oncall", "schedule " + "x" * 12_000, "There is no rotation `{cut}`. Known rotations:"),
    ("/override", "x" * 12_000 + " carol now 1h", "There is no rotation `{cut}`. Known rotations:"),
    ("/override", "dba-primary " + "x" * 12_000 + " now 1h", "I don't know '{cut}' (people in app.yaml:"),
    ("/override", "dba-primary carol " + "x" * 12_000 + " 1h", "'{cut}' is not a time"),
    ("/override", "dba-primary carol now " + "x" * 12_000, "'{cut}' is not a time"),
    ("/oncall", "take dba-primary now 1h " + "x" * 12_000, "Too many arguments: {cut}."),
])
async def test_a_long_argument_is_echoed_cut_short(slack: Slack, command: str, text: str, expected: str) -> None:
    answer = (await slack.answer(await slack.command(command, text, user="U02BOB")))["text"]
    assert expected.format(cut="x" * 79 + "\u2026") in answer and "x" * 80 not in answer


@pytest.mark.parametrize(("command", "text", "user", "expected"), [
    ("/override", "dba-primary carol now 1h", "U01ALICE", "`/override` needs the `manager` role, and Alice has"),
    ("/override", "dba-primary zed now 1h", "U02BOB", "I don't know 'zed' (people in app.yaml: alice, bob, carol)."),
    ("/override", "nightly carol now 1h", "U02BOB", "There is no rotation `nightly`. Known rotations:"),
    ("/override", "dba-primary carol 2026-11-20T09:00 2026-11-21T09:00", "U02BOB", "That stretch is over already"),
    ("/override", "dba-primary carol now 100d", "U02BOB", "An override can last 90 days at most."),
    ("/override", "dba-primary carol tomorrow 1h", "U02BOB", "'tomorrow' is not a time"),
    ("/override", "dba-primary carol 9999-12-31T00:00 1d", "U02BOB", "'9999-12-31T00:00' is too far away"),
    ("/override", "dba-primary carol now 99999999w", "U02BOB", "'99999999w' from then is too far away"),
    ("/override", "dba-primary carol now 99999999999d", "U02BOB", "'99999999999d' from then is too far away"),
    ("/oncall", "take web", "U01ALICE", "You are not a member of `web` (members: bob, carol)"),
])
async def test_covering_mistakes_get_a_precise_answer(slack: Slack, command: str, text: str, user: str,
                                                      expected: str) -> None:
    answer = await slack.answer(await slack.command(command, text, user=user))
    assert expected in answer["text"]
    async with slack.h.bot.db.sessions() as session:
        assert (await session.execute(select(AuditEvent).where(AuditEvent.action == "oncall.override"))).first() is None


async def test_an_override_from_the_past_is_capped_at_90_days_from_now_not_from_its_from(slack: Slack) -> None:
    """FROM in the past starts now: what is over already does not count against the 90 days (it refused 2026-09-01
    to 2026-12-01, eight days of cover from now, as longer than 90 days)."""
    answer = await slack.answer(await slack.command("/override", "dba-primary carol 2026-09-01T00:00 2026-12-01T00:00",
                                                    user="U02BOB"))
    assert "90 days" not in answer["text"], answer["text"]
    async with slack.h.bot.db.sessions() as session:
        [stored] = (await session.execute(select(Override))).scalars().all()
    assert (stored.person, stored.starts_at, stored.ends_at) == ("carol", T0, datetime(2026, 11, 30, 23, tzinfo=UTC))
    answer = await slack.answer(await slack.command("/override", "dba-primary carol 2026-09-01T00:00 2027-03-01T00:00",
                                                    user="U02BOB"))
    assert "An override can last 90 days at most." in answer["text"]  # from now, still more than 90 days


def test_feed_text_leaves_out_the_control_characters_rfc5545_forbids() -> None:
    """A person's name with a BEL or an ESC in it made the whole feed invalid; a tab is allowed."""
    from handlers.oncall import ics_text

    assert ics_text("Bob\x07 the\tbuilder\x1b[31m; nights\n") == "Bob the\tbuilder[31m\\; nights\\n"


# -- a person on call for several shifts in a row ---------------------------------------------------------------

TRIO = ('rotations:\n  - {id: trio, members: [alice, alice, alice, bob], shift: 1w, handoff: "mon 09:00", '
        'start: 2026-11-02, timezone: Europe/Berlin}\n')
TRIO_PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE}
  - {id: bob, name: Bob, roles: [manager], slack: U02BOB}
  - {id: carol, name: Carol, roles: [responder], slack: U03CAROL}
"""


async def cover(s: Slack, text: str) -> None:
    answer = (await s.answer(await s.command("/override", text, user="U02BOB")))["text"]
    assert "Override #" in answer, answer


async def test_oncall_sees_a_cover_more_than_a_shift_and_a_day_away(tmp_path: Path, capsys: Any) -> None:
    """Alice holds three weeks in a row (members [alice, alice, alice, bob]); Carol covers the third. On the first
    week's Wednesday `/oncall` and `chatops oncall` said Alice until 23 Nov, then Bob: they loaded the covers of a shift
    and a day around now only, where `/oncall trio` and the schedule showed Carol from 16 Nov."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: '{url}'}}\ntimezone: Europe/Berlin\n" + TRIO_PEOPLE + TRIO, encoding="utf-8")
    async with FakeSlack() as fake, running_bot(url, slack_config(fake) + TRIO, people=TRIO_PEOPLE,
                                                clock=FakeClock(datetime(2026, 11, 4, 12, tzinfo=UTC))) as h:
        s = Slack(h, fake)
        await cover(s, "trio carol 2026-11-16T09:00 2026-11-23T09:00")
        assert rows(await ask(s, "trio"))[3][:2] == ["Carol (override)", "Mon 16 Nov 09:00 CET"]
        assert rows(await ask(s, ""))[1] == ["trio", "Alice", "Mon 2 Nov 09:00 CET", "Mon 16 Nov 09:00 CET",
                                             "Carol (override)"]
        assert await asyncio.to_thread(main, ["oncall", "-c", str(config), "--at", "2026-11-04T13:00:00+01:00"]) == 0
        [line] = [re.split(r"\s{2,}", x.strip()) for x in capsys.readouterr().out.splitlines() if x.startswith("trio")]
        assert line[1:] == ["Alice", "Mon 2 Nov 09:00 CET", "Mon 16 Nov 09:00 CET", "Carol (override)"]


async def test_oncall_sees_a_cover_more_than_a_shift_and_a_day_back(tmp_path: Path) -> None:
    """Carol covered the first of Alice's three weeks: on the third, Alice is on call since the second began (it
    said since the first, whose cover was too far back to be loaded)."""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake) + TRIO,
                                                people=TRIO_PEOPLE,
                                                clock=FakeClock(datetime(2026, 11, 1, 12, tzinfo=UTC))) as h:
        s = Slack(h, fake)
        await cover(s, "trio carol 2026-11-02T09:00 2026-11-09T09:00")
        h.clock.set(datetime(2026, 11, 19, 12, tzinfo=UTC))  # the Thursday of Alice's third week
        assert rows(await ask(s, ""))[1] == ["trio", "Alice", "Mon 9 Nov 09:00 CET", "Mon 23 Nov 09:00 CET", "Bob"]
