"""Incident rules: lifecycle, severity and priority. Pure functions of their inputs."""

from __future__ import annotations

from datetime import datetime

from bot.alerts import SEVERITIES

TRIGGERED, ACKNOWLEDGED, RESOLVED = "triggered", "acknowledged", "resolved"
STATUSES = (TRIGGERED, ACKNOWLEDGED, RESOLVED)
SEVERITY_BASE = {"critical": 90, "high": 60, "medium": 30, "low": 10, "info": 0}

# action -> (states it may start from, state it leads to)
TRANSITIONS = {
    "acknowledge": ((TRIGGERED,), ACKNOWLEDGED),
    "resolve": ((TRIGGERED, ACKNOWLEDGED), RESOLVED),
    "reopen": ((RESOLVED,), TRIGGERED),
}


class InvalidTransition(ValueError):
    pass


def transition(status: str, action: str) -> str:
    """The state after `action`, or InvalidTransition saying why not."""
    allowed, target = TRANSITIONS[action]
    if status not in allowed:
        raise InvalidTransition(f"cannot {action} an incident that is {status}")
    return target


def worst(a: str, b: str) -> str:
    """The more severe of two normalized severities."""
    return a if SEVERITIES.index(a) <= SEVERITIES.index(b) else b


def priority(
    *, severity: str, duplicates: int, source_count: int, critical_asset: bool, opened_at: datetime, now: datetime
) -> int:
    """Severity base, +2 per duplicate (at most +20), +10 when two or more tools
    report it, +20 for a critical asset, -1 per hour of age (at most -10)."""
    age_hours = max(0, int((now - opened_at).total_seconds() // 3600))
    return (
        SEVERITY_BASE[severity]
        + min(2 * max(duplicates, 0), 20)
        + (10 if source_count >= 2 else 0)
        + (20 if critical_asset else 0)
        - min(age_hours, 10)
    )
