"""Paging a person directly: the incident's card, with the buttons its state calls for, in their private chat.

Used by `/incident page ID PERSON` and, through the outbox, by escalation steps. The
platform is the first of the person's `page_via` (default: Slack first during business
hours, Telegram first after them and for /incident page) that is on and knows them. Success and failure are both audit events; a failure says what to do,
so whoever pages (a person, or the escalation) can move on at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from bot.chat import Adapter, DeliveryError, MessageRef, Outbound
from bot.clock import Clock
from bot.config import Config, Person
from bot.metrics import Metrics
from bot.model import Actor
from bot.view import incident_card
from handlers.escalation import drawn_with
from handlers.notify import page_redraw_row
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import Escalation, Incident, OutboxItem
from storage.queries import UNCONFIRMED, recent_alerts

log = logging.getLogger("chatops.paging")
DEFAULT_ORDER = ("telegram", "slack", "teams")  # after hours, and for /incident page
HAND_PAGE_WAIT = 5.0  # seconds of a platform's flood control that /incident page waits out
BUSINESS_ORDER = ("slack", "teams", "telegram")  # in business hours people are at their desks


@dataclass(frozen=True)
class PageResult:
    ok: bool
    message: str
    platform: str | None = None


def page_message(incident: Incident, alerts: list[Any], person: Person, config: Config, now: datetime,
                 reason: str = "", escalation_mark: str = "") -> Outbound:
    """The incident's card, for a person's private chat. Its buttons are the card's (view.buttons_for), as a
    redraw of the page draws them: no Acknowledge on a page about an incident someone acknowledged already.
    `escalation_mark`: where the escalation stood when the page was sent, which Escalate carries."""
    card = incident_card(incident, alerts, now=now, tz=person.timezone or config.timezone,
                         names={p.id: p.name for p in config.people}, escalation_mark=escalation_mark)
    headline = f"Page: {card.context['headline']}"  # what a phone's notification shows (Slack's `text`)
    return Outbound(card.kind, {**card.context, "headline": headline,
                                "next_step": reason or card.context.get("next_step")}, card.buttons, text=headline)


@dataclass(frozen=True)
class Attempt:
    """How sending a page went: the platform that took it, or what each platform said."""

    platform: str | None
    tried: list[str]
    transient: bool  # some platform failed in a way that may pass (rate limit, network, 5xx)
    waiting: bool = False  # the first platform able to take it is rate-limited now: try again later, not elsewhere
    retry_after: float | None = None  # what the platform said about when (None: our own budget is spent)
    unknown: str | None = None  # the platform that took it and never answered: it may have arrived (not resent)
    ref: MessageRef | None = None  # the message the platform that took it made (redrawn as the incident changes)
    refused: tuple[str, ...] = ()  # platforms that refused the bot's token: the bot's trouble, not the person's

    def counted(self) -> tuple[str, str]:
        """(platform, outcome): how chatops_pages_total counts this page, sent by hand or by an escalation."""
        return (self.platform or self.unknown or "none",
                "ok" if self.platform else "unknown" if self.unknown else "failed")

    def problem(self, person: Person, adapters: Mapping[str, Adapter], *, what: str = "page",
                off: Mapping[str, str] | None = None, order: Sequence[str] = ()) -> str:
        """What went wrong, in words; `what` the attempt sent (a page, a message). `off`: why each platform that
        is not on is off (its settings unset, its token refused at start), named for a platform of `order` that
        knows the person: that, not their app.yaml entry, is why nobody was tried."""
        if self.unknown:
            twice = "page twice" if what == "page" else f"send the {what} twice"
            return (f"{self.unknown.capitalize()} took it but never confirmed it, so the {what} may have arrived; it "
                    f"is not sent again, so as not to {twice} ({self.tried[-1].removeprefix(f'{self.unknown}: ')})")
        if self.tried:
            return "; ".join(self.tried)
        nobody = (f"{person.name} has no id in app.yaml for a platform that is on "
                  f"(on: {', '.join(sorted(adapters)) or 'none'})")
        down = [f"{platform} is off ({(off or {})[platform]})" for platform in dict.fromkeys(order)
                if platform not in adapters and platform in (off or {}) and getattr(person, platform, None)]
        return f"{'; '.join(down)}, and {nobody}" if down else nobody


async def send_page(adapters: Mapping[str, Adapter], person: Person, message: Outbound, order: Sequence[str],
                    allow: Callable[[str, str], bool] | None = None) -> Attempt:
    """Try the platforms in `order` that are on and know the person; the first that takes it wins.

    With `allow(platform, user_id)` (a rate budget), a platform whose budget is spent, or that answers
    "too many requests", is waited for rather than skipped: the person chose that order. A platform that took
    the message and never answered ends the attempt (`unknown`), a page's and a direct message's alike: it may
    have arrived, and sending it again, there or on the next platform, would make the person read it twice.
    A platform that refuses the bot's token is named in `refused`: the bot's trouble, not the person's, so an
    escalation's page waits for the token to work again rather than fail (see OutboxWorker._page_waits).
    """
    tried: list[str] = []
    transient = False
    refused: list[str] = []
    for platform in order:
        user_id = getattr(person, platform, None)
        adapter = adapters.get(platform)
        pager = getattr(adapter, "page", None)
        if user_id is None or pager is None:
            continue
        if allow is not None and not allow(platform, str(user_id)):
            return Attempt(None, tried, True, waiting=True)
        try:
            try:
                ref = await pager(str(user_id), message)
            except DeliveryError as exc:
                # Asked for by hand (no budget: someone waits for the answer): a short flood-control wait is
                # waited out once, on the platform the person chose first, rather than failing or going elsewhere.
                if allow is not None or not exc.retry_after or exc.retry_after > HAND_PAGE_WAIT:
                    raise
                await asyncio.sleep(exc.retry_after)
                ref = await pager(str(user_id), message)
        except DeliveryError as exc:
            said = str(exc) if str(exc).startswith((f"{platform} ", f"{platform}:")) else f"{platform}: {exc}"
            if allow is not None and exc.retry_after:
                return Attempt(None, tried, True, waiting=True, retry_after=exc.retry_after)
            if exc.unknown:  # it may have arrived: neither again nor elsewhere, or the person gets it twice
                return Attempt(None, [*tried, said], False, unknown=platform)
            tried.append(said)
            transient = transient or not exc.permanent
            if exc.token_refused:
                refused.append(platform)
            continue
        return Attempt(platform, tried, transient, ref=ref if isinstance(ref, MessageRef) else None,
                       refused=tuple(refused))
    return Attempt(None, tried, transient, refused=tuple(refused))


# How a page (or a card, a line) whose answer was lost is marked for the bot to look for it by the key it carried
# (bot.chat.Finder), in its outbox row's details: {"key", "at": Unix time, "platform"?} (see handlers/outbox.py).
UNANSWERED = "unanswered"
LOOK_AFTER = 15.0  # seconds before that look: a post whose answer timed out may still be being stored


def page_finders(adapters: Mapping[str, Adapter], person: Person, order: Sequence[str]) -> list[str]:
    """The platforms of `order` that are on, know `person`, and can find a page by its key (bot.chat.Finder)."""
    return [platform for platform in order if platform in adapters and getattr(person, platform, None)
            and getattr(adapters[platform], "find", None) is not None]


def page_where(ref: MessageRef) -> dict[str, Any]:
    """Where a page went, as its outbox row keeps it (details["message"]) for the outbox to redraw it."""
    return {"platform": ref.platform, "chat_id": ref.chat_id, "message_id": ref.message_id}


def page_order(person: Person, *, business_hours: bool | None = None) -> Sequence[str]:
    """The person's `page_via`, else Slack first in business hours and Telegram first after them."""
    if person.page_via:
        return person.page_via
    if business_hours:
        return BUSINESS_ORDER
    return DEFAULT_ORDER


async def page(*, db: Database, audit: AuditLog, config: Config, clock: Clock, adapters: Mapping[str, Adapter],
               metrics: Metrics, incident_id: int, person: Person, actor: Actor, reason: str = "",
               off: Mapping[str, str] | None = None) -> PageResult:
    """Send the page; record `incident.paged` or `incident.page_failed` either way. `off`: why each platform that is
    not on is off, for the failure to name it."""
    async with db.sessions() as session:
        incident = await session.get(Incident, incident_id)
        alerts = await recent_alerts(session, incident_id) if incident else []
        escalation = await session.get(Escalation, incident_id) if incident else None
    if incident is None:
        return PageResult(False, f"There is no incident #{incident_id}.")
    if incident.status == "resolved":
        return PageResult(False, f"#{incident_id} is resolved, so nobody was paged; if it needs someone after all, "
                                 f"`/incident reopen {incident_id}` first.")
    now = clock.now()
    # Escalate carries where the escalation stands, as on an escalation's page: a double press escalates once.
    _, mark = drawn_with(escalation)
    # It carries a key where a platform can find it by it (Slack), as an escalation's page does: if its answer is
    # lost, it is looked for when it is to be redrawn, and redrawn if it had arrived.
    key = f"hand-page-{uuid.uuid4().hex[:20]}"
    order = page_order(person)
    attempt = await send_page(adapters, person, replace(page_message(incident, alerts, person, config, now, reason,
                                                                     escalation_mark=mark), key=key), order)
    metrics.pages.labels(*attempt.counted()).inc()
    if attempt.platform is not None:
        details = {"person": person.id, "platform": attempt.platform, "reason": reason}
        if attempt.tried:
            details["tried"] = attempt.tried  # the platforms that refused it first
        sent = None
        if attempt.ref is not None:  # kept as an escalation's pages are, so the outbox redraws it as the incident changes
            sent = OutboxItem(created_at=now, due_at=now, incident_id=incident_id, channel=f"@{person.id}", kind="page",
                              event="incident.page", status="sent", attempts=1,
                              details={"person": person.id, "manual": True, "message": page_where(attempt.ref),
                                       "reason": reason})  # (its words, kept when it is redrawn)
        await _record(db, audit, actor, incident_id, now, "incident.paged", details, sent, drawn=incident.status)
        return PageResult(True, f"Paged {person.name} on {attempt.platform.capitalize()}.", attempt.platform)
    why = attempt.problem(person, adapters, off=off, order=order)
    failed: dict[str, Any] = {"person": person.id, "tried": attempt.tried, "reason": reason, "problem": why}
    if attempt.unknown:  # it may have arrived (see send_page)
        failed["unknown"] = attempt.unknown
    log.warning("%s %s about #%s: %s", "unconfirmed page to" if attempt.unknown else "could not page", person.id,
                incident_id, why)
    lost = None
    if attempt.unknown and attempt.unknown in page_finders(adapters, person, order):  # (see OutboxWorker._page)
        lost = OutboxItem(created_at=now, due_at=now + timedelta(seconds=LOOK_AFTER), incident_id=incident_id,
                          channel=f"@{person.id}", kind="page", event="incident.page", status="dead", attempts=1,
                          last_error=(UNCONFIRMED + why)[:500],
                          details={"person": person.id, "manual": True,
                                   UNANSWERED: {"key": key, "at": time.time(), "platform": attempt.unknown}})
    await _record(db, audit, actor, incident_id, now, "incident.page_failed", failed, lost)
    if attempt.unknown:
        return PageResult(False, f"The page to {person.name} is unconfirmed: {why}")
    return PageResult(False, f"Could not page {person.name}: {why}")


async def _record(db: Database, audit: AuditLog, actor: Actor, incident_id: int, now: datetime, action: str,
                  details: dict[str, Any], sent: OutboxItem | None = None, drawn: str | None = None) -> None:
    """The audit event, and `sent` (the page's outbox row); a page drawn while the incident was `drawn` (its status)
    is redrawn at once if someone changed that while it went out (their redraw did not know of it yet)."""
    async with db.transaction() as session:
        if sent is not None:
            session.add(sent)
            now_is = await session.get(Incident, incident_id)
            if now_is is not None and drawn is not None and now_is.status != drawn:
                session.add(OutboxItem(**page_redraw_row(incident_id, now)))
        await audit.append_many(session, [Entry(action, actor, "incident", str(incident_id), now, details, incident_id)])
