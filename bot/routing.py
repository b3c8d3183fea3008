"""Label matchers, routes and silences: pure functions of an alert's labels and the time."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from bot.alerts import MAX_KEY, Alert, alert_name, bounded_key
from bot.config import Route, Silence, WeeklyWindow
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
    covered = _covers(s.weekly, local)
    if covered and local.fold:
        # The second pass of an hour the clocks went back over: an occurrence whose end is in that hour ended at
        # its first pass (as silence_ends says, and the incident it muted spoke then); it does not come back.
        return now < _occurrence_end(s, now, default_tz)
    return covered


def _covers(weekly: WeeklyWindow, local: datetime) -> bool:
    """Whether the wall time `local` (in the window's zone) is inside the weekly window."""
    days = {parse_weekday(d) for d in weekly.days}
    t = local.time().replace(tzinfo=None, fold=0)
    if weekly.start == weekly.end:  # 00:00-00:00 (or 06:00-06:00): the whole day, from start to start
        return (local.weekday() if t >= weekly.start else (local.weekday() - 1) % 7) in days
    if weekly.start < weekly.end:
        return local.weekday() in days and weekly.start <= t < weekly.end
    # A window across midnight belongs to the day it starts on: `days: [fri]`, 22:00-06:00 is Friday night,
    # so Saturday 02:00 is in it and Friday 02:00 (Thursday night) is not.
    if t >= weekly.start:
        return local.weekday() in days
    return t < weekly.end and (local.weekday() - 1) % 7 in days


def silence_ends(s: Silence, now: datetime, default_tz: str) -> datetime | None:
    """The first instant after `now` that `s` (active at `now`) does not cover; None when it has no end (no `ends`,
    or a weekly window that covers every day whole). An incident it muted may speak then."""
    if s.weekly is None:
        return s.ends
    end: datetime | None = now
    for _ in range(8):  # back-to-back windows (`days: [sat, sun]`, 00:00-00:00) end when the last does
        end = _occurrence_end(s, end, default_tz)
        if not _active(s, end, default_tz):
            return end
    return None


def _occurrence_end(s: Silence, at: datetime, default_tz: str) -> datetime:
    """When the occurrence of weekly window `s` covering `at` ends: its end's wall time on the day it ends, in its
    time zone (01:00-03:30 lasts 3.5 hours on the night clocks go back over 02:00-03:00; an end in that hour, which
    the clocks show twice, is its first pass)."""
    assert s.weekly is not None
    tz = ZoneInfo(s.weekly.timezone or default_tz)
    local = at.astimezone(tz)
    start, end, t = s.weekly.start, s.weekly.end, local.time().replace(tzinfo=None)
    day = local.date()
    if start >= end and t < end:  # after midnight in a window that started the day before
        day -= timedelta(days=1)
    if start >= end:
        day += timedelta(days=1)
    wall = datetime.combine(day, end)
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    later = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if later >= first:  # (a wall time that happens twice, as clocks go back: the window ends at the first)
        return first
    # A wall time that never happens (clocks skip it going forward): the window ends as they skip, somewhere
    # between the two readings; found to the second.
    lo, hi = later, first
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        lo, hi = (mid, hi) if _active(s, mid, default_tz) else (lo, mid)
    return hi


def _key_part(text: str) -> str:
    """A label name or value as a group key holds it: `\\`, `|` and `=` escaped with a `\\`, so that labels holding
    them cannot make another alert's key (`alertname=A|instance=B` and instance "" against `A` and `B|instance=`).
    Only a text that holds one is changed: every key of other labels stays as stored, and its open incidents match."""
    if "|" in text or "=" in text or "\\" in text:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("=", "\\=")
    return text


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
        key = f"{_key_part(source_dedup)}={_key_part(alert.labels[source_dedup])}"
    else:
        key = "|".join(f"{_key_part(k)}="
                       f"{_key_part(alert_name(alert.labels) if k == 'alertname' else alert.labels.get(k, ''))}"
                       for k in grouping_by)
    return key if len(key) <= MAX_KEY else bounded_key(key)  # (a very long label value still fits the index)
