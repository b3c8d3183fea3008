"""Read-side queries over incidents and alerts (for the CLI, metrics and chat commands)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from datetime import datetime

from sqlalchemy import case, func, or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from storage.audit import AuditLog, Damaged
from storage.models import AlertRecord, AuditEvent, Incident, OutboxItem, Override

# How the last_error of a page's or direct message's outbox row begins when its platform took it without an answer:
# settled "dead", as it is not sent again, but it may have arrived (for the escalation's move_on, it reached its
# person; `outbox retry --dead` leaves it).
UNCONFIRMED = "outcome unknown: "


async def open_incidents_by_severity(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(Incident.severity, func.count()).where(Incident.status != "resolved").group_by(Incident.severity)
    )
    return {severity: count for severity, count in rows.all()}


# What `incidents list` and `/incident list` take: the stored statuses, and the states the chat card shows (firing:
# triggered and not silenced; silenced: muted by a maintenance window and not resolved), "open" (not resolved), "all".
LIST_FILTERS = ("open", "firing", "triggered", "acknowledged", "silenced", "resolved", "all")


def _with_status(query: Any, status: str | None) -> Any:
    if status == "open":
        return query.where(Incident.status != "resolved")
    if status == "firing":
        return query.where(Incident.status == "triggered", Incident.silenced.is_(False))
    if status == "silenced":
        return query.where(Incident.status != "resolved", Incident.silenced.is_(True))
    if status and status != "all":
        return query.where(Incident.status == status)
    return query


def list_status(incident: Incident) -> str:
    """An incident's status as a list shows it: the stored one, but "silenced" for one a maintenance window muted and
    not resolved, as its card says (and as the `silenced` filter finds it), not "triggered"; acknowledged and muted,
    both ("acknowledged, silenced": someone is on it, which "silenced" alone did not say)."""
    if not incident.silenced or incident.status == "resolved":
        return incident.status
    return "silenced" if incident.status == "triggered" else f"{incident.status}, silenced"


async def list_incidents(session: AsyncSession, *, status: str | None = None, limit: int = 200,
                         by_priority: bool = False) -> list[Incident]:
    """The newest first; `status` one of LIST_FILTERS, or None (all). `by_priority`: the open ones first, then the
    resolved, each highest priority first (as stored: the hours of age it has lost since, at most 10, are not
    counted), then newest: in a storm, the `limit` most urgent, not the newest."""
    order = ((case((Incident.status == "resolved", 1), else_=0), Incident.priority.desc(), Incident.id.desc())
             if by_priority else (Incident.id.desc(),))
    query = _with_status(select(Incident).order_by(*order).limit(limit), status)
    return list((await session.execute(query)).scalars().all())


async def count_incidents(session: AsyncSession, *, status: str | None = None) -> int:
    """How many incidents `list_incidents` would list with no limit."""
    return int((await session.execute(_with_status(select(func.count()).select_from(Incident), status))).scalar_one())


async def get_incident(session: AsyncSession, incident_id: int) -> Incident | None:
    return await session.get(Incident, incident_id)


async def incident_alerts(session: AsyncSession, incident_id: int) -> list[AlertRecord]:
    query = select(AlertRecord).where(AlertRecord.incident_id == incident_id).order_by(AlertRecord.id)
    return list((await session.execute(query)).scalars().all())


async def recent_alerts(session: AsyncSession, incident_id: int, limit: int = 50) -> list[AlertRecord]:
    """The incident's newest `limit` alerts (by last received), oldest of them first: what a message draws."""
    query = (select(AlertRecord).where(AlertRecord.incident_id == incident_id)
             .order_by(AlertRecord.last_received.desc(), AlertRecord.id.desc()).limit(limit))
    return list(reversed((await session.execute(query)).scalars().all()))


async def incident_timeline(session: AsyncSession, incident_id: int) -> list[AuditEvent | Damaged]:
    """The incident's audit events in order; one whose row cannot be read whole comes as Damaged, with what can be
    read of it (the rest of the timeline is still there to see)."""
    return [event async for event in AuditLog.events(session, incident_id=incident_id)]


async def outbox_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(OutboxItem.status, func.count()).group_by(OutboxItem.status))
    return {status: count for status, count in rows.all()}


async def outbox_oldest_due(session: AsyncSession, now: datetime, channels: Sequence[str]) -> float:
    """Seconds the longest-waiting pending delivery has been due (0 if none): people's pages and direct messages, and
    the rows of `channels` (those on a platform that is on: the others wait for it on purpose)."""
    query = select(func.min(OutboxItem.due_at)).where(
        OutboxItem.status == "pending", OutboxItem.due_at <= now,
        OutboxItem.channel.in_(list(channels)) | OutboxItem.channel.startswith("@"))
    oldest = (await session.execute(query)).scalar()
    return max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0


async def retry_dead(session: AsyncSession, now: datetime, ids: Sequence[int] | None = None) -> list[int]:
    """Dead letters back to pending, due now, with a fresh count of attempts: the named ones, or (no ids) every
    one but pages (a page given up on was followed by the escalation's next step; sent now, it comes late) and
    but those a platform took without confirming (UNCONFIRMED: they may have arrived; sent again, twice)."""
    query = select(OutboxItem.id).where(OutboxItem.status == "dead")
    if ids:
        query = query.where(OutboxItem.id.in_(list(ids)))
    else:
        query = query.where(OutboxItem.kind != "page", or_(OutboxItem.last_error.is_(None),
                                                           ~OutboxItem.last_error.startswith(UNCONFIRMED)))
    chosen = list((await session.execute(query.order_by(OutboxItem.id))).scalars())
    if chosen:
        await session.execute(update(OutboxItem).where(OutboxItem.id.in_(chosen), OutboxItem.status == "dead")
                              .values(status="pending", attempts=0, due_at=now, created_at=now))
    return chosen


async def list_outbox(session: AsyncSession, *, status: str | None = None, limit: int = 200) -> list[OutboxItem]:
    query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
    if status:
        query = query.where(OutboxItem.status == status)
    return list((await session.execute(query)).scalars().all())


async def active_overrides(session: AsyncSession, *, start: datetime, end: datetime,
                           rotations: Sequence[str] | None = None) -> list[Override]:
    """Overrides not cancelled that overlap [start, end), of the given rotations (all when None), oldest first."""
    query = (select(Override)
             .where(Override.cancelled_at.is_(None), Override.starts_at < end, Override.ends_at > start)
             .order_by(Override.created_at, Override.id))
    if rotations is not None:
        query = query.where(Override.rotation.in_(list(rotations)))
    return list((await session.execute(query)).scalars().all())
