"""Who is on call: `/oncall` on every platform, the iCalendar feed, and the tables `chatops oncall` prints.

The schedule itself is `bot.rotations` (pure); this module reads overrides from the store, picks the time
zone to show times in, and draws tables and the feed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

from bot.chat import CommandEvent, Reply, echoed
from bot.clock import Clock
from bot.config import Config, Person
from bot.dispatch import Dispatcher
from bot.durations import format_duration
from bot.rotations import Override, Schedule, Shift, next_shifts, on_call, run_at, run_span, shifts_between
from bot.tables import table
from storage.db import Database
from storage.models import Override as OverrideRow
from storage.queries import active_overrides

USAGE = ("/oncall [ROTATION] | /oncall schedule ROTATION [--weeks N] | /oncall take [ROTATION] [FROM] [UNTIL] | "
         "/oncall cancel ID")
UPCOMING = 3  # shifts after the current one in `/oncall ROTATION`
DEFAULT_WEEKS, MAX_WEEKS = 4, 26
MAX_ROWS = 60  # rows of `/oncall schedule` in one message
MAX_CHARS = 3800  # characters of it (Telegram takes 4,096, and the HTML around a table adds some)
FEED_BACK, FEED_AHEAD = timedelta(weeks=4), timedelta(weeks=12)


@dataclass
class Oncall:
    """The read side of rotations for one config: schedules, overrides from the store, tables, the feed."""

    config: Config
    schedules: dict[str, Schedule] = field(init=False)
    names: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.schedules = {r.id: Schedule.from_config(r, default_tz=self.config.timezone) for r in self.config.rotations}
        self.names = {p.id: p.name for p in self.config.people}

    def unknown(self, rotation: str) -> str:
        rotation = echoed(rotation)  # what was typed, not all of it if it goes on
        if not self.schedules:
            return f"There is no rotation `{rotation}`: no rotations are configured (add them under `rotations:` in app.yaml)."
        return f"There is no rotation `{rotation}`. Known rotations: {self.known()}."

    def find(self, rotation: str) -> Schedule | None:
        """The rotation of that id; case does not matter when that leaves one."""
        if rotation in self.schedules:
            return self.schedules[rotation]
        matches = [s for rid, s in self.schedules.items() if rid.casefold() == rotation.casefold()]
        return matches[0] if len(matches) == 1 else None

    def known(self) -> str:
        return ", ".join(f"`{r}`" for r in sorted(self.schedules))

    async def overrides(self, db: Database | None, start: datetime, end: datetime,
                        rotations: Sequence[str] | None = None) -> dict[int, OverrideRow]:
        """Every active override the schedule over [start, end) depends on, by id (none without a store).

        The window is padded by a shift and a day either side, and widened until every loaded override has
        that much room around it too: an override under way at the window's edge, any newer one that cuts
        it, and whatever follows it decide where the first and last stretches begin and end.
        """
        if db is None:
            return {}
        chosen = list(rotations) if rotations is not None else list(self.schedules)
        pad = max((self.schedules[r].shift for r in chosen), default=timedelta(0)) + timedelta(days=1)
        start, end = start.astimezone(UTC), end.astimezone(UTC)
        lo, hi = start - pad, end + pad
        async with db.sessions() as session:
            while True:
                rows = await active_overrides(session, start=lo, end=hi, rotations=chosen)
                need_lo = min([start] + [r.starts_at for r in rows]) - pad
                need_hi = max([end] + [r.ends_at for r in rows]) + pad
                if need_lo >= lo and need_hi <= hi:
                    return {r.id: r for r in rows if r.id is not None}
                lo, hi = min(lo, need_lo), max(hi, need_hi)

    async def around(self, db: Database | None, at: datetime) -> dict[int, OverrideRow]:
        """Every override `now_rows` depends on at `at`, for every rotation: run_at looks up to 8 stretches either
        side (since when, until when, who next), which may reach well past a shift and a day (a person who holds
        several shifts in a row: a cover three weeks ahead was missed, and `/oncall` said Alice until a Monday that
        Carol would begin at)."""
        # (first what the rotations alone span: most often the covers do not reach past it, and one look does)
        spans = [run_span(schedule, [], at) for schedule in self.schedules.values()]
        lo, hi = min([at, *(first for first, _ in spans)]), max([at, *(last for _, last in spans)])
        for _ in range(20):
            rows = await self.overrides(db, lo, hi)
            need_lo, need_hi = lo, hi
            for rid, schedule in self.schedules.items():
                first, last = run_span(schedule, domain(rows.values(), rid), at)
                need_lo, need_hi = min(need_lo, first), max(need_hi, last)
            if need_lo >= lo and need_hi <= hi:
                break
            lo, hi = need_lo, need_hi
        return rows

    async def upcoming(self, db: Database | None, schedule: Schedule, now: datetime,
                       n: int) -> tuple[dict[int, OverrideRow], list[Shift]]:
        """The overrides and the stretches: the one under way at `now` and the next `n`."""
        end = now + schedule.shift * (n + 1)
        while True:
            rows = await self.overrides(db, now, end, [schedule.id])
            overrides = domain(rows.values(), schedule.id)
            shifts = [on_call(schedule, overrides, now)] + next_shifts(schedule, overrides, now, n)
            if shifts[-1].end <= end:
                return rows, shifts
            end = shifts[-1].end  # long overrides ahead: read what lies beyond them too

    def name(self, person: str | None) -> str:
        return "nobody" if person is None else self.names.get(person, person)

    def who(self, shift: Shift) -> str:
        if shift.source != "override":
            return self.name(shift.person)
        if shift.person is not None and shift.person not in self.names:  # an override outlived their removal
            return f"{shift.person} (override; no longer in app.yaml)"
        return self.name(shift.person) + " (override)"

    # -- views -----------------------------------------------------------------------------------

    def now_rows(self, rows: dict[int, OverrideRow], now: datetime, tz_for: Callable[[Schedule], ZoneInfo], *,
                 today: datetime | None = None) -> list[tuple[str, str, str, str, str]]:
        """(rotation, on call now, since, until, next) for every rotation. `today`: the present, whose year the
        times leave out (`now` when not given; `chatops oncall --at` asks about another moment)."""
        out = []
        for rid, schedule in sorted(self.schedules.items()):
            overrides = domain(rows.values(), rid)
            tz = tz_for(schedule)
            current, since, until, following = run_at(schedule, overrides, now)
            out.append((rid, self.who(current), when(since, tz, today or now), when(until, tz, today or now),
                        self.who(following) if following is not None else "-"))
        return out

    def upcoming_rows(self, shifts: Sequence[Shift], rows: dict[int, OverrideRow], now: datetime,
                      tz: ZoneInfo, *, today: datetime | None = None, current: str = "now"
                      ) -> list[tuple[str, str, str, str]]:
        """(who, from, until, note) for `upcoming`'s stretches; `today` as for now_rows; `current`: the note of the
        stretch at `now` (the command line's `--at` is not now)."""
        return [(self.who(s), when(s.start, tz, today or now), when(s.end, tz, today or now),
                 self.note(s, rows, current=i == 0, word=current)) for i, s in enumerate(shifts)]

    def schedule_rows(self, schedule: Schedule, rows: dict[int, OverrideRow], start: datetime, end: datetime,
                      tz: ZoneInfo) -> list[tuple[str, str, str, str, str]]:
        """(from, until, length, who, note) for every stretch overlapping [start, end)."""
        shifts = shifts_between(schedule, domain(rows.values(), schedule.id), start, end)
        return [(when(s.start, tz, start), when(s.end, tz, start),
                 format_duration(s.length) if s.length is not None else "-", self.who(s),
                 self.note(s, rows, current=s.covers(start))) for s in shifts]

    def note(self, shift: Shift, rows: dict[int, OverrideRow], *, current: bool, word: str = "now") -> str:
        parts = [word] if current else []
        if shift.source == "none":
            parts.append("the rotation has not started")
        row = rows.get(shift.override_id) if shift.override_id is not None else None
        if row is not None:
            author = self.name(row.created_by)
            # `/override` wrote "override by AUTHOR" as its reason once: not said twice
            reason = row.reason if row.reason != f"override by {author}" else ""
            parts.append(f"override #{row.id} by {author}" + (f": {reason}" if reason else ""))
        return "; ".join(parts)

    def feed_window(self, schedule: Schedule, now: datetime) -> tuple[datetime, datetime]:
        """What the feed shows: from FEED_BACK ago until FEED_AHEAD after now, or after the rotation's start when it
        starts later (a calendar needs an event, and this one says when). The feed reads its overrides for this too."""
        return now - FEED_BACK, max(now, schedule.begins) + FEED_AHEAD

    def calendar(self, schedule: Schedule, rows: dict[int, OverrideRow], now: datetime) -> str:
        """The effective schedule over `feed_window` as an RFC 5545 calendar."""
        host = urlsplit(self.config.server.public_url).hostname or "chatops"
        stamp = ics_time(now)
        lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//chatops//on-call schedule//EN", "CALSCALE:GREGORIAN",
                 "METHOD:PUBLISH", f"X-WR-CALNAME:{ics_text(f'On call: {schedule.id}')}",
                 "REFRESH-INTERVAL;VALUE=DURATION:PT1H", "X-PUBLISHED-TTL:PT1H"]
        start, end = self.feed_window(schedule, now)
        for s in shifts_between(schedule, domain(rows.values(), schedule.id), start, end):
            if s.person is None or s.start is None:
                continue
            begins, ends = ics_time(s.start), ics_time(s.end)
            if ends <= begins:  # under a second (a cover another replaced at once): it would end as it starts, which
                continue        # RFC 5545 forbids; the next stretch begins in the same whole second, so no gap shows
            name = self.name(s.person)
            if s.person is not None and s.person not in self.names:  # an override outlived their removal
                name = f"{s.person} (no longer in app.yaml)"
            if s.source == "override":
                row = rows.get(s.override_id) if s.override_id is not None else None
                uid = f"{schedule.id}-override-{s.override_id}-{begins}@{host}"
                # the feed is served without authentication: who made the override, not why
                about = f"{name} covers {schedule.id}" + (
                    f" (override #{row.id}, made by {self.name(row.created_by)})" if row is not None else "")
            else:
                uid = f"{schedule.id}-{s.index}-{begins}@{host}"
                about = f"{name} is on call for {schedule.id}: {schedule.describe()}"
            lines += ["BEGIN:VEVENT", f"UID:{ics_text(uid)}", f"DTSTAMP:{stamp}", f"DTSTART:{begins}",
                      f"DTEND:{ends}", f"SUMMARY:{ics_text(f'On call: {name} ({schedule.id})')}",
                      f"DESCRIPTION:{ics_text(about)}", "TRANSP:TRANSPARENT", "END:VEVENT"]
        lines.append("END:VCALENDAR")
        return "".join(fold(line) + "\r\n" for line in lines)


@dataclass
class OncallHandlers:
    """`/oncall`, registered on the dispatcher; the clock is the bot's."""

    db: Database
    config: Config
    clock: Clock
    view: Oncall = field(init=False)
    # `/oncall take ...`, when the write side is wired in (handlers/overrides.py)
    take: Callable[[CommandEvent, Person, list[str]], Awaitable[Reply]] | None = None
    cancel: Callable[[CommandEvent, Person, list[str]], Awaitable[Reply]] | None = None  # `/oncall cancel ID`

    def __post_init__(self) -> None:
        self.view = Oncall(self.config)

    def register(self, dispatcher: Dispatcher) -> None:
        dispatcher.command("oncall", usage=USAGE, help="who is on call now and next, and a rotation's schedule")(self.oncall)

    async def oncall(self, event: CommandEvent, person: Person) -> Reply:
        args = [a.replace("\u2014", "--") for a in event.args]  # chat clients like to turn -- into an em dash
        if args and args[0].lower() in ("help", "-h", "--help"):
            return Reply(f"Usage: `{USAGE}`")
        if args and args[0].lower() == "take" and self.take is not None and "take" not in self.view.schedules:
            return await self.take(event, person, args[1:])
        if args and args[0].lower() == "cancel" and self.cancel is not None and "cancel" not in self.view.schedules:
            return await self.cancel(event, person, args[1:])
        if not self.view.schedules:
            return Reply("No rotations are configured yet: add them under `rotations:` in app.yaml.")
        if not args:
            return await self._everyone(person)
        if args[0].lower() == "schedule" and not (len(args) == 1 and "schedule" in self.view.schedules):
            return await self._schedule(event, person, args[1:])
        if len(args) > 1:
            return Reply(f"Usage: `{USAGE}`")
        schedule = self.view.find(args[0])
        if schedule is None:
            return Reply(self.view.unknown(args[0]))
        return await self._one(person, schedule)

    def _tz(self, person: Person | None, schedule: Schedule) -> ZoneInfo:
        return ZoneInfo(person.timezone) if person is not None and person.timezone else schedule.tz

    async def _everyone(self, person: Person) -> Reply:
        now = self.clock.now()
        rows = await self.view.around(self.db, now)
        lines = self.view.now_rows(rows, now, lambda s: self._tz(person, s))
        text = table(["rotation", "on call", "since", "until", "next"], lines)
        return Reply(f"On call now ({self._zone_note(person)}):\n```\n{text}\n```")

    async def _one(self, person: Person, schedule: Schedule) -> Reply:
        now = self.clock.now()
        rows, shifts = await self.view.upcoming(self.db, schedule, now, UPCOMING)
        tz = self._tz(person, schedule)
        lines = self.view.upcoming_rows(shifts, rows, now, tz)
        text = table(["who", "from", "until", "note"], lines)
        return Reply(f"`{schedule.id}`: {schedule.describe()}. Times in {tz.key}.\n```\n{text}\n```")

    async def _schedule(self, event: CommandEvent, person: Person, args: list[str]) -> Reply:
        usage = Reply("Usage: `/oncall schedule ROTATION [--weeks N]`, for example `/oncall schedule "
                      f"{min(self.view.schedules)} --weeks 8` (N from 1 to {MAX_WEEKS}).")
        weeks, rest = DEFAULT_WEEKS, []
        it = iter(args)
        for arg in it:
            value: str | None = None
            if arg.startswith("--weeks="):
                value = arg.split("=", 1)[1]
            elif arg == "--weeks":
                value = next(it, "")
            else:
                rest.append(arg)
                continue
            # the length first: int() of thousands of digits raises rather than answer
            if not (value.isascii() and value.isdigit() and len(value) <= 3) or not 1 <= int(value) <= MAX_WEEKS:
                return usage
            weeks = int(value)
        if len(rest) != 1:
            return usage
        schedule = self.view.find(rest[0])
        if schedule is None:
            return Reply(self.view.unknown(rest[0]))
        now = self.clock.now()
        end = now + timedelta(weeks=weeks)
        rows = await self.view.overrides(self.db, now, end, [schedule.id])
        tz = self._tz(person, schedule)
        lines = self.view.schedule_rows(schedule, rows, now, end, tz)
        head = (f"`{schedule.id}` for the next {weeks} week{'s' if weeks != 1 else ''} "
                f"({schedule.describe()}). Times in {tz.key}.")
        # Chat messages have a length limit (Telegram's is 4,096 characters, and long names make long rows): as
        # many rows as fit, then how many more there are and where to see them all.
        shown = min(len(lines), MAX_ROWS)
        feed = self._feed(event, schedule)
        while True:
            more = "" if shown == len(lines) else f"\n{len(lines) - shown} more shifts: ask for fewer weeks, or {feed}"
            text = f"{head}\n```\n{table(['from', 'until', 'length', 'who', 'note'], lines[:shown])}\n```{more}"
            if len(text) <= MAX_CHARS or shown <= 1:
                return Reply(text)
            shown -= 1

    def _feed(self, event: CommandEvent, schedule: Schedule) -> str:
        """Where the rest of a schedule is: the rotation's calendar feed. With server.calendar_token its link holds
        the token, a secret, so it is given only where the asker alone reads it: on Slack (a command's answer is
        ephemeral) and in a private chat on Telegram; in a Telegram group, where everyone reads the answer, it is
        left out, and the answer says where to ask for it."""
        url = f"{self.config.server.public_url.rstrip('/')}/oncall/{schedule.id}.ics"
        token = self.config.server.calendar_token
        if token is None:
            return f"subscribe to {url}"
        if event.direct or event.actor.platform == "slack":
            return f"subscribe to {url}?{urlencode({'token': token})} (a private link: keep it to yourself)"
        return "ask me in a private chat for the link to subscribe to (it holds a secret, so not here)"

    def _zone_note(self, person: Person) -> str:
        return f"times in {person.timezone}" if person.timezone else "times in each rotation's time zone"

    async def calendar(self, rotation: str) -> str | None:
        """The rotation's iCalendar feed, or None when there is no such rotation (case does not matter)."""
        schedule = self.view.find(rotation)
        if schedule is None:
            return None
        now = self.clock.now()
        rows = await self.view.overrides(self.db, *self.view.feed_window(schedule, now), [schedule.id])
        return self.view.calendar(schedule, rows, now)


def domain(rows: Iterable[OverrideRow], rotation: str) -> list[Override]:
    return [Override(r.rotation, r.person, r.starts_at, r.ends_at, r.created_at, r.id)
            for r in rows if r.rotation == rotation]


def when(at: datetime | None, tz: ZoneInfo, now: datetime) -> str:
    """`Mon 23 Nov 09:00 CET` in `tz`; the year too when it is not now's (the present's, not that of a moment asked
    about)."""
    if at is None:
        return "-"
    local = at.astimezone(tz)
    year = "" if local.year == now.astimezone(tz).year else f" {local.year}"
    return f"{local:%a} {local.day} {local:%b}{year} {local:%H:%M} {local.tzname()}"


# -- RFC 5545 ----------------------------------------------------------------------------------------

def ics_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def ics_text(value: str) -> str:
    """A TEXT value: backslash, semicolon and comma escaped, line breaks as `\\n`, and the control characters
    RFC 5545 does not allow in a value (all but tab) left out: a name with a BEL in it made the feed invalid."""
    value = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    value = value.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")
    return value.translate(_CONTROLS)


_CONTROLS = dict.fromkeys([*range(0x09), *range(0x0A, 0x20), 0x7F])


def fold(line: str) -> str:
    """Lines longer than 75 octets continue on the next line after CRLF and a space; characters stay whole."""
    if len(line.encode()) <= 75:
        return line
    parts, current, limit = [], b"", 75
    for ch in line:
        data = ch.encode()
        if len(current) + len(data) > limit:
            parts.append(current)
            current, limit = b"", 74  # the leading space counts
        current += data
    parts.append(current)
    return "\r\n ".join(p.decode() for p in parts)
