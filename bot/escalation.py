"""Escalation rules: a policy's snapshot, its steps across repeats, business hours. Pure functions.

A policy runs its steps in order and then again `repeat` more times (PagerDuty's
"repeat this policy N times"): `repeat: 2` means three passes. An incident keeps
the snapshot taken when it opened, so editing app.yaml does not change an
escalation already running.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from bot.alerts import SEVERITIES
from bot.config import BusinessHours, EscalationPolicy
from bot.durations import WEEKDAYS
from bot.rotations import first_instant


def snapshot(policy: EscalationPolicy) -> dict[str, Any]:
    """What an incident keeps of its policy: plain JSON."""
    return {
        "policy": policy.id,
        "repeat": policy.repeat,
        "steps": [{"notify": step.notify.model_dump(exclude_defaults=True), "wait": int(step.wait.total_seconds())}
                  for step in policy.steps],
    }


def total_steps(snap: dict[str, Any]) -> int:
    return len(snap["steps"]) * (int(snap.get("repeat", 0)) + 1)


def step_at(snap: dict[str, Any], n: int) -> dict[str, Any]:
    """The n-th step of the run (0-based, counting across repeats)."""
    return snap["steps"][n % len(snap["steps"])]


def pages_after_hours(severity: str, minimum: str) -> bool:
    """Does an incident of `severity` page people outside business hours?"""
    return SEVERITIES.index(severity) <= SEVERITIES.index(minimum)


def _zone(hours: BusinessHours, default_tz: str) -> ZoneInfo:
    return ZoneInfo(hours.timezone or default_tz)


def in_business_hours(hours: BusinessHours, default_tz: str, at: datetime) -> bool:
    local = at.astimezone(_zone(hours, default_tz))
    if WEEKDAYS[local.weekday()] not in hours.days:
        return False
    return hours.start <= local.time().replace(tzinfo=None) < hours.end


def next_business_start(hours: BusinessHours, default_tz: str, at: datetime) -> datetime:
    """`at` itself during business hours, else the next time business hours begin (UTC)."""
    if in_business_hours(hours, default_tz, at):
        return at.astimezone(UTC)
    zone = _zone(hours, default_tz)
    day: date = at.astimezone(zone).date()
    for offset in range(8):
        candidate_day = day + timedelta(days=offset)
        if WEEKDAYS[candidate_day.weekday()] not in hours.days:
            continue
        start = first_instant(datetime.combine(candidate_day, hours.start), zone)
        if start > at:
            return start
    raise ValueError("business_hours.days is empty")  # config validation requires at least one day


def escalation_mark(step: int, run: int) -> str:
    """Where an escalation stood when a message was drawn, as its Escalate button carries it: the steps fired
    (`2`), and the run after a reopen (`2.1`)."""
    return f"{step}.{run}" if run else str(step)


def read_mark(text: str) -> tuple[int, int] | None:
    """(steps fired, run) from `escalation_mark`; None for a button without one (drawn before marks existed)."""
    step, _, run = text.partition(".")
    if not (text.isascii() and step.isdigit()) or (run and not run.isdigit()):
        return None
    return int(step), int(run or 0)
