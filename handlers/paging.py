"""Paging a person directly: the incident's card, with the buttons its state calls for, in their private chat.

Used by `/incident page ID PERSON` and, through the outbox, by escalation steps. The
platform is the first of the person's `page_via` (default: Slack first during business
hours, Telegram first after them and for /incident page) that is on and knows them. Success and failure are both audit events; a failure says what to do,
so whoever pages (a person, or the escalation) can move on at once. A page sent by hand says so in the incident's
thread too ("Alice paged Carol on Telegram."), as an escalation's does: the channel learns who was asked, and that a
page reached nobody. It carries the words typed after the person, and is not sent again to someone paged about the
incident moments ago (REPEAT_AFTER): a command typed twice, or by two people at once, pages them once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.chat import Adapter, DeliveryError, MessageRef, Outbound
from bot.clock import Clock
from bot.config import Config, Person
from bot.metrics import Metrics
from bot.model import Actor
from bot.view import incident_card, one_line, span
from handlers.escalation import drawn_with
from handlers.notify import page_redraw_row, queue_thread_line
from storage.audit import AuditLog, Entry
from storage.db import Database, explain_failure
from storage.models import AuditEvent, Escalation, Incident, OutboxItem
from storage.queries import UNCONFIRMED, recent_alerts

log = logging.getLogger("chatops.paging")
DEFAULT_ORDER = ("telegram", "slack", "teams")  # after hours, and for /incident page
HAND_PAGE_WAIT = 5.0  # seconds of a platform's flood control that /incident page waits out
# Seconds of a platform's "too many requests" an escalation's page waits out there; a longer one (Telegram's flood
# control can say 15 minutes) sends it on the person's next platform, if they have one: a page is not held that long.
PAGE_RATE_WAIT = 60.0
# A platform that fails a page for a reason that may pass (a 5xx, no connection) is tried again after these waits
# (seconds) before the next platform: the person chose the first (Telegram rings at 3 a.m.; a Slack DM often does
# not), and one Bad Gateway should not send the page elsewhere. PagerDuty and Opsgenie retry alike.
RETRY_WAITS = (1.0, 2.0)
BUSINESS_ORDER = ("slack", "teams", "telegram")  # in business hours people are at their desks
NOTE_MAX = 200  # characters of the words a page sent by hand carries: its thread line quotes them within 300
# A person paged about an incident (by hand or by its escalation) is not paged about it again by hand before this: a
# command typed twice pages once, and they have a moment to answer before being asked again.
REPEAT_AFTER = timedelta(minutes=1)
HAND_PAGE_EVENTS = ("incident.paged", "incident.page_failed")  # a page sent by hand's thread line (the card shows none)


@dataclass(frozen=True)
class PageResult:
    ok: bool
    message: str
    platform: str | None = None
    recorded: bool = False  # tried: audited, and a line queued for the incident's thread


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
    failed: tuple[tuple[str, str], ...] = ()  # (platform, what it said) for each platform that failed it, in order
    held: tuple[str, str] | None = None  # (platform, what it said) when that platform's rate limit holds it (waiting)
    dropped: bool = False  # no longer wanted (acknowledged or resolved during a retry's wait): not sent on

    def count(self, metrics: Metrics) -> None:
        """Count this page (sent by hand or by an escalation) in chatops_pages_total: `failed` on each platform that
        failed it, also when the next one took it, then how it ended (`none` for the platform when none was tried)."""
        for platform, _ in self.failed:
            metrics.pages.labels(platform, "failed").inc()
        if self.platform or self.unknown or not self.failed:
            metrics.pages.labels(self.platform or self.unknown or "none",
                                 "ok" if self.platform else "unknown" if self.unknown else "failed").inc()

    def detour(self) -> str:
        """Why a page that went out did not go on the platforms before it, for its line: " (Telegram failed: Bad
        Gateway)"; nothing when the first platform took it."""
        if not self.platform or not self.failed:
            return ""
        return " (" + "; ".join(f"{platform.capitalize()} failed: {said}" for platform, said in self.failed) + ")"

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
                    allow: Callable[[str, str], bool] | None = None, *,
                    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                    retry_waits: Sequence[float] | None = None,
                    wanted: Callable[[], Awaitable[bool]] | None = None) -> Attempt:
    """Try the platforms in `order` that are on and know the person; the first that takes it wins.

    With `allow(platform, user_id)` (a rate budget), a platform whose budget is spent, or that answers
    "too many requests", is waited for rather than skipped: the person chose that order. A platform that took
    the message and never answered ends the attempt (`unknown`), a page's and a direct message's alike: it may
    have arrived, and sending it again, there or on the next platform, would make the person read it twice.
    A platform that fails for a reason that may pass is tried again there first (`retry_waits`, RETRY_WAITS unless
    given, slept with `sleep`: see _on_platform). Each platform that failed it is logged, and named in `failed`, for
    the line that says where the page went to say why not on the one before. A platform that refuses the bot's token
    is named in `refused`: the bot's trouble, not the person's, so an escalation's page waits for the token to work
    again rather than fail (see OutboxWorker._page_waits). With `wanted`, asked before each call after the first (a
    retry after its wait, the next platform): once it says no (the incident was acknowledged or resolved meanwhile),
    nothing more is sent and the attempt is `dropped`: a page retried for seconds went out after the acknowledgement.
    """
    tried: list[str] = []
    transient = False
    refused: list[str] = []
    failed: list[tuple[str, str]] = []
    for platform in order:
        user_id = getattr(person, platform, None)
        adapter = adapters.get(platform)
        pager = getattr(adapter, "page", None)
        if user_id is None or pager is None:
            continue
        if failed and wanted is not None and not await wanted():  # (before a budget is spent on it)
            return Attempt(None, tried, transient, failed=tuple(failed), dropped=True)
        if allow is not None and not allow(platform, str(user_id)):
            return Attempt(None, tried, True, waiting=True)
        tries = [0]
        try:
            ref = await _on_platform(pager, platform, str(user_id), message, person, allow is None, sleep,
                                     RETRY_WAITS if retry_waits is None else retry_waits, tries, wanted)
        except DeliveryError as exc:
            said = _said(platform, exc)
            following = [p for p in order[order.index(platform) + 1:]
                         if getattr(person, p, None) is not None and getattr(adapters.get(p), "page", None)]
            if allow is not None and exc.retry_after and (exc.retry_after <= PAGE_RATE_WAIT or not following):
                return Attempt(None, tried, True, waiting=True, retry_after=exc.retry_after,
                               held=(platform, _reason(platform, str(exc))))
            if exc.unknown:  # it may have arrived: neither again nor elsewhere, or the person gets it twice
                return Attempt(None, [*tried, said], False, unknown=platform, failed=tuple(failed))
            reason = _reason(platform, str(exc))  # (the line keeps it short: no count of tries)
            if tries[0] > 1:
                said = f"{said} ({tries[0]} tries)"
            log.warning("paging: could not reach %s on %s: %s%s", person.id, platform, said,
                        f"; trying {following[0]} next" if following else "")
            tried.append(said)
            failed.append((platform, reason))
            transient = transient or not exc.permanent
            if exc.token_refused:
                refused.append(platform)
            continue
        if isinstance(ref, _Dropped):
            said = _said(platform, ref.error) + (f" ({tries[0]} tries)" if tries[0] > 1 else "")
            return Attempt(None, [*tried, said], True, failed=(*failed, (platform, _reason(platform, str(ref.error)))),
                           dropped=True)
        return Attempt(platform, tried, transient, ref=ref if isinstance(ref, MessageRef) else None,
                       refused=tuple(refused), failed=tuple(failed))
    return Attempt(None, tried, transient, refused=tuple(refused), failed=tuple(failed))


@dataclass(frozen=True)
class _Dropped:
    """_on_platform's answer when the page was no longer wanted after a retry's wait: the failure before it."""

    error: DeliveryError


async def _on_platform(pager: Callable[[str, Outbound], Awaitable[Any]], platform: str, user_id: str,
                       message: Outbound, person: Person, by_hand: bool, sleep: Callable[[float], Awaitable[Any]],
                       retry_waits: Sequence[float], tries: list[int],
                       wanted: Callable[[], Awaitable[bool]] | None = None) -> Any:
    """One platform's call of a page, tried again there while it fails for a reason that may pass (a 5xx, no
    connection: neither permanent, nor a rate limit, nor an unknown outcome, which may have arrived), after each of
    `retry_waits`; the last failure is raised. The waits are longer than a private chat's pace, so the retries
    spend no budget. Asked for `by_hand` (no budget: someone waits for the answer), a short flood-control wait is
    waited out once, on the platform the person chose first, rather than failing or going elsewhere. `tries`
    counts the calls. With `wanted`, asked after each retry's wait: no longer wanted, a _Dropped (with the last
    failure) is returned rather than calling again."""
    waits, flooded = list(retry_waits), False
    while True:
        tries[0] += 1
        try:
            return await pager(user_id, message)
        except DeliveryError as exc:
            if by_hand and not flooded and exc.retry_after and exc.retry_after <= HAND_PAGE_WAIT:
                flooded = True
                await sleep(exc.retry_after)
                continue
            if exc.permanent or exc.retry_after or exc.unknown or not waits:
                raise
            wait = waits.pop(0)
            log.warning("paging: %s failed a page to %s (%s); trying %s again in %g s", platform, person.id, exc,
                        platform, wait)
            await sleep(wait)
            if wanted is not None and not await wanted():
                log.info("paging: the page to %s is no longer wanted; not tried again on %s", person.id, platform)
                return _Dropped(exc)


def _said(platform: str, exc: DeliveryError) -> str:
    """What a platform said of a page it failed, named by it: "telegram sendMessage: Bad Gateway"."""
    return str(exc) if str(exc).startswith((f"{platform} ", f"{platform}:")) else f"{platform}: {exc}"


def _reason(platform: str, said: str) -> str:
    """What a platform said, without its name and call in front ("telegram sendMessage: Bad Gateway": "Bad
    Gateway"), for a line that names the platform itself."""
    if said.startswith((f"{platform} ", f"{platform}:")) and ": " in said:
        return said.split(": ", 1)[1]
    return said


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
               metrics: Metrics, incident_id: int, person: Person, actor: Actor, note: str = "",
               off: Mapping[str, str] | None = None) -> PageResult:
    """Send the page, sent by hand by `actor` (a person: their name is `display_name`, their id `person_id`); record
    `incident.paged` or `incident.page_failed` either way, with a line in the incident's thread. `note`: the words
    typed after the person, the page's message. `off`: why each platform that is not on is off, for the failure to
    name it."""
    now = clock.now()
    async with db.sessions() as session:
        incident = await session.get(Incident, incident_id)
        alerts = await recent_alerts(session, incident_id) if incident else []
        escalation = await session.get(Escalation, incident_id) if incident else None
        recent = await _recent_page(session, incident_id, person.id, now - REPEAT_AFTER) if incident else None
    if incident is None:
        return PageResult(False, f"There is no incident #{incident_id}.")
    if incident.status == "resolved":
        return PageResult(False, f"#{incident_id} is resolved, so nobody was paged; if it needs someone after all, "
                                 f"`/incident reopen {incident_id}` first.")
    note = one_line(note, NOTE_MAX)
    if recent is not None:
        return PageResult(False, _too_soon(recent, person, actor, incident_id, now, note,
                                           {p.id: p.name for p in config.people}))
    who = actor.display_name
    # The words as typed: a backtick as a look-alike (U+02CB), since the page's and the line's own are code spans
    shown = note.replace("`", "\u02cb")
    reason = f"{who} asks for your help" + (f" with #{incident_id}: {shown}" if note else "")
    quoted = f": \u201c{shown}\u201d" if note else "."
    # Escalate carries where the escalation stands, as on an escalation's page: a double press escalates once.
    _, mark = drawn_with(escalation)
    # It carries a key where a platform can find it by it (Slack), as an escalation's page does: if its answer is
    # lost, it is looked for when it is to be redrawn, and redrawn if it had arrived.
    key = f"hand-page-{uuid.uuid4().hex[:20]}"
    order = page_order(person)
    attempt = await send_page(adapters, person, replace(page_message(incident, alerts, person, config, now, reason,
                                                                     escalation_mark=mark), key=key), order)
    attempt.count(metrics)
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
        # (and why not on a platform before it: " (Telegram failed: Bad Gateway)")
        line = f"{who} paged {person.name} on {attempt.platform.capitalize()}{attempt.detour()}{quoted}"
        paged = f"Paged {person.name} on {attempt.platform.capitalize()}{attempt.detour()}"
        try:
            await _record(db, audit, actor, incident_id, now, "incident.paged", details, line, sent,
                          drawn=incident.status)
        except Exception as exc:  # it went out all the same: say so, not that nothing happened (or that it failed)
            why = explain_failure(exc, db.wait)
            log.error("paging: %s paged %s about #%d on %s, but recording it failed (%s): the audit log and the "
                      "incident's thread do not show it", who, person.id, incident_id, attempt.platform, why)
            return PageResult(True, f"{paged}, but recording it failed ({why}), so the incident's thread and audit "
                                    f"log do not show it: it is not sent again, and a page now would reach "
                                    f"{person.name} a second time.", attempt.platform)
        return PageResult(True, f"{paged}.", attempt.platform, recorded=True)
    why = attempt.problem(person, adapters, off=off, order=order)
    # What to do about it (an unconfirmed page says so itself: it may have arrived, and is not sent again), with the
    # command as code in the answer; the thread line has none (a Telegram thread would show the backticks as typed).
    todo = "" if attempt.unknown else (
        (" Try again in a minute, or page" if attempt.transient else " Page") + " someone else with {}.")
    command = f"/incident page {incident_id} PERSON"
    said = why.rstrip(".")
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
    if attempt.unknown:
        line = f"{who} paged {person.name}, and the page is unconfirmed: {said}."
    else:
        line = f"{who} tried to page {person.name}: {said}.{todo.format(command)}"
    await _record(db, audit, actor, incident_id, now, "incident.page_failed", failed, line, lost)
    if attempt.unknown:
        return PageResult(False, f"The page to {person.name} is unconfirmed: {why}", recorded=True)
    return PageResult(False, f"Could not page {person.name}: {said}.{todo.format(f'`{command}`')}", recorded=True)


@dataclass(frozen=True)
class RecentPage:
    """A page of a person about an incident, a moment ago: when, by whom (None: its escalation), on which platform."""

    at: datetime
    by: str | None
    platform: str | None


async def _recent_page(session: AsyncSession, incident_id: int, person_id: str, since: datetime) -> RecentPage | None:
    """The newest `incident.paged` of `person_id` about the incident after `since`, by hand or by its escalation, as the
    audit log has it (every page is recorded there, wherever it was sent from). A page that reached nobody does not
    count: paging again is what its answer says to do."""
    rows = (await session.execute(
        select(AuditEvent.at, AuditEvent.actor_person, AuditEvent.details)
        .where(AuditEvent.incident_id == incident_id, AuditEvent.action == "incident.paged", AuditEvent.at > since)
        .order_by(AuditEvent.seq.desc()))).all()
    for at, by, details in rows:
        if isinstance(details, dict) and details.get("person") == person_id:
            return RecentPage(at, by, details.get("platform"))
    return None


def _too_soon(recent: RecentPage, person: Person, actor: Actor, incident_id: int, now: datetime, note: str,
              names: Mapping[str, str]) -> str:
    """Why the page is not sent: who paged the person a moment ago, and when they may be paged again."""
    ago = max(timedelta(0), now - recent.at)
    left = timedelta(seconds=max(1, math.ceil((REPEAT_AFTER - ago).total_seconds())))
    by = ("you" if recent.by == actor.person_id else "the escalation" if recent.by is None
          else names.get(recent.by, recent.by))
    where = f" on {recent.platform.capitalize()}" if recent.platform else ""
    dropped = " Your message was not sent." if note else ""
    when = f"{span(ago)} ago" if ago >= timedelta(seconds=1) else "just now"
    return (f"{person.name} was paged about #{incident_id} {when}, by {by}{where}, so not again yet: give them "
            f"a moment to answer.{dropped} To page them again, wait {span(left)}; to ask someone else, "
            f"`/incident page {incident_id} PERSON`.")


async def _record(db: Database, audit: AuditLog, actor: Actor, incident_id: int, now: datetime, action: str,
                  details: dict[str, Any], line: str, sent: OutboxItem | None = None, drawn: str | None = None) -> None:
    """The audit event, its `line` in the incident's thread on every platform it is posted on (through the outbox,
    in the same transaction), and `sent` (the page's outbox row); a page drawn while the incident was `drawn` (its
    status) is redrawn at once if someone changed that while it went out (their redraw did not know of it yet)."""
    async with db.transaction() as session:
        now_is = await session.get(Incident, incident_id)
        if sent is not None:
            session.add(sent)
            if now_is is not None and drawn is not None and now_is.status != drawn:
                session.add(OutboxItem(**page_redraw_row(incident_id, now)))
        if now_is is not None:
            queue_thread_line(session, now_is, now, action, {"line": line})  # (action: one of HAND_PAGE_EVENTS)
        await audit.append_many(session, [Entry(action, actor, "incident", str(incident_id), now, details, incident_id)])
