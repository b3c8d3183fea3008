"""Escalation: each incident with a policy walks its snapshot's steps on durable timers.

When an incident opens (intake), an `Escalation` row and a timer due at once are
written in the same transaction. Each `escalation.step` timer, when it fires
(in its own transaction, exactly once: handlers/timers.py):
- does nothing unless it is still the escalation's current timer and the
  incident still wants it (triggered; or anything but resolved for an Escalate
  click). Acknowledge and resolve therefore stop an escalation without touching
  timers, and a click racing a step is settled by the incident's row lock;
- after hours, for an incident below `paging.after_hours_min_severity`, moves
  itself to the next business morning;
- otherwise queues one `page` outbox row per person to notify (the outbox
  worker delivers it after the commit, see handlers/paging.py) and a line in the
  channel when the step names one, and schedules the next step after `wait`.
After the last step's wait, the escalation is `exhausted` and the thread says so.

A step that fires more than a minute after its due time (the bot was down, or
behind) says so where people read it: its page, its thread line and the card
name the due time, how late it is and why (late_words), and its audit event
keeps the due time and the lateness whatever they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Config, Person
from bot.escalation import (escalation_mark, in_business_hours, next_business_start, pages_after_hours, read_mark, snapshot,
                            step_at, total_steps)
from bot.incidents import ACKNOWLEDGED, RESOLVED
from bot.model import Actor
from bot.rotations import Schedule, on_call
from bot.view import ESCALATION_DONE, clock, span
from handlers.notify import UNACKNOWLEDGED, notice_row, page_redraw_row, queue_redraw, queue_thread_line
from handlers.oncall import domain
from handlers.timers import LATE_AFTER, TimerService
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.models import AuditEvent, Escalation, Incident, OutboxItem, Timer
from storage.queries import UNCONFIRMED, active_overrides

log = logging.getLogger("chatops.escalation")
STEP = "escalation.step"
# The end of a note whose next step was promised for the business morning (next_words): who, at when, and why
_MORNING = re.compile(r" at [^()]*? if nobody acknowledges \(\w+ incidents page nobody after hours\)\.$")


def _morning_promise(note: str, names: set[str]) -> int | None:
    """Where a note's promise of the next step for the business morning begins (next_words: "Carol and Dave at Wed
    09:00 CET if nobody acknowledges (medium incidents page nobody after hours)."), or None. Its start is found by
    who it names (people's names, which may hold ". ", as "J. R. Smith" does), after the note's first sentence or at
    its start."""
    end = _MORNING.search(note)
    if end is None:
        return None
    known = names | {"the channel", "The channel", "The next step"}
    for start in [0, *(i + 2 for i in range(len(note)) if note.startswith(". ", i))]:
        if start < end.start() and all(part in known for part in note[start:end.start()].split(" and ")):
            return start
    return None
ESCALATIONS = Escalation.__table__
SYSTEM = Actor("system", "escalation", "Escalation")
NO_LONGER = "no longer in app.yaml"  # a rotation, person or channel a running escalation's snapshot still names
# A page waiting because a platform refused the bot's token (handlers/page_lanes.py, PageLanes._page_waits): in its
# outbox row's details, how often it found it refused. The escalation keeps its pace meanwhile, so a policy can run
# out while its pages still wait: it says so rather than that nobody acknowledged them.
TOKEN_REFUSED = "token_refused"


@dataclass(frozen=True)
class Targets:
    people: list[Person]
    channel: str | None  # (None when the step's channel is no longer in app.yaml: see gone_channel)
    rotation: str | None
    missing: str = ""  # why the rotation named nobody: nobody is on call in it
    # What the step names (in the policy as the incident keeps it) that app.yaml no longer has: nobody can be paged or
    # posted to there, and the step says so rather than paging nobody in silence.
    gone_rotation: str = ""
    gone_people: tuple[str, ...] = ()
    gone_channel: str = ""
    # Who an override (a taken swap, a manager's /override) puts on call for the rotation though app.yaml no longer
    # lists them (the cover outlived their removal), and the override's id: the rotation reaches nobody.
    gone_cover: str = ""
    gone_cover_override: int | None = None
    # An acknowledged incident's step runs because someone asked for help: whoever acknowledged it is not paged to
    # help with it (their name, when the step named them).
    acknowledger: str = ""
    # A step someone's Escalate reached: whoever pressed it is asking others for help, and is not paged by their own
    # press (their name, when the step named them and they are not the acknowledger).
    asker: str = ""

    def without_acknowledger(self, person_id: str, name: str) -> "Targets":
        """These targets less the person who acknowledged the incident, if they are one."""
        if all(p.id != person_id for p in self.people):
            return self
        return replace(self, people=[p for p in self.people if p.id != person_id], acknowledger=name)

    def without_asker(self, person_id: str, name: str) -> "Targets":
        """These targets less the person who pressed Escalate, if they are one."""
        if all(p.id != person_id for p in self.people):
            return self
        return replace(self, people=[p for p in self.people if p.id != person_id], asker=name)

    def removed(self) -> dict[str, Any]:
        """For the step's audit event: what it names that is no longer in app.yaml (empty: nothing)."""
        gone: dict[str, Any] = {}
        if self.gone_rotation:
            gone["rotation"] = self.gone_rotation
        if self.gone_people:
            gone["people"] = list(self.gone_people)
        if self.gone_channel:
            gone["channel"] = self.gone_channel
        if self.gone_cover:
            gone["cover"] = {"person": self.gone_cover, "rotation": self.rotation, "override": self.gone_cover_override}
        return gone

    def why(self) -> str:
        """Why the step reaches fewer than it names, in words ("" when it reaches them all): "nobody is on call for
        primary now"; "bob is no longer in app.yaml" when nobody else is notified; "skipped bob, no longer in
        app.yaml" when the others are; "carol, on call for primary through a swap or an override, is no longer in
        app.yaml"."""
        reasons = [f"rotation {self.gone_rotation} is {NO_LONGER}"] if self.gone_rotation else []
        if self.gone_cover:
            reasons.append(f"{self.gone_cover}, on call for {self.rotation} through a swap or an override, is {NO_LONGER}")
        if self.missing:
            reasons.append(self.missing)
        if self.gone_people:
            names = " and ".join(self.gone_people)
            if self.people or self.channel:
                reasons.append(f"skipped {names}, {NO_LONGER}")
            else:
                reasons.append(f"{names} {'is' if len(self.gone_people) == 1 else 'are'} {NO_LONGER}")
        if self.gone_channel:
            reasons.append(f"channel {self.gone_channel} is {NO_LONGER}")
        if self.acknowledger:
            reasons.append(f"skipped {self.acknowledger}, who acknowledged it" if self.people or self.channel else
                           f"{self.acknowledger} acknowledged it, and is not paged to help with it")
        if self.asker:
            reasons.append(f"skipped {self.asker}, who asked for help" if self.people or self.channel else
                           f"{self.asker} asked for help, and is not paged for it")
        return "; ".join(reasons)


class Escalations:
    def __init__(self, *, audit: AuditLog, config: Config):
        self.audit, self.config = audit, config
        self.policies = {p.id: p for p in config.escalation_policies}
        self.people = {p.id: p for p in config.people}
        self.channels = {c.id for c in config.channels}
        self.schedules = {r.id: Schedule.from_config(r, default_tz=config.timezone) for r in config.rotations}
        self.timers: TimerService | None = None  # asked why a step runs late

    def register(self, timers: TimerService) -> None:
        self.timers = timers
        timers.handler(STEP)(self.fire)

    def _lateness(self, timer: Timer, now: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(what the step's audit event keeps of its timing, always; what its words say of it when it is late: its
        due time, by how much, why (see late_words))."""
        by = max(0, int((now - timer.due_at).total_seconds()))
        timing: dict[str, Any] = {"due_at": timer.due_at.isoformat(), "late_seconds": by}
        if self.timers is not None:
            why = self.timers.lateness(timer.due_at, now)
        else:
            why = "the bot was running behind" if now - timer.due_at > LATE_AFTER else None
        if why is None:
            return timing, None
        timing["late_because"] = why
        return timing, {"due_at": timing["due_at"], "by": by, "why": why}

    # -- starting (inside intake's transaction) -------------------------------------------------

    def start_all(self, conn: Connection, incidents: list[tuple[int, str]], now: datetime) -> None:
        """An escalation and its first step (due now) for each new (incident id, policy id)."""
        wanted = [(iid, self.policies[pid]) for iid, pid in incidents if pid in self.policies]
        if not wanted:
            return
        ids = timer_store.schedule_many(conn, [timer_store.timer_row(STEP, iid, now, now, payload={"step": 0})
                                               for iid, _ in wanted])
        conn.execute(ESCALATIONS.insert(), [
            {"incident_id": iid, "policy": policy.id, "snapshot": snapshot(policy), "state": "active", "next_step": 0,
             "timer_id": timer_id, "note": "", "run": 0, "started_at": now, "updated_at": now}
            for (iid, policy), timer_id in zip(wanted, ids)])

    def reconsider(self, conn: Connection, incident_ids: list[int], now: datetime) -> list[Entry]:
        """Incidents whose severity just rose (intake, in its transaction): a step deferred to the business
        morning because the incident was below `paging.after_hours_min_severity` fires now if the incident
        pages after hours at its new severity. A fresh timer, due now, supersedes the deferred one (which is
        cancelled); the step then pages as any other. The audit events saying so (the caller appends them)."""
        if not incident_ids:
            return []
        timers, incidents = timer_store.TIMERS, Incident.__table__
        minimum = self.config.paging.after_hours_min_severity
        rows = conn.execute(
            select(ESCALATIONS.c.incident_id, ESCALATIONS.c.next_step, timers.c.id, timers.c.payload,
                   timers.c.due_at, incidents.c.severity, ESCALATIONS.c.note)
            .join(timers, timers.c.id == ESCALATIONS.c.timer_id)
            .join(incidents, incidents.c.id == ESCALATIONS.c.incident_id)
            .where(ESCALATIONS.c.incident_id.in_(incident_ids), ESCALATIONS.c.state == "active",
                   timers.c.status == timer_store.PENDING, timers.c.due_at > now)).all()
        due = [(iid, step, old, was, severity) for iid, step, old, payload, was, severity, _ in rows
               if (payload or {}).get("deferred") and pages_after_hours(severity, minimum)]
        # Not deferred yet, but promised for the morning (next_words: the step falls due after hours, when the old
        # severity paged nobody): at the new one it pages when it falls due, and the card says so. (Who is on call
        # then is not looked up here, in intake's transaction: "the next step".)
        for iid, _, _, payload, was, severity, note in rows:
            start = _morning_promise(note or "", {p.name for p in self.config.people})
            if start is not None and not (payload or {}).get("deferred") and pages_after_hours(severity, minimum):
                words = f"The next step in {span(was - now)} if nobody acknowledges."
                conn.execute(ESCALATIONS.update().where(ESCALATIONS.c.incident_id == iid)
                             .values(note=note[:start] + words, updated_at=now))
        if not due:
            return []
        ids = timer_store.schedule_many(conn, [timer_store.timer_row(STEP, iid, now, now, payload={"step": step})
                                               for iid, step, *_ in due])
        for (iid, *_), timer_id in zip(due, ids):
            conn.execute(ESCALATIONS.update().where(ESCALATIONS.c.incident_id == iid)
                         .values(timer_id=timer_id, note="", updated_at=now))
        conn.execute(timers.update().where(timers.c.id.in_([old for _, _, old, *_ in due]))
                     .values(status=timer_store.CANCELLED, fired_at=now))
        return [Entry("escalation.resumed", SYSTEM, "incident", str(iid), now,
                      {"step": step + 1, "severity": severity, "was_due": was.isoformat()}, iid)
                for iid, step, _, was, severity in due]

    # -- what people do (inside incident_actions.perform's transaction) -------------------------

    async def stop(self, session: AsyncSession, incident_id: int, now: datetime) -> None:
        """Acknowledged or resolved: no further steps (the current timer will find it stopped)."""
        esc = await session.get(Escalation, incident_id)
        if esc is not None and esc.state in ("active", "exhausted"):  # (exhausted: its "nobody acknowledged" goes)
            esc.state, esc.note, esc.updated_at = "stopped", "", now
            session.add(esc)

    async def restart(self, session: AsyncSession, incident_id: int, now: datetime) -> None:
        """Reopened: the policy starts again from its first step, now, as its next run; or starts, if it never did
        (the incident was resolved while a maintenance window muted it), unless the incident is muted still."""
        esc = await session.get(Escalation, incident_id)
        if esc is None:
            incident = await session.get(Incident, incident_id)
            policy = self.policies.get(incident.escalation or "") if incident is not None else None
            if incident is not None and policy is not None and not incident.silenced:
                await self._begin(session, incident_id, policy, now, manual=False)
            return
        esc.timer_id = await timer_store.schedule(session, STEP, incident_id, now, now, payload={"step": 0})
        esc.state, esc.next_step, esc.note, esc.updated_at = "active", 0, "", now
        esc.run += 1
        session.add(esc)

    @staticmethod
    async def _begin(session: AsyncSession, incident_id: int, policy: Any, now: datetime, *,
                     manual: bool) -> Escalation:
        """An escalation that never started, from its first step, now (`manual`: an Escalate asked for it)."""
        timer_id = await timer_store.schedule(session, STEP, incident_id, now, now,
                                              payload={"step": 0, **({"manual": True} if manual else {})})
        esc = Escalation(incident_id=incident_id, policy=policy.id, snapshot=snapshot(policy), state="active",
                         next_step=0, timer_id=timer_id, note="", run=0, started_at=now, updated_at=now)
        session.add(esc)
        return esc

    async def escalate_now(self, session: AsyncSession, incident: Incident, now: datetime, *,
                           seen: str = "") -> tuple[bool, str]:
        """The Escalate button: the next step fires now (once, however many clicks). (changed, words).

        `seen`: where the escalation stood when the pressed message was drawn (its button carries
        bot.escalation.escalation_mark). If a step fired since, by its timer or by another press, or the incident
        was reopened, this press is answered and changes nothing (as GoAlert does): two people pressing at once,
        or one pressing twice, escalate once. A button drawn before marks existed carries none: no check."""
        if incident.silenced:  # a maintenance window muted it: its escalation does not run (nor start) meanwhile
            return False, await self._silenced(session, incident)
        esc = await session.get(Escalation, incident.id)
        policy = self.policies.get(incident.escalation or "")
        if esc is None and policy is not None:
            # Its policy never started (acknowledged while a maintenance window muted it): from its first step, now
            assert incident.id is not None
            esc = await self._begin(session, incident.id, policy, now, manual=True)
            return True, f"Escalating #{incident.id} to step 1 of {total_steps(esc.snapshot)} now."
        if esc is None:  # nothing to move on: no thread line, no audit event, however many presses
            return False, (f"#{incident.id} has no escalation policy; page someone with "
                           f"`/incident page {incident.id} PERSON`.")
        total = total_steps(esc.snapshot)
        if esc.next_step >= total:
            return False, (f"#{incident.id} has been through every step of escalation policy `{esc.policy}`; "
                           f"page someone directly with `/incident page {incident.id} PERSON`.")
        if esc.state == "active" and esc.timer_id is not None:
            current = await session.get(Timer, esc.timer_id)
            if current is not None and current.status == "pending" and current.payload.get("manual"):
                return False, f"#{incident.id} is already escalating to step {esc.next_step + 1}."
        mark = read_mark(seen)
        if seen and (mark is None or mark[1] > esc.run or (mark[1] == esc.run and mark[0] > esc.next_step)):
            # (no button the bot drew says so: a step or a run still to come, or no mark at all)
            return False, "This button is not valid: it was not made by this bot, or it is too old."
        if mark is not None and mark != (esc.next_step, esc.run):
            how = (f"escalated since this message was drawn: step {esc.next_step} of {total} has paged"
                   if mark[1] == esc.run and esc.next_step > mark[0] else
                   "was reopened since this message was drawn, and its escalation started again")
            return False, (f"#{incident.id} {how}. To go further, press Escalate on its current message, or "
                           f"type `/incident escalate {incident.id}`.")
        esc.timer_id = await timer_store.schedule(session, STEP, incident.id, now, now,
                                                  payload={"step": esc.next_step, "manual": True})
        esc.state, esc.updated_at = "active", now
        session.add(esc)
        return True, f"Escalating #{incident.id} to step {esc.next_step + 1} of {total} now."

    @staticmethod
    async def _silenced(session: AsyncSession, incident: Incident) -> str:
        """Escalate on a silenced incident, in words: which silences muted it (its alerts' `alert.silenced` events
        name them) and what to do instead."""
        rows = (await session.execute(
            select(AuditEvent.details).where(AuditEvent.incident_id == incident.id,
                                             AuditEvent.action == "alert.silenced")
            .order_by(AuditEvent.seq.desc()).limit(50))).scalars().all()
        names: list[str] = []
        for details in rows:
            silence, comment = (details or {}).get("silence"), (details or {}).get("comment") or ""
            name = f"`{silence}`" if silence else ""
            if comment:
                name = f"{name} ({comment})".strip()
            if name and name not in names:
                names.append(name)
        by = (f"maintenance window {names[0]}" if len(names) == 1 else
              f"maintenance windows {', '.join(names)}" if names else "a maintenance window")
        page = f"`/incident page {incident.id} PERSON`"
        if not incident.escalation:
            return f"#{incident.id} is silenced by {by}, and it has no escalation policy; page someone with {page}."
        # (short enough for a Telegram toast, which shows 200 characters)
        return (f"#{incident.id} is silenced by {by}, so its escalation policy `{incident.escalation}` pages nobody; "
                f"page someone with {page}.")

    async def move_on(self, session: AsyncSession, incident_id: int, step: int, now: datetime, *,
                      manual: bool = False, reaches: Callable[[str], bool] | None = None) -> bool:
        """A page of `step` (1-based) could not be delivered: fire the next step now instead of after its wait,
        unless another page of that step got through or is still on its way, the escalation has moved since, or
        the step before also reached nobody: two steps in a row that page nobody look like a platform that is
        down or off, and running through the whole policy in seconds would leave nothing for once it is back.
        Only this run's pages count (a reopen starts a new run). True when it moved.

        `manual`: the step was reached by a person's Escalate. Someone asked for help now, so the next step is
        theirs too (it pages even if the incident is acknowledged, whose own timer pages nobody more), and it
        moves on whatever the step before did: for an acknowledged incident the policy's pace is no fallback,
        as its timer stops the escalation.

        A step that mentioned a channel its platform can reach (`reaches(channel id)`: on, its token not refused) keeps
        its wait: the channel's people were asked, and promised it.

        On PostgreSQL the pages of one incident decide one at a time (a transaction lock): two failing at once each
        saw the other still on its way, uncommitted, and neither moved on; the second now waits for the first's
        commit and sees both."""
        if session.bind.dialect.name == "postgresql":  # (per schema, as Database.lock_for_transaction)
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || :n, 0))"),
                                  {"n": f":escalation-move:{incident_id}"})
        esc = await session.get(Escalation, incident_id, populate_existing=True)
        if esc is None or esc.state != "active" or esc.next_step != step:
            return False
        pages = [(status, details, error or "") for status, details, error in (await session.execute(
            select(OutboxItem.status, OutboxItem.details, OutboxItem.last_error).where(
                OutboxItem.incident_id == incident_id, OutboxItem.kind == "page",
                OutboxItem.event == "escalation.page"))).all()
                 if (details or {}).get("run", 0) == esc.run]
        reached = {details.get("step") for status, details, error in pages  # unconfirmed: it may have
                   if status == "sent" or error.startswith(UNCONFIRMED)}
        pages = [(status, details) for status, details, error in pages if not error.startswith(UNCONFIRMED)]
        on_the_way = {details.get("step") for status, details in pages if status in ("pending", "sending")}
        missed = {details.get("step") for status, details in pages if status == "dead"}
        if step in reached or step in on_the_way or (not manual and step - 1 in missed and step - 1 not in reached):
            return False
        asked = await self._asked_channel(session, incident_id, step)
        if asked and (reaches is None or reaches(asked)):  # its people were asked: the step's wait is theirs
            return False
        esc.timer_id = await timer_store.schedule(session, STEP, incident_id, now, now,
                                                  payload={"step": step, **({"manual": True} if manual else {})})
        esc.updated_at = now
        session.add(esc)
        return True

    @staticmethod
    async def _asked_channel(session: AsyncSession, incident_id: int, step: int) -> str | None:
        """The channel the latest firing of `step` (this run's: move_on is asked only while the run is at it)
        mentioned (@here), if any: a step with a channel and a person who cannot be paged moved on at once, and the
        channel it had just asked for help got none of the wait its line promised."""
        fired = (await session.execute(select(AuditEvent.details).where(
            AuditEvent.incident_id == incident_id, AuditEvent.action == "escalation.step")
            .order_by(AuditEvent.seq.desc()).limit(50))).scalars().all()
        this = next((d for d in fired if (d or {}).get("step") == step), None)
        return str((this or {}).get("channel") or "") or None

    async def _waiting(self, session: AsyncSession, incident_id: int, run: int) -> tuple[bool, list[str]]:
        """(whether a page of this run reached someone, or may have; the names of those whose page of this run
        still waits for the bot's token to be accepted)."""
        rows = (await session.execute(select(OutboxItem.status, OutboxItem.details, OutboxItem.last_error).where(
            OutboxItem.incident_id == incident_id, OutboxItem.kind == "page", OutboxItem.event == "escalation.page")
            .order_by(OutboxItem.id))).all()
        rows = [(status, details or {}, error or "") for status, details, error in rows
                if (details or {}).get("run", 0) == run]
        reached = any(status == "sent" or error.startswith(UNCONFIRMED) for status, _, error in rows)
        waiting = [str(details.get("person")) for status, details, _ in rows
                   if status in ("pending", "sending") and details.get(TOKEN_REFUSED)]
        return reached, [self.people[p].name if p in self.people else p for p in dict.fromkeys(waiting)]

    # -- the timer ------------------------------------------------------------------------------

    async def fire(self, session: AsyncSession, timer: Timer, now: datetime) -> None:
        incident_id = int(timer.subject)
        query = select(Incident).where(Incident.id == incident_id)
        postgres = session.bind.dialect.name == "postgresql"
        if postgres:
            query = query.with_for_update()  # settles a race with a click: one of them goes first
        incident = (await session.execute(query)).scalar_one_or_none()
        esc = await session.get(Escalation, incident_id, with_for_update=postgres)
        if incident is None or esc is None or esc.timer_id != timer.id or esc.state != "active":
            return  # superseded (Escalate, reopen) or stopped: nothing to do
        manual = bool(timer.payload.get("manual"))
        if incident.status == RESOLVED or (incident.status == ACKNOWLEDGED and not manual) or incident.silenced:
            esc.state, esc.note, esc.updated_at = "stopped", "", now
            session.add(esc)
            return
        snap, n = esc.snapshot, esc.next_step
        total = total_steps(snap)
        timing, late = self._lateness(timer, now)
        entries: list[Entry] = []
        if n >= total:
            esc.state, esc.updated_at = "exhausted", now
            steps = f"{total} step{'s' if total != 1 else ''}"
            reached, waiting = await self._waiting(session, incident_id, esc.run)
            if waiting:
                several = len(waiting) > 1
                pages = f"the page{'s' if several else ''} to {' and '.join(waiting)}"
                wait, go = ("wait", "go") if several else ("waits", "goes")
                if reached:
                    esc.note = (f"Every step of escalation policy `{esc.policy}` ran and nobody acknowledged; {pages} "
                                f"still {wait} for the bot's token to be accepted. Page someone with "
                                f"`/incident page {incident_id} PERSON`.")
                    line = (f"Escalation policy {esc.policy} finished after {steps}: nobody acknowledged, and {pages} "
                            f"still {wait} for the bot's token to be accepted.")
                else:  # its steps' pages only waited: nobody was paged, so nobody failed to acknowledge
                    esc.note = (f"Every step of escalation policy `{esc.policy}` ran, but nobody has been paged yet: "
                                f"{pages} {wait} for the bot's token to be accepted. Page someone with "
                                f"`/incident page {incident_id} PERSON`.")
                    line = (f"Escalation policy {esc.policy} finished after {steps} without paging anyone: {pages} "
                            f"{wait} for the bot's token to be accepted, and {go} out when it is.")
            elif incident.status == ACKNOWLEDGED:  # someone asked for help and the steps left reached nobody
                esc.note = (f"Every step of escalation policy `{esc.policy}` ran; the last reached nobody. "
                            f"Page someone with `/incident page {incident_id} PERSON`.")
                line = f"Escalation policy {esc.policy} finished after {steps}: the last reached nobody."
            else:
                esc.note = (f"Every step of escalation policy `{esc.policy}` ran and nobody acknowledged. "
                            f"Page someone with `/incident page {incident_id} PERSON`.")
                line = f"Escalation policy {esc.policy} finished: nobody acknowledged after {steps}."
            self._lines(session, incident, now, "escalation.exhausted", line)
            entries.append(Entry("escalation.exhausted", SYSTEM, "incident", str(incident_id), now,
                                 {"policy": esc.policy, "steps": total, **timing}, incident_id))
        else:
            step = step_at(snap, n)
            targets = await self.targets(session, step["notify"], now)
            acknowledger = incident.acknowledged_by if incident.status == ACKNOWLEDGED else None
            if acknowledger:  # asked for help: someone else's
                targets = targets.without_acknowledger(acknowledger, self._name(acknowledger, acknowledger))
            asker = await self._asker(session, incident) if manual else None
            if asker and asker != acknowledger:  # (a repeat of the policy, a rotation they are on call in)
                targets = targets.without_asker(asker, self._name(asker, asker))
            hours, tz = self.config.business_hours, self.config.timezone
            business = in_business_hours(hours, tz, now)
            minimum = self.config.paging.after_hours_min_severity
            # After hours an incident below the paging minimum waits for the morning, whether its step would page
            # people or @here a channel (which wakes whoever there has notifications on).
            if ((targets.people or targets.channel) and not business and not manual
                    and not pages_after_hours(incident.severity, minimum)):
                morning = next_business_start(hours, tz, now)
                esc.timer_id = await timer_store.schedule(session, STEP, incident_id, morning, now,
                                                          payload={"step": n, "deferred": True})
                when = _local(morning, hours.timezone or tz, now)  # the morning as business hours define it
                esc.note = (f"After hours: {incident.severity} incidents page nobody until business hours "
                            f"({when}).")
                self._lines(session, incident, now, "escalation.deferred",
                            f"After hours and {incident.severity}: step {n + 1} waits until {when}.")
                entries.append(Entry("escalation.deferred", SYSTEM, "incident", str(incident_id), now,
                                     {"step": n + 1, "until": morning.isoformat(), "severity": incident.severity},
                                     incident_id))
            else:
                entries.append(await self._step(session, incident, esc, targets, n, total, business, manual, now,
                                                timing, late))
        esc.updated_at = now
        session.add(esc)
        queue_redraw(session, incident, now)
        if n > 0 and any(e.action in ("escalation.step", "escalation.exhausted") for e in entries):
            # The pages of the steps before: "Carol in 5 min if nobody acknowledges" came and went, and their
            # Escalate answered only "escalated since this message was drawn" (in a private chat, with no other).
            session.add(OutboxItem(**page_redraw_row(incident_id, now, fired=(n + 1, esc.run))))
        await self.audit.append_many(session, entries)

    async def _step(self, session: AsyncSession, incident: Incident, esc: Escalation, targets: Targets, n: int,
                    total: int, business: bool, manual: bool, now: datetime, timing: dict[str, Any],
                    late: dict[str, Any] | None) -> Entry:
        """`timing`: the audit event's due time and lateness; `late`: what the step's words say of it when it is
        late, kept on its pages for the outbox to word in each person's time zone."""
        assert incident.id is not None
        step = step_at(esc.snapshot, n)
        wait = timedelta(seconds=int(step["wait"]))
        due = now + wait
        # Escalated by hand while acknowledged: the steps after this one do not run (an acknowledged incident's
        # timer stops the escalation), so nothing is promised about them.
        after = "" if incident.status == ACKNOWLEDGED else await self.next_words(session, esc.snapshot, n + 1, total,
                                                                                  due, wait, incident.severity)
        # Acknowledged, the step runs because someone pressed Escalate: whoever it reaches is asked for help, and is
        # told so by whom, not left with an amber "Acknowledged" that reads as "handled" on a lock screen.
        helping = await self._asking(session, incident) if incident.status == ACKNOWLEDGED else None
        asks = _asks_words(incident.id, *helping) if helping else ""
        # A page says what comes after its step in its row's `next` (the outbox words it after "Step 2 of 4 of the
        # escalation.", in the page and in its thread line and the card once it went): for an acknowledged
        # incident that is the ask. An ask is no promise spent once the next step is due (`next_at`, see
        # outbox._promised_past): it holds however late the page goes.
        told = {"next": asks} if asks else {"next": after, "next_at": due.isoformat()}
        for person in targets.people:
            session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=f"@{person.id}",
                                   kind="page", event="escalation.page",
                                   details={"person": person.id, "step": n + 1, "of": total, "business": business,
                                            "manual": manual, **told, "run": esc.run,
                                            **({"late": late} if late else {})}))
        who = ", ".join(p.name for p in targets.people)
        tardy = late_words(late, self.config.timezone, now)
        if targets.channel:
            # Asked for help, the line still mentions everyone there (that is the ask), but says so rather than that
            # nobody acknowledged.
            says = asks or "nobody has acknowledged yet."
            line = f"Step {n + 1} of {total}{tardy}: {says} {after}".strip()
            promise = {"next": after, "next_at": due.isoformat()} if after else {}  # (see outbox._kept_promise)
            if not asks:  # "nobody has acknowledged yet", to everyone: not sent if someone has by then
                promise[UNACKNOWLEDGED] = True
            self._channel_line(session, incident, targets.channel, now, line, promise)
        why = targets.why()
        if why:
            self._lines(session, incident, now, "escalation.nobody", f"Step {n + 1} of {total}{tardy}: {why}")
        removed = targets.removed()
        if removed:  # app.yaml changed under a running escalation: whoever reads the log learns what the step lost
            log.warning("escalation: #%s step %d of %d (policy %s as it was when the escalation started): %s",
                        incident.id, n + 1, total, esc.policy, why)
        nobody = not targets.people and not targets.channel  # a rotation with nobody on call: move on at once
        esc.next_step = n + 1
        # A step someone's Escalate reached that pages nobody hands that on to the next, or an acknowledged
        # incident's escalation would stop there, with nobody paged.
        payload = {"step": n + 1, **({"manual": True} if nobody and manual else {})}
        esc.timer_id = await timer_store.schedule(session, STEP, incident.id, now if nobody else due, now,
                                                  payload=payload)
        if who:
            esc.note = f"Paging {who}{tardy}. {asks or after}".strip()
        elif helping:  # (an acknowledged incident waits for nobody to acknowledge it)
            on_it, asker = ("Someone" if helping[0] == "someone" else helping[0]), helping[1]
            asked = ("asked the channel for help" if targets.channel
                     else f"asked for help, and step {n + 1} reached nobody")
            esc.note = f"{on_it} is on it and {asked}." if asker == on_it else f"{on_it} is on it; {asker} {asked}."
        else:
            esc.note = after or "Waiting for someone to acknowledge."
        return Entry("escalation.step", SYSTEM, "incident", str(incident.id), now,
                     {"policy": esc.policy, "step": n + 1, "of": total, "people": [p.id for p in targets.people],
                      "channel": targets.channel, "rotation": targets.rotation, "business_hours": business,
                      "manual": manual, "next_at": due.isoformat(), **({"removed": removed} if removed else {}),
                      **timing}, incident.id)

    async def _asking(self, session: AsyncSession, incident: Incident) -> tuple[str, str]:
        """An acknowledged incident's step runs because someone pressed Escalate: (who acknowledged it, who asked for
        help), by name."""
        return self._name(incident.acknowledged_by, "someone"), self._name(await self._asker(session, incident),
                                                                           "Someone")

    @staticmethod
    async def _asker(session: AsyncSession, incident: Incident) -> str | None:
        """Who asked for help with `incident`: the person who last escalated it, as its audit log has it (None for a
        command line run as nobody in app.yaml)."""
        return (await session.execute(
            select(AuditEvent.actor_person).where(AuditEvent.incident_id == incident.id,
                                                  AuditEvent.action == "incident.escalated")
            .order_by(AuditEvent.seq.desc()).limit(1))).scalar()

    def _name(self, who: str | None, unknown: str) -> str:
        person = self.people.get(who or "")
        return person.name if person is not None else unknown

    async def targets(self, session: AsyncSession, notify: dict[str, Any], at: datetime) -> Targets:
        people: list[Person] = []
        missing = gone_rotation = gone_cover = ""
        cover_id: int | None = None
        rotation = notify.get("rotation")
        if rotation:
            schedule = self.schedules.get(rotation)
            if schedule is None:
                gone_rotation = rotation
            else:
                rows = await active_overrides(session, start=at, end=at + timedelta(seconds=1), rotations=[rotation])
                shift = on_call(schedule, domain(rows, rotation), at)
                person = self.people.get(shift.person) if shift.person else None
                if person is None and shift.person and shift.source == "override":
                    # (a member the rotation itself has is in app.yaml: the config would not load otherwise)
                    gone_cover, cover_id = shift.person, shift.override_id
                elif person is None:
                    missing = f"nobody is on call for {rotation} now"
                else:
                    people.append(person)
        gone: list[str] = []
        for pid in notify.get("people", []):
            person = self.people.get(pid)
            if person is None:
                gone.append(pid)
            elif person not in people:
                people.append(person)
        channel = notify.get("channel")
        gone_channel = ""
        if channel and channel not in self.channels:  # the outbox serves only app.yaml's channels: it would never go
            channel, gone_channel = None, channel
        return Targets(people, channel, rotation, missing, gone_rotation, tuple(dict.fromkeys(gone)), gone_channel,
                       gone_cover, cover_id)

    async def next_words(self, session: AsyncSession, snap: dict[str, Any], n: int, total: int, due: datetime,
                         wait: timedelta, severity: str) -> str:
        """"Carol in 10 min if nobody acknowledges." for the step after this one, due after `wait`. A step that falls
        due after hours for an incident that pages nobody then waits for the business morning (see fire), so the
        words name that morning instead, and whoever is to be notified then: a promise of "in 5 min" at 17:59 was
        taken back at 18:04."""
        if n >= total:
            return ""
        notify = step_at(snap, n)["notify"]
        targets = await self.targets(session, notify, due)
        hours, tz = self.config.business_hours, self.config.timezone
        morning = None
        if ((targets.people or targets.channel) and not in_business_hours(hours, tz, due)
                and not pages_after_hours(severity, self.config.paging.after_hours_min_severity)):
            morning = next_business_start(hours, tz, due)
            targets = await self.targets(session, notify, morning)  # a rotation may have handed over by then
        names = [p.name for p in targets.people] + (["the channel"] if targets.channel else [])
        # (it starts a sentence: "Paged Bob on Slack. The channel in 5 min ..."; a person's name is left as written)
        who = " and ".join(names) if targets.people else "The channel" if targets.channel else "The next step"
        if morning is not None:
            return (f"{who} at {_local(morning, hours.timezone or tz, due - wait)} if nobody acknowledges ({severity} incidents "
                    "page nobody after hours).")
        return f"{who} in {span(wait)} if nobody acknowledges."

    def _lines(self, session: AsyncSession, incident: Incident, now: datetime, event: str, line: str) -> None:
        """A line in the incident's threads: those of its channels still in app.yaml (the outbox sends no other)."""
        queue_thread_line(session, incident, now, event, {"line": line},
                          channels=[c for c in incident.channels if c in self.channels])

    @staticmethod
    def _channel_line(session: AsyncSession, incident: Incident, channel: str, now: datetime, line: str,
                      promise: dict[str, Any]) -> None:
        """A step that notifies a channel: a line mentioning everyone there, in the incident's thread. `promise`:
        what it says comes next, and until when, for a line that goes only later to leave it out."""
        if channel in incident.channels:
            queue_thread_line(session, incident, now, "escalation.channel",
                              {"line": line, "mention": "here", **promise}, channels=[channel])
        else:  # not routed there: a post of its own
            row = notice_row(channel, f"#{incident.id} {incident.title}: {line}", now, event="escalation.channel",
                             mention="here")
            if promise.get(UNACKNOWLEDGED):  # (which incident's acknowledgement holds it back: see PageLanes._notice)
                row.details = {**row.details, UNACKNOWLEDGED: incident.id}
            session.add(row)


def drawn_with(escalation: Escalation | None) -> tuple[str, str]:
    """What an incident's card says of its escalation: (the note on what comes next, or that every step ran; the
    mark its Escalate button carries, see bot.escalation.escalation_mark)."""
    if escalation is None:
        return "", ""
    note = escalation.note if escalation.state in ("active", "exhausted") else ""
    # Every step ran, or the last one has (its wait runs on): a press could only say so, so the card has no Escalate.
    if escalation.state == "exhausted" or escalation.next_step >= total_steps(escalation.snapshot):
        return note, ESCALATION_DONE
    return note, escalation_mark(escalation.next_step, escalation.run)


def _asks_words(incident_id: int | None, on_it: str, asker: str) -> str:
    """Who asks for help with an acknowledged incident (Escalate), and who is on it (Escalations._asking): what its
    step's page, its channel line and its card say."""
    if asker == on_it:
        return f"{asker} acknowledged #{incident_id} and asks for help."
    return f"{asker} asks for help with #{incident_id} (acknowledged by {on_it})."


def late_words(late: dict[str, Any] | None, tz: str, now: datetime) -> str:
    """What a step that fired late says of it, right after what it did (", 30 min late (due 24 Nov 05:05 CET; the
    bot was not running)"), in `tz`; nothing for a step on time. `late` as Escalations._lateness keeps it."""
    if not late:
        return ""
    due = datetime.fromisoformat(str(late["due_at"]))
    return (f", {span(timedelta(seconds=int(late['by'])))} late (due {clock(due, now, ZoneInfo(tz))}; "
            f"{late['why']})")


def _local(at: datetime, tz: str, now: datetime) -> str:
    """A business morning in words: "Wed 09:00 CET"; with its date when it is six days or more away ("Mon 14 Dec
    09:00 CET"), where "Mon 09:00", said on a Monday evening, read as that morning, gone already."""
    local = at.astimezone(ZoneInfo(tz))
    if (local.date() - now.astimezone(ZoneInfo(tz)).date()).days >= 6:
        return f"{local:%a} {local.day} {local:%b %H:%M %Z}"
    return local.strftime("%a %H:%M %Z")
