"""Label matchers, routes and silences: pure functions of an alert's labels and the time."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from bot.alerts import MAX_KEY, Alert, alert_name, bounded_key
from bot.config import Route, Silence
from bot.durations import parse_weekday


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def matches(matchers: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """`value` (equal), `!=value`, `=~regex`, `!~regex` (full match), all must hold."""
    for key, want in matchers.items():
        have = labels.get(key, "")
        if want.startswith("=~"):
            ok = _regex(want[2:]).fullmatch(have) is not None
        elif want.startswith("!~"):
            ok = _regex(want[2:]).fullmatch(have) is None
        elif want.startswith("!="):
            ok = have != want[2:]
        else:
            ok = have == want
        if not ok:
            return False
    return True


def select_routes(routes: Sequence[Route], labels: Mapping[str, str]) -> list[Route]:
    """First match wins unless it says `continue: true`; the last route catches the rest."""
    chosen = []
    for route in routes:
        if matches(route.match, labels):
            chosen.append(route)
            if not route.continue_:
                break
    return chosen or [routes[-1]]


def silenced_by(silences: Sequence[Silence], labels: Mapping[str, str], now: datetime, tz: str) -> Silence | None:
    for silence in silences:
        if matches(silence.matchers, labels) and _active(silence, now, tz):
            return silence
    return None


def _active(s: Silence, now: datetime, default_tz: str) -> bool:
    if s.weekly is None:
        return (s.starts is None or s.starts <= now) and (s.ends is None or now < s.ends)
    local = now.astimezone(ZoneInfo(s.weekly.timezone or default_tz))
    days = {parse_weekday(d) for d in s.weekly.days}
    t = local.time().replace(tzinfo=None)
    if s.weekly.start == s.weekly.end:  # 00:00-00:00 (or 06:00-06:00): the whole day, from start to start
        return (local.weekday() if t >= s.weekly.start else (local.weekday() - 1) % 7) in days
    if s.weekly.start < s.weekly.end:
        return local.weekday() in days and s.weekly.start <= t < s.weekly.end
    # A window across midnight belongs to the day it starts on: `days: [fri]`, 22:00-06:00 is Friday night,
    # so Saturday 02:00 is in it and Friday 02:00 (Thursday night) is not.
    if t >= s.weekly.start:
        return local.weekday() in days
    return t < s.weekly.end and (local.weekday() - 1) % 7 in days


def group_key(grouping_by: Sequence[str], source_dedup: str | None, alert: Alert) -> str:
    """The key alerts share to join one incident.

    A sender's explicit `dedup_key` wins; then the source's `dedup_key` setting
    (`groupKey`: the sender's own group, or a label name); then `grouping.by`.
    """
    if alert.dedup_key:
        key = f"dedup:{alert.source}:{alert.dedup_key}"
    elif source_dedup == "groupKey" and alert.group_key:
        key = f"group:{alert.source}:{alert.group_key}"
    elif source_dedup and source_dedup != "groupKey" and alert.labels.get(source_dedup):
        key = f"{source_dedup}={alert.labels[source_dedup]}"
    else:
        key = "|".join(f"{k}={alert_name(alert.labels) if k == 'alertname' else alert.labels.get(k, '')}"
                       for k in grouping_by)
    return key if len(key) <= MAX_KEY else bounded_key(key)  # (a very long label value still fits the index)
