"""Covering shifts without anyone's consent: `/oncall take` (yourself) and `/override` (a manager, for anyone).

Both write an `overrides` row and its audit event in one transaction; the effective schedule
(`/oncall`, the feed) follows at once, and so do the handoff notices (replanned after the commit, as
after a swap; swaps, which need the counterpart's consent, are handlers/swaps.py). Whoever the cover
displaces (the people the schedule had on call in the stretch, other than the one covering and the one who
made it) gets a direct message, in the same transaction, naming who covers which part of their time.
In a rotation whose swaps need approval (`swap_approval`), `/oncall take` of anyone else's time is left to
people with the `manager` role (who could `/override` it anyway); others are pointed to `/swap`, which asks
for consent and approval. Times typed without an offset are wall times in the person's time zone; a length
(`8h`) is elapsed time, across a clock change too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from bot.chat import CommandEvent, Reply, echoed
from bot.clock import Clock
from bot.config import MANAGER, RESPONDER, Config, Person, Rotation, find_person, paged_rotations, unknown_person
from bot.durations import DurationTooLong, parse_duration
from bot.model import Actor
from bot.rotations import Override, Schedule, first_instant, on_call, shifts_between
from bot.view import and_list
from handlers.handoffs import load_overrides
from handlers.notify import queue_direct
from handlers.oncall import Oncall, domain, when
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import AuditEvent
from storage.models import Override as OverrideRow

log = logging.getLogger("chatops.overrides")

MAX_LENGTH = timedelta(days=90)
MIN_LENGTH = timedelta(minutes=1)  # shorter is a typing slip, and would still tell whoever it displaces
TAKE_USAGE = "/oncall take [ROTATION] [FROM] [UNTIL]"
OVERRIDE_USAGE = "/override ROTATION PERSON FROM UNTIL"
TIME_HELP = "times are `now`, `2026-12-24T18:00` or `2026-12-24 18:00` (your time zone), or for UNTIL a length such as `8h`"


class BadInput(ValueError):
    pass


@dataclass
class OverrideHandlers:
    db: Database
    audit: AuditLog
    config: Config
    clock: Clock
    view: Oncall
    changed: Callable[[list[str]], Awaitable[Any]] | None = None  # a cover was written: replan handoff notices
    rotations: dict[str, Rotation] = field(init=False)
    people: dict[str, Person] = field(init=False)

    def __post_init__(self) -> None:
        self.rotations = {r.id: r for r in self.config.rotations}
        self.people = {p.id: p for p in self.config.people}

    async def take(self, event: CommandEvent, person: Person, args: list[str]) -> Reply:
        """`/oncall take [ROTATION] [FROM] [UNTIL]`: cover a stretch yourself; by default the current shift."""
        mine = [s for s in self.view.schedules.values() if person.id in s.members]
        given = args  # (its first word, if no rotation, was read as a time)
        if args and self.view.find(args[0]) is not None:
            schedule, args = self.view.find(args[0]), args[1:]
        elif len(mine) == 1:
            schedule = mine[0]
        else:
            options = ", ".join(f"`{s.id}`" for s in mine) or "none"
            return Reply(f"Which rotation? Usage: `{TAKE_USAGE}` (yours: {options}).")
        assert schedule is not None
        if person.id not in schedule.members:
            return Reply(f"You are not a member of `{schedule.id}` (members: {', '.join(schedule.members)}); "
                         "a manager can still `/override` it.")
        now = self.clock.now()
        try:
            start, end = await self._window(schedule, person, args, now)
        except BadInput as exc:
            if args and args is given and str(exc) == f"{echoed(args[0])!r} is not a time.":  # nor a rotation
                return Reply(f"{echoed(args[0])!r} is neither a rotation nor a time. Known rotations: "
                             f"{self.view.known()}. Usage: `{TAKE_USAGE}`; {TIME_HELP}.")
            return Reply(f"{exc} Usage: `{TAKE_USAGE}`; {TIME_HELP}.")
        return await self._write(schedule, person, person, start, end, event.actor, "took the shift", take=True)

    async def override(self, event: CommandEvent, person: Person) -> Reply:
        """`/override ROTATION PERSON FROM UNTIL`, for people with the manager role."""
        args = list(event.args)
        if args and args[0].lower() == "cancel" and self.view.find(args[0]) is None:
            return await self.cancel(event, person, args[1:], anyone=True)
        if len(args) < 3:
            return Reply(f"Usage: `{OVERRIDE_USAGE}`; {TIME_HELP}.")
        schedule = self.view.find(args[0])
        if schedule is None:
            return Reply(self.view.unknown(args[0]))
        target = find_person(self.config.people, args[1])
        if target is None:
            return Reply(unknown_person(self.config.people, args[1]))
        if RESPONDER not in target.roles and schedule.id in paged_rotations(self.config):
            return Reply(f"{target.name} has no `responder` role, so they could not acknowledge the pages "
                         f"`{schedule.id}` gets; add it to their `roles` in app.yaml first, or put a responder on.")
        now = self.clock.now()
        try:
            start, end = await self._window(schedule, person, args[2:], now, need_both=True)
        except BadInput as exc:
            return Reply(f"{exc} Usage: `{OVERRIDE_USAGE}`; {TIME_HELP}.")
        # no reason: the note shows "override #N by PERSON" already
        return await self._write(schedule, target, person, start, end, event.actor, "")

    async def _window(self, schedule: Schedule, person: Person, args: list[str], now: datetime,
                      *, need_both: bool = False) -> tuple[datetime, datetime]:
        tz = ZoneInfo(person.timezone) if person.timezone else schedule.tz
        tokens = join_date_time(args)
        if len(tokens) > 2:  # (before "give both": `now 1h extra` gave both, and was told to)
            raise BadInput(f"Too many arguments: {echoed(' '.join(tokens[2:]))}.")
        if need_both and len(tokens) != 2:
            raise BadInput("Give both FROM and UNTIL.")
        if not tokens:  # the current shift, from now to its end
            rows = await self.view.overrides(self.db, now, now, [schedule.id])
            current = on_call(schedule, _domain(rows, schedule.id), now)
            if current.person is None or current.end is None:
                raise BadInput(f"`{schedule.id}` has no current shift to take.")
            return now, current.end
        start = _instant(tokens[0], tz, now)
        end = _until(tokens[1], tz, start, now) if len(tokens) == 2 else None
        if end is None:
            rows = await self.view.overrides(self.db, start, start, [schedule.id])
            shift = on_call(schedule, _domain(rows, schedule.id), start)
            if shift.person is None:  # before the rotation starts: no shift to take, so no end to take it to
                raise BadInput(f"Nobody is on call for `{schedule.id}` at {when(start, tz, now)} (the rotation "
                               "has not started then), so there is no shift to take; give UNTIL too.")
            end = shift.end
        if end <= start:
            # both in the hour the clocks skip: each is the moment of the skip, so they are one moment
            skipped = [t for t in tokens if _skipped(t, tz)]
            if skipped and _in_order(tokens, tz):
                one = len(skipped) == 1
                raise BadInput(f"{and_list([f'`{echoed(t)}`' for t in skipped])} {'does' if one else 'do'} not exist in "
                               f"{tz.key}: the clocks go forward over {'it' if one else 'them'} that night. Give times "
                               "before or after the jump.")
            raise BadInput("UNTIL must come after FROM.")
        if end <= now:
            raise BadInput(f"That stretch is over already (it ended {when(end, tz, now)}).")
        start = max(start, now)  # a FROM in the past starts now (and what is over does not count against the cap)
        if end - start > MAX_LENGTH:
            raise BadInput("An override can last 90 days at most.")
        if end - start < MIN_LENGTH:
            raise BadInput("A cover lasts a minute at least.")
        return start, end

    async def _write(self, schedule: Schedule, covering: Person, by: Person, start: datetime, end: datetime,
                     actor: Actor, reason: str, *, take: bool = False) -> Reply:
        now = self.clock.now()
        actor = Actor(actor.platform, actor.user_id, by.name, by.id)
        tz = ZoneInfo(by.timezone) if by.timezone else schedule.tz
        async with self.db.transaction() as session:
            await self.db.lock_for_transaction(session, schedule_lock(schedule.id))  # one change at a time (swaps)
            overrides = await load_overrides(session, self.view, start, end, [schedule.id])
            displaced = _displaced(schedule, overrides, covering.id, start, end)
            if take and all(s.person == covering.id for s in shifts_between(schedule, overrides, start, end)):
                # nothing would change: an override would only pin what the schedule already says
                return Reply(f"You are already on call for `{schedule.id}` from {when(start, tz, now)} until "
                             f"{when(end, tz, now)}; nothing changed.")
            rotation = self.rotations.get(schedule.id)
            approval = rotation.swap_approval if rotation is not None else None
            if take and displaced and approval and MANAGER not in by.roles:
                # A swap of this time would need the holder's consent and an approval; a take would skip both.
                names = [self.view.name(p) for p in displaced]
                await self.audit.append_many(session, [Entry(  # (as the dispatcher records a role refused)
                    "access.refused", actor, "command", "/oncall take", now,
                    {"what": "/oncall take", "needs": MANAGER, "roles": list(by.roles), "rotation": schedule.id,
                     "holders": sorted(displaced)})])
                whose = " and ".join(f"{n}'s" for n in names) + (" shift" if len(names) == 1 else " shifts")
                return Reply(f"Shifts in `{schedule.id}` change hands only with the approval of someone with the "
                             f"`{approval}` role, so you cannot take {whose} from {when(start, tz, now)} until "
                             f"{when(end, tz, now)} yourself. Ask {' or '.join(names)} to `/swap` it to you (you "
                             f"accept, then it is approved), or someone with the `{MANAGER}` role to `/override` it.")
            row = OverrideRow(rotation=schedule.id, person=covering.id, starts_at=start, ends_at=end, created_at=now,
                              created_by=by.id, reason=reason)
            session.add(row)
            await session.flush()
            await self.audit.append_many(session, [Entry(
                "oncall.override", actor, "rotation", schedule.id, now,
                {"override": row.id, "person": covering.id, "from": start.isoformat(), "until": end.isoformat(),
                 "reason": reason})])
            for person_id, stretches in displaced.items():
                if person_id != by.id:  # who made the override knows, and has the answer
                    self._tell_displaced(session, schedule, person_id, covering, by, stretches, now)
        if self.changed is not None:  # "X is now on call" at the cover's start (at once for `now`) and end
            try:
                await self.changed([schedule.id])
            except Exception:  # planning runs again within minutes; the cover itself is committed
                log.exception("replanning the handoffs of %s failed", schedule.id)
        undo = f"/oncall cancel {row.id}" if take else f"/override cancel {row.id}"
        return Reply(f"{covering.name} is on call for `{schedule.id}` from {when(start, tz, now)} until "
                     f"{when(end, tz, now)} ({tz.key}). Override #{row.id}: `{undo}` undoes it.", ephemeral=False)

    async def cancel_own(self, event: CommandEvent, person: Person, args: list[str]) -> Reply:
        """`/oncall cancel ID`: an override you made that puts you on call (your `/oncall take`)."""
        return await self.cancel(event, person, args, anyone=False)

    async def cancel(self, event: CommandEvent, person: Person, args: list[str], *, anyone: bool) -> Reply:
        """`/override cancel ID` (a manager: any override) and `/oncall cancel ID` (your own take):
        an override not started yet no longer counts (`cancelled_at`); one under way ends now, so the stretch it
        covered stays as it was. A swap's override is undone with the swap (`/swap undo`), whose messages say so."""
        usage = "/override cancel ID" if anyone else "/oncall cancel ID"
        if len(args) != 1 or not args[0].lstrip("#").isdigit() or len(args[0]) > 18:
            return Reply(f"Usage: `{usage}`, ID the override's number (`/oncall schedule ROTATION` shows them).")
        override_id = int(args[0].lstrip("#"))
        actor = Actor(event.actor.platform, event.actor.user_id, person.name, person.id)
        async with self.db.transaction() as session:
            row = await session.get(OverrideRow, override_id)
            if row is not None:  # one change at a time (swaps, overrides), then read again under the lock
                await self.db.lock_for_transaction(session, schedule_lock(row.rotation))
                await session.refresh(row)
            now = self.clock.now()  # (after the lock: a cancel that waited for another sees its end as past)
            # Without the manager role, only your own take: not an override you made for someone else while you had it.
            if row is None or (not anyone and (row.created_by != person.id or row.person != person.id)):
                mine = "" if anyone else " of yours"
                return Reply(f"There is no override #{override_id}{mine}."
                             + ("" if anyone else " A manager can `/override cancel` anyone's."))
            schedule = self.view.find(row.rotation)
            tz = ZoneInfo(person.timezone) if person.timezone else (schedule.tz if schedule else ZoneInfo("UTC"))
            swap = re.match(r"swap #(\d+)", row.reason or "")
            if swap:
                return Reply(f"Override #{override_id} is swap #{swap.group(1)}'s: the two in it can `/swap undo "
                             f"{swap.group(1)}` before it starts; once it started, `/override` the rest to someone.")
            if row.cancelled_at is not None or await _cancelled_early(session, row):
                return Reply(f"Override #{override_id} was cancelled already.")
            if row.ends_at <= now:
                return Reply(f"Override #{override_id} is over already (it ended {when(row.ends_at, tz, now)}).")
            started, until = row.starts_at <= now, row.ends_at
            back_from = now if started else row.starts_at
            # The stretches this override wins (a later one may cover some of its time): who has those after the
            # cancel is put back on call, and told.
            won = [] if schedule is None else [
                (max(s.start or back_from, back_from), min(s.end, until)) for s in shifts_between(
                    schedule, await load_overrides(session, self.view, back_from, until, [schedule.id]), back_from,
                    until) if s.override_id == override_id]
            if started:
                row.ends_at = now
            else:
                row.cancelled_at = now
            session.add(row)
            await self.audit.append_many(session, [Entry(
                "oncall.override_cancelled", actor, "rotation", row.rotation, now,
                {"override": override_id, "person": row.person, "from": row.starts_at.isoformat(),
                 "until": until.isoformat(), "ended_early": started})])
            covering = self.people.get(row.person)
            name = covering.name if covering is not None else row.person

            def stretch(z: ZoneInfo) -> str:
                return (f"from now until {when(until, z, now)}" if started else
                        f"from {when(row.starts_at, z, now)} until {when(until, z, now)}")

            if row.person != person.id:  # whoever covered is off call for it, told in their time zone
                queue_direct(session, row.person, f"{person.name} cancelled override #{override_id}: you are no longer "
                                                  f"on call for `{row.rotation}` {stretch(self._tz_of(row.person, tz))}.",
                             now,
                             event="oncall.override_cancelled")
            if schedule is not None and won:  # whoever it puts back on call (told they were off it when it was made)
                await session.flush()
                overrides = await load_overrides(session, self.view, back_from, until, [schedule.id])
                back: dict[str, list[tuple[datetime, datetime]]] = {}
                for a, b in won:
                    for who, spans in _displaced(schedule, overrides, row.person, a, b).items():
                        back.setdefault(who, []).extend(spans)
                for person_id, stretches in back.items():
                    if person_id != person.id:
                        self._tell_back(session, schedule, person_id, person, override_id, stretches, now)
        if self.changed is not None:  # the handoff notices follow the schedule as it is now
            try:
                await self.changed([row.rotation])
            except Exception:  # planning runs again within minutes; the cancel itself is committed
                log.exception("replanning the handoffs of %s failed", row.rotation)
        return Reply(f"Cancelled override #{override_id}: {name} is no longer on call for `{row.rotation}` "
                     f"{stretch(tz)}; `/oncall {row.rotation}` shows who is.", ephemeral=False)

    def _tz_of(self, person_id: str, fallback: ZoneInfo) -> ZoneInfo:
        """The time zone a person reads times in: their own, else `fallback` (the rotation's, or the asker's)."""
        person = self.people.get(person_id)
        return ZoneInfo(person.timezone) if person is not None and person.timezone else fallback

    def _spans(self, person_id: str, schedule: Schedule, stretches: list[tuple[datetime, datetime]], now: datetime,
               *, from_now: bool = False) -> str:
        """"from ... until ..." for each stretch, in the person's time zone (`from_now`: one under way "from now")."""
        tz = self._tz_of(person_id, schedule.tz)
        return " and ".join(f"from {'now' if from_now and a <= now else when(a, tz, now)} until {when(b, tz, now)}"
                            for a, b in stretches)

    def _tell_back(self, session: AsyncSession, schedule: Schedule, person_id: str, by: Person, override_id: int,
                   stretches: list[tuple[datetime, datetime]], now: datetime) -> None:
        """A direct message to someone a cancelled override puts back on call: which stretches, in their zone."""
        spans = self._spans(person_id, schedule, stretches, now, from_now=True)
        queue_direct(session, person_id, f"{by.name} cancelled override #{override_id}: you are on call for "
                                         f"`{schedule.id}` {spans} again.", now, event="oncall.override_cancelled")

    def _tell_displaced(self, session: AsyncSession, schedule: Schedule, person_id: str, covering: Person, by: Person,
                        stretches: list[tuple[datetime, datetime]], now: datetime) -> None:
        """A direct message to someone a cover takes off call: who covers which of their stretches, in their zone."""
        spans = self._spans(person_id, schedule, stretches, now)
        if by.id == covering.id:
            text = f"{covering.name} took over your `{schedule.id}` shift {spans}."
        else:
            text = f"{by.name} put {covering.name} on call for `{schedule.id}` instead of you {spans}."
        queue_direct(session, person_id, text, now, event="oncall.override")


def _displaced(schedule: Schedule, overrides: Sequence[Override], covering: str, start: datetime,
               end: datetime) -> dict[str, list[tuple[datetime, datetime]]]:
    """Who the schedule has on call within [start, end) other than `covering`, with their stretches there (back to
    back ones joined), in order."""
    out: dict[str, list[tuple[datetime, datetime]]] = {}
    for s in shifts_between(schedule, overrides, start, end):
        if s.person is None or s.person == covering:
            continue
        a, b = max(s.start or start, start), min(s.end, end)
        spans = out.setdefault(s.person, [])
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return out


async def _cancelled_early(session: AsyncSession, row: OverrideRow) -> bool:
    """Whether a cancel ended `row` early already (its end moved to then: it keeps no `cancelled_at`)."""
    events = (await session.execute(select(AuditEvent.details).where(
        AuditEvent.action == "oncall.override_cancelled", AuditEvent.subject_id == row.rotation))).scalars().all()
    return any((details or {}).get("override") == row.id for details in events)


def schedule_lock(rotation: str) -> str:
    """The lock that changes to a rotation's schedule (swaps, overrides) take, one at a time."""
    return f"swap:{rotation}"


def _domain(rows: dict[int, OverrideRow], rotation: str) -> list[Override]:
    return domain(rows.values(), rotation)


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?([+-]\d{2}:?\d{2}|Z)?$")  # (with its offset: 02:30+01:00, the second)


def join_date_time(args: Sequence[str]) -> list[str]:
    """`2026-12-24 18:00` (or `18:00:30`, or `02:30+01:00`) written as two words is one time."""
    out: list[str] = []
    for arg in args:
        if out and _DATE.match(out[-1]) and _TIME.match(arg):
            out[-1] = f"{out[-1]}T{arg if arg.index(':') == 2 else '0' + arg}"  # 9:00 -> 09:00, as ISO 8601 wants it
        else:
            out.append(arg)
    return out


def _instant(text: str, tz: ZoneInfo, now: datetime) -> datetime:
    """A time as typed, in UTC: a wall time in `tz` (the first of a repeated one; one the clock skips is the
    moment of the skip, as for rotations' handoffs) or one with its own offset."""
    if text.lower() == "now":
        return now.astimezone(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"{echoed(text)!r} is not a time.") from None
    if not 1970 <= value.year <= 9000:
        raise BadInput(f"{echoed(text)!r} is too far away: give a year from 1970 to 9000.")
    return first_instant(value, tz) if value.tzinfo is None else value.astimezone(UTC)


def _in_order(tokens: Sequence[str], tz: ZoneInfo) -> bool:
    """Whether FROM and UNTIL, as typed, are in order: UNTIL a length, or a time after FROM's on the wall clock of
    `tz` (two times in the hour the clocks skip are, yet become one moment; an UNTIL typed before FROM is not the
    skip's doing). One with an offset is read on that clock too."""
    if len(tokens) < 2:
        return True
    try:
        parse_duration(tokens[1])
        return True
    except (ValueError, DurationTooLong):
        pass
    try:
        start, end = datetime.fromisoformat(tokens[0]), datetime.fromisoformat(tokens[1])
    except ValueError:
        return False
    def wall(value: datetime) -> datetime:
        return value if value.tzinfo is None else value.astimezone(tz).replace(tzinfo=None)
    return wall(start) < wall(end)


def _skipped(text: str, tz: ZoneInfo) -> bool:
    """Whether `text` is a wall time (no offset) the clock in `tz` skips (the night it goes forward)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return False
    if value.tzinfo is not None:
        return False
    return value.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) != value


def _until(text: str, tz: ZoneInfo, start: datetime, now: datetime) -> datetime:
    """An end: a length from `start` (elapsed time: `8h` across a clock change is still 8 hours) or a time (`now`
    the present, not `start`)."""
    try:
        length = parse_duration(text)
    except DurationTooLong:
        raise BadInput(f"{echoed(text)!r} from then is too far away: give a length of 90 days at most.") from None
    except ValueError:
        return _instant(text, tz, now)
    try:
        return start.astimezone(UTC) + length
    except OverflowError:
        raise BadInput(f"{echoed(text)!r} from then is too far away: give a length of 90 days at most.") from None
