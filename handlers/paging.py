"""Paging a person directly: the incident's card with Acknowledge and Escalate, in their private chat.

Used by `/incident page ID PERSON` now and by escalation steps later. The platform is
the first of the person's `page_via` (default: Telegram, then Slack) that is on and
knows them. Success and failure are both audit events; a failure says what to do,
so whoever pages (a person, or the escalation) can move on at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bot.actions import Action
from bot.chat import Adapter, Button, DeliveryError, Outbound
from bot.clock import Clock
from bot.config import Config, Person
from bot.model import Actor
from bot.view import incident_card
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import Incident
from storage.queries import recent_alerts

log = logging.getLogger("chatops.paging")
DEFAULT_ORDER = ("telegram", "slack", "teams")


@dataclass(frozen=True)
class PageResult:
    ok: bool
    message: str
    platform: str | None = None


async def page(*, db: Database, audit: AuditLog, config: Config, clock: Clock, adapters: Mapping[str, Adapter],
               incident_id: int, person: Person, actor: Actor, reason: str = "") -> PageResult:
    """Send the page; record `incident.paged` or `incident.page_failed` either way."""
    async with db.sessions() as session:
        incident = await session.get(Incident, incident_id)
        alerts = await recent_alerts(session, incident_id) if incident else []
    if incident is None:
        return PageResult(False, f"There is no incident #{incident_id}.")
    now = clock.now()
    card = incident_card(incident, alerts, now=now, tz=person.timezone or config.timezone,
                         names={p.id: p.name for p in config.people})
    buttons = [Button(Action.ACKNOWLEDGE, incident_id, label="Acknowledge", style="primary"),
               Button(Action.ESCALATE, incident_id, label="Escalate")]
    message = Outbound(card.kind, {**card.context, "next_step": reason or card.context.get("next_step")},
                       buttons, text=f"Page: {card.text}")
    tried: list[str] = []
    for platform in person.page_via or DEFAULT_ORDER:
        user_id = getattr(person, platform, None)
        adapter = adapters.get(platform)
        pager = getattr(adapter, "page", None)
        if user_id is None or pager is None:
            continue
        try:
            await pager(str(user_id), message)
        except DeliveryError as exc:
            tried.append(f"{platform}: {exc}")
            continue
        await _record(db, audit, actor, incident_id, now, "incident.paged",
                      {"person": person.id, "platform": platform, "reason": reason})
        return PageResult(True, f"Paged {person.name} on {platform.capitalize()}.", platform)
    why = "; ".join(tried) or (f"{person.name} has no id in app.yaml for a platform that is on "
                               f"(on: {', '.join(sorted(adapters)) or 'none'})")
    log.warning("could not page %s about #%s: %s", person.id, incident_id, why)
    await _record(db, audit, actor, incident_id, now, "incident.page_failed",
                  {"person": person.id, "tried": tried, "reason": reason, "problem": why})
    return PageResult(False, f"Could not page {person.name}: {why}")


async def _record(db: Database, audit: AuditLog, actor: Actor, incident_id: int, now: datetime, action: str,
                  details: dict[str, Any]) -> None:
    async with db.transaction() as session:
        await audit.append_many(session, [Entry(action, actor, "incident", str(incident_id), now, details, incident_id)])
