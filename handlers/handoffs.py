"""Handoff notices: "X is now on call" in the rotation's channel, and a direct reminder to X beforehand.

A periodic job (`plan`, every 10 minutes and at start) looks at each rotation's effective schedule
(overrides included) for the next 48 hours (longer when a `reminder` comes earlier than that: its lead
plus 10 minutes, so a reminder is planned before it falls due) and, for every handoff in it, adds two
durable timers with unique keys, so planning twice (or on two replicas, or after a restart) adds nothing new:

- `handoff.notice` at the handoff, key `handoff:ROTATION:START`, when the rotation has a `channel`;
- `handoff.reminder` at START - `reminder` (default 1h), key `reminder:ROTATION:START:PERSON`, when
  `reminder` is not `0s`.

A handoff is an instant at which the person on call changes (a rotation's handoff, or the edge of an
override such as a taken swap); a shift handed to the same person is none. The timers' handlers run
inside the timer's transaction and compute the schedule again when they fire, so a swap taken after
planning is respected: the notice names whoever is on call then, and says nothing when the handoff
no longer exists; a reminder planned for someone who no longer takes over is dropped, and the next
planning (which a taken swap triggers at once) reminds the new person. A dropped reminder gives up its key:
whoever it was for may be put back on call before the handoff (a swap undone, a manager's override), and
then the next planning reminds them again (at once when it is due already). A reminder sent keeps its key,
so nobody is reminded twice of one handoff. A notice fired after the
incoming stretch has ended (the bot was down throughout) is dropped as stale. Back from an outage longer
than the horizon, the first planning of the process looks back to the last notice it had planned (at most
7 days, or a shift), so the stretch under way is announced; a bot that never planned a notice for the
rotation announces nothing that began before it started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import Clock
from bot.config import MANAGER, Config, Person, Rotation
from bot.model import Actor
from bot.rotations import Override, Schedule, on_call, shifts_between
from handlers.notify import queue_direct, queue_notice
from handlers.oncall import Oncall, domain, when
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import Timer
from storage.queries import active_overrides

log = logging.getLogger("chatops.handoffs")

NOTICE, REMINDER = "handoff.notice", "handoff.reminder"
PLAN_EVERY = timedelta(minutes=10)
HORIZON = timedelta(hours=48)
GRACE = PLAN_EVERY  # a handoff that began since the last planning (a swap taken minutes before) still gets its notice
CATCH_UP = timedelta(days=7)  # after a long outage, planning looks back this far (or a shift) for unannounced handoffs
_TICK = timedelta(microseconds=1)


async def load_overrides(session: AsyncSession, view: Oncall, start: datetime, end: datetime,
                         rotations: Sequence[str]) -> list[Override]:
    """The active overrides the schedule over [start, end) depends on, read in `session` (as `Oncall.overrides`
    does in a session of its own: padded by a shift and a day, widened until every override has room)."""
    chosen = [r for r in rotations if r in view.schedules]
    pad = max((view.schedules[r].shift for r in chosen), default=timedelta(0)) + timedelta(days=1)
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    lo, hi = start - pad, end + pad
    while True:
        rows = await active_overrides(session, start=lo, end=hi, rotations=chosen)
        need_lo = min([start] + [r.starts_at for r in rows]) - pad
        need_hi = max([end] + [r.ends_at for r in rows]) + pad
        if need_lo >= lo and need_hi <= hi:
            return [o for r in chosen for o in domain(rows, r)]
        lo, hi = min(lo, need_lo), max(hi, need_hi)


def handoffs_between(schedule: Schedule, overrides: Sequence[Override], start: datetime,
                     end: datetime) -> list[tuple[datetime, str]]:
    """(instant, incoming person) for every change of the person on call within [start, end)."""
    stretches = shifts_between(schedule, overrides, start, end)
    out: list[tuple[datetime, str]] = []
    for i, s in enumerate(stretches):
        if s.start is None or s.person is None or not start <= s.start < end:
            continue
        before = stretches[i - 1].person if i > 0 else on_call(schedule, overrides, s.start - _TICK).person
        if before != s.person:
            out.append((s.start, s.person))
    return out


@dataclass(frozen=True)
class Incoming:
    """Who takes over at a handoff, until when (their whole run, across back-to-back stretches), who follows."""

    person: str
    until: datetime
    following: str | None


async def incoming_at(session: AsyncSession, view: Oncall, schedule: Schedule, at: datetime) -> Incoming | None:
    """The handoff at `at` as the schedule is now; None when nobody takes over at `at` any more."""
    span = schedule.shift * 2
    for _ in range(8):
        overrides = await load_overrides(session, view, at - _TICK, at + span, [schedule.id])
        before = on_call(schedule, overrides, at - _TICK)
        stretches = shifts_between(schedule, overrides, at, at + span)
        first = stretches[0]
        if first.person is None or first.person == before.person or first.start != at:
            return None
        until, following = first.end, None
        for s in stretches[1:]:
            if s.person != first.person:
                following = s.person
                break
            until = s.end
        if following is not None:
            return Incoming(first.person, until, following)
        span *= 2
    # Nobody else follows (a rotation of one): until the end of the shift, as /oncall says, not of the years scanned.
    return Incoming(first.person, first.end, None)


@dataclass
class Handoffs:
    db: Database
    audit: AuditLog
    config: Config
    clock: Clock
    view: Oncall
    after_commit: Callable[[], None] | None = None  # wake the timer tick (and the outbox) after planning
    rotations: dict[str, Rotation] = field(init=False)
    people: dict[str, Person] = field(init=False)
    _caught_up: set[str] = field(init=False, default_factory=set)  # rotations planned since this process started
    # One planning at a time: the job's first run and a replan (a cover taken, a swap) at start were both "first",
    # and the later to commit looked back as far as the first (a notice dropped meanwhile came back).
    _planning: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _covers_checked: bool = field(init=False, default=False)  # the first planning warns of covers by people gone

    def __post_init__(self) -> None:
        self.rotations = {r.id: r for r in self.config.rotations}
        self.people = {p.id: p for p in self.config.people}

    def register(self, timers: TimerService) -> None:
        """Timer kinds and the planning job on the bot's `TimerService`."""
        timers.handler(NOTICE)(self.notice)
        timers.handler(REMINDER)(self.reminder)
        timers.add_job(self.plan, seconds=PLAN_EVERY.total_seconds(), name="plan-handoffs")

    async def plan(self, rotations: Iterable[str] | None = None) -> int:
        """Add the notice and reminder timers of every handoff in the next 48 hours (or the rotation's reminder
        lead plus a planning interval, when longer); how many were new."""
        async with self._planning:
            if not self._covers_checked:
                await self._warn_gone_covers()
                self._covers_checked = True
            return await self._plan(rotations)

    async def _warn_gone_covers(self) -> None:
        """A WARNING for each override (a taken swap's cover, a manager's /override) under way or to come that puts
        someone no longer in app.yaml on call: app.yaml changed under it, and for its stretch the rotation pages
        nobody and its handoff notice can only say so. Once per process, at its first planning (at start)."""
        now = self.clock.now()
        async with self.db.sessions() as session:
            rows = await active_overrides(session, start=now, end=datetime(9999, 1, 1, tzinfo=UTC),
                                          rotations=list(self.rotations))
        for row in rows:
            if row.person in self.people:
                continue
            schedule = self.view.schedules[row.rotation]
            start, end = (t.astimezone(schedule.tz).isoformat(timespec="minutes")
                          for t in (max(row.starts_at, now), row.ends_at))
            why = f" ({row.reason})" if row.reason else ""
            log.warning("override #%s%s puts %s, who is no longer in app.yaml, on call for %s from %s until %s: "
                        "nobody is paged for %s then. Put someone else on for that stretch: /override %s PERSON "
                        "%s %s", row.id, why, row.person, row.rotation, start, end, row.rotation, row.rotation, start,
                        end)

    async def _plan(self, rotations: Iterable[str] | None) -> int:
        now = self.clock.now()
        wanted = set(rotations) if rotations is not None else None
        added = 0
        async with self.db.transaction() as session:
            for rot in self.config.rotations:
                if wanted is not None and rot.id not in wanted:
                    continue
                notices, reminders = rot.channel is not None, rot.reminder > timedelta(0)
                if not (notices or reminders):
                    continue
                schedule = self.view.schedules[rot.id]
                start, end = now - GRACE, now + max(HORIZON, rot.reminder + PLAN_EVERY)
                if notices and rot.id not in self._caught_up:
                    # The first planning of this process: back from an outage longer than the horizon, plan from
                    # the last handoff planned before it (later runs look back only GRACE: a handoff moved in
                    # app.yaml meanwhile is not announced days late).
                    last = (await session.execute(select(func.max(timer_store.TIMERS.c.due_at)).where(
                        timer_store.TIMERS.c.kind == NOTICE, timer_store.TIMERS.c.subject == rot.id))).scalar()
                    if last is not None and last < start:
                        start = max(last, now - max(CATCH_UP, schedule.shift))
                overrides = await load_overrides(session, self.view, start, end, [rot.id])
                for at, person in handoffs_between(schedule, overrides, start, end):
                    payload = {"rotation": rot.id, "at": at.isoformat(), "person": person}
                    if notices:
                        new = await timer_store.schedule(session, NOTICE, rot.id, at, now, payload=payload,
                                                         key=f"handoff:{rot.id}:{at.isoformat()}")
                        added += new is not None
                    if reminders and at > now and person in self.people:  # (nobody to remind: see notice)
                        new = await timer_store.schedule(session, REMINDER, rot.id, max(at - rot.reminder, now), now,
                                                         payload=payload,
                                                         key=f"reminder:{rot.id}:{at.isoformat()}:{person}")
                        added += new is not None
        self._caught_up.update(r.id for r in self.config.rotations if wanted is None or r.id in wanted)
        if added:
            log.info("planned %d handoff notice(s) and reminder(s)", added)
            if self.after_commit is not None:
                self.after_commit()
        return added

    async def notice(self, session: AsyncSession, timer: Timer, now: datetime) -> None:
        """`handoff.notice`: "X is now on call for ROTATION until ..., next is Y" in the rotation's channel."""
        rot, schedule, at = self._timer(timer)
        if rot is None or schedule is None or rot.channel is None:
            log.info("handoff notice %s dropped: the rotation or its channel is gone from app.yaml", timer.key)
            return
        incoming = await incoming_at(session, self.view, schedule, at)
        if incoming is None:
            log.info("handoff notice %s dropped: nobody takes over %s at %s any more", timer.key, rot.id, at)
            return
        if now >= incoming.until:
            log.warning("handoff notice %s dropped: %s's stretch ended before it could be sent", timer.key,
                        incoming.person)
            return
        tz = schedule.tz
        until = when(incoming.until, tz, now)
        gone = incoming.person not in self.people
        if gone:  # an override (a swap's cover) outlived their removal: the rotation reaches nobody meanwhile
            log.warning("handoff notice %s: %s, whom an override puts on call for %s until %s, is no longer in "
                        "app.yaml; nobody is paged for %s then", timer.key, incoming.person, rot.id,
                        incoming.until.isoformat(), rot.id)
            then = f"; {self._named(incoming.following)} is next" if incoming.following else ""
            text = (f"{incoming.person} is no longer in app.yaml, yet an override puts them on call for `{rot.id}` "
                    f"until {until}, so nobody is paged for `{rot.id}` until then{then}. Someone with the "
                    f"`{MANAGER}` role can `/override {rot.id}` that stretch to someone else.")
        else:
            text = f"{self.name(incoming.person)} is now on call for `{rot.id}` until {until}"
            text += f", next is {self._named(incoming.following)}." if incoming.following else "."
        queue_notice(session, rot.channel, text, now, event=NOTICE)
        await self.audit.append_many(session, [Entry(
            "oncall.handoff", Actor.system(), "rotation", rot.id, now,
            {"person": incoming.person, "at": at.isoformat(), "until": incoming.until.isoformat(),
             "next": incoming.following, "channel": rot.channel, "planned_for": timer.payload.get("person"),
             **({"removed": True} if gone else {})})])

    async def reminder(self, session: AsyncSession, timer: Timer, now: datetime) -> None:
        """`handoff.reminder`: "You are on call for ROTATION from ... until ..." to the incoming person."""
        rot, schedule, at = self._timer(timer)
        if rot is None or schedule is None:
            return
        incoming = await incoming_at(session, self.view, schedule, at)
        planned = timer.payload.get("person")
        if incoming is None or incoming.person != planned:
            log.info("handoff reminder %s dropped: %s no longer takes over %s then", timer.key, planned, rot.id)
            # Free the key, so that planning can remind them if they are put back on before the handoff.
            await session.execute(update(timer_store.TIMERS).where(timer_store.TIMERS.c.id == timer.id)
                                  .values(key=None))
            return
        if now >= incoming.until:
            return
        if incoming.person not in self.people:  # no longer in app.yaml: there is no chat to remind them in
            log.info("handoff reminder %s dropped: %s is no longer in app.yaml", timer.key, incoming.person)
            return
        person = self.people.get(incoming.person)
        tz = ZoneInfo(person.timezone) if person is not None and person.timezone else schedule.tz
        text = (f"You are on call for `{rot.id}` from {when(at, tz, now)} until {when(incoming.until, tz, now)}"
                + (f"; then {self.name(incoming.following)}." if incoming.following else "."))
        queue_direct(session, incoming.person, text, now, event=REMINDER)
        await self.audit.append_many(session, [Entry(
            "oncall.handoff_reminder", Actor.system(), "rotation", rot.id, now,
            {"person": incoming.person, "at": at.isoformat(), "until": incoming.until.isoformat()})])

    def _timer(self, timer: Timer) -> tuple[Rotation | None, Schedule | None, datetime]:
        rid = str(timer.payload.get("rotation", timer.subject))
        at = datetime.fromisoformat(str(timer.payload["at"]))
        return self.rotations.get(rid), self.view.schedules.get(rid), at

    def name(self, person: str | None) -> str:
        return self.view.name(person)

    def _named(self, person: str) -> str:
        """Who follows, by name; one an override puts on though app.yaml no longer lists them, said so."""
        return self.name(person) if person in self.people else f"{person} (no longer in app.yaml)"
