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
next end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Config, Silence
from bot.incidents import TRIGGERED
from bot.model import Actor
from bot.routing import silence_ends, silenced_by
from handlers.escalation import Escalations
from handlers.notify import page_redraw_row, queue_thread_line
from handlers.outbox import FOLLOWS
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.models import AlertRecord, Escalation, Incident, OutboxItem, Timer

SILENCE_END = "silence.end"
SYSTEM = Actor("system", "silences", "Maintenance windows")


def schedule_silence_ends(conn: Connection, wanted: Sequence[tuple[int, Mapping[datetime, Silence]]],
                          now: datetime) -> None:
    """A `silence.end` timer per (incident, end), in the caller's (synchronous) transaction; the silence ending
    then is named in its payload. One each, however many of the incident's alerts the silence covers and however
    often their sender repeats them (the timer's key)."""
    rows = [timer_store.timer_row(SILENCE_END, iid, due, now, key=f"{SILENCE_END}:{iid}:{due.isoformat()}",
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
        incident_id = int(timer.subject)
        query = select(Incident).where(Incident.id == incident_id)
        if session.bind.dialect.name == "postgresql":
            query = query.with_for_update()  # settles a race with intake or a click on it: one goes first
        incident = (await session.execute(query)).scalar_one_or_none()
        if incident is None or not incident.silenced or incident.status != TRIGGERED:
            return  # it spoke already (an unsilenced alert), someone is on it, or it is over
        labels = list((await session.execute(select(AlertRecord.labels).where(
            AlertRecord.incident_id == incident_id, AlertRecord.status == "firing"))).scalars())
        if not labels:
            return  # nothing fires: nothing to page about
        tz = self.config.timezone
        covering = [silenced_by(self.config.silences, dict(lb or {}), now, tz) for lb in labels]
        if all(s is not None for s in covering):  # another window covers them all: try again when the first ends
            ends = {end: s for s in covering if s is not None and (end := silence_ends(s, now, tz)) is not None}
            if ends:
                first = min(ends)
                await session.run_sync(lambda s: schedule_silence_ends(
                    s.connection(), [(incident_id, {first: ends[first]})], now))
            return
        await self._unsilence(session, incident, timer.payload or {}, len(labels), now)

    async def _unsilence(self, session: AsyncSession, incident: Incident, ended: Mapping[str, Any], firing: int,
                         now: datetime) -> None:
        """As intake unsilences an incident (handlers/intake.py, `incident.unsilenced`): never posted while muted,
        its card is posted now, drawn as it is (firing); its pages are redrawn; its escalation starts."""
        assert incident.id is not None
        iid = incident.id
        incident.silenced = False
        session.add(incident)
        for channel in incident.channels:
            session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=channel, kind="post",
                                   event="incident.opened", details={}))
        session.add(OutboxItem(**page_redraw_row(incident.id, now)))
        window = window_name(ended.get("silence"), str(ended.get("comment") or ""))
        alerts = f"{firing} alert{'s' if firing != 1 else ''} still fir{'e' if firing != 1 else 'es'}"
        policy = incident.escalation if incident.escalation in self.escalations.policies else None
        what = f"paging now, from step 1 of escalation policy {policy}" if policy else "it has no escalation policy"
        line = f"{window[0].upper()}{window[1:]} ended and {alerts}: {what}."
        # (the card is posted with it: a line queued before the first post follows it, rather than fold into it)
        queue_thread_line(session, incident, now, "incident.unsilenced", {"line": line, FOLLOWS: True})
        if policy:  # from the first step, as intake starts an unsilenced incident's escalation (Escalations.start_all)
            if await session.get(Escalation, iid) is None:
                await session.run_sync(lambda s: self.escalations.start_all(s.connection(), [(iid, policy)], now))
            else:
                await self.escalations.restart(session, iid, now)
        await self.audit.append_many(session, [Entry(
            "incident.unsilenced", SYSTEM, "incident", str(incident.id), now,
            {"reason": f"{window} ended", "silence": ended.get("silence"), "firing": firing,
             "note": "the maintenance window ended while its alerts still fired"}, incident.id)])
