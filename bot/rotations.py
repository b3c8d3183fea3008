"""On-call schedules: who is on call when, from a rotation and its overrides. Pure: time is passed in.

A rotation hands over from one member to the next every `shift`, starting at its
first handoff: the `handoff` time on the `start` date (with a weekday, the first
such weekday on or after `start`). Before that, nobody is on call.

Handoffs are computed in the rotation's local wall-clock time, so they stay on
the clock through daylight-saving changes: handoff k is at local wall time
`first handoff + k * shift` (09:00 + 1w is next Monday 09:00; 09:00 + 12h is
21:00), turned into an instant by one rule:

    the handoff is the first instant at which the local clock reads that time or later.

So a handoff at a time the clock reads twice (fall back) is the first of the two,
and one at a time the clock skips (spring forward) is the moment of the skip
(02:30 on the night clocks jump from 02:00 to 03:00 is 03:00 new time). The
shift that spans a change is as much shorter or longer as the clocks moved: a
weekly shift lasts 167 h or 169 h, a 12-hour night shift 11 h or 13 h. The rule
never moves a handoff backwards, so shifts never overlap; a shift whose start
and end fall into the same skipped hour (1-hour shifts) is empty and left out.

Overrides (person P covers the rotation from T1 to T2) are laid over the
rotation; where overrides overlap, the one created last wins. An override splits
the shift it falls into: the rotation's person before and after it. A swap taken
is one override: the counterpart covers the requester's shift.

Lookups are arithmetic on the shift number, not a walk from the start, so a
time far in the future costs the same as today.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo

from bot.durations import format_duration, parse_clock, parse_weekday, WEEKDAYS

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from bot.config import Rotation

Source = Literal["rotation", "override", "none"]
MIN_SHIFT = timedelta(hours=1)
_NEVER = datetime.min.replace(tzinfo=UTC)  # "since always": compared, never converted
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Schedule:
    """A rotation as the schedule sees it (`from_config` builds one from app.yaml's `rotations[]`)."""

    id: str
    members: tuple[str, ...]
    shift: timedelta
    handoff: time
    start: date
    tz: ZoneInfo
    weekday: int | None = None  # 0 = Monday; None: the first handoff is on `start` itself

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"rotation {self.id}: no members")
        if self.shift < MIN_SHIFT:
            raise ValueError(f"rotation {self.id}: a shift must last at least 1h")

    @classmethod
    def from_config(cls, rotation: Rotation, *, default_tz: str = "UTC") -> Schedule:
        parts = rotation.handoff.split()
        weekday = parse_weekday(parts[0]) if len(parts) == 2 else None
        return cls(id=rotation.id, members=tuple(rotation.members), shift=rotation.shift,
                   handoff=parse_clock(parts[-1]), start=rotation.start, tz=ZoneInfo(rotation.timezone or default_tz),
                   weekday=weekday)

    @cached_property
    def anchor(self) -> datetime:
        """The local wall time (naive) of the first handoff."""
        day = self.start
        if self.weekday is not None:
            day += timedelta(days=(self.weekday - day.weekday()) % 7)
        return datetime.combine(day, self.handoff)

    @cached_property
    def begins(self) -> datetime:
        """The instant of the first handoff: nobody is on call before it."""
        return self.boundary(0)

    def boundary(self, k: int) -> datetime:
        """The instant (UTC) shift number k starts; shift 0 is the first."""
        return first_instant(self.anchor + k * self.shift, self.tz)

    def member(self, k: int) -> str:
        return self.members[k % len(self.members)]

    def index_at(self, at: datetime) -> int:
        """The number of the shift under way at `at`, -1 before the first handoff. O(1)."""
        _aware(at, "at")
        if at < self.begins:
            return -1
        wall = at.astimezone(self.tz).replace(tzinfo=None)
        k = max(0, (wall - self.anchor) // self.shift)  # wall time and instants differ by a few hours at most
        while k > 0 and self.boundary(k) > at:
            k -= 1
        while self.boundary(k + 1) <= at:
            k += 1
        return k

    def describe(self) -> str:
        """`1w shifts, handoff mon 09:00 Europe/Berlin, from 2026-11-02`."""
        day = f"{WEEKDAYS[self.weekday]} " if self.weekday is not None else ""
        return (f"{format_duration(self.shift)} shifts, handoff {day}{self.handoff:%H:%M} {self.tz.key}, "
                f"from {self.start.isoformat()}")


@dataclass(frozen=True)
class Override:
    """`person` covers `rotation` over [start, end). Among overlapping ones, the latest `created_at` wins
    (then the higher id, then the later in the list)."""

    rotation: str
    person: str
    start: datetime
    end: datetime
    created_at: datetime
    id: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end", "created_at"):
            _aware(getattr(self, name), name)


@dataclass(frozen=True)
class Shift:
    """A stretch of the effective schedule. `person` None (source `none`): nobody, before the rotation starts;
    `start` None: since always. `index` is the rotation's shift number the stretch belongs to (source
    `rotation`); `override_id` the override's id (source `override`)."""

    rotation: str
    person: str | None
    start: datetime | None
    end: datetime
    source: Source
    index: int | None = None
    override_id: int | None = None

    @property
    def length(self) -> timedelta | None:
        return None if self.start is None else self.end - self.start

    def covers(self, at: datetime) -> bool:
        return (self.start is None or self.start <= at) and at < self.end


def on_call(rotation: Schedule, overrides: Iterable[Override], at: datetime) -> Shift:
    """Who is on call at `at`, from when until when. A handoff instant belongs to the incoming shift."""
    _aware(at, "at")
    return _segments(rotation, overrides, at, at + _TICK)[0]


def shifts_between(rotation: Schedule, overrides: Iterable[Override], start: datetime, end: datetime) -> list[Shift]:
    """Every stretch of the effective schedule that overlaps [start, end), whole (the first may begin before
    `start`, the last end after `end`), in order, each beginning where the previous one ends."""
    _aware(start, "start")
    _aware(end, "end")
    if end <= start:
        raise ValueError("end must be after start")
    return _segments(rotation, overrides, start, end)


def next_shifts(rotation: Schedule, overrides: Iterable[Override], after: datetime, n: int) -> list[Shift]:
    """The next `n` stretches that begin strictly after `after`."""
    _aware(after, "after")
    overrides = list(overrides)
    if n <= 0:
        return []
    span = rotation.shift * (n + 1)
    if after < rotation.begins:  # nothing of the rotation's own before it begins: look from there on at once (else
        span += rotation.begins - after  # the doubling windows walked every shift up to a start years ahead)
    for _ in range(40):
        found = [s for s in _segments(rotation, overrides, after, after + span) if s.start is not None and s.start > after]
        if len(found) >= n:
            return found[:n]
        span *= 2
    return found[:n]


def run_at(rotation: Schedule, overrides: Iterable[Override], at: datetime, *, limit: int = 8
           ) -> tuple[Shift, datetime | None, datetime, Shift | None]:
    """The stretch under way at `at`; the start and the end of its person's whole run (back-to-back stretches of the
    same person, such as a cover that runs into their own shift, are one run; up to `limit` stretches either side);
    and the stretch of whoever follows (None if the same person holds the next `limit` stretches)."""
    overrides = list(overrides)
    current = on_call(rotation, overrides, at)
    since = current.start
    behind = _previous(rotation, overrides, current.start, limit) if current.start is not None else []
    for earlier in behind:
        if earlier.person != current.person:
            break
        since = earlier.start
    else:  # the same person all along (a rotation of one): since their shift began, as `until` is when it ends
        since = current.start
    until = current.end
    ahead = next_shifts(rotation, overrides, at, limit)
    for following in ahead:
        if following.person != current.person:
            return current, since, until, following
        until = following.end
    # The same person all along (a rotation of one): their shift as it is, and theirs next.
    return current, since, current.end, ahead[0] if ahead else None


def run_span(rotation: Schedule, overrides: Iterable[Override], at: datetime, *, limit: int = 8
             ) -> tuple[datetime, datetime]:
    """The time `run_at` looks at for `at`: from the start of the earliest stretch it may look back to (`at` when
    there is none) to the end of the latest it may look ahead to. The overrides it is given must cover that much."""
    overrides = list(overrides)
    current = on_call(rotation, overrides, at)
    behind = _previous(rotation, overrides, current.start, limit) if current.start is not None else []
    ahead = next_shifts(rotation, overrides, at, limit)
    first = next((s.start for s in reversed(behind) if s.start is not None), current.start or at)
    return min(first, at), max(ahead[-1].end if ahead else current.end, at)


def _previous(rotation: Schedule, overrides: Sequence[Override], before: datetime, n: int) -> list[Shift]:
    """The last `n` stretches that end at or before `before`, latest first; fewer when the first of them is the
    nobody before the rotation starts (it begins "since always")."""
    span = rotation.shift * (n + 1)
    for _ in range(40):
        found = [s for s in reversed(_segments(rotation, overrides, before - span, before)) if s.end <= before]
        if len(found) >= n or (found and found[-1].start is None):
            return found[:n]
        span *= 2
    return found[:n]


def first_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first instant (UTC) at which the clock in `tz` reads `wall` (naive) or later."""
    guess = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)  # fold=0: the first of a repeated time
    if guess.astimezone(tz).replace(tzinfo=None) == wall:
        return guess
    # `wall` was skipped (spring forward): the answer is the moment of the skip. fold=1 maps it before the
    # change, fold=0 after; look between them for the first second whose wall time has passed `wall`.
    lo = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    hi = int(guess.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _segments(rotation: Schedule, overrides: Iterable[Override], a: datetime, b: datetime) -> list[Shift]:
    """The effective stretches overlapping [a, b), each with its true start and end."""
    ranked = sorted((o for o in overrides if o.rotation == rotation.id and o.end > o.start),
                    key=lambda o: (o.created_at, o.id if o.id is not None else -1))
    first, last = rotation.index_at(a), rotation.index_at(b - _TICK)
    lo = rotation.boundary(first) if first >= 0 else _NEVER
    hi = rotation.boundary(last + 1)
    for o in ranked:  # an override under way at the window's edge sets where that stretch starts or ends
        if o.start < b and o.end > a:
            lo, hi = min(lo, o.start), max(hi, o.end)
    ranked = [o for o in ranked if o.start < hi and o.end > lo]
    cuts = sorted({lo, hi} | {t for o in ranked for t in (o.start, o.end) if lo < t < hi})
    out: list[Shift] = []
    for (u, v), winner in _covered(cuts, ranked):
        if winner is not None:
            out.append(Shift(rotation.id, winner.person, u, v, "override", override_id=winner.id))
        else:
            out += _base(rotation, u, v)
    stretches = [s for s in out if s.end > a and (s.start is None or s.start < b)]
    return [s if s.start != _NEVER else Shift(s.rotation, s.person, None, s.end, s.source) for s in stretches]


def _covered(cuts: Sequence[datetime], ranked: Sequence[Override]) -> list[tuple[tuple[datetime, datetime], Override | None]]:
    """[lo, hi) cut into runs, each with the override that wins it (latest created) or None."""
    runs: list[tuple[tuple[datetime, datetime], Override | None]] = []
    for u, v in zip(cuts, cuts[1:]):
        winner = None
        for o in ranked:  # ascending rank: the last covering one wins
            if o.start <= u and o.end >= v:
                winner = o
        if runs and runs[-1][1] is winner:
            runs[-1] = ((runs[-1][0][0], v), winner)
        else:
            runs.append(((u, v), winner))
    return runs


def _base(rotation: Schedule, u: datetime, v: datetime) -> list[Shift]:
    """The rotation's own shifts over [u, v), cut at u and v."""
    out: list[Shift] = []
    begins = rotation.begins
    if u < begins:
        out.append(Shift(rotation.id, None, u, min(v, begins), "none"))
        u = begins
    if u >= v:
        return out
    k = rotation.index_at(u)
    start = u
    while start < v:
        end = min(rotation.boundary(k + 1), v)
        if end > start:
            out.append(Shift(rotation.id, rotation.member(k), start, end, "rotation", index=k))
        start, k = max(start, end), k + 1
    return out


def _aware(value: datetime, name: str) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime (with a time zone)")
    return value
