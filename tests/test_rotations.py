"""The schedule: handoffs on the local clock through DST changes, overrides, exact boundaries, far futures."""

from __future__ import annotations

import time as timer
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.config import Rotation
from bot.rotations import Override, Schedule, Shift, first_instant, next_shifts, on_call, run_at, shifts_between

H = timedelta(hours=1)
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
# (zone, the Sunday clocks spring forward in 2026, the Sunday they fall back)
DST_2026 = [("Europe/Berlin", date(2026, 3, 29), date(2026, 10, 25)),
            ("America/New_York", date(2026, 3, 8), date(2026, 11, 1))]


def rotation(shift: str, handoff: str = "mon 09:00", *, tz: str = "Europe/Berlin", start: date = date(2026, 1, 5),
             members: tuple[str, ...] = ("alice", "bob", "carol"), rid: str = "dba") -> Schedule:
    return Schedule.from_config(Rotation(id=rid, members=list(members), shift=shift, handoff=handoff, start=start,
                                         timezone=tz))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(at: datetime | None, tz: ZoneInfo) -> datetime:
    assert at is not None
    return at.astimezone(tz)


def override(person: str, start: datetime, end: datetime, created: datetime, oid: int, rid: str = "dba") -> Override:
    return Override(rid, person, start, end, created, oid)


# -- daylight saving ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zone, spring, fall", DST_2026)
def test_a_weekly_handoff_stays_at_0900_local_and_the_shift_across_a_change_lasts_167_or_169_hours(
        zone: str, spring: date, fall: date) -> None:
    tz = ZoneInfo(zone)
    schedule = rotation("1w", tz=zone)
    for sunday, changed in ((spring, 167 * H), (fall, 169 * H)):
        around = datetime.combine(sunday, time(12), tz)
        shifts = shifts_between(schedule, [], around - timedelta(weeks=3), around + timedelta(weeks=3))
        assert all((local(s.start, tz).weekday(), local(s.start, tz).time()) == (0, time(9)) for s in shifts)
        across = [s for s in shifts if s.start is not None and s.start < around < s.end]
        assert [s.length for s in across] == [changed]
        assert {s.length for s in shifts if s not in across} == {168 * H}


@pytest.mark.parametrize("zone, spring, fall", DST_2026)
def test_a_daily_handoff_stays_at_0900_local_and_the_day_of_the_change_lasts_23_or_25_hours(
        zone: str, spring: date, fall: date) -> None:
    tz = ZoneInfo(zone)
    schedule = rotation("1d", "09:00", tz=zone)
    for sunday, changed in ((spring, 23 * H), (fall, 25 * H)):
        before = datetime.combine(sunday - timedelta(days=1), time(9), tz)
        shifts = shifts_between(schedule, [], before - timedelta(days=3), before + timedelta(days=3))
        assert all(local(s.start, tz).time() == time(9) for s in shifts)
        assert {s.start: s.length for s in shifts}[before.astimezone(UTC)] == changed
        assert sorted(s.length for s in shifts).count(24 * H) == len(shifts) - 1


@pytest.mark.parametrize("zone, spring, fall", DST_2026)
def test_twelve_hour_shifts_hand_off_at_0900_and_2100_local_and_the_night_of_the_change_is_11_or_13_hours(
        zone: str, spring: date, fall: date) -> None:
    tz = ZoneInfo(zone)
    schedule = rotation("12h", "09:00", tz=zone)
    for sunday, changed in ((spring, 11 * H), (fall, 13 * H)):
        night = datetime.combine(sunday - timedelta(days=1), time(21), tz)
        shifts = shifts_between(schedule, [], night - timedelta(days=2), night + timedelta(days=2))
        times = [local(s.start, tz).time() for s in shifts]
        assert set(times) == {time(9), time(21)} and all(x != y for x, y in zip(times, times[1:]))
        assert {s.start: s.length for s in shifts}[night.astimezone(UTC)] == changed
        assert [s.length for s in shifts].count(12 * H) == len(shifts) - 1
        # the people keep alternating: the night shift is one shift, not two
        assert [s.person for s in shifts] == [schedule.member(s.index or 0) for s in shifts]
        assert all(b.index == a.index + 1 for a, b in zip(shifts, shifts[1:]) if a.index is not None)


def test_a_handoff_in_the_skipped_hour_happens_when_the_clock_skips_and_a_repeated_one_the_first_time() -> None:
    schedule = rotation("1d", "02:30")
    spring = on_call(schedule, [], utc(2026, 3, 29, 12))
    assert spring.start == utc(2026, 3, 29, 1)  # 03:00 CEST, the moment 02:00 CET became 03:00
    assert local(spring.start, BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
    assert spring.end == utc(2026, 3, 30, 0, 30)  # 02:30 CEST the next night
    fall = on_call(schedule, [], utc(2026, 10, 25, 12))
    assert fall.start == utc(2026, 10, 25, 0, 30)  # the first 02:30 (CEST), not the second (CET)
    assert first_instant(datetime(2026, 3, 29, 2, 0), BERLIN) == first_instant(datetime(2026, 3, 29, 3, 0), BERLIN)


def test_one_hour_shifts_through_the_skipped_hour_leave_no_empty_shift() -> None:
    schedule = rotation("1h", "00:00", members=("a", "b"))
    day = shifts_between(schedule, [], datetime(2026, 3, 29, 0, tzinfo=BERLIN), datetime(2026, 3, 30, 0, tzinfo=BERLIN))
    assert len(day) == 23 and {s.length for s in day} == {H}
    assert [local(s.start, BERLIN).hour for s in day] == [0, 1] + list(range(3, 24))
    long_day = shifts_between(schedule, [], datetime(2026, 10, 25, 0, tzinfo=BERLIN),
                              datetime(2026, 10, 26, 0, tzinfo=BERLIN))
    assert [s.length for s in long_day].count(2 * H) == 1 and len(long_day) == 24  # 02:00 CEST to 03:00 CET


# -- boundaries, the start, the far future --------------------------------------------------------------------

def test_the_handoff_instant_belongs_to_the_incoming_person() -> None:
    schedule = rotation("1w", start=date(2026, 11, 2), members=("alice", "bob"))
    handoff = datetime(2026, 11, 9, 9, tzinfo=BERLIN)
    assert on_call(schedule, [], handoff - timedelta(microseconds=1)).person == "alice"
    incoming = on_call(schedule, [], handoff)
    assert (incoming.person, incoming.start, incoming.source, incoming.index) == ("bob", handoff, "rotation", 1)
    assert on_call(schedule, [], handoff + timedelta(weeks=1)).person == "alice"


def test_before_the_first_handoff_nobody_is_on_call_and_the_weekday_picks_the_first_handoff() -> None:
    schedule = rotation("1w", "mon 09:00", start=date(2026, 11, 4))  # a Wednesday
    assert schedule.begins == datetime(2026, 11, 9, 9, tzinfo=BERLIN)
    nobody = on_call(schedule, [], utc(2026, 11, 5))
    assert (nobody.person, nobody.start, nobody.end, nobody.source) == (None, None, schedule.begins, "none")
    [first] = next_shifts(schedule, [], utc(2026, 11, 5), 1)
    assert (first.person, first.start, first.index) == ("alice", schedule.begins, 0)
    window = shifts_between(schedule, [], utc(2026, 10, 1), utc(2026, 11, 20))
    assert [(s.person, s.source) for s in window] == [(None, "none"), ("alice", "rotation"), ("bob", "rotation")]


def test_far_future_times_are_arithmetic_not_a_walk_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = rotation("1w", start=date(2026, 1, 5), members=("alice", "bob", "carol"))
    at = datetime(2526, 7, 1, 12, tzinfo=BERLIN)
    shift = on_call(schedule, [], at)
    start = local(shift.start, BERLIN)
    assert (start.weekday(), start.time(), start.tzname()) == (0, time(9), "CEST")
    weeks = (start.date() - date(2026, 1, 5)).days // 7
    assert shift.index == weeks and shift.person == ("alice", "bob", "carol")[weeks % 3]
    computed = []
    boundary = Schedule.boundary
    monkeypatch.setattr(Schedule, "boundary", lambda self, k: computed.append(k) or boundary(self, k))
    far = on_call(schedule, [], utc(9000, 6, 1))
    assert local(far.start, BERLIN).strftime("%a %H:%M %Z") == "Mon 09:00 CEST"
    assert far.index == (local(far.start, BERLIN).date() - date(2026, 1, 5)).days // 7 == 363_906
    assert len(computed) < 10  # a handful of handoffs computed, not 363,906 walked
    monkeypatch.undo()
    started = timer.perf_counter()
    for year in range(2030, 9030, 7):
        on_call(schedule, [], utc(year, 6, 1))
    assert timer.perf_counter() - started < 5.0  # 1,000 lookups up to the year 9000 (about 0.15 s here)
    hourly = rotation("1h", "00:00", tz="America/New_York")
    assert local(on_call(hourly, [], utc(8000, 11, 5, 6, 30)).start, NEW_YORK).minute == 0


def test_a_rotation_that_starts_years_ahead_is_not_walked_up_to_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """An hourly rotation whose `start` is in 2199 (a typo of a year, say): the next shifts and the overview's run
    looked for the first shift in windows doubling from now, and made every hourly shift up to the start and as far
    again, on the event loop: seconds of CPU for each `/oncall`. The first shift is where the rotation begins."""
    schedule = rotation("1h", "09:00", start=date(2199, 12, 31))
    made: list[int] = []
    base = Shift.__init__
    monkeypatch.setattr(Shift, "__init__", lambda self, *a, **k: made.append(1) or base(self, *a, **k))
    now = utc(2026, 12, 7, 3)
    following = next_shifts(schedule, [], now, 5)
    assert [(s.person, s.index) for s in following] == [
        ("alice", 0), ("bob", 1), ("carol", 2), ("alice", 3), ("bob", 4)]
    assert following[0].start == schedule.begins == datetime(2199, 12, 31, 9, tzinfo=BERLIN)
    current, since, until, after = run_at(schedule, [], now)
    assert (current.person, since, until) == (None, None, schedule.begins) and after is not None
    assert after.person == "alice"
    assert len(made) < 100, len(made)  # a few shifts made, not every hour from now to 2199 and on


def test_the_index_agrees_with_counting_handoffs_from_the_start() -> None:
    schedule = rotation("12h", "09:00", tz="America/New_York", start=date(2026, 1, 1))
    k, at = 0, schedule.begins  # 09:00 EST on 1 January
    while at < utc(2028, 1, 1):  # two years, through four DST changes, handoff by handoff
        while schedule.boundary(k + 1) <= at:
            k += 1
        assert schedule.index_at(at) == k
        at += timedelta(hours=7, minutes=13)


# -- overrides ------------------------------------------------------------------------------------------------

def test_an_override_splits_the_shift_it_falls_into() -> None:
    schedule = rotation("1w", start=date(2026, 11, 2), members=("alice", "bob"))
    cover = override("carol", datetime(2026, 11, 4, 18, tzinfo=BERLIN), datetime(2026, 11, 5, 8, tzinfo=BERLIN),
                     utc(2026, 11, 1), 7)
    shifts = shifts_between(schedule, [cover], utc(2026, 11, 3), utc(2026, 11, 8))
    assert [(s.person, s.source, s.index, s.override_id) for s in shifts] == [
        ("alice", "rotation", 0, None), ("carol", "override", None, 7), ("alice", "rotation", 0, None)]
    assert [s.start for s in shifts] == [schedule.begins, cover.start, cover.end]
    assert shifts[-1].end == datetime(2026, 11, 9, 9, tzinfo=BERLIN)
    assert on_call(schedule, [cover], cover.start).person == "carol"
    assert on_call(schedule, [cover], cover.end).person == "alice"  # [start, end): the end is alice's again


def test_a_run_joins_a_cover_to_the_same_persons_shift_and_names_who_follows() -> None:
    schedule = rotation("1w", start=date(2026, 11, 2), members=("alice", "bob"))
    cover = override("bob", datetime(2026, 11, 6, 18, tzinfo=BERLIN), datetime(2026, 11, 9, 9, tzinfo=BERLIN),
                     utc(2026, 11, 1), 7)  # Bob covers Alice's last weekend, then his own week follows
    current, since, until, following = run_at(schedule, [cover], datetime(2026, 11, 7, 12, tzinfo=BERLIN))
    assert (current.person, current.source, until) == ("bob", "override", datetime(2026, 11, 16, 9, tzinfo=BERLIN))
    assert since == cover.start and following is not None and following.person == "alice"
    current, since, until, _ = run_at(schedule, [cover], datetime(2026, 11, 12, tzinfo=BERLIN))  # in his own week
    assert (current.person, current.source, current.start, since) == ("bob", "rotation", cover.end, cover.start)
    alone = rotation("1w", start=date(2026, 11, 2), members=("alice",))  # a rotation of one: her shift, hers next
    current, since, until, following = run_at(alone, [], utc(2026, 11, 4))
    assert until == current.end == datetime(2026, 11, 9, 9, tzinfo=BERLIN)
    assert since == current.start == alone.begins  # nobody before her
    assert following is not None and (following.person, following.start) == ("alice", until)
    current, since, until, _ = run_at(alone, [], utc(2027, 3, 4))  # months on: her shift as it is, either way
    assert (since, until) == (current.start, current.end)


def test_where_overrides_overlap_the_one_created_last_wins() -> None:
    schedule = rotation("1d", "09:00", start=date(2026, 11, 1), members=("alice", "bob"))
    older = override("carol", utc(2026, 11, 10), utc(2026, 11, 20), utc(2026, 11, 2), 1)
    newer = override("dave", utc(2026, 11, 12), utc(2026, 11, 14), utc(2026, 11, 3), 2)
    for given_order in ([older, newer], [newer, older]):
        shifts = shifts_between(schedule, given_order, utc(2026, 11, 11), utc(2026, 11, 16))
        assert [(s.person, s.start, s.end) for s in shifts] == [
            ("carol", utc(2026, 11, 10), utc(2026, 11, 12)), ("dave", utc(2026, 11, 12), utc(2026, 11, 14)),
            ("carol", utc(2026, 11, 14), utc(2026, 11, 20))]
    # looking from inside the old override, its stretch starts where the newer one ended
    assert on_call(schedule, [older, newer], utc(2026, 11, 15)).start == utc(2026, 11, 14)
    same_time = override("erin", utc(2026, 11, 12), utc(2026, 11, 13), utc(2026, 11, 3), 3)
    assert on_call(schedule, [same_time, newer], utc(2026, 11, 12, 6)).person == "erin"  # then the higher id
    other_rotation = override("zed", utc(2026, 11, 12), utc(2026, 11, 13), utc(2026, 11, 9), 4, rid="web")
    assert on_call(schedule, [other_rotation], utc(2026, 11, 12, 6)).person in ("alice", "bob")


def test_an_override_across_a_handoff_is_one_stretch_and_one_before_the_start_covers_nobody() -> None:
    schedule = rotation("1w", start=date(2026, 11, 2), members=("alice", "bob"))
    across = override("carol", datetime(2026, 11, 8, 9, tzinfo=BERLIN), datetime(2026, 11, 10, 9, tzinfo=BERLIN),
                      utc(2026, 11, 1), 1)
    shifts = shifts_between(schedule, [across], utc(2026, 11, 7), utc(2026, 11, 12))
    assert [(s.person, s.source) for s in shifts] == [("alice", "rotation"), ("carol", "override"), ("bob", "rotation")]
    assert shifts[2].start == across.end and shifts[2].index == 1
    early = override("carol", utc(2026, 10, 20), utc(2026, 10, 22), utc(2026, 10, 1), 2)
    before = shifts_between(schedule, [early], utc(2026, 10, 19), utc(2026, 11, 3))
    assert [(s.person, s.source) for s in before] == [(None, "none"), ("carol", "override"), (None, "none"),
                                                      ("alice", "rotation")]
    assert before[2].start == utc(2026, 10, 22) and before[0].start is None


def test_next_shifts_begin_strictly_after_the_instant() -> None:
    schedule = rotation("1w", start=date(2026, 11, 2), members=("alice", "bob"))
    handoff = datetime(2026, 11, 9, 9, tzinfo=BERLIN)
    upcoming = next_shifts(schedule, [], handoff, 3)
    assert [s.start for s in upcoming] == [handoff + timedelta(weeks=w) for w in (1, 2, 3)]
    assert [s.person for s in upcoming] == ["alice", "bob", "alice"]
    cover = override("carol", handoff + timedelta(days=1), handoff + timedelta(days=2), utc(2026, 11, 1), 1)
    assert [s.person for s in next_shifts(schedule, [cover], handoff, 3)] == ["carol", "bob", "alice"]
    assert next_shifts(schedule, [], handoff, 0) == []


def test_naive_times_are_refused() -> None:
    schedule = rotation("1w")
    with pytest.raises(ValueError, match="aware"):
        on_call(schedule, [], datetime(2026, 11, 9, 9))
    with pytest.raises(ValueError, match="aware"):
        Override("dba", "x", datetime(2026, 1, 1), utc(2026, 1, 2), utc(2026, 1, 1))
    with pytest.raises(ValueError, match="after"):
        shifts_between(schedule, [], utc(2026, 1, 2), utc(2026, 1, 1))


# -- properties -----------------------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "Pacific/Apia",
         "America/Santiago", "Asia/Tehran"]


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    members = tuple(draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4)))
    shift = timedelta(minutes=draw(st.one_of(st.sampled_from([60, 720, 1440, 10080]), st.integers(60, 60 * 24 * 15))))
    handoff = time(draw(st.integers(0, 23)), draw(st.sampled_from([0, 15, 30, 45])))
    start = draw(st.dates(date(2010, 1, 1), date(2030, 12, 31)))
    weekday = draw(st.one_of(st.none(), st.integers(0, 6)))
    return Schedule("r", members, shift, handoff, start, ZoneInfo(draw(st.sampled_from(ZONES))), weekday)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Schedule, list[Override], datetime, datetime]:
    schedule = draw(schedules())
    origin = datetime.combine(schedule.start, time(0), UTC)
    a = origin + timedelta(minutes=draw(st.integers(-60 * 24 * 30, 60 * 24 * 400)))
    b = a + timedelta(minutes=draw(st.integers(1, 60 * 24 * 40)))
    overrides = []
    for i in range(draw(st.integers(0, 6))):
        start = a + timedelta(minutes=draw(st.integers(-60 * 24 * 20, 60 * 24 * 40)))
        end = start + timedelta(minutes=draw(st.integers(1, 60 * 24 * 20)))
        created = origin + timedelta(minutes=draw(st.integers(0, 5)))  # few values: ties happen
        overrides.append(Override(draw(st.sampled_from(["r", "r", "other"])), draw(st.sampled_from(["x", "y", "a"])),
                                  start, end, created, i + 1))
    return schedule, overrides, a, b


def expected_owner(schedule: Schedule, overrides: list[Override], at: datetime) -> tuple[str | None, str, int | None]:
    covering = [o for o in overrides if o.rotation == schedule.id and o.start <= at < o.end]
    if covering:
        winner = max(covering, key=lambda o: (o.created_at, o.id))
        return winner.person, "override", winner.id
    k = schedule.index_at(at)
    return (None, "none", None) if k < 0 else (schedule.member(k), "rotation", k)


def owner(s: Shift) -> tuple[str | None, str, int | None]:
    return s.person, s.source, s.override_id if s.source == "override" else s.index


@settings(max_examples=300, deadline=None)
@given(cases(), st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_shifts_tile_any_window_and_the_latest_override_wins_everywhere(
        case: tuple[Schedule, list[Override], datetime, datetime], probes: list[float]) -> None:
    schedule, overrides, a, b = case
    shifts = shifts_between(schedule, overrides, a, b)
    assert shifts and shifts[0].covers(a) and shifts[-1].end >= b
    for s in shifts:
        assert s.start is None or s.start < s.end  # nothing empty
    for prev, nxt in zip(shifts, shifts[1:]):
        assert prev.end == nxt.start  # no gap, no overlap
        assert owner(prev) != owner(nxt)  # and no needless cut
    for s in shifts:  # every stretch belongs to whom the rules say, at both of its ends
        for at in ([s.start] if s.start is not None else []) + [s.end - timedelta(microseconds=1)]:
            assert expected_owner(schedule, overrides, at) == owner(s)
    upcoming = next_shifts(schedule, overrides, a, 3)  # the stretches right after the one under way at `a`
    assert len(upcoming) == 3 and upcoming[0].start == on_call(schedule, overrides, a).end
    assert all(x.end == y.start for x, y in zip(upcoming, upcoming[1:]))
    assert all(owner(s) == expected_owner(schedule, overrides, s.start) for s in upcoming if s.start is not None)
    for p in probes:  # on_call agrees with the window and with the rules at any instant
        at = a + (b - a) * p
        if at >= b:
            continue
        current = on_call(schedule, overrides, at)
        assert current in shifts and current.covers(at)
        assert owner(current) == expected_owner(schedule, overrides, at)


@settings(max_examples=200, deadline=None)
@given(schedules(), st.integers(-60 * 24 * 30, 60 * 24 * 400))
def test_every_handoff_is_the_first_instant_the_local_clock_reaches_its_time(schedule: Schedule, minutes: int) -> None:
    at = datetime.combine(schedule.start, time(0), UTC) + timedelta(minutes=minutes)
    k = max(schedule.index_at(at), 0)
    for i in range(k, k + 3):
        t = schedule.boundary(i)
        wall = schedule.anchor + i * schedule.shift
        assert t.astimezone(schedule.tz).replace(tzinfo=None) >= wall
        assert (t - timedelta(seconds=1)).astimezone(schedule.tz).replace(tzinfo=None) < wall
        assert schedule.boundary(i + 1) >= t
