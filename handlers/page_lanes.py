"""The outbox's pages loop: pages, direct messages and channel notices, in lanes side by side.

Someone is waiting for a page, so nothing slow to send may hold it back: each person, each channel's notices and
each incident's page redraws has a lane of its own (see _people_and_notices). An incident's pages still go in step
order (_waiting_first, _behind), and a redraw of its pages waits for a page of it on its way.

A page is claimed (SENDING) before the platform is called, and what the platform answered is recorded however long
the database takes to answer again (_record). A page cut off by a crash, or still unanswered when stopping has
waited STOP_CALLS_WAIT for it, is settled at the next start as unconfirmed (_recover). A page whose answer was lost
is not sent again (the person would read it twice); on Slack it is looked for by its key when someone acts, to be
redrawn as the incident now is, as pages whose answer came are.

The loop is the outbox worker's (handlers/outbox.py mixes PageLanes into OutboxWorker): it settles rows, spends the
platforms' budgets and posts as the worker does for incident messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, exists, update
from sqlmodel import select

from bot.chat import Adapter, DeliveryError, MessageRef, Outbound
from bot.clock import Clock
from bot.config import Channel, Config, Person
from bot.escalation import escalation_mark, pages_after_hours
from bot.incidents import ACKNOWLEDGED, RESOLVED, TRIGGERED
from bot.metrics import Metrics
from bot.tables import counted
from bot.view import incident_card, incident_state, span, thread_line
from handlers.escalation import SYSTEM, TOKEN_REFUSED, Escalations, drawn_with, late_words
from handlers.notify import (ASKED, ASKS, FIRED, LIVE_WHILE, SETTLED, SWAP_ASKS, UNACKNOWLEDGED, asked_row,
                             button_from, decided_words, queue_redraw, queue_thread_line, swap_changed_row)
from handlers.paging import (LOOK_AFTER, PAGE_RATE_WAIT, UNANSWERED, Attempt, page_finders, page_message, page_order,
                             page_where, send_page)
from storage.audit import AuditLog, Entry
from storage.db import Database, explain_failure
from storage.models import AlertRecord, Escalation, Incident, OutboxItem, RunbookRun, SwapRequest, Timer
from storage.queries import UNCONFIRMED, recent_alerts

if TYPE_CHECKING:
    from handlers.outbox import _Buckets

log = logging.getLogger("chatops.outbox")
# rows not drawn on an incident's message (handlers/notify.py); `asked` redraws a decided runbook request's messages
PERSONAL_KINDS = ("page", "direct", "notice", "pages", "asked")
# People (and channels) the pages loop serves side by side (see _people_and_notices): a call that hangs, up to the
# platform's 15 s timeout, holds back only what goes to the same person or chat.
LANES = 16
# How long stopping waits for the platform calls still in flight, after the drain (seconds): a platform that hangs
# would hold the stop for its 15 s timeout, a call after a call; an orchestrator kills the bot after its grace (30 s).
STOP_CALLS_WAIT = 5.0
PAGE_ATTEMPTS = 3  # a page that fails for a passing reason is tried this often, then the escalation moves on
# A page is claimed (SENDING, committed) before the platform is called and settled after: one found SENDING when
# the worker starts, or takes the lead again (a replica that led meanwhile may have died mid-call), and is not a call
# of its own still in flight, was cut off by a crash mid-call, and may have arrived. It is not sent again (as GoAlert
# does: an unknown outcome is not retried blindly into a double page).
SENDING = "sending"
UNSETTLED = ("pending", SENDING)
# A page waiting because a platform refused the bot's token (see _page_waits) has TOKEN_REFUSED in its details (how
# often it found it refused; handlers/escalation.py). Its words are drawn as things are when it goes (_after_now).
_WAITED = OutboxItem.details[TOKEN_REFUSED].as_string().is_not(None)  # a row that waited for the token
# A channel's or person's message (not a page) that a platform refused for the bot's token (OutboxWorker._failed):
# it goes at once once a call there works again, or at the next start, not at its back-off (up to 5 minutes).
TOKEN_WAIT = "token_wait"
LATE_WORDS = timedelta(minutes=1)  # a page that goes this long after its step fired says the time left (_page)
HELD_SAID = "held_said"  # a page's details: the thread said a platform's rate limit holds it (_page_held)
_TOKEN_WAITED = OutboxItem.details[TOKEN_WAIT].as_string().is_not(None)
RECENT_ALERTS = 50  # alerts read to draw a message: its links and "the last of N" come from the newest


class PageLanes:
    """The pages loop of OutboxWorker, which mixes it in: the worker's round calls _people_and_notices (and
    _recover_on_lead first), its stop calls _let_calls_end. It uses the worker's state below, and its way of settling
    a row (_failed, _finish, _mark, _save_details), of posting one (_call, _look_first, _findable), _leading and
    nudge."""

    db: Database
    config: Config
    adapters: Mapping[str, Adapter]
    clock: Clock
    metrics: Metrics
    audit: AuditLog
    escalations: Escalations | None
    off: Mapping[str, str]
    channels: dict[str, Channel]
    people: dict[str, Person]
    names: dict[str, str]
    buckets: _Buckets
    batch: int
    give_up_after: timedelta
    token_refused: dict[str, str]
    _monotonic: Callable[[], float]
    _wake: dict[str | None, asyncio.Event]
    _stopping: bool
    _stopped: asyncio.Event

    def __init__(self) -> None:
        self._recovering = asyncio.Lock()
        # Pages a crash cut off mid-call are settled (_recover) each time this worker takes the lead: another
        # replica may have led meanwhile and died during a page. Counted by the questions that found it not
        # leading; settled for the count when the last settling began (None: not yet).
        self._followed = 0
        self._recovered_at: int | None = None
        # Pages this worker claimed (SENDING) and has not settled, its own calls: their incidents, by row id
        self._claimed: dict[int, int | None] = {}
        self._lanes: dict[str, asyncio.Task[int]] = {}  # the pages loop's deliveries in flight, by whom they go to
        self._lane_pages: dict[asyncio.Task[int], set[tuple[Any, Any]]] = {}  # each one's pages: (incident, step)
        # The wait before a platform that failed a page for a passing reason is tried again (send_page's retry_waits):
        # stopping cuts it short. Tests replace it, so as not to wait.
        self._sleep: Callable[[float], Awaitable[Any]] = self._pause

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _recover_on_lead(self, now: datetime) -> None:
        """Settle the pages a crash cut off (_recover) when this worker first leads, and when it leads again after a
        question found it not leading (_leading counts them)."""
        async with self._recovering:
            if self._recovered_at != self._followed:
                followed = self._followed  # (a question that finds it not leading during the settling: again)
                await self._recover(now)
                self._recovered_at = followed

    async def _let_calls_end(self, loops: Sequence[asyncio.Task[None]], calls: float) -> None:
        """Stopping (see OutboxWorker.stop), once no loop or lane starts another row: the loops' and the lanes' calls
        still in flight get `calls` seconds to be answered; one still unanswered then is cut off."""
        going = [*loops, *self._lane_pages]
        if going:
            _, hung = await asyncio.wait(going, timeout=calls)
            if hung:  # (a lane's failure is logged as it ends)
                pages = len(self._claimed)
                log.warning("outbox: stopping with %s still waiting for the platform after %g s; cut off, as a "
                            "crash cuts them off: the next start settles them%s", counted(len(hung), "delivery",
                                                                                     "deliveries"), calls,
                            f" ({counted(pages, 'page')} as unconfirmed, not sent again)" if pages else "")
                for task in hung:
                    task.cancel()
                await asyncio.wait(hung, timeout=1.0)

    async def _people_and_notices(self, now: datetime, off: Sequence[str], *, wait: bool = False) -> int:
        """Pages first (someone is waiting for them), then direct messages and notices; notices for a channel whose
        platform is `off` wait (as its incident messages do) outside the window, so that a backlog of them holds
        back nothing.

        They go in lanes side by side (at most LANES): a person's (their pages, then their direct messages), a
        channel's notices, an incident's page redraws. A call that hangs until its timeout (15 s) held back every
        page behind it, on every platform; now it holds back its own lane only, and the round does not wait for
        it: a page to someone else queued meanwhile goes at once. A lane still going keeps its rows out of the
        next rounds (one lane per person at a time: their chat's order and budget, and no row taken twice).
        Returns the calls made: none here, as the lanes go on their own, unless `wait` (run_once): then it waits
        for the lanes in flight, and for those it starts."""
        if wait and self._lane_pages:
            await asyncio.gather(*self._lane_pages, return_exceptions=True)
        # The lanes on their way as the rows are read: a row of theirs read now may be settled by the time the lanes
        # are started below (a direct message sent, a page refused and due later), and taken again it went twice, or
        # a later step's page went before the earlier one. Their rows wait for the next round (their end wakes it).
        busy = set(self._lanes)
        paging = {(i, step) for pages in self._lane_pages.values() for i, step in pages}  # in flight
        async with self.db.sessions() as session:
            rows = list((await session.execute(
                select(OutboxItem).where(OutboxItem.status == "pending", OutboxItem.due_at <= now,
                                         OutboxItem.kind.in_(PERSONAL_KINDS),
                                         ~and_(OutboxItem.kind == "notice", OutboxItem.channel.in_(off)))
                .order_by(case((OutboxItem.kind == "page", 0), else_=1), OutboxItem.id).limit(self.batch)
            )).scalars().all())
            rows = await self._waiting_first(session, rows, now)
        # An incident's pages of different steps join their people's lanes into one, so that they go in step
        # order ("Paged Bob", then "Paged Carol"; see _waiting_first); the pages of one step go side by side.
        steps: dict[int, set[Any]] = {}
        for row in rows:
            if row.kind == "page" and row.incident_id is not None:
                steps.setdefault(row.incident_id, set()).add(_step(row))
        joined: dict[str, str] = {}

        def root(key: str) -> str:
            while joined.get(key, key) != key:
                key = joined[key]
            return key

        for row in rows:
            if row.kind == "page" and len(steps.get(row.incident_id or 0, ())) > 1:
                lane, incident = root(_lane_of(row)), root(f"incident-{row.incident_id}")
                if lane != incident:
                    joined[lane] = incident
        lanes: dict[str, list[OutboxItem]] = {}
        for row in rows:
            lanes.setdefault(root(_lane_of(row)), []).append(row)
        busy.update(self._lanes)
        paging.update((i, step) for pages in self._lane_pages.values() for i, step in pages)
        started = []
        for mine in lanes.values():
            keys = {_lane_of(r) for r in mine}
            pages = {(r.incident_id, _step(r)) for r in mine if r.kind == "page"}
            if keys & busy or any(i == j and s != t for i, s in pages for j, t in paging):
                continue  # its person's lane still goes, or an earlier step's page of its incident is on its way
            if any(r.kind == "pages" and r.incident_id in self._claimed.values() for r in mine):
                # A page of its incident is on its way, drawn as the incident was before this change: the redraw
                # waits for it (the next round after its lane ends), or it would find no page to redraw, be done,
                # and the page would go on saying Firing with an Acknowledge button.
                continue
            if len(self._lane_pages) >= LANES:
                break  # the rest wait for a lane to end (which wakes this loop)
            task = asyncio.create_task(self._lane(mine, loop=not wait), name=f"outbox-{min(keys)}")
            self._lane_pages[task] = pages
            self._lanes.update(dict.fromkeys(keys, task))
            task.add_done_callback(functools.partial(self._lane_ended, keys))
            started.append(task)
        return sum(await asyncio.gather(*started)) if wait else 0

    def _lane_ended(self, keys: set[str], task: asyncio.Task[int]) -> None:
        for key in keys:
            if self._lanes.get(key) is task:
                del self._lanes[key]
        self._lane_pages.pop(task, None)
        if not task.cancelled() and task.exception() is not None:  # its rows stay pending: the next round
            log.error("outbox: delivering to %s failed", ", ".join(sorted(keys)), exc_info=task.exception())
        wake = self._wake.get(None)
        if wake is not None:
            wake.set()  # its rows held back meanwhile, or the ones after the lane limit, go now

    async def _lane(self, rows: Sequence[OutboxItem], *, loop: bool = True) -> int:
        """One person's (or chat's, or incident's) rows of a round, in order (see _people_and_notices); one of the
        loop's stops when the worker stops (run_once's, called as such, goes on). Each row goes at the clock's time
        as it starts, not the round's: a call before it may have hung for its timeout (15 s), and what the row
        records (its audit event, its thread line) and compares (a promise spent, a page given up on) is of now."""
        calls = 0
        behind: dict[int, tuple[Any, Attempt]] = {}  # incident -> the step of a page of it that did not go here, why
        for row in rows:
            if (loop and self._stopping) or not await self._leading():
                break  # (stopping: the rest wait for the next start, pending, not claimed)
            now = self.clock.now()
            if row.kind == "page":
                assert row.id is not None
                self._claimed[row.id] = row.incident_id  # claimed (SENDING) by _page: this worker's own call
                try:
                    calls += await self._page(row, now, behind)
                finally:
                    self._claimed.pop(row.id, None)
            elif row.kind == "pages":
                calls += await self._redraw_pages(row, now)
            elif row.kind == "asked":
                calls += await self._redraw_asks(row)
            elif row.kind == "direct":
                calls += await self._direct(row)
            else:
                calls += await self._notice(row)
        return calls

    @staticmethod
    async def _waiting_first(session: Any, rows: list[OutboxItem], now: datetime) -> list[OutboxItem]:
        """The pages of an incident go in step order: a page due now (a new step's) is preceded by the incident's
        earlier pages that wait for the bot's token, not due yet (their back-off). If the token works again, they go
        before it, or give way to it (_superseding); if not, they wait on."""
        pages = [r for r in rows if r.kind == "page"]
        newest: dict[int, int] = {}
        for page in pages:
            if page.incident_id is not None:
                newest[page.incident_id] = max(newest.get(page.incident_id, 0), page.id or 0)
        if not newest:
            return rows
        held = [r for r in (await session.execute(select(OutboxItem).where(
            OutboxItem.kind == "page", OutboxItem.status == "pending", OutboxItem.due_at > now,
            OutboxItem.incident_id.in_(sorted(newest)), _WAITED)
        )).scalars().all() if (r.id or 0) < newest[r.incident_id or 0]]
        if not held:
            return rows
        return sorted(pages + held, key=lambda r: r.id or 0) + [r for r in rows if r.kind != "page"]

    async def _redraw_pages(self, row: OutboxItem, now: datetime) -> int:
        """Someone acted on the incident (or its source resolved it): each page its escalation sent is drawn as the
        incident now is (state, who, the buttons that apply), as its channel card is. A page the platform no longer
        has (deleted) is left alone; a page whose chat's budget is spent waits a moment, and holds back no other. A
        page whose answer was lost is looked for first (_look_for_pages), and redrawn if it had arrived."""
        # The pages this row redrew already (a chat takes about one edit a second: two pages to one person wait for
        # each other, and a retry that began again with the first would never reach the second).
        drawn = set((row.details or {}).get("drawn") or [])
        fired = (row.details or {}).get(FIRED)  # [step, run]: the escalation moved on to that step
        async with self.db.sessions() as session:
            incident = await session.get(Incident, row.incident_id)
            sent = [p for p in (await session.execute(select(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.incident_id == row.incident_id,
                OutboxItem.status.in_(("sent", "dead"))).order_by(OutboxItem.id))).scalars().all()
                    if p.id not in drawn and ((p.details or {}).get("message") or _lost_page(p))
                    and (fired is None or [(p.details or {}).get("step"), (p.details or {}).get("run", 0)]
                         == [fired[0] - 1, fired[1]])]
            alerts = await recent_alerts(session, row.incident_id, RECENT_ALERTS) if incident and sent else []
            escalation = await session.get(Escalation, row.incident_id) if sent else None
        if incident is None:
            sent = []
        # (a look that failed for now, the platform in trouble, holds back no page already found: they are redrawn,
        # and the row waits for the look's retry, as after a failed redraw)
        calls, look_at, look_failed = await self._look_for_pages(row, [p for p in sent if _lost_page(p)], now)
        pages = [p for p in sent if (p.details or {}).get("message")]
        waiting = False
        for page in pages:
            where = page.details["message"]
            adapter = self.adapters.get(where["platform"])
            if adapter is None:
                continue
            if not self.buckets.allow(where["platform"], where["chat_id"], edit=True, now=self._monotonic()):
                waiting = True  # this chat's budget is spent: the others' pages go on, this one a moment later
                continue
            card = self._page_drawn(page, incident, alerts, escalation, now)
            calls += 1
            try:
                await adapter.update(MessageRef(where["platform"], where["chat_id"], where["message_id"]), card)
            except DeliveryError as exc:
                # The platform in trouble, or refusing the bot's token (the bot's trouble, which every call waits out,
                # as _call does): the pages not redrawn yet, later, once it works again.
                if exc.token_refused:
                    self.token_refused[where["platform"]] = str(exc)
                if not exc.permanent or exc.token_refused:
                    await self._redrawn(row, drawn)
                    await self._failed([row], str(exc), exc.retry_after, permanent=False, platform_trouble=True)
                    return calls
                log.warning("outbox: cannot redraw the page to %s about #%s: %s", page.channel, row.incident_id, exc)
            else:
                if self.token_refused.pop(where["platform"], None) is not None:
                    await self._token_accepted()
            drawn.add(page.id)
        if look_failed is not None:
            await self._redrawn(row, drawn)
            await self._failed([row], look_failed[0], look_failed[1], permanent=False, platform_trouble=True)
            return calls
        if waiting or look_at is not None:  # (no attempt spent)
            await self._redrawn(row, drawn)
            if waiting:
                await self._failed([row], "the chat's budget is spent", 1.0, permanent=False)
            else:
                assert look_at is not None
                await self._failed([row], "a page whose answer was lost is looked for once the platform stored it",
                                   max(0.1, (look_at - now).total_seconds()), permanent=False)
            return calls
        async with self.db.transaction() as session:  # this one, and any other waiting for the same incident
            # (one that redrew the pages of one step settles only itself: it drew no others)
            await session.execute(update(OutboxItem).where(
                OutboxItem.kind == "pages", OutboxItem.incident_id == row.incident_id,
                OutboxItem.status == "pending", OutboxItem.id == row.id if fired else OutboxItem.id <= row.id)
                .values(status="sent"))
        return calls

    def _page_drawn(self, page: OutboxItem, incident: Incident, alerts: list[AlertRecord],
                    escalation: Escalation | None, now: datetime) -> Outbound:
        """A page drawn again as the incident now is (its state, who, its buttons), in the page's own words, not
        the channel card's: while the escalation runs, an escalation's page still says which step it was and what
        comes next, as it did when it was sent ("Step 1 of 2 of the escalation. Bob in 5 min if nobody
        acknowledges."), or, once the escalation has moved past it, what it says now; a page sent by hand keeps
        the reason it was sent with while the incident fires. Once the escalation stopped (acknowledged,
        resolved), neither is said."""
        details = page.details or {}
        person = self.people.get(str(details.get("person")))
        note, mark = drawn_with(escalation)
        if person is None:
            return incident_card(incident, alerts, now=now, tz=self.config.timezone, names=self.names, next_step=note,
                                 escalation_mark=mark)
        state, step, total = incident_state(incident), details.get("step"), details.get("of")
        words = note if state in ("firing", "acknowledged") else ""
        if (words and isinstance(step, int) and total and escalation is not None
                and details.get("run", 0) == escalation.run):
            here = escalation.state == "active" and escalation.next_step == step  # not moved past it
            # Moved past it: said so, with no promise (its redraw comes once, as the escalation leaves its step: what
            # comes next would be outdated at the next step, and redrawing every page at every step costs each
            # person's chat the edits its new pages need).
            after = (str(details.get("next") or "") if here else
                     "Every step of the escalation has run." if escalation.state == "exhausted" else
                     f"The escalation has moved on to step {escalation.next_step}." if escalation.next_step > step
                     else note)
            words = step_words(step, total, after,
                               late_words(details.get("late"), person.timezone or self.config.timezone, now))
        elif step is None and details.get("reason") and state == "firing":
            words = str(details["reason"])
        return page_message(incident, alerts, person, self.config, now, words, escalation_mark=mark)

    async def _look_for_pages(self, row: OutboxItem, lost: Sequence[OutboxItem], now: datetime
                              ) -> tuple[int, datetime | None, tuple[str, float | None] | None]:
        """Pages whose answer was lost (unconfirmed: the platform may have them), about to be redrawn (`row`), are
        looked for by the key they carried: one found is recorded where it is (details["message"]) and is sent
        after all, so this redraw and the next ones draw it; one not found is left as it was. Only when someone
        acted, for only a page to redraw needs finding. Returns the calls made and when a look not due yet (the
        platform may still be storing it: LOOK_AFTER) is due, and why looking failed for now (the platform in
        trouble) with the wait it asked for, if it did: then the pages not looked for yet are looked for at `row`'s
        retry."""
        calls, look_at = 0, None
        for page in lost:
            if page.due_at > now:
                look_at = page.due_at if look_at is None else min(look_at, page.due_at)
                continue
            mark = page.details[UNANSWERED]
            person = self.people.get(str(page.details.get("person")))
            order = page_order(person, business_hours=bool(page.details.get("business"))) if person else []
            platforms = ([mark["platform"]] if mark.get("platform") else page_finders(self.adapters, person, order)
                         ) if person else []
            found: MessageRef | None = None
            for platform in platforms:
                find = getattr(self.adapters.get(platform), "find", None)
                user_id = getattr(person, platform, None)
                if find is None or user_id is None:
                    continue
                calls += 1
                try:
                    found = await find(str(user_id), str(mark["key"]), thread=None,
                                       sent_at=float(mark.get("at") or time.time()))
                except DeliveryError as exc:
                    self.metrics.chat_calls.labels(platform, "find", "error").inc()
                    if not exc.permanent or exc.token_refused:
                        if exc.token_refused:
                            self.token_refused[platform] = str(exc)
                        return calls, look_at, (f"looking for the page whose answer was lost: {exc}", exc.retry_after)
                    log.warning("outbox: cannot look for the page to %s about #%s, whose answer was lost (%s), so it "
                                "is not redrawn (Slack lets the bot look in a direct conversation with im:history)",
                                page.channel, page.incident_id, exc)
                    continue
                self.metrics.chat_calls.labels(platform, "find", "ok").inc()
                if found is not None:
                    break
            details = {k: v for k, v in page.details.items() if k != UNANSWERED}  # looked for: not again
            settled: dict[str, Any] = {}
            if found is not None:
                log.warning("outbox: the page to %s about #%s, whose answer was lost, had arrived (%s); it is "
                            "redrawn as the incident changes", page.channel, page.incident_id, found.message_id)
                details["message"] = page_where(found)
                settled = {"status": "sent", "last_error": None}
            else:
                log.info("outbox: the page to %s about #%s, whose answer was lost, is not there", page.channel,
                         page.incident_id)
            async with self.db.transaction() as session:
                await session.execute(update(OutboxItem).where(OutboxItem.id == page.id, OutboxItem.status == "dead")
                                      .values(details=details, **settled))
            page.details = details
        return calls, look_at, None

    async def _redrawn(self, row: OutboxItem, drawn: set[int]) -> None:
        """Keep on the row which pages it redrew, for its retry to go on from there."""
        if drawn:
            row.details = {**(row.details or {}), "drawn": sorted(drawn)}
            await self._save_details([row])

    async def _notice(self, row: OutboxItem) -> int:
        channel = self.channels.get(row.channel)
        if channel is None:
            await self._finish([row], "dead", f"no channel {row.channel!r} in app.yaml")
            return 0
        adapter = self.adapters.get(channel.platform)
        if adapter is None or not self.buckets.allow(channel.platform, channel.chat, edit=False, now=self._monotonic()):
            return 0  # that platform is off (it waits, like incident messages) or this chat's budget is spent
        held = row.details.get(UNACKNOWLEDGED)
        if isinstance(held, int) and not isinstance(held, bool):  # "nobody has acknowledged" #N, if still so
            async with self.db.sessions() as session:
                status = (await session.execute(select(Incident.status).where(Incident.id == held))).scalar()
            if status is not None and status != TRIGGERED:
                await self._finish([row], "cancelled", f"not sent: #{held} was {status} first")
                return 0
        found = await self._look_first(adapter, [row], "notice", channel.platform, channel.chat, None)
        if found is not True:  # there already (it had arrived), or the look failed for now (it waits)
            if found is not False:
                await self._finish([row], "sent")
            return 1
        text = str(row.details.get("text") or "")
        context: dict[str, Any] = {"text": text}
        if row.details.get("mention") == "here":
            context["mention"] = "here"
        key = f"notice-{row.id}"
        if await self._call(adapter.send(channel.chat, Outbound("text", context, text=text, key=key)), [row],
                            channel.platform, channel.chat, "send", lost=self._findable(adapter, key)) is not None:
            await self._finish([row], "sent")
        return 1

    async def _direct(self, row: OutboxItem) -> int:
        person = self.people.get(row.channel.removeprefix("@"))
        if person is None:
            await self._failed([row], f"no person {row.channel.removeprefix('@')!r} in app.yaml", None, permanent=True)
            return 0
        if row.details.get(ASKS) is not None:
            ended = await self._decided(int(row.details[ASKS]))
            if ended is not None:  # (a question already answered: not asked at all)
                await self._finish([row], "cancelled", f"the runbook request was decided before it went: {ended}")
                return 0
        text = str(row.details.get("text") or "")
        buttons = [button_from(spec) for spec in row.details.get("buttons") or []]
        moved_on = await self._swap_moved_on(row.details) if row.details.get(SWAP_ASKS) is not None else None
        if moved_on is not None:  # (its buttons would do nothing: it goes as its redraw would leave it)
            text, buttons = f"{text}\n\n{moved_on}", []
        order = row.details.get("platforms") or page_order(person)
        message = Outbound("text", {"text": text}, buttons, text=text)
        attempt = await send_page(self.adapters, person, message, order, allow=self._budget, sleep=self._sleep)
        if attempt.waiting:
            await self._wait(row, attempt, self.clock.now())
            return 1 if attempt.retry_after else 0
        if attempt.platform is not None:
            self.metrics.chat_calls.labels(attempt.platform, "direct", "ok").inc()
            await self._finish([row], "sent", where=attempt.ref, settled=moved_on is not None)
            if self.token_refused.pop(attempt.platform, None) is not None:
                await self._token_accepted()
            return 1
        if attempt.unknown:
            # It may have arrived: as a page, it is sent neither again nor on the next platform (the person would
            # read it twice), and whoever waits on it is not told it never arrived (`if_undeliverable`).
            problem = attempt.problem(person, self.adapters, what="message")
            log.warning("outbox: the %s message to %s is unconfirmed: %s", row.event, person.id, problem)
            async with self.db.transaction() as session:
                await self._mark(session, [row], "dead", (UNCONFIRMED + problem)[:500], tried=True)
            return 1
        problem = attempt.problem(person, self.adapters, off=self.off, order=order)
        # A refused token is the bot's trouble, not the person's: the message waits for a token that works.
        trouble = attempt.transient or bool(attempt.refused)
        self._refused_tokens(attempt, problem)
        await self._failed([row], problem, None, permanent=not trouble, platform_trouble=trouble)
        return 1

    async def _decided(self, run_id: int) -> str | None:
        """How the runbook request `run_id` ended (its `asked` row's words: see handlers/notify.py asked_row), or
        None while it waits."""
        async with self.db.sessions() as session:
            found = (await session.execute(select(OutboxItem.details).where(
                OutboxItem.kind == "asked", OutboxItem.channel == ASKED,
                OutboxItem.details[ASKS].as_integer() == run_id).limit(1))).first()
        return str(found[0].get("outcome") or "") if found is not None else None

    async def _keep_where(self, session: Any, items: Sequence[OutboxItem], ref: MessageRef, *,
                          settled: bool) -> None:
        """In the transaction that marks them sent: a message asking to decide a runbook request (its row carries
        ASKS) keeps where it went, as a page does, to be redrawn once the request is decided (`settled`: it went
        saying how it ended already). One that went asking while the request was decided during the call (a click
        as the platform took it) is redrawn now: the redraw of the decision may have looked before it was kept.
        (On PostgreSQL the run's row is locked for it, so the decision commits either before this look or after
        this transaction; on SQLite, writes are one at a time.)"""
        for item in items:
            if (item.details or {}).get(SWAP_ASKS) is not None:
                await self._keep_swap_ask(session, item, ref, settled=settled)
                continue
            run_id = (item.details or {}).get(ASKS)
            if run_id is None:
                continue
            details = {**item.details, "message": page_where(ref), **({SETTLED: True} if settled else {})}
            await session.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(details=details))
            item.details = details
            if settled:
                continue
            query = select(RunbookRun.id).where(RunbookRun.id == int(run_id))
            if self.db.is_postgres:
                query = query.with_for_update(read=True)
            await session.execute(query)
            decided = (await session.execute(select(OutboxItem).where(
                OutboxItem.kind == "asked", OutboxItem.channel == ASKED,
                OutboxItem.details[ASKS].as_integer() == int(run_id)).limit(1))).scalars().first()
            if decided is not None:
                session.add(asked_row(decided.incident_id, int(run_id), str(decided.details.get("outcome") or ""),
                                      self.clock.now()))
                self.nudge()

    async def _swap_moved_on(self, details: Mapping[str, Any]) -> str | None:
        """What became of the swap a direct message's buttons act on, if its last change left them doing nothing."""
        async with self.db.sessions() as session:
            last = await _last_swap_change(session, int(details[SWAP_ASKS]))
        if last is None or last.get("status") in (details.get(LIVE_WHILE) or ()):
            return None
        return str(last.get("outcome") or "")

    async def _keep_swap_ask(self, session: Any, item: OutboxItem, ref: MessageRef, *, settled: bool) -> None:
        """_keep_where for a direct message with a swap's buttons (SWAP_ASKS). One that went while the swap moved
        past what its buttons do (the other side cancelled as it was sent) is redrawn now: the redraw of that change
        may have looked before it was kept. (PostgreSQL: the swap's row is locked for it, as a run's is.)"""
        details = {**item.details, "message": page_where(ref), **({SETTLED: True} if settled else {})}
        await session.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(details=details))
        item.details = details
        if settled:
            return
        swap_id = int(details[SWAP_ASKS])
        query = select(SwapRequest.id).where(SwapRequest.id == swap_id)
        if self.db.is_postgres:
            query = query.with_for_update(read=True)
        await session.execute(query)
        last = await _last_swap_change(session, swap_id)
        if last is not None and last.get("status") not in (details.get(LIVE_WHILE) or ()):
            session.add(swap_changed_row(swap_id, str(last.get("status")), str(last.get("outcome")), self.clock.now(),
                                         clicked=last.get("clicked")))
            self.nudge()

    async def _redraw_asks(self, row: OutboxItem) -> int:
        """A runbook request was decided: each message that asked to decide it (the thread's line on each platform,
        each approver's direct message) is redrawn to say how it ended, without its buttons, where it went. A swap
        changed (SWAP_ASKS): each direct message whose buttons do nothing in its new state is redrawn, its words
        then what happened, without them; but the one clicked for the change, which the click's answer redraws.
        One whose chat's budget is spent waits a moment and holds back no other; one the platform no longer has
        (deleted) is left alone; the platform in trouble, the rest wait for the row's retry. Each one redrawn is
        marked so (SETTLED), for a retry to go on from there."""
        swap_id = row.details.get(SWAP_ASKS)
        if swap_id is not None:
            status, outcome = row.details.get("status"), str(row.details.get("outcome") or "")
            clicked = row.details.get("clicked") or {}
            moot = [r for r in await self._asking(SWAP_ASKS, int(swap_id), ("direct",))
                    if status not in (r.details.get(LIVE_WHILE) or ())]
            # The one clicked for this change: its click's answer is what it says now, and stays (a later change
            # wrote the question back over it); the others, redrawn. (Telegram numbers each chat's messages.)
            answered = [r for r in moot if clicked and all(
                str(r.details["message"].get(key)) == str(clicked.get(key)) for key in ("platform", "chat_id", "message_id"))]
            if answered:
                for r in answered:
                    r.details = {**r.details, SETTLED: True}
                await self._save_details(answered)
            asks = [r for r in moot if r not in answered]
            return await self._settle_asks(row, asks, lambda ask: f"{ask.details.get('text') or ''}\n\n{outcome}",
                                           f"swap #{swap_id}, {status}")
        run_id, ended = int(row.details[ASKS]), str(row.details.get("outcome") or "")
        asks = await self._asking(ASKS, run_id, ("reply", "direct"))
        return await self._settle_asks(row, asks, lambda ask: decided_words(ask.details, ended),
                                       f"runbook run {run_id}, decided")

    async def _asking(self, key: str, subject: int, kinds: tuple[str, ...]) -> list[OutboxItem]:
        """The messages sent asking something of `subject` (a run, a swap: its id under `key` in their details),
        where they went, not redrawn yet."""
        async with self.db.sessions() as session:
            return [r for r in (await session.execute(select(OutboxItem).where(
                OutboxItem.kind.in_(kinds), OutboxItem.details[key].as_integer() == subject)
                .order_by(OutboxItem.id))).scalars().all()
                    if (r.details or {}).get("message") and not r.details.get(SETTLED)]

    async def _settle_asks(self, row: OutboxItem, asks: list[OutboxItem], words_of: Callable[[OutboxItem], str],
                           what: str) -> int:
        """Redraw each of `asks` with `words_of(it)`, without its buttons (see _redraw_asks); `what` for the log."""
        calls, waiting = 0, False
        for ask in asks:
            where = ask.details["message"]
            platform, chat = str(where["platform"]), str(where["chat_id"])
            adapter = self.adapters.get(platform)
            if adapter is None:
                continue  # (its platform is off now: it stays as it was)
            if not self.buckets.allow(platform, chat, edit=True, now=self._monotonic()):
                waiting = True
                continue
            words = words_of(ask)
            message = (Outbound("thread", {"line": thread_line(ask.event, {"line": words}, actor_name=None),
                                           "incident_id": ask.incident_id}, text=words)
                       if ask.kind == "reply" else Outbound("text", {"text": words}, text=words))
            calls += 1
            try:
                await adapter.update(MessageRef(platform, chat, str(where["message_id"])), message)
            except DeliveryError as exc:
                self.metrics.chat_calls.labels(platform, "update", "error").inc()
                if exc.token_refused:
                    self.token_refused[platform] = str(exc)
                if exc.retry_after:
                    self.buckets.pause(platform, chat, self._monotonic() + exc.retry_after)
                if not exc.permanent or exc.token_refused:
                    await self._failed([row], str(exc), exc.retry_after, permanent=False, platform_trouble=True)
                    return calls
                log.warning("outbox: cannot redraw the %s %s about %s: %s", ask.kind, ask.event, what, exc)
            else:
                self.metrics.chat_calls.labels(platform, "update", "ok").inc()
                if self.token_refused.pop(platform, None) is not None:
                    await self._token_accepted()
            ask.details = {**ask.details, SETTLED: True}
            await self._save_details([ask])
        if waiting:  # (no attempt spent)
            await self._failed([row], "the chat's budget is spent", 1.0, permanent=False)
            return calls
        async with self.db.transaction() as session:
            await self._mark(session, [row], "sent")
        return calls

    def _refused_tokens(self, attempt: Attempt, problem: str) -> None:
        """Remember the platforms that refused the bot's token in `attempt`, each with what it said (for /readyz, and
        until a call there works again: see _token_accepted)."""
        for platform in attempt.refused:
            self.token_refused[platform] = next((t for t in attempt.tried if t.startswith(platform)), problem)

    def _reaches(self, channel_id: str) -> bool:
        """Whether a message to the channel can go now: its platform on, and its token not refused."""
        channel = self.channels.get(channel_id)
        return channel is not None and channel.platform in self.adapters and channel.platform not in self.token_refused

    def _budget(self, platform: str, user_id: str) -> bool:
        """A direct message spends from the person's private chat budget (and the platform's)."""
        return self.buckets.allow(platform, user_id, edit=False, now=self._monotonic())

    async def _wait(self, row: OutboxItem, attempt: Attempt, now: datetime) -> None:
        """Rate-limited: the row waits (as long as the platform said), without counting as a failed try."""
        values: dict[str, Any] = {"status": "pending"}  # a page claimed for sending: not sent, so pending again
        if attempt.retry_after:
            values.update(due_at=now + timedelta(seconds=attempt.retry_after),
                          last_error=f"rate-limited; retrying in {attempt.retry_after:g}s")
        elif row.status != SENDING:
            return  # our own budget: the next round looks again
        async with self.db.transaction() as session:
            await session.execute(update(OutboxItem).where(OutboxItem.id == row.id, OutboxItem.status.in_(UNSETTLED))
                                  .values(**values))

    async def _recover(self, now: datetime) -> None:
        """Pages found SENDING when this worker starts, or takes the lead again (another replica led meanwhile): a
        crash cut the call off, so each may have arrived. None is sent again; each is settled as unconfirmed, in
        the thread and the audit log, and its step's wait stands. This worker's own calls still in flight (it lost
        the lead during one, and leads again before the platform answered) are not among them: they settle when
        the platform answers."""
        problem = "the bot stopped while sending it, so it may have arrived; it is not sent again, so as not to page twice"
        async with self.db.transaction() as session:
            # Pages waiting for the bot's token are tried at once, not at the end of their back-off: the token may
            # have been fixed meanwhile, and a restart is what fixing it takes for a platform off since it refused
            # the token at start.
            await session.execute(update(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.status == "pending", OutboxItem.due_at > now,
                _WAITED).values(due_at=now))
            await session.execute(update(OutboxItem).where(  # (the cards and lines that waited for it too)
                OutboxItem.kind != "page", OutboxItem.status == "pending", OutboxItem.due_at > now,
                _TOKEN_WAITED).values(due_at=now))
            rows = (await session.execute(select(OutboxItem).where(OutboxItem.status == SENDING,
                                                                   OutboxItem.id.not_in(sorted(self._claimed)))
                                          .order_by(OutboxItem.id))).scalars().all()
            entries = []
            for row in rows:
                row.status, row.last_error = "dead", UNCONFIRMED + problem
                session.add(row)
                incident = await session.get(Incident, row.incident_id) if row.incident_id is not None else None
                if incident is None:
                    continue
                who = str(row.details.get("person"))
                name = self.people[who].name if who in self.people else who
                queue_thread_line(session, incident, now, "escalation.page_failed",
                                  {"line": f"The page to {name} is unconfirmed: {problem}."})
                entries.append(Entry("incident.page_failed", SYSTEM, "incident", str(incident.id), now,
                                     {"person": who, "step": row.details.get("step"), "problem": problem,
                                      "unknown": "restart"}, incident.id))
                log.warning("outbox: the page to %s about #%s was cut off by a restart; not sent again", who,
                            incident.id)
            await self.audit.append_many(session, entries)
        if rows:
            self.nudge()

    async def _page(self, row: OutboxItem, now: datetime,
                    behind: dict[int, tuple[Any, Attempt]] | None = None) -> int:
        """An escalation step's page: still wanted? send it, then say in the thread what happened and what is next.
        `behind`: by incident, the page of its lane so far that did not go, and why (see _behind)."""
        person = self.people.get(str(row.details.get("person")))
        async with self.db.sessions() as session:
            incident = await session.get(Incident, row.incident_id)
            alerts = await recent_alerts(session, row.incident_id, RECENT_ALERTS) if incident else []
            escalation = await session.get(Escalation, row.incident_id)
        if person is None or incident is None:
            await self._finish([row], "dead", "the person or the incident no longer exists")
            return 0
        manual = bool(row.details.get("manual"))
        if incident.status == RESOLVED or (incident.status == ACKNOWLEDGED and not manual):
            await self._finish([row], "cancelled", f"not sent: #{incident.id} was {incident.status} first")
            return 0
        if escalation is not None and row.details.get("run", 0) != escalation.run:  # resolved and reopened since
            await self._finish([row], "cancelled", f"not sent: #{incident.id} was reopened, and its escalation "
                                                   "started again")
            return 0
        waited = bool(row.details.get(TOKEN_REFUSED))  # it waited for the bot's token (_page_waits)
        step, total = row.details.get("step"), row.details.get("of")
        newer = await self._superseding(row) if waited else None
        if newer is not None:
            await self._finish([row], "cancelled", superseded(newer, person.name))
            return 0
        business = bool(row.details.get("business"))
        order = page_order(person, business_hours=business)
        earlier = (behind or {}).get(row.incident_id or 0)
        if earlier is not None and await self._behind(row, person, incident, order, *earlier, now):
            return 0
        # Still at this page's step (the next has not fired): what it says comes next holds.
        here = (escalation is not None and escalation.state == "active" and isinstance(step, int)
                and escalation.next_step == step)
        after = str(row.details.get("next") or "")
        # Drawn as things are now when it waited for the bot's token (its "Carol in 5 min" may have come and gone),
        # or goes late (a platform's flood control held it, the bot was down): "Carol in 30 min" written at 04:00
        # and sent at 04:15 promised 15 minutes more than there were. (An ask holds however late: no `next_at`.)
        # So is a promise for the business morning that a rise in severity took back (it pages at night now).
        stale = "page nobody after hours" in after and pages_after_hours(
            incident.severity, self.config.paging.after_hours_min_severity)
        if row.details.get("next_at") and (waited or stale or now - row.created_at >= LATE_WORDS):
            after = await self._after_now(escalation, incident, step, total, now) if here else ""
        elif not here or _promised_past(row.details, now):  # (it waited out a restart while the next step fired)
            after = ""
        tz = person.timezone or self.config.timezone
        reason = step_words(step, total, after, late_words(row.details.get("late"), tz, now))
        message = page_message(incident, alerts, person, self.config, now, reason,
                               escalation_mark=escalation_mark(step, int(row.details.get("run", 0)))
                               if isinstance(step, int) else "")
        # The page carries its key where a platform can find it by it (Slack): a page whose answer is lost, or that
        # a crash cuts off, is looked for when it is to be redrawn (_look_for_pages). The mark goes with the claim.
        key = f"page-{row.id}"
        if page_finders(self.adapters, person, order):
            row.details = {**(row.details or {}), UNANSWERED: {"key": key, "at": time.time()}}
        # Claimed only while the incident still wants it, in the claim's own statement: an acknowledgement committed
        # since it was read above (another replica's click, while this one drew the page) leaves it unclaimed, and
        # it is not sent (it was: "Acknowledged by Alice", then "Paged Bob"). One committed after the claim finds
        # the page on its way, as a page handed to the platform is.
        wanted = (TRIGGERED, ACKNOWLEDGED) if manual else (TRIGGERED,)
        still = exists().where(Incident.id == row.incident_id, Incident.status.in_(wanted))
        async with self.db.transaction() as session:  # claimed: a crash from here on leaves it SENDING (see _recover)
            claimed = (await session.execute(update(OutboxItem).where(OutboxItem.id == row.id,
                                                                      OutboxItem.status == "pending", still)
                                             .values(status=SENDING, details=row.details))).rowcount
            if not claimed:
                now_status = (await session.execute(select(Incident.status).where(Incident.id == row.incident_id))
                              ).scalar_one_or_none()
                pending = (await session.execute(select(OutboxItem.status).where(OutboxItem.id == row.id))
                           ).scalar_one_or_none() == "pending"
        if not claimed:
            if pending and now_status not in wanted:  # (else another replica claimed it)
                await self._finish([row], "cancelled", f"not sent: #{incident.id} was {now_status} first")
            return 0
        row.status = SENDING
        gone: list[str] = []

        async def still_wanted() -> bool:  # asked between tries: a retry's waits are seconds long
            async with self.db.sessions() as session:
                status = (await session.execute(select(Incident.status).where(Incident.id == row.incident_id))
                          ).scalar_one_or_none()
                run = (await session.execute(select(Escalation.run).where(Escalation.incident_id == row.incident_id))
                       ).scalar_one_or_none() if isinstance(step, int) else None
            if status not in wanted:
                gone.append(f"#{row.incident_id} was {status} first")
                return False
            if run is not None and run != row.details.get("run", 0):  # resolved and reopened meanwhile
                gone.append(f"#{row.incident_id} was reopened, and its escalation started again")
                return False
            return True

        try:
            attempt = await send_page(self.adapters, person, replace(message, key=key), order, allow=self._budget,
                                      sleep=self._sleep, wanted=still_wanted)
        except Exception as exc:  # a fault before any platform took it (drawing it, say): pending again, as retries go
            log.exception("outbox: paging %s about #%s failed", person.id, incident.id)
            await self._failed([row], f"{type(exc).__name__}: {exc}", None, permanent=False, unmark=True)
            return 1
        now = self.clock.now()  # answered (up to the platforms' timeouts later): what is recorded, and waits, from now
        if attempt.dropped:  # acknowledged or resolved while a failed try waited to be tried again: not sent on
            attempt.count(self.metrics)
            async with self.db.transaction() as session:
                await self._mark(session, [row], "cancelled", f"not sent: {gone[-1]} (after "
                                 f"{'; '.join(attempt.tried)})"[:500], tried=True)
            return 1
        if attempt.waiting:
            await self._wait(row, attempt, now)
            if attempt.held is not None and (attempt.retry_after or 0) > PAGE_RATE_WAIT:
                await self._page_held(row, person, incident, attempt, after, now)
            if behind is not None and row.incident_id is not None:
                behind.setdefault(row.incident_id, (_step(row), attempt))
            return 1 if attempt.retry_after else 0
        if attempt.platform is None and attempt.transient and row.attempts + 1 < PAGE_ATTEMPTS:
            await self._failed([row], attempt.problem(person, self.adapters), None, permanent=False, unmark=True)
            return 1
        if attempt.platform is None and not attempt.unknown:
            attempt = self._off_refused(attempt, person, order)
        if (attempt.platform is None and not attempt.unknown and attempt.refused
                and now - row.created_at < self.give_up_after):
            await self._page_waits(row, person, incident, attempt, now)
            if behind is not None and row.incident_id is not None:
                behind.setdefault(row.incident_id, (_step(row), attempt))
            return 1
        if attempt.platform is not None and self.token_refused.pop(attempt.platform, None) is not None:
            await self._token_accepted()
        attempt.count(self.metrics)
        actor = SYSTEM  # the escalation pages, not a person
        kept = {k: v for k, v in (row.details or {}).items() if k != UNANSWERED}
        if attempt.ref is not None:  # where the page is, to redraw it when someone acts (_redraw_pages)
            kept["message"] = page_where(attempt.ref)
        settled: dict[str, Any] = {"details": kept}
        if attempt.unknown and attempt.unknown in page_finders(self.adapters, person, order):
            # It may have arrived, on a platform that can find it: it is looked for (not before LOOK_AFTER, for the
            # platform to store it) when someone acts and it is to be redrawn. (Elsewhere it stays as it was drawn.)
            kept[UNANSWERED] = {"key": key, "at": time.time(), "platform": attempt.unknown}
            settled["due_at"] = self.clock.now() + timedelta(seconds=LOOK_AFTER)
        async def record(session: Any) -> None:
            problem = attempt.problem(person, self.adapters, off=self.off, order=order)
            if waited and attempt.refused and not attempt.platform and not attempt.unknown:
                platforms = " and ".join(p.capitalize() for p in attempt.refused)
                hours = self.give_up_after.total_seconds() / 3600
                waited_for = f"{hours:g} h" if hours >= 1 else span(self.give_up_after)  # "24 h", as the README says
                problem = f"the bot waited {waited_for} for {platforms} to accept its token, and gave up ({problem})"
            await self._mark(session, [row], "sent" if attempt.platform else "dead",
                             None if attempt.platform else ((UNCONFIRMED if attempt.unknown else "") + problem)[:500],
                             tried=attempt.platform is None)
            if kept != (row.details or {}) or "due_at" in settled:
                await session.execute(update(OutboxItem).where(OutboxItem.id == row.id).values(**settled))
            if attempt.platform is not None:
                tardy = late_words(row.details.get("late"), self.config.timezone, now)
                line = (f"Paged {person.name} on {attempt.platform.capitalize()}{attempt.detour()}{tardy}. "
                        f"{after}").strip()
                details: dict[str, Any] = {"person": person.id, "platform": attempt.platform, "step": step}
                if attempt.tried:
                    details["tried"] = attempt.tried
                entry = Entry("incident.paged", actor, "incident", str(incident.id), now, details, incident.id)
            elif attempt.unknown:  # it may have arrived: the step's wait stands, and nothing is sent again
                line = f"The page to {person.name} is unconfirmed: {problem}. {after}".strip()
                entry = Entry("incident.page_failed", actor, "incident", str(incident.id), now,
                              {"person": person.id, "tried": attempt.tried, "problem": problem, "step": step,
                               "unknown": attempt.unknown}, incident.id)
                log.warning("escalation: the page to %s about #%s is unconfirmed: %s", person.id, incident.id, problem)
            else:
                moved = (self.escalations is not None and isinstance(step, int)
                         and await self.escalations.move_on(session, incident.id, step, now, manual=manual,
                                                            reaches=self._reaches))
                line = f"Could not page {person.name}: {problem}." + (" Moving to the next step now." if moved else "")
                entry = Entry("incident.page_failed", actor, "incident", str(incident.id), now,
                              {"person": person.id, "tried": attempt.tried, "problem": problem, "step": step},
                              incident.id)
                log.warning("escalation: could not page %s about #%s: %s", person.id, incident.id, problem)
            # The line keeps its promise apart ("Carol in 5 min ..."), and until when it holds: a line that goes only
            # after that (the platform down, the bot stopped before it went) leaves it out (_kept_promise).
            promise = {"next": after, "next_at": row.details["next_at"]} if after and row.details.get("next_at") else {}
            queue_thread_line(session, incident, now, "escalation.paged" if attempt.platform else "escalation.page_failed",
                              {"line": line, **promise,
                               **({"mention": person.id} if business and attempt.platform else {})})
            esc = await session.get(Escalation, incident.id)
            if esc is not None and attempt.platform is not None and (
                    (esc.state == "active" and esc.next_step == step) or (waited and esc.state == "exhausted")):
                # (a page that waited, going after the last step ran: the card no longer says it waits)
                esc.note = line if esc.state == "active" else (
                    f"{line} Every step of escalation policy `{esc.policy}` has run.")
                session.add(esc)
                queue_redraw(session, incident, now)
            await self.audit.append_many(session, [entry])

        where = f" on {attempt.platform.capitalize()}" if attempt.platform else ""
        await self._record(f"the page to {person.id} about #{incident.id} went out{where}" if attempt.platform
                           else f"the page to {person.id} about #{incident.id} was tried", record,
                           all_settled([row]),
                           "the page stays `sending`, settled as unconfirmed when a replica next takes the lead")
        self.nudge()
        return 1

    async def _record(self, what: str, work: Callable[[Any], Awaitable[None]],
                      recorded: Callable[[Any], Awaitable[bool]], left: str) -> None:
        """Write what a platform answered (`work`, in one transaction). The call was made, so its outcome is kept
        (in memory) and written once the database answers again, tried again with back-off: a failed recording left
        a page SENDING until another change of leader settled it as unconfirmed, and the audit log never showed it;
        it left a card or a thread line pending, and the next round sent it again. The loop (or lane) that made the
        call waits meanwhile (it could read nothing either), so nothing takes its rows again; a page stays this
        worker's own call (_claimed), which _recover leaves alone. A second try writes only if `recorded` (asked in
        its transaction) says the first did not: it may have committed without the answer reaching us, or another
        replica settled the rows. `left`: what stopping leaves unrecorded, for the log."""
        delay, tries = 1.0, 0
        while True:
            try:
                async with self.db.transaction() as session:
                    if tries and await recorded(session):
                        log.info("outbox: %s; recorded meanwhile (or settled by another replica)", what)
                        return
                    await work(session)
                if tries:
                    log.info("outbox: %s; recorded now, after %d failed tries", what, tries)
                return
            except Exception as exc:
                tries += 1
                why = explain_failure(exc, self.db.wait)
                if self._stopping:
                    log.error("outbox: %s, but recording it failed (%s) and the bot is stopping: %s", what, why, left)
                    return
                log.warning("outbox: %s, but recording it failed (%s); trying again in %.0f s", what, why, delay)
                with contextlib.suppress(asyncio.TimeoutError):  # (stop() cuts the wait short)
                    await asyncio.wait_for(self._stopped.wait(), delay)
                delay = min(delay * 2, 30.0)

    async def _behind(self, row: OutboxItem, person: Person, incident: Incident, order: Sequence[str], step: Any,
                      attempt: Attempt, now: datetime) -> bool:
        """Whether a page waits, untried, behind an earlier step's page of its incident that did not go a moment ago
        in the same lane (`step`, and how its `attempt` went), so that the two go in step order:
        - the earlier one waits for its chat's budget or a rate limit: this one goes after it (no sooner than the
          platform said, so that the earlier one is not pulled into every round meanwhile: _waiting_first);
        - it found the bot's token refused, and so did every platform that could take this one: tried, this one
          would be refused too, unless the token works again in between; then it went first, and the earlier one
          after it (at once, as the token works again). It waits as if refused (the same back-off and thread line).
          One that waited a day is tried, to be given up on.
        True: it waits (settled here)."""
        if _step(row) == step:
            return False  # (the pages of one step go side by side)
        if attempt.waiting:
            if attempt.retry_after:
                async with self.db.transaction() as session:
                    await session.execute(update(OutboxItem).where(
                        OutboxItem.id == row.id, OutboxItem.status == "pending",
                        OutboxItem.due_at < now + timedelta(seconds=attempt.retry_after))
                        .values(due_at=now + timedelta(seconds=attempt.retry_after)))
            return True
        platforms = [p for p in dict.fromkeys(order) if p in self.adapters and getattr(person, p, None)]
        if (not attempt.refused or now - row.created_at >= self.give_up_after or not platforms
                or any(p not in attempt.refused for p in platforms)):
            return False
        said = [t for t in attempt.tried if t.startswith(tuple(f"{p}{s}" for p in platforms for s in (" ", ":")))]
        await self._page_waits(row, person, incident, Attempt(None, said, False, refused=tuple(platforms)), now)
        return True

    async def _superseding(self, row: OutboxItem) -> Any:
        """The step of a newer page of the same run to the same person about the same incident, sent or still to go,
        if there is one: a page that waited for the bot's token gives way to it, so that once the token works the
        person gets one page, not one for every step that came round to them meanwhile."""
        async with self.db.sessions() as session:
            newer = (await session.execute(select(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.event == row.event, OutboxItem.incident_id == row.incident_id,
                OutboxItem.channel == row.channel, OutboxItem.id > row.id,
                OutboxItem.status.in_(("pending", SENDING, "sent"))).order_by(OutboxItem.id))).scalars().all()
        run = (row.details or {}).get("run", 0)
        return next(((r.details or {}).get("step") for r in newer if (r.details or {}).get("run", 0) == run), None)

    async def _after_now(self, escalation: Escalation | None, incident: Incident, step: Any, total: Any,
                         now: datetime) -> str:
        """What a page that waited for the bot's token or goes late, going while its escalation is still at its step,
        says comes next: the next step, in the time left until it fires ("Carol in 2 min if nobody acknowledges."), not the
        wait the step was written with. Nothing when no next step is due later."""
        if self.escalations is None or escalation is None or escalation.timer_id is None or not isinstance(total, int):
            return ""
        async with self.db.sessions() as session:
            timer = await session.get(Timer, escalation.timer_id)
            if timer is None or timer.status != "pending" or timer.due_at <= now:
                return ""
            return await self.escalations.next_words(session, escalation.snapshot, step, total, timer.due_at,
                                                     timer.due_at - now, incident.severity)

    def _off_refused(self, attempt: Attempt, person: Person, order: Sequence[str]) -> Attempt:
        """A platform of `order` that knows the person but is off because it refused the bot's token at start
        (bot/server.py): for a page, that counts as a refused token, so the page waits for it as for one refused
        since (a restart with the token fixed sends it), rather than reaching nobody at once."""
        off = [p for p in dict.fromkeys(order) if p not in self.adapters and p in self.token_refused
               and getattr(person, p, None) and p not in attempt.refused]
        if not off:
            return attempt
        return replace(attempt, tried=[*attempt.tried, *(self.token_refused[p] for p in off)],
                       refused=(*attempt.refused, *off))

    async def _page_held(self, row: OutboxItem, person: Person, incident: Incident, attempt: Attempt, after: str,
                         now: datetime) -> None:
        """A platform's rate limit holds the page for longer than PAGE_RATE_WAIT (Telegram's flood control: "retry
        after 900"), and no other platform of the person's can take it (else it went there: paging.send_page). It
        waits as long as the platform said, and the thread says so, once for the page, with the audit log's
        `incident.page_delayed`: else it waited unseen for a quarter of an hour while the thread said nothing."""
        if (row.details or {}).get(HELD_SAID):
            return
        assert attempt.held is not None and attempt.retry_after is not None
        platform, said = attempt.held
        wait = span(timedelta(seconds=attempt.retry_after))
        line = (f"Could not page {person.name} yet: {platform.capitalize()} holds the bot's messages for {wait} "
                f"({said}), and no other platform can reach {person.name}; the page goes out then. {after}").strip()
        async with self.db.transaction() as session:
            marked = (await session.execute(update(OutboxItem).where(
                OutboxItem.id == row.id, OutboxItem.status.in_(UNSETTLED)).values(
                details={**(row.details or {}), HELD_SAID: True}))).rowcount
            if not marked:
                return
            # (its promise of the next step left out if the line goes only after that step fell due, as the others)
            promise = ({"next": after, "next_at": row.details["next_at"]}
                       if after and (row.details or {}).get("next_at") else {})
            queue_thread_line(session, incident, now, "escalation.page_waits", {"line": line, **promise})
            esc = await session.get(Escalation, incident.id)
            if esc is not None and esc.state == "active" and esc.next_step == row.details.get("step"):
                esc.note = line  # (the card said "Paging Bob" for the quarter of an hour the page waited)
                session.add(esc)
                queue_redraw(session, incident, now)
            await self.audit.append_many(session, [Entry(
                "incident.page_delayed", SYSTEM, "incident", str(incident.id), now,
                {"person": person.id, "step": row.details.get("step"), "problem": f"{platform}: {said}",
                 "retry_after": attempt.retry_after}, incident.id)])
        log.warning("escalation: the page to %s about #%s waits %g s for %s's rate limit (%s); no other platform can "
                    "reach them", person.id, incident.id, attempt.retry_after, platform, said)

    async def _page_waits(self, row: OutboxItem, person: Person, incident: Incident, attempt: Attempt,
                          now: datetime) -> None:
        """Every platform that could take the page refused the bot's token (revoked, or being replaced): the bot's
        trouble, not the person's. The page is not given up on, and the escalation does not move on because of it
        (every step would page nobody in a second): it waits, tried again with back-off (at most every 5 minutes,
        and at once when a call on that platform works again) for `give_up_after`, as the platform's other messages
        do. The step's wait runs as written; the next step's pages wait alike while the token is refused, and a
        person's page that waits gives way to a newer one of theirs (cancelled, "superseded by the page of step 3"):
        once the token works, each gets one page, drawn as things are then. A platform off because it refused the
        token at start (_off_refused) is waited for alike, until a restart with the token fixed. The thread says so
        when the page first finds the token refused, and the audit log has `incident.page_delayed`."""
        problem = attempt.problem(person, self.adapters)
        self._refused_tokens(attempt, problem)
        tries = int((row.details or {}).get(TOKEN_REFUSED) or 0) + 1
        details = {**{k: v for k, v in (row.details or {}).items() if k != UNANSWERED}, TOKEN_REFUSED: tries}
        step, after = row.details.get("step"), str(row.details.get("next") or "")
        platforms = " and ".join(p.capitalize() for p in attempt.refused)
        run = (row.details or {}).get("run", 0)
        async with self.db.transaction() as session:
            waits = (await session.execute(update(OutboxItem).where(
                OutboxItem.id == row.id, OutboxItem.status.in_(UNSETTLED)).values(
                status="pending", details=details, due_at=now + timedelta(seconds=min(300.0, 2.0 ** tries)),
                last_error=f"waiting for the bot's token to be accepted: {problem}"[:500]))).rowcount
            older = [r.id for r in (await session.execute(select(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.event == row.event, OutboxItem.incident_id == row.incident_id,
                OutboxItem.channel == row.channel, OutboxItem.id < row.id, OutboxItem.status == "pending",
                _WAITED))).scalars().all()
                     if (r.details or {}).get("run", 0) == run]
            if waits and older:
                await session.execute(update(OutboxItem).where(OutboxItem.id.in_(older),
                                                               OutboxItem.status == "pending").values(
                    status="cancelled", last_error=superseded(step, person.name)))
            if waits and tries == 1:
                if all(p not in self.adapters for p in attempt.refused):  # off since it refused the token at start
                    line = (f"Could not page {person.name} yet: {platforms} refused the bot's token when the bot "
                            f"started, so it is off ({problem}); the page goes out once the token is fixed and the "
                            f"bot restarted. {after}").strip()
                else:
                    line = (f"Could not page {person.name} yet: {platforms} refuses the bot's token ({problem}); the "
                            f"page goes out as soon as the token is accepted again. {after}").strip()
                queue_thread_line(session, incident, now, "escalation.page_waits", {"line": line})
                await self.audit.append_many(session, [Entry(
                    "incident.page_delayed", SYSTEM, "incident", str(incident.id), now,
                    {"person": person.id, "step": step, "problem": problem, "refused": list(attempt.refused)},
                    incident.id)])
        log.warning("escalation: the page to %s about #%s waits for the bot's token to be accepted: %s", person.id,
                    incident.id, problem)
        self.nudge()

    async def _token_accepted(self) -> None:
        """A platform took a call again after refusing the bot's token: the pages (and the cards and lines, TOKEN_WAIT)
        waiting for that go now, not at their next try (up to 5 minutes away)."""
        async with self.db.transaction() as session:
            await session.execute(update(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.status == "pending", OutboxItem.due_at > self.clock.now(),
                _WAITED).values(due_at=self.clock.now()))
            await session.execute(update(OutboxItem).where(  # (the cards and lines that waited for it too)
                OutboxItem.kind != "page", OutboxItem.status == "pending", OutboxItem.due_at > self.clock.now(),
                _TOKEN_WAITED).values(due_at=self.clock.now()))
        self.nudge()


def step_words(step: Any, total: Any, after: str, late: str = "") -> str:
    """What an escalation's page says of its step (`late`: that it fired late, see late_words) and what comes after
    it."""
    return f"Step {step} of {total} of the escalation{late}. {after}".strip()


def _promised_past(details: Mapping[str, Any], now: datetime) -> bool:
    """Whether the next step a page or a line promises ("Bob in 5 min if nobody acknowledges", due at `next_at`) has
    fallen due by `now`: the promise is spent, and said after that it misleads (Bob was paged already)."""
    until = details.get("next_at")
    return bool(until) and datetime.fromisoformat(str(until)) <= now



def superseded(step: Any, name: str) -> str:
    """Why a page that waited for the bot's token was not sent (its outbox row's error): a newer one went instead."""
    return (f"superseded by the page of step {step}: it waited for the bot's token while the escalation went on, and "
            f"{name} gets the newer page instead")


def all_settled(rows: Sequence[OutboxItem]) -> Callable[[Any], Awaitable[bool]]:
    """For _record: whether none of `rows` is left to settle (all sent, dead or cancelled, or gone)."""
    ids = [row.id for row in rows]

    async def done(session: Any) -> bool:
        return not (await session.execute(select(OutboxItem.id).where(
            OutboxItem.id.in_(ids), OutboxItem.status.in_(UNSETTLED)).limit(1))).first()
    return done


def _lost_page(page: OutboxItem) -> bool:
    """A page the platform took without answering (unconfirmed), marked to be looked for (see _page)."""
    details = page.details or {}
    return (page.status == "dead" and (page.last_error or "").startswith(UNCONFIRMED)
            and isinstance(details.get(UNANSWERED), dict) and not details.get("message"))


async def _last_swap_change(session: Any, swap_id: int) -> dict[str, Any] | None:
    """The details of the swap's latest change (its state, what happened: see handlers/notify.py swap_changed_row)."""
    found = (await session.execute(select(OutboxItem.details).where(
        OutboxItem.kind == "asked", OutboxItem.channel == ASKED, OutboxItem.details[SWAP_ASKS].as_integer() == swap_id)
        .order_by(OutboxItem.id.desc()).limit(1))).first()
    return dict(found[0]) if found is not None else None


def _lane_of(row: OutboxItem) -> str:
    """Whom a page, direct message or notice goes to (a person, a channel); an incident's pages, for a redraw; a
    runbook request's messages, for theirs."""
    if row.kind == "asked":
        details = row.details or {}
        return f"asked-swap-{details[SWAP_ASKS]}" if details.get(SWAP_ASKS) is not None else f"asked-{details.get(ASKS)}"
    return f"pages-{row.incident_id}" if row.kind == "pages" else row.channel


def _step(row: OutboxItem) -> tuple[Any, Any]:
    """A page's escalation run and step."""
    details = row.details or {}
    return details.get("run", 0), details.get("step")
