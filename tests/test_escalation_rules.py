"""Escalation rules as pure functions: business hours across daylight-saving changes, severities, snapshots."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.config import BusinessHours, EscalationPolicy
from bot.escalation import in_business_hours, next_business_start, pages_after_hours, snapshot, step_at, total_steps

WEEKDAYS = BusinessHours()


@pytest.mark.parametrize(("tz", "at", "expected"), [
    # Berlin: clocks go forward on Sun 2026-03-29 and back on Sun 2026-10-25; 09:00 local stays 09:00 local.
    ("Europe/Berlin", "2026-03-27T17:30:00+00:00", "2026-03-30T07:00:00+00:00"),  # Fri 18:30 CET -> Mon 09:00 CEST
    ("Europe/Berlin", "2026-10-23T16:30:00+00:00", "2026-10-26T08:00:00+00:00"),  # Fri 18:30 CEST -> Mon 09:00 CET
    ("Europe/Berlin", "2026-03-30T06:59:00+00:00", "2026-03-30T07:00:00+00:00"),  # Mon 08:59 CEST
    # New York: forward on Sun 2026-03-08, back on Sun 2026-11-01.
    ("America/New_York", "2026-03-06T23:30:00+00:00", "2026-03-09T13:00:00+00:00"),  # Fri 18:30 EST -> Mon 09:00 EDT
    ("America/New_York", "2026-10-30T22:30:00+00:00", "2026-11-02T14:00:00+00:00"),  # Fri 18:30 EDT -> Mon 09:00 EST
    ("America/New_York", "2026-11-02T14:00:00+00:00", "2026-11-02T14:00:00+00:00"),  # in business hours: now
])
def test_the_next_business_morning_is_nine_local_across_dst(tz: str, at: str, expected: str) -> None:
    assert next_business_start(WEEKDAYS, tz, datetime.fromisoformat(at)) == datetime.fromisoformat(expected)


def test_business_hours_edges_and_days() -> None:
    berlin = "Europe/Berlin"
    assert in_business_hours(WEEKDAYS, berlin, datetime(2026, 11, 24, 8, 0, tzinfo=UTC))  # Tue 09:00
    assert not in_business_hours(WEEKDAYS, berlin, datetime(2026, 11, 24, 7, 59, tzinfo=UTC))  # Tue 08:59
    assert not in_business_hours(WEEKDAYS, berlin, datetime(2026, 11, 24, 17, 0, tzinfo=UTC))  # Tue 18:00: closed
    assert not in_business_hours(WEEKDAYS, berlin, datetime(2026, 11, 28, 10, 0, tzinfo=UTC))  # Saturday
    own_zone = BusinessHours(days=["sat"], start=time(10), end=time(12), timezone="America/New_York")
    assert in_business_hours(own_zone, berlin, datetime(2026, 11, 28, 15, 30, tzinfo=UTC))  # 10:30 in New York


def test_business_hours_must_end_after_they_start() -> None:
    with pytest.raises(ValueError, match="must be after start"):
        BusinessHours(start=time(18), end=time(9))


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)),
       st.sampled_from(["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"]))
def test_no_business_minute_is_skipped_before_the_next_start(naive: datetime, tz: str) -> None:
    at = naive.replace(tzinfo=UTC, second=0, microsecond=0)
    start = next_business_start(WEEKDAYS, tz, at)
    assert start >= at and in_business_hours(WEEKDAYS, tz, start)
    assert start - at < timedelta(days=4)  # at most a long weekend away
    probe = at
    while probe < start:  # every 30 minutes before it is outside business hours
        assert not in_business_hours(WEEKDAYS, tz, probe)
        probe += timedelta(minutes=30)


def test_severity_threshold_after_hours() -> None:
    assert pages_after_hours("critical", "high") and pages_after_hours("high", "high")
    assert not pages_after_hours("medium", "high") and not pages_after_hours("info", "critical")
    assert pages_after_hours("low", "low")


def test_a_snapshot_is_plain_json_and_repeats_the_steps() -> None:
    policy = EscalationPolicy.model_validate({"id": "dba", "repeat": 2, "steps": [
        {"notify": {"rotation": "dba-primary"}, "wait": "5m"}, {"notify": {"people": ["carol"]}, "wait": "10m"}]})
    snap = snapshot(policy)
    assert snap == {"policy": "dba", "repeat": 2, "steps": [{"notify": {"rotation": "dba-primary"}, "wait": 300},
                                                           {"notify": {"people": ["carol"]}, "wait": 600}]}
    assert total_steps(snap) == 6  # `repeat: 2` runs the policy three times, as PagerDuty counts
    assert [step_at(snap, n)["wait"] for n in range(6)] == [300, 600] * 3
