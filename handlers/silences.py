"""The end of a maintenance window: an incident it muted speaks then if its alerts still fire.

A silence mutes an incident at intake (handlers/intake.py): it is recorded and
grouped, but not posted and its escalation does not start. Intake unsilences it
when an alert no silence covers arrives, but a source need not send one when a
window ends: Alertmanager repeats a firing group only after its repeat_interval
(4 h by default), a generic sender perhaps never. So intake also writes a durable
`silence.end` timer at the end of each window that muted an incident (none for a
silence without an end). When it fires (in its own transaction, once, also after
a restart: handlers/timers.py), an incident still triggered and still silenced
whose firing alerts are not all covered by a silence any more is unsilenced, as
intake's path does it: posted in its channels, its pages redrawn, a thread line
saying why, its escalation started from the first step, an `incident.unsilenced`
audit event. Still covered (another window, a back-to-back one), it waits for the
next end. An incident someone acknowledged or resolved while it was muted is not muted any more either (an Escalate, a
reopen, a list treat it as any other), and pages nobody; acknowledged, it is posted then, saying who is on it.

At start (`at_start`, before the timers and the outbox run) every muted incident
is looked at the same way, now: one muted by an older version of the bot has no
timer, and app.yaml may have changed while the bot was down (a window removed or
shortened: its timer waits for the old end, or none comes). One whose firing
alerts no silence covers any more is unsilenced now; one still covered gets a
timer at the first end of the windows that cover it. Each incident is settled in
a transaction of its own that locks its row (as a timer does), so replicas that
start together, and a second start, change nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import Clock
from bot.config import Config, Silence
from bot.incidents import RESOLVED, TRIGGERED
from bot.model import Actor
from bot.routing import silence_ends, silenced_by
from handlers.escalation import Escalations
from handlers.notify import page_redraw_row, queue_thread_line
from handlers.outbox import FOLLOWS
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import AlertRecord, AuditEvent, Incident, OutboxItem, Timer

SILENCE_END = "silence.end"
SYSTEM = Actor("system", "silences", "Maintenance windows")
log = logging.getLogger("chatops.silences")


def end_key(incident_id: int, due: datetime) -> str:
    """The key of the `silence.end` timer of an incident at a window's end: one each."""
    return f"{SILENCE_END}:{incident_id}:{due.isoformat()}"


def schedule_silence_ends(conn: Connection, wanted: Sequence[tuple[int, Mapping[datetime, Silence]]],
                          now: datetime) -> None:
    """A `silence.end` timer per (incident, end), in the caller's (synchronous) transaction; the silence ending
    then is named in its payload. One each, however many of the incident's alerts the silence covers and however
    often their sender repeats them (the timer's key)."""
    rows = [timer_store.timer_row(SILENCE_END, iid, due, now, key=end_key(iid, due),
                                  payload={"silence": silence.id, "comment": silence.comment})
            for iid, ends in wanted for due, silence in sorted(ends.items(), key=lambda e: e[0])]
    if rows:
        timer_store.schedule_unique(conn, rows)


def window_name(silence: str | None, comment: str) -> str:
    """`sunday-maint (weekly maintenance)`, as the thread and the Escalate answer name a maintenance window."""
    name = f"{silence} ({comment})" if silence and comment else silence or (f"({comment})" if comment else "")
    return f"maintenance window {name}" if name else "the maintenance window"


class SilenceEnds:
    def __init__(self, *, audit: AuditLog, config: Config, escalations: Escalations):
        self.audit, self.config, self.escalations = audit, config, escalations

    def register(self, timers: TimerService) -> None:
        timers.handler(SILENCE_END)(self.fire)

    async def fire(self, session: AsyncSession, timer: Timer, now: datetime) -> None:
        incident, firing, ends = await self._look(session, int(timer.subject), now)
        if incident is None:
            return
        if ends is None:
            await self._unsilence(session, incident, timer.payload or {}, firing, now)
        else:
            await self._wait(session, incident, ends, now)

    async def at_start(self, db: Database, clock: Clock) -> None:
        """Every muted incident, as its window's end would find it now (see the module's docstring); says how many
        it checked, unsilenced and gave a timer. One that cannot be settled is said and left as it was (it waits
        for its timer, if it has one, or an alert no silence covers): the bot starts anyway."""
        async with db.sessions() as session:
            # (not the resolved ones: their window's end unmutes them; one under a window without an end, or muted
            # by an older version, stays so, and a reopen of it while muted stays muted, as intake would open it)
            muted = list((await session.execute(select(Incident.id).where(
                Incident.silenced.is_(True), Incident.status != RESOLVED).order_by(Incident.id))).scalars())
        unsilenced = scheduled = 0
        for incident_id in muted:
            try:
                async with db.transaction() as session:
                    now = clock.now()
                    incident, firing, ends = await self._look(session, incident_id, now)
                    if incident is None:
                        continue
                    if ends is None:
                        last = await self._last_silence(session, incident_id)
                        await self._unsilence(session, incident, last, firing, now, how=self._how_gone(last))
                        unsilenced += 1
                    else:
                        scheduled += await self._wait(session, incident, ends, now)
            except Exception:
                log.exception("muted incident #%d could not be checked at start; it stays muted until its window's "
                              "timer or an alert no silence covers", incident_id)
        if muted:
            log.info("checked %d muted incident(s) at start: %d unsilenced (their firing alerts are not all covered "
                     "by a silence in app.yaml any more), %d given a timer at the end of the window covering them",
                     len(muted), unsilenced, scheduled)

    async def _look(self, session: AsyncSession, incident_id: int, now: datetime
                    ) -> tuple[Incident | None, int, dict[datetime, Silence] | None]:
        """The incident, locked in the caller's transaction, if it is still muted while its alerts fire (else None);
        how many fire; and None when a silence no longer covers them all, else the ends of those that do (none for
        windows without an end)."""
        query = select(Incident).where(Incident.id == incident_id)
        if session.bind.dialect.name == "postgresql":
            query = query.with_for_update()  # settles a race with intake or a click on it: one goes first
        incident = (await session.execute(query)).scalar_one_or_none()
        if incident is None or not incident.silenced:
            return None, 0, None  # it spoke already (an unsilenced alert)
        labels = list((await session.execute(select(AlertRecord.labels).where(
            AlertRecord.incident_id == incident_id, AlertRecord.status == "firing"))).scalars())
        if not labels:
            # Triggered, nothing fires: nothing to page about. Acknowledged or resolved meanwhile: muted for nothing
            # (its Escalate said a window muted it, a reopen stayed muted, it listed as silenced): unmuted.
            return (None if incident.status == TRIGGERED else incident), 0, None
        tz = self.config.timezone
        covering = [silenced_by(self.config.silences, dict(lb or {}), now, tz) for lb in labels]
        if not all(s is not None for s in covering):
            return incident, len(labels), None
        return incident, len(labels), {
            end: s for s in covering if s is not None and (end := silence_ends(s, now, tz)) is not None}

    @staticmethod
    async def _wait(session: AsyncSession, incident: Incident, ends: Mapping[datetime, Silence],
                    now: datetime) -> bool:
        """Windows still cover the incident's alerts: a timer when the first of them ends (none when none ends);
        True when it is new."""
        assert incident.id is not None
        iid = incident.id
        if not ends:
            return False
        first = min(ends)
        if (await session.execute(select(Timer.id).where(Timer.key == end_key(iid, first)))).first() is not None:
            return False
        await session.run_sync(lambda s: schedule_silence_ends(s.connection(), [(iid, {first: ends[first]})], now))
        return True

    @staticmethod
    async def _last_silence(session: AsyncSession, incident_id: int) -> dict[str, Any]:
        """The window that last muted an alert of the incident, as its `alert.silenced` audit event names it (a
        timer's payload names the window ending; at start the window may be gone from app.yaml)."""
        details = (await session.execute(select(AuditEvent.details).where(
            AuditEvent.incident_id == incident_id, AuditEvent.action == "alert.silenced")
            .order_by(AuditEvent.seq.desc()).limit(1))).scalar_one_or_none()
        return dict(details) if isinstance(details, dict) else {}

    def _how_gone(self, last: Mapping[str, Any]) -> str:
        """How the window that last muted an incident stopped covering it, as the start finds it: gone from app.yaml
        (removed, or renamed, while the bot was down), ended (shortened, or its end passed), or, for a window with no
        id, that it covers the alerts no more."""
        silence = last.get("silence")
        if not silence:
            return "no longer covers its alerts"
        return "ended" if any(s.id == silence for s in self.config.silences) else "is no longer in app.yaml"

    async def _unsilence(self, session: AsyncSession, incident: Incident, ended: Mapping[str, Any], firing: int,
                         now: datetime, *, how: str = "ended") -> None:
        """As intake unsilences an incident (handlers/intake.py, `incident.unsilenced`): never posted while muted,
        its card is posted now, drawn as it is; its pages are redrawn; a triggered one's escalation starts. One someone
        acknowledged while it was muted pages nobody (the thread says so); one resolved meanwhile is over: nothing
        is posted. `how` the window stopped muting it (its timer: it ended)."""
        assert incident.id is not None
        incident.silenced = False
        session.add(incident)
        window = window_name(ended.get("silence"), str(ended.get("comment") or ""))
        policy = incident.escalation if incident.escalation in self.escalations.policies else None
        if incident.status == TRIGGERED:
            what = f"paging now, from step 1 of escalation policy {policy}" if policy else "it has no escalation policy"
            note = f"the maintenance window {how} while its alerts still fired"
        else:
            what = "acknowledged while muted, so nobody is paged"
            note = f"the maintenance window {how}; {incident.status} while muted, so nobody is paged"
        if incident.status != RESOLVED:
            for channel in incident.channels:
                session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=channel,
                                       kind="post", event="incident.opened", details={}))
            session.add(OutboxItem(**page_redraw_row(incident.id, now)))
            alerts = (f"{firing} alert{'s' if firing != 1 else ''} still fir{'e' if firing != 1 else 'es'}" if firing
                      else "no alert fires")
            line = f"{window[0].upper()}{window[1:]} {how} and {alerts}: {what}."
            # (the card is posted with it: a line queued before the first post follows it, rather than fold into it)
            queue_thread_line(session, incident, now, "incident.unsilenced", {"line": line, FOLLOWS: True})
        if policy and incident.status == TRIGGERED:  # from the first step (or its first, if it never started)
            await self.escalations.restart(session, incident.id, now)
        await self.audit.append_many(session, [Entry(
            "incident.unsilenced", SYSTEM, "incident", str(incident.id), now,
            {"reason": f"{window} {how}", "silence": ended.get("silence"), "firing": firing, "note": note},
            incident.id)])
