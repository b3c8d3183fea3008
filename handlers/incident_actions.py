"""What a person can do to an incident: acknowledge, escalate, resolve, reopen.

Each action is one transaction: the state change, its audit event naming the
person, and an outbox row to redraw the incident's message and one for its
thread line in every channel the incident is routed to. Nothing here calls a
chat platform: the outbox worker does that after the commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlmodel import select

from bot.actions import stamp
from bot.incidents import ACKNOWLEDGED, RESOLVED, TRIGGERED, InvalidTransition, transition
from bot.model import Actor
from bot.view import who_did
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.db import Database
from handlers.notify import page_redraw_row, queue_redraw, queue_thread_line
from storage.models import AlertRecord, AuditEvent, Incident, OutboxItem, Timer

if TYPE_CHECKING:
    from bot.metrics import Metrics
    from handlers.escalation import Escalations

# A button whose tag is not that of the incident of its number: drawn for an incident of an earlier store (numbers
# start again at #1 in a new one), or from elsewhere. Nothing is done to the incident that has the number now.
FOREIGN_CARD = ("This card belongs to an incident that no longer exists in this bot's store, so nothing was done. "
                "Use the buttons on the incident's latest message, or `/incident list` to find it.")
VERBS = {"acknowledge": "Acknowledged", "escalate": "Escalated", "resolve": "Resolved", "reopen": "Reopened"}


@dataclass(frozen=True)
class ActionResult:
    """What happened, in words for the person who asked."""

    changed: bool
    message: str
    incident_id: int | None = None
    status: str | None = None
    severity: str | None = None
    elapsed: float | None = None  # seconds from opened to acknowledged or resolved, when that is what happened


# A timer the command line leaves for the running bot: a change it made, for the bot's /metrics (chatops_actions,
# the time-to-acknowledge and -resolve histograms), as a click's is counted where it is handled. One replica takes it.
OBSERVED = "incident.observed"


def observe(metrics: Metrics, verb: str, result: ActionResult) -> None:
    """An action's outcome in /metrics: chatops_actions_total{action,outcome}, and the first acknowledge or resolve of
    an incident in its histogram (seconds from opened)."""
    metrics.actions.labels(verb, "changed" if result.changed else "refused").inc()
    if result.elapsed is not None and result.severity:
        measure = metrics.time_to_acknowledge if verb == "acknowledge" else metrics.time_to_resolve
        measure.labels(result.severity).observe(max(0.0, result.elapsed))


def observed_later(metrics: Metrics) -> Callable[[AsyncSession, Timer, datetime], Awaitable[None]]:
    """The bot's handler of OBSERVED timers."""
    async def handle(_session: AsyncSession, timer: Timer, _now: datetime) -> None:
        p = timer.payload or {}
        verb, seconds = p.get("verb"), p.get("seconds")
        if verb not in VERBS:  # (not one this version knows: nothing to count)
            return
        observe(metrics, str(verb), ActionResult(True, "", severity=str(p.get("severity") or "") or None,
                                                 elapsed=float(seconds) if isinstance(seconds, (int, float)) else None))
    return handle


async def perform(
    *, db: Database, audit: AuditLog, incident_id: int, action: str, actor: Actor, now: datetime, note: str = "",
    escalations: Escalations | None = None, names: Mapping[str, str] | None = None, seen: str = "", tag: str = "",
    counted_later: bool = False,
) -> ActionResult:
    """Apply `action` (acknowledge, escalate, resolve, reopen) for `actor`; a no-op says why.

    With `escalations`, acknowledge and resolve stop the incident's escalation, reopen starts it
    again, and escalate fires its next step now, all in the same transaction; `seen` (what the Escalate
    button carried) makes escalate a no-op if the escalation moved since the message was drawn. `tag` (what a
    button said of its incident, `bot.actions.stamp`): a no-op unless it is the tag of the incident of that number.
    `counted_later`: a change is left for the running bot to count in its /metrics (OBSERVED; the command line's).
    """
    if action not in VERBS:
        raise ValueError(f"unknown incident action {action!r}")
    async with db.transaction() as session:
        query = select(Incident).where(Incident.id == incident_id)
        if db.is_postgres:
            query = query.with_for_update()
        incident = (await session.execute(query)).scalar_one_or_none()
        if incident is None:
            return ActionResult(False, FOREIGN_CARD if tag else f"There is no incident #{incident_id}.")
        if tag and tag != stamp(incident.opened_at, incident.group_key):
            return ActionResult(False, FOREIGN_CARD)
        refusal = _refusal(incident, action, names or {})
        if refusal is None and action == "reopen":
            refusal = await _held_elsewhere(session, incident, names or {})
        if refusal:
            return ActionResult(False, refusal, incident.id, incident.status)
        who = actor.person_id or f"{actor.platform}:{actor.user_id}"
        details: dict[str, Any] = {"from": incident.status}
        message = f"{VERBS[action]} #{incident.id}."
        if action == "escalate" and escalations is not None:
            changed, message = await escalations.escalate_now(session, incident, now, seen=seen)
            if not changed:
                return ActionResult(False, message, incident.id, incident.status)
        elif action in ("acknowledge", "resolve") and escalations is not None:
            await escalations.stop(session, incident.id, now)
        elif action == "reopen" and escalations is not None:
            await escalations.restart(session, incident.id, now)
        if action == "acknowledge":
            incident.status = transition(incident.status, "acknowledge")
            incident.acknowledged_at, incident.acknowledged_by = now, who
        elif action == "resolve":
            incident.status = transition(incident.status, "resolve")
            incident.resolved_at, incident.resolved_by = now, f"person:{who}"
        elif action == "reopen":
            incident.status = transition(incident.status, "reopen")
            incident.resolved_at = incident.resolved_by = None
            incident.acknowledged_at = incident.acknowledged_by = None
            incident.last_seen = now  # open again now: new alerts of its key join it (grouping.window counts from here)
        elapsed = None
        if action in ("acknowledge", "resolve") and not await _done_before(session, incident.id, action):
            # (measured the first time only: acknowledging a reopened incident is not a second response to it)
            elapsed = (now - incident.opened_at).total_seconds()
        details["to"] = incident.status
        if note:
            details["note"] = note
        session.add(incident)
        _queue(session, incident, now, f"incident.{_past(action)}", {"by": who, "name": actor.display_name})
        await audit.append_many(session, [Entry(f"incident.{_past(action)}", actor, "incident", str(incident.id),
                                                now, details, incident.id)])
        if counted_later:
            await timer_store.schedule(session, OBSERVED, incident.id, now, now, payload={
                "verb": action, "severity": incident.severity, "seconds": elapsed})
        return ActionResult(True, message, incident.id, incident.status, incident.severity, elapsed)


async def _done_before(session: AsyncSession, incident_id: int, action: str) -> bool:
    """Whether the incident was acknowledged (or resolved) before, by anyone, the source included."""
    event = f"incident.{_past(action)}"
    return (await session.execute(select(AuditEvent.seq).where(AuditEvent.incident_id == incident_id,
                                                               AuditEvent.action == event).limit(1))).first() is not None


async def _held_elsewhere(session: AsyncSession, incident: Incident, names: Mapping[str, str]) -> str | None:
    """Why a reopen is refused when an alert of `incident` fires in another open incident now: a person resolved
    it while the alert fired, and the alert's next notification opened a later incident, which escalates for it
    (and gets its news). Reopened too, both would run their escalations for one alert, and paging twice, and an
    acknowledgement of one would not stop the other. The person is told where to follow it instead."""
    mine, other = aliased(AlertRecord), aliased(AlertRecord)
    holders = (await session.execute(
        select(Incident.id, Incident.status, Incident.acknowledged_by)
        .join(other, other.incident_id == Incident.id)
        .join(mine, and_(mine.source == other.source, mine.fingerprint == other.fingerprint))
        .where(mine.incident_id == incident.id, other.incident_id != incident.id, other.status == "firing",
               Incident.status != RESOLVED)
        .distinct().order_by(Incident.id))).all()
    if not holders:
        return None
    where = " and ".join(f"#{iid}" + (f" (acknowledged by {who_did(by, names)})" if status == ACKNOWLEDGED else "")
                         for iid, status, by in holders)
    later = "they are" if len(holders) > 1 else f"#{holders[0][0]} is"
    return (f"#{incident.id} is not reopened: its alert fires in {where} now. Follow it there; reopening #{incident.id}"
            f" as well would page twice for the same alert. #{incident.id} can be reopened once {later} resolved.")


def _refusal(incident: Incident, action: str, names: Mapping[str, str]) -> str | None:
    """Why `action` does nothing now, in the words a person wants to read; None when it applies."""
    ident = f"#{incident.id}"
    if action == "escalate":
        return f"{ident} is resolved; reopen it first." if incident.status == RESOLVED else None
    try:
        transition(incident.status, action)
    except InvalidTransition:
        if incident.status == ACKNOWLEDGED and action == "acknowledge":
            return f"{ident} is already acknowledged by {who_did(incident.acknowledged_by, names)}."
        if incident.status == RESOLVED and action in ("acknowledge", "resolve"):
            return f"{ident} is already resolved by {who_did(incident.resolved_by, names)}."
        if incident.status == TRIGGERED and action == "reopen":
            return f"{ident} is open; there is nothing to reopen."
        return f"{ident} is {incident.status}; it cannot be {_past(action)}."
    return None


def _past(action: str) -> str:
    return {"acknowledge": "acknowledged", "escalate": "escalated", "resolve": "resolved", "reopen": "reopened"}[action]


def _queue(session: AsyncSession, incident: Incident, now: datetime, event: str, details: dict[str, Any]) -> None:
    """Redraw the incident's message and add a thread line, in every channel it is routed to (none while silenced:
    it was never posted there), and redraw its pages (a silenced one's too: `/incident page` reaches people then)."""
    assert incident.id is not None
    session.add(OutboxItem(**page_redraw_row(incident.id, now)))
    if incident.silenced:
        return
    queue_redraw(session, incident, now)
    queue_thread_line(session, incident, now, event, details)
