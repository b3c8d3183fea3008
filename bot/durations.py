"""Durations (`90s`, `5m`, `1h30m`, `1w`), clock times (`09:00`) and weekdays."""

from __future__ import annotations

import re
from datetime import time, timedelta

_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNITS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


LONGEST = timedelta(days=3650)  # ten years: longer than any shift, wait or window, and short enough for dates


class DurationTooLong(ValueError):
    """Well written, but longer than LONGEST (dates this far away break the calendar arithmetic)."""


def parse_duration(text: str | int | timedelta) -> timedelta:
    """`1h30m` -> timedelta(hours=1, minutes=30). A bare integer counts seconds."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return _delta(text, text)
    raw = str(text).strip()
    m = _DURATION.fullmatch(raw)
    if re.fullmatch(r"\d+(?::\d+)+", raw):  # 168:00, 1:30: a clock's way of writing it, which says no units
        raise ValueError(f"invalid duration {raw[:40]!r}: write it with units (1:30 could be 1h30m or 1m30s), "
                         "not as a clock time")
    if not raw or not m or not any(m.groups()):
        raise ValueError(f"invalid duration {text!r} (expected e.g. 90s, 5m, 1h30m, 1d, 1w)")
    seconds = sum(int(v) * mult for v, (_, mult) in zip(m.groups(), _UNITS) if v)
    return _delta(seconds, text)


def parse_setting(text: str | int | timedelta) -> timedelta:
    """A duration in app.yaml: as `parse_duration`, and a bare number counts seconds however the file gives it,
    `900`, `"900"` or `${WINDOW:-900}` (substitution gives text). A bare number typed in chat stays refused: the end
    of `/override ... now 5` is more likely 5 hours than 5 seconds, and is refused as not a time."""
    if isinstance(text, str) and re.fullmatch(r"[0-9]+", text.strip()):
        return _delta(int(text.strip()), text.strip())
    return parse_duration(text)


def _delta(seconds: int, text: object) -> timedelta:
    if seconds > LONGEST.total_seconds():
        raise DurationTooLong(f"duration {str(text)[:40]!r} is too long (at most {LONGEST.days}d)")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """timedelta(seconds=5400) -> `1h30m`; the inverse of parse_duration."""
    seconds = int(delta.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, mult in _UNITS:
        value, seconds = divmod(seconds, mult)
        if value:
            parts.append(f"{value}{unit}")
    return "".join(parts)


def parse_clock(text: str | time) -> time:
    """`09:00` -> time(9, 0)."""
    if isinstance(text, time):
        return text
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", str(text).strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f"invalid time of day {text!r} (expected HH:MM, e.g. 09:00)")
    return time(int(m.group(1)), int(m.group(2)))


def parse_weekday(text: str) -> int:
    """`mon` -> 0 ... `sun` -> 6 (Python's weekday numbering)."""
    key = str(text).strip().lower()[:3]
    if key not in WEEKDAYS or len(str(text).strip()) < 3:
        raise ValueError(f"invalid weekday {text!r} (expected one of: {', '.join(WEEKDAYS)})")
    return WEEKDAYS.index(key)
