"""Incident-response measures over a window: MTTA, MTTR, escalation rate, noise reduction, pages.

`build()` reads what it needs for the incidents opened in [since, until) in a few
queries (no per-incident ones); `compute()` turns those rows into a `Report` in
Python, so JSON details are read the same way on SQLite and PostgreSQL.
`render_text()` and `as_json()` are what `chatops report` prints.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from bot.tables import table
from storage.models import AlertRecord, AuditEvent, Incident

DEFAULT_WINDOW = timedelta(days=30)
SEVERITIES = ("critical", "high", "medium", "low", "info")
UNKNOWN = "(unknown)"  # a NULL route, a page without a platform
ACKNOWLEDGED, RESOLVED, ESCALATED, STEP = "incident.acknowledged", "incident.resolved", "incident.escalated", "escalation.step"
PAGED, PAGE_FAILED = "incident.paged", "incident.page_failed"


@dataclass(frozen=True)
class IncidentRow:
    """The columns of one incident that the report needs."""

    id: int
    severity: str
    route: str | None
    status: str
    opened_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True)
class Durations:
    """Mean, median and 90th percentile of some durations (None when there are none)."""

    count: int
    mean: timedelta | None = None
    p50: timedelta | None = None
    p90: timedelta | None = None

    @classmethod
    def of(cls, values: Iterable[timedelta]) -> Durations:
        seconds = sorted(v.total_seconds() for v in values)
        if not seconds:
            return cls(0)
        return cls(len(seconds), timedelta(seconds=sum(seconds) / len(seconds)),
                   timedelta(seconds=percentile(seconds, 0.5)), timedelta(seconds=percentile(seconds, 0.9)))


@dataclass(frozen=True)
class Group:
    """One row of a breakdown: the incidents of one severity or route."""

    key: str | None
    incidents: int
    tta: Durations
    ttr: Durations


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    incidents: int
    tta: Durations  # time to acknowledge; tta.count incidents were acknowledged
    ttr: Durations  # time to resolve; ttr.count incidents are resolved
    by_severity: list[Group]
    by_route: list[Group]
    escalated: int
    alerts: int
    pages_sent: int
    pages_failed: int
    pages_by_platform: dict[str, int]

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.incidents if self.incidents else None

    @property
    def noise_reduction(self) -> float | None:
        """1 - incidents / alerts: the share of alerts that did not become an incident of their own."""
        return 1 - self.incidents / self.alerts if self.alerts else None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default; q=0.5 is the median)."""
    rank = q * (len(sorted_values) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


async def build(session: AsyncSession, since: datetime, until: datetime) -> Report:
    """Read the window's incidents, their acknowledgements, escalations and alerts, and the pages sent in it."""
    window = (Incident.opened_at >= since) & (Incident.opened_at < until)
    # (only the chain's events, numbered from 1: a row written around the bot with a seq of 0 or less is in no chain
    # `audit verify` walks, and would be counted unseen)
    in_window = AuditEvent.incident_id.in_(select(Incident.id).where(window)) & (AuditEvent.seq > 0)
    incidents = [IncidentRow(*row) for row in await session.execute(
        select(Incident.id, Incident.severity, Incident.route, Incident.status, Incident.opened_at,
               Incident.resolved_at).where(window))]
    first_acks = dict((await session.execute(
        select(AuditEvent.incident_id, func.min(AuditEvent.at))
        .where(in_window, AuditEvent.action == ACKNOWLEDGED).group_by(AuditEvent.incident_id))).all())
    # (a reopened incident is acknowledged and resolved again: MTTA and MTTR both count its first time)
    first_resolves = dict((await session.execute(
        select(AuditEvent.incident_id, func.min(AuditEvent.at))
        .where(in_window, AuditEvent.action == RESOLVED).group_by(AuditEvent.incident_id))).all())
    escalations = (await session.execute(
        select(AuditEvent.incident_id, AuditEvent.action, AuditEvent.details)
        .where(in_window, AuditEvent.action.in_([STEP, ESCALATED])))).all()
    alerts = (await session.execute(
        select(func.count()).select_from(AlertRecord)
        .where(AlertRecord.incident_id.in_(select(Incident.id).where(window))))).scalar_one()
    in_time = (AuditEvent.at >= since) & (AuditEvent.at < until) & (AuditEvent.seq > 0)
    pages = (await session.execute(
        select(AuditEvent.details).where(in_time, AuditEvent.action == PAGED))).scalars().all()
    failed = (await session.execute(
        select(func.count()).select_from(AuditEvent).where(in_time, AuditEvent.action == PAGE_FAILED))).scalar_one()
    return compute(since, until, incidents, first_acks=first_acks, first_resolves=first_resolves,
                   escalations=escalations, alerts=alerts,
                   pages=pages, pages_failed=failed)


def compute(since: datetime, until: datetime, incidents: Sequence[IncidentRow], *,
            first_acks: dict[int, datetime], first_resolves: dict[int, datetime],
            escalations: Iterable[tuple[int, str, dict[str, Any]]],
            alerts: int, pages: Iterable[dict[str, Any]], pages_failed: int) -> Report:
    """The report from rows already read: `first_acks` maps an incident to its first acknowledgement and
    `first_resolves` to its first resolution (by a person or its source),
    `escalations` are (incident_id, action, details) of escalation events, `pages` the details of pages sent."""
    escalated = {incident_id for incident_id, action, details in escalations
                 if action == ESCALATED or _step(details) >= 2}
    platforms = Counter(str((p or {}).get("platform") or UNKNOWN) for p in pages)
    severities = {i.severity for i in incidents}
    order = [s for s in SEVERITIES if s in severities] + sorted(severities - set(SEVERITIES))
    routes = Counter(i.route for i in incidents)
    route_order = sorted(routes, key=lambda r: (-routes[r], r is None, r or ""))
    return Report(
        since=since, until=until, incidents=len(incidents),
        tta=_since_opened(incidents, first_acks), ttr=_since_opened(incidents, first_resolves),
        by_severity=[_group(s, [i for i in incidents if i.severity == s], first_acks, first_resolves) for s in order],
        by_route=[_group(r, [i for i in incidents if i.route == r], first_acks, first_resolves)
                  for r in route_order],
        escalated=len(escalated & {i.id for i in incidents}), alerts=alerts,
        pages_sent=sum(platforms.values()), pages_failed=pages_failed,
        pages_by_platform=dict(sorted(platforms.items(), key=lambda p: (-p[1], p[0]))),
    )


def _since_opened(incidents: Iterable[IncidentRow], first: dict[int, datetime]) -> Durations:
    """From opening to the first acknowledgement (MTTA) or resolution (MTTR)."""
    return Durations.of(first[i.id] - i.opened_at for i in incidents if i.id in first)


def _group(key: str | None, incidents: list[IncidentRow], first_acks: dict[int, datetime],
           first_resolves: dict[int, datetime]) -> Group:
    return Group(key, len(incidents), _since_opened(incidents, first_acks), _since_opened(incidents, first_resolves))


def _step(details: dict[str, Any] | None) -> int:
    """The 1-based step of an `escalation.step` event (0 when it does not say)."""
    value = (details or {}).get("step")
    if isinstance(value, bool):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# -- presentation ---------------------------------------------------------------------------------------------

def human_duration(delta: timedelta) -> str:
    """`4 min 10 s`, `2 h 3 min`, `3 d 4 h`: the two largest units, the smaller one rounded."""
    total = delta.total_seconds()
    if total < 0:
        return "-" + human_duration(-delta)
    seconds = math.floor(total + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return _two(seconds // 60, "min", seconds % 60, "s")
    minutes = math.floor(seconds / 60 + 0.5)
    if minutes < 1440:
        return _two(minutes // 60, "h", minutes % 60, "min")
    hours = math.floor(minutes / 60 + 0.5)
    return _two(hours // 24, "d", hours % 24, "h")


def _two(big: int, big_unit: str, small: int, small_unit: str) -> str:
    return f"{big} {big_unit}" + (f" {small} {small_unit}" if small else "")


def percent(share: float) -> str:
    """0.5 -> `50%`, 1/3 -> `33.3%`."""
    value = share * 100
    return f"{value:.0f}%" if abs(value - round(value)) < 0.05 else f"{value:.1f}%"


def _stat(d: Durations, what: str, of: int) -> str:
    if d.mean is None or d.p50 is None or d.p90 is None:
        return f"n/a; 0 of {of} {what}"
    return (f"{human_duration(d.mean)} (p50 {human_duration(d.p50)}, p90 {human_duration(d.p90)}); "
            f"{d.count} of {of} {what}")


def _mean(d: Durations) -> str:
    return human_duration(d.mean) if d.mean is not None else "-"


def _when(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def render_text(r: Report) -> str:
    """What `chatops report` prints: the totals, then the tables by severity and by route."""
    if not r.incidents:
        text = f"No incidents opened between {_when(r.since)} and {_when(r.until)}."
        if r.pages_sent or r.pages_failed:
            text += f"\n{_pages(r)}"
        return text
    rate = r.escalation_rate or 0.0
    noise = (f"{percent(r.noise_reduction)} ({r.alerts} alerts became {r.incidents} incidents)"
             if r.noise_reduction is not None else "n/a (no alerts recorded)")
    facts = [("incidents", str(r.incidents)), ("MTTA", _stat(r.tta, "acknowledged", r.incidents)),
             ("MTTR", _stat(r.ttr, "resolved", r.incidents)),
             ("escalation rate", f"{percent(rate)} ({r.escalated} of {r.incidents} incidents escalated)"),
             ("noise reduction", noise), ("pages sent", _pages(r, label=False))]
    lines = [f"Incidents opened from {_when(r.since)} to {_when(r.until)} ({human_duration(r.until - r.since)})", ""]
    lines += [f"{key:<17}{value}" for key, value in facts]
    for title, header, groups in (("By severity", "SEVERITY", r.by_severity), ("By route", "ROUTE", r.by_route)):
        lines += ["", title, table([header, "INCIDENTS", "ACKNOWLEDGED", "MTTA", "RESOLVED", "MTTR"],
                                   [(g.key or UNKNOWN, g.incidents, g.tta.count, _mean(g.tta), g.ttr.count,
                                     _mean(g.ttr)) for g in groups])]
    return "\n".join(lines)


def _pages(r: Report, *, label: bool = True) -> str:
    platforms = ", ".join(f"{name} {count}" for name, count in r.pages_by_platform.items())
    text = f"{r.pages_sent}" + (f" ({platforms})" if platforms else "") + f"; {r.pages_failed} failed"
    return f"pages sent: {text}" if label else text


def _seconds(value: timedelta | None) -> float | None:
    return round(value.total_seconds(), 3) if value is not None else None


def _durations_json(d: Durations) -> dict[str, Any]:
    return {"count": d.count, "mean_seconds": _seconds(d.mean), "p50_seconds": _seconds(d.p50),
            "p90_seconds": _seconds(d.p90)}


def _group_json(g: Group, key: str) -> dict[str, Any]:
    return {key: g.key, "incidents": g.incidents, "acknowledged": g.tta.count, "resolved": g.ttr.count,
            "mtta_seconds": _seconds(g.tta.mean), "mttr_seconds": _seconds(g.ttr.mean)}


def _fraction(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def as_json(r: Report) -> dict[str, Any]:
    """The report as JSON-ready values: durations in seconds, rates as fractions (null when undefined)."""
    return {
        "since": r.since.isoformat(), "until": r.until.isoformat(), "incidents": r.incidents,
        "acknowledged": r.tta.count, "resolved": r.ttr.count,
        "mtta": _durations_json(r.tta), "mttr": _durations_json(r.ttr),
        "by_severity": [_group_json(g, "severity") for g in r.by_severity],
        "by_route": [_group_json(g, "route") for g in r.by_route],
        "escalated": r.escalated, "escalation_rate": _fraction(r.escalation_rate),
        "alerts": r.alerts, "noise_reduction": _fraction(r.noise_reduction),
        "pages": {"sent": r.pages_sent, "failed": r.pages_failed, "by_platform": r.pages_by_platform},
    }
