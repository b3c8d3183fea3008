"""The outbox worker: delivers what intake and actions queued, within each platform's rate limits.

Rows are grouped per incident and channel. The first delivery posts the
incident's parent message, drawn from the incident as it is now, so anything
queued before it is folded into it. After that, every pending redraw of the
same message becomes one edit, and thread lines of the same kind ("3 new
alerts") merge into one reply. Calls spend tokens from per-chat and
per-platform buckets (the platforms' published limits); a platform's 429 pauses that chat
until its Retry-After, which costs the row no attempt. A platform in trouble
(5xx, unreachable, its token refused) is retried with back-off, at most every
5 minutes, for `give_up_after` (24 h) and at least `max_attempts` tries; an
unexpected error (a bug) gets `max_attempts` tries. When the platform says the
call can never work (no such channel, not in it), the row becomes a dead letter
at once (`chatops outbox list --status dead`, `chatops_outbox_dead_total`).

A posted message is recorded as an `IncidentMessage` in the same transaction
that marks its rows sent. A post's rows are marked with the key it carries
before it goes, so one cut off by the process dying while the platform answers
is treated after the restart as one whose answer was lost. A post
whose answer was lost (the connection dropped or timed out after the request
went, so the platform may have it) is looked for before it is made again, where
the platform can find it by the key it carried (Slack, by message metadata);
elsewhere (Telegram, whose bots cannot read a chat) it is made again. A page
whose answer was lost is not sent again (the person would read it twice); on
Slack it is looked for by its key when someone acts, to be redrawn as the
incident now is, as pages whose answer came are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, update
from sqlmodel import select

from bot.chat import Adapter, DeliveryError, MessageRef, Outbound
from bot.clock import Clock
from bot.config import Config, Person
from bot.metrics import Metrics
from bot.ratelimit import TokenBucket, Window
from bot.incidents import ACKNOWLEDGED, RESOLVED
from bot.view import incident_card, incident_state, span, thread_line
from bot.escalation import escalation_mark
from handlers.escalation import SYSTEM, TOKEN_REFUSED, Escalations, drawn_with, late_words
from handlers.notify import button_from, direct_row, queue_redraw, queue_thread_line
from handlers.paging import (HAND_PAGE_EVENTS, LOOK_AFTER, UNANSWERED, Attempt, page_finders, page_message, page_order,
                             page_where, send_page)
from storage.audit import AuditLog, Entry
from storage.db import Database, StoreReplaced, explain_failure
from storage.models import AlertRecord, Escalation, Incident, IncidentMessage, OutboxItem, SwapRequest, Timer
from storage.queries import UNCONFIRMED, recent_alerts

log = logging.getLogger("chatops.outbox")
MERGED_EVENTS = ("alerts.grouped", "alerts.resolved")
PER_CHANNEL = 10  # incident messages of one channel looked at in a round (a second's budget is a few)
PERSONAL_KINDS = ("page", "direct", "notice", "pages")  # rows not drawn on an incident's message (handlers/notify.py)
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
# A thread line that was due under a card that went (deleted, or left in a group that became a supergroup): it
# follows the card posted afresh, in its thread, instead of being folded into it (see _deliver's repost).
FOLLOWS = "follows"
# A page waiting because a platform refused the bot's token (see _page_waits) has TOKEN_REFUSED in its details (how
# often it found it refused; handlers/escalation.py). Its words are drawn as things are when it goes (_after_now).
UNSETTLED = ("pending", SENDING)
_WAITED = OutboxItem.details[TOKEN_REFUSED].as_string().is_not(None)  # a row that waited for the token
ROUTINE_EVENTS = ("alerts.changed", "alerts.grouped", "alerts.resolved")  # redraws and counts from alert traffic
# A card, thread line or notice whose answer was lost, on a platform that can find it by the key it carried (see
# bot.chat.Finder), is marked on its rows (UNANSWERED), {"key": that key, "at": when it was given up on (Unix
# time)}: their next try looks for it, not before LOOK_AFTER, before posting again (_look_first). Folding leaves
# marked rows alone: what they count was posted. A page is never sent again: its mark says where to look for it when
# it is to be redrawn (_look_for_pages).
RECENT_ALERTS = 50  # alerts read to draw a message: its links and "the last of N" come from the newest  # thread lines that add up their counts


@dataclass(frozen=True)
class Budget:
    """Calls per minute and burst: per chat (posts and replies), per platform for edits, per platform overall."""

    chat: tuple[int, int]
    group_chat: tuple[int, int] | None
    edits: tuple[int, int] | None
    platform: tuple[int, int]


BUDGETS: dict[str, Budget] = {
    # Slack: chat.postMessage about 1/s per channel with short bursts; chat.update is Tier 3 (50+/min).
    "slack": Budget(chat=(56, 3), group_chat=None, edits=(50, 10), platform=(600, 50)),  # a margin under 1/s
    # Telegram: 1 message/s per chat, 20/min per group, about 30/s per bot; edits count like messages.
    "telegram": Budget(chat=(60, 3), group_chat=(20, 3), edits=None, platform=(1800, 30)),
    # Teams: 1,800 operations/hour per thread, about 50 requests/s per app and tenant.
    "teams": Budget(chat=(30, 5), group_chat=None, edits=None, platform=(3000, 50)),
}


class _Buckets:
    def __init__(self, budgets: Mapping[str, Budget]):
        self.budgets = budgets
        self.buckets: dict[tuple[str, ...], TokenBucket] = {}
        self.windows: dict[tuple[str, ...], Window] = {}  # a Telegram group's minute (see _for)
        self.paused: dict[tuple[str, str], float] = {}

    def _bucket(self, key: tuple[str, ...], spec: tuple[int, int]) -> TokenBucket:
        if key not in self.buckets:
            self.buckets[key] = TokenBucket(*spec)
        return self.buckets[key]

    def _for(self, platform: str, chat: str, *, edit: bool) -> list[TokenBucket | Window]:
        """The buckets one call spends from: the chat's (or the platform's edit budget), and the platform's."""
        budget = self.budgets.get(platform, BUDGETS["slack"])
        if edit and budget.edits is not None:
            first = self._bucket(("edits", platform), budget.edits)
        else:
            per_chat = budget.group_chat if budget.group_chat and chat.startswith("-") else budget.chat
            first = self._bucket(("chat", platform, chat), per_chat)
            if budget.group_chat and chat.startswith("-"):
                # The bucket paces the group, but its burst on top of a minute's refill let 23 through in the first
                # minute of a storm: a window holds any 60 seconds to the group's per-minute figure as well.
                key = ("minute", platform, chat)
                window = self.windows[key] = self.windows.get(key) or Window(per_chat[0])
                return [first, window, self._bucket(("platform", platform), budget.platform)]
        return [first, self._bucket(("platform", platform), budget.platform)]

    @staticmethod
    def _open(buckets: list[TokenBucket | Window], now: float) -> bool:
        return all(b.take(now, 0.0) == 0 and b.tokens >= 1 for b in buckets)  # take(0) only refills

    def allow(self, platform: str, chat: str, *, edit: bool, now: float) -> bool:
        """Spend one call's tokens if every bucket it touches has one; False leaves all untouched."""
        if self.paused.get((platform, chat), 0.0) > now:
            return False
        buckets = self._for(platform, chat, edit=edit)
        if not self._open(buckets, now):
            return False
        for b in buckets:
            b.take(now)
        return True

    def edits_share_chat(self, platform: str) -> bool:
        """Whether an edit spends the chat's own budget (Telegram, Teams), not an edit budget of its own (Slack)."""
        return self.budgets.get(platform, BUDGETS["slack"]).edits is None

    def any_open(self, platform: str, chat: str, *, now: float) -> bool:
        """Could a call (a message or an edit) to this chat be made now? Spends nothing."""
        if self.paused.get((platform, chat), 0.0) > now:
            return False
        return any(self._open(self._for(platform, chat, edit=edit), now) for edit in (False, True))

    def pause(self, platform: str, chat: str, until: float) -> None:
        self.paused[(platform, chat)] = max(until, self.paused.get((platform, chat), 0.0))


class OutboxWorker:
    def __init__(self, *, db: Database, config: Config, adapters: Mapping[str, Adapter], clock: Clock,
                 metrics: Metrics, budgets: Mapping[str, Budget] = BUDGETS, poll_seconds: float = 0.5,
                 max_attempts: int = 8, batch: int = 500, min_interval: float = 0.2, idle_poll_seconds: float = 5.0,
                 compact_seconds: float = 30.0, give_up_after: timedelta = timedelta(hours=24),
                 monotonic: Callable[[], float] | None = None, audit: AuditLog | None = None,
                 escalations: Escalations | None = None, may_deliver: Callable[[], Awaitable[bool]] | None = None,
                 off: Mapping[str, str] | None = None):
        self.db, self.config, self.adapters, self.clock, self.metrics = db, config, adapters, clock, metrics
        self.audit = audit or AuditLog(config.audit.hmac_key)  # pages are audited (incident.paged / page_failed)
        self.escalations = escalations  # a page that cannot be delivered moves its escalation on
        self.may_deliver = may_deliver  # with several replicas, one delivers (a leader lock)
        self.off = off if off is not None else {}  # platform -> why it is off: a page that could not go says so
        self.channels = {c.id: c for c in config.channels}
        self.people = {p.id: p for p in config.people}
        self.names = {p.id: p.name for p in config.people}
        self.buckets = _Buckets(budgets)
        self.poll_seconds, self.max_attempts, self.batch = poll_seconds, max_attempts, batch
        self.give_up_after = give_up_after  # how long a platform in trouble is waited for
        self.token_refused: dict[str, str] = {}  # platform -> why, while its token is refused (until a call works)
        self.min_interval = min_interval
        # With nothing pending at all, only a nudge brings work (every change that queues a row nudges); on SQLite,
        # where no other replica queues rows, the safety poll then slows to this.
        self.idle_poll_seconds = idle_poll_seconds
        # The loops (see start), by key: None for pages, direct messages and notices; a platform for its messages.
        self._idle: dict[str | None, bool] = {}  # its last round found nothing due
        self._wake: dict[str | None, asyncio.Event] = {}
        self.compact_seconds = compact_seconds
        self._monotonic = monotonic or time.monotonic  # platform limits run on real time, whatever the clock says
        self._tasks: list[asyncio.Task[None]] = []
        self._recovering = asyncio.Lock()
        self._stopping = False
        self._stopped = asyncio.Event()  # set by stop(): a page's recording waits no longer (_record)
        # Pages a crash cut off mid-call are settled (_recover) each time this worker takes the lead: another
        # replica may have led meanwhile and died during a page. Counted by the questions that found it not
        # leading; settled for the count when the last settling began (None: not yet).
        self._followed = 0
        self._recovered_at: int | None = None
        # Pages this worker claimed (SENDING) and has not settled, its own calls: their incidents, by row id
        self._claimed: dict[int, int | None] = {}
        self._lanes: dict[str, asyncio.Task[int]] = {}  # the pages loop's deliveries in flight, by whom they go to
        self._lane_pages: dict[asyncio.Task[int], set[tuple[Any, Any]]] = {}  # each one's pages: (incident, step)

    def start(self) -> None:
        """A loop for pages, direct messages and notices, and one for each platform's incident messages: a platform
        slow to answer (each card waiting out its timeout) holds back no page, and no other platform."""
        loops: list[str | None] = [None, *self.adapters]
        for key in loops:
            self._wake.setdefault(key, asyncio.Event())
        self._tasks = [asyncio.create_task(self._run(key), name=f"outbox-{key or 'pages'}") for key in loops]

    async def stop(self, *, drain: float = 0.0, calls: float = STOP_CALLS_WAIT) -> None:
        """Stop the loops after the round each is in. `drain` (seconds, for SIGTERM): first let them send what is due
        now, for at most that long: a thread line queued a moment before ("Paged Alice on Telegram. Bob in 5 min if
        nobody acknowledges.") goes now, not after the next start, when it may no longer be true. What is not sent
        by then waits for the next start (the log says how much); rows due later (a retry's back-off) are not
        waited for.

        Then no loop or lane starts another row (they stay pending), and the calls still in flight get `calls`
        seconds to be answered: a platform that hangs held the stop for its timeout, call after call (45 s with
        three incidents paging three people, killed by an orchestrator's 30 s grace, paging after the log said it
        stopped). A call still unanswered by then is cut off, as a crash cuts it off: the next start settles it (a
        page as unconfirmed, not sent again; see _recover)."""
        if drain > 0 and self._tasks:
            try:
                await self._drain(drain)
            except Exception:  # the database gone, say: stopping must not fail for it
                log.exception("outbox: could not send what was queued before stopping")
        self._stopping = True
        self._stopped.set()
        self.nudge()
        going = [*self._tasks, *self._lane_pages]
        if going:
            _, hung = await asyncio.wait(going, timeout=calls)
            if hung:  # (a lane's failure is logged as it ends)
                pages = len(self._claimed)
                log.warning("outbox: stopping with %d delivery(ies) still waiting for the platform after %g s; cut "
                            "off, as a crash cuts them off: the next start settles them%s", len(hung), calls,
                            f" ({pages} page(s) as unconfirmed, not sent again)" if pages else "")
                for task in hung:
                    task.cancel()
                await asyncio.wait(hung, timeout=1.0)
        self._tasks = []

    async def _drain(self, seconds: float) -> None:
        if self.may_deliver is not None and not await self.may_deliver():
            return  # another replica delivers: it sends them
        started = time.monotonic()  # real time, whatever the clock says
        due = await self._due_now()
        # A page on its way (its lane) queues its thread line once the platform answers: waited for too, else the
        # line saying who was just paged was left for the next start when SIGTERM came during the call.
        if not due and not self._lane_pages:
            return
        log.info("outbox: %d message(s) queued, %d delivery(ies) on their way; sending them before stopping (up to "
                 "%g s)", due, len(self._lane_pages), seconds)
        while (due or self._lane_pages) and time.monotonic() - started < seconds:
            self.nudge()
            await asyncio.sleep(0.1)
            due = await self._due_now()
        if due:
            log.warning("outbox: stopping with %d message(s) still queued after %g s; they go after the next start",
                        due, seconds)
        else:
            log.info("outbox: sent what was queued before stopping, in %.1f s", time.monotonic() - started)

    async def _due_now(self) -> int:
        """Rows due now that a loop of this worker could send (not those for a platform that is off)."""
        off = [cid for cid, ch in self.channels.items() if ch.platform not in self.adapters]
        (due,) = await self.db.read_row(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.status == "pending", OutboxItem.due_at <= self.clock.now(), OutboxItem.channel.not_in(off)))
        return int(due or 0)

    def nudge(self) -> None:
        """Something was queued: look now instead of at the next poll."""
        for wake in self._wake.values():
            wake.set()

    async def _run(self, key: str | None) -> None:
        wake = self._wake[key]
        # What this loop folds between its rounds (never during one, so a round's rows are not folded under it):
        # its platform's channels; the pages loop folds those of platforms that are off, which no loop delivers.
        own = [cid for cid, ch in self.channels.items()
               if (ch.platform == key if key else ch.platform not in self.adapters)]
        compacted = self._monotonic()
        while not self._stopping:
            try:
                await self._round(key)
            except Exception:  # the loop must outlive any one bad round; the rows stay pending
                log.exception("outbox round failed; retrying in %.1fs", self.poll_seconds)
            if own and self._monotonic() - compacted >= self.compact_seconds:
                compacted = self._monotonic()
                try:
                    if await self._leading():
                        await self.compact(own)
                except Exception:
                    log.exception("outbox: folding pending rows failed; trying again in %.0fs", self.compact_seconds)
            idle = self._idle.get(key, False) and not self.db.is_postgres
            try:
                await asyncio.wait_for(wake.wait(), self.idle_poll_seconds if idle else self.poll_seconds)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            if not self._stopping:
                await asyncio.sleep(self.min_interval)  # a storm of nudges still means a few rounds a second

    async def compact(self, channels: Sequence[str] | None = None) -> int:
        """Fold pending rows that say the same thing, so a storm that outruns a platform's budget (or a platform
        that is off) does not pile them up: per incident message, the redraws become one (due at the earliest of
        them), and the "N new alerts" / "N alerts resolved" lines of one kind become one with the sum; the oldest
        row is kept, so the thread's order and the delivery order stay. Run by the delivery loop between its
        rounds (`channels`: the ones it delivers; None: all). Returns how many rows were folded away."""
        folded = 0
        where = [OutboxItem.status == "pending", _unmarked(),
                 *([OutboxItem.channel.in_(channels)] if channels is not None else [])]
        async with self.db.transaction() as session:
            redraws = (await session.execute(
                select(OutboxItem.incident_id, OutboxItem.channel, func.min(OutboxItem.id), func.min(OutboxItem.due_at),
                       func.min(case((OutboxItem.event.in_(ROUTINE_EVENTS), 1), else_=0)))
                .where(*where, OutboxItem.kind == "update", OutboxItem.incident_id.is_not(None))
                .group_by(OutboxItem.incident_id, OutboxItem.channel).having(func.count() > 1))).all()
            for incident_id, channel, keep, due, routine in redraws:
                folded += (await session.execute(delete(OutboxItem).where(
                    *where, OutboxItem.kind == "update", OutboxItem.incident_id == incident_id,
                    OutboxItem.channel == channel, OutboxItem.id > keep))).rowcount or 0
                # a person's or an escalation's redraw among them keeps the one left from counting as routine
                await session.execute(update(OutboxItem).where(OutboxItem.id == keep).values(
                    due_at=due, **({} if routine else {"event": "incident.changed"})))
            lines = (await session.execute(
                select(OutboxItem.incident_id, OutboxItem.channel, OutboxItem.event)
                .where(*where, OutboxItem.kind == "reply", OutboxItem.event.in_(MERGED_EVENTS))
                .group_by(OutboxItem.incident_id, OutboxItem.channel, OutboxItem.event).having(func.count() > 1))).all()
            for incident_id, channel, event in lines:
                rows = (await session.execute(select(OutboxItem).where(
                    *where, OutboxItem.kind == "reply", OutboxItem.incident_id == incident_id,
                    OutboxItem.channel == channel, OutboxItem.event == event).order_by(OutboxItem.id))).scalars().all()
                keep_row = rows[0]  # the first keeps its place among the thread's lines and in the delivery order
                total = sum(int((r.details or {}).get("count", 1)) for r in rows)
                await session.execute(update(OutboxItem).where(OutboxItem.id == keep_row.id).values(
                    details={**(keep_row.details or {}), "count": total}, due_at=min(r.due_at for r in rows)))
                await session.execute(delete(OutboxItem).where(OutboxItem.id.in_([r.id for r in rows[1:]])))
                folded += len(rows) - 1
        if folded:
            log.info("outbox: folded %d pending row(s) into the ones that say the same", folded)
        return folded

    async def run_once(self) -> int:
        """One pass over what is due, pages and each platform's incident messages side by side; returns the number
        of platform calls made. (The worker runs each in a loop of its own; see start.)"""
        done = await asyncio.gather(*(self._round(key, wait=True) for key in (None, *self.adapters)),
                                    return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return sum(done)  # type: ignore[arg-type]

    async def _round(self, key: str | None, *, wait: bool = False) -> int:
        """One round of a loop: pages, direct messages and notices (`key` None), or one platform's messages.
        `wait`: until the pages it sent off have gone (see _people_and_notices)."""
        personal = key is None
        if not await self._leading():
            return 0
        try:
            self.db.check_file()  # a SQLite file lost under the bot: a post could not be recorded, and would go again
        except StoreReplaced:
            return 0
        now = self.clock.now()
        async with self._recovering:
            if self._recovered_at != self._followed:
                followed = self._followed  # (a question that finds it not leading during the settling: again)
                await self._recover(now)
                self._recovered_at = followed
        # One cheap read first: most rounds of a quiet bot end here. Rows for a platform that is off wait for it
        # out of sight, so that they neither hold back the others nor keep a quiet bot polling.
        off = [cid for cid, ch in self.channels.items() if ch.platform not in self.adapters]
        waiting = OutboxItem.kind.in_(PERSONAL_KINDS)
        if personal:
            waiting &= ~and_(OutboxItem.kind == "notice", OutboxItem.channel.in_(off))
        else:
            mine = [cid for cid, ch in self.channels.items() if ch.platform == key]
            waiting = ~waiting & OutboxItem.channel.in_(mine)
        (earliest,) = await self.db.read_row(select(func.min(OutboxItem.due_at)).where(
            OutboxItem.status == "pending", waiting))
        self._idle[key] = earliest is None
        if earliest is None or earliest > now:
            return 0
        if personal:
            return await self._people_and_notices(now, off, wait=wait)
        deliverable = mine
        first = func.min(OutboxItem.id)
        # A message not posted in the channel yet (no IncidentMessage): its card is what goes first. In a storm the
        # older incidents' escalation lines ("Paged Bob ...") would otherwise take the channel's budget (a post a
        # second) for minutes while the new incident's card waited, its page long gone.
        carded = func.max(case((IncidentMessage.id.is_(None), 0), else_=1))
        routine = func.min(case((OutboxItem.event.in_(ROUTINE_EVENTS), 1), else_=0))
        order = (carded, routine, first)
        groups = (select(OutboxItem.incident_id, OutboxItem.channel, first.label("first"), routine.label("routine"),
                         carded.label("carded"),
                         func.row_number().over(partition_by=OutboxItem.channel, order_by=order).label("nth"))
                  .outerjoin(IncidentMessage, and_(IncidentMessage.incident_id == OutboxItem.incident_id,
                                                   IncidentMessage.channel == OutboxItem.channel))
                  .where(OutboxItem.status == "pending", OutboxItem.due_at <= now, OutboxItem.channel.in_(deliverable),
                         OutboxItem.incident_id.is_not(None))
                  .group_by(OutboxItem.incident_id, OutboxItem.channel).subquery())
        async with self.db.sessions() as session:
            due = (await session.execute(
                # New incidents' cards first, then what people did and what the escalation did, then the alert
                # churn (each incident's own rows still go in order: _deliver); at most PER_CHANNEL messages of one
                # channel a round (more than its budget lets out in one), so that a busy channel holds back no other.
                select(groups.c.incident_id, groups.c.channel).where(groups.c.nth <= PER_CHANNEL)
                .order_by(groups.c.carded, groups.c.routine, groups.c.first).limit(self.batch)
            )).all()
        return await self._messages(list(due), now, loop=not wait)

    async def _messages(self, groups: list[tuple[int, str]], now: datetime, *, loop: bool = True) -> int:
        """Deliver the pending rows of each (incident, channel), in order; the number of platform calls made. A
        `loop`'s round stops when the worker stops (run_once, called as such, goes on)."""
        calls = 0
        for incident_id, channel_id in groups:
            if (loop and self._stopping) or not await self._leading():
                break  # (stopping: the rest wait for the next start, pending)
            channel = self.channels[channel_id]
            if not self.buckets.any_open(channel.platform, channel.chat, now=self._monotonic()):
                continue  # nothing could be sent to this chat now: don't even read
            async with self.db.sessions() as session:  # one snapshot: the rows and the incident they describe
                items = list((await session.execute(
                    select(OutboxItem).where(OutboxItem.status == "pending", OutboxItem.incident_id == incident_id,
                                             OutboxItem.channel == channel_id).order_by(OutboxItem.id)
                )).scalars().all())  # every pending row of the message, due or not, so they coalesce
                incident = await session.get(Incident, incident_id)
                parent = (await session.execute(select(IncidentMessage).where(
                    IncidentMessage.incident_id == incident_id, IncidentMessage.channel == channel_id))).scalar_one_or_none()
                alerts = await recent_alerts(session, incident_id, RECENT_ALERTS) if incident else []
                escalation = await session.get(Escalation, incident_id)
            if items:
                calls += await self._deliver(channel_id, items, incident, parent, alerts, now, *drawn_with(escalation))
        return calls

    async def _leading(self) -> bool:
        """Whether this replica still leads delivery, asked again before each message, not once a round: a replica
        whose lock went with its connection mid-round (another took over and reads the same pending rows) stops
        before it posts what the new leader posts too. Not leading is counted: when it leads again, it settles
        what a leader that died meanwhile left SENDING (_recover)."""
        if self.may_deliver is None or await self.may_deliver():
            return True
        self._followed += 1
        return False

    async def _deliver(self, channel_id: str, items: list[OutboxItem], incident: Incident | None,
                       parent: IncidentMessage | None, alerts: list[AlertRecord], now: datetime,
                       next_step: str = "", escalation_mark: str = "") -> int:
        channel = self.channels[channel_id]
        adapter = self.adapters[channel.platform]
        if incident is None:
            await self._finish(items, "dead", "the incident no longer exists")
            return 0
        tick = self._monotonic()
        if parent is None:
            if _look_waits(items, "card", now):
                return 0  # (spending nothing meanwhile: a card to post goes first in its channel, and would take it all)
            if not self.buckets.allow(channel.platform, channel.chat, edit=False, now=tick):
                return 0
            found = await self._look_first(adapter, items, "card", channel.platform, channel.chat, None)
            if found is False:
                return 1
            if isinstance(found, tuple):
                ref: MessageRef | None = found[0]
            else:
                card = incident_card(incident, alerts, now=now, tz=self.config.timezone, names=self.names,
                                     next_step=next_step, escalation_mark=escalation_mark)
                key = f"card-{items[0].id}"
                ref = await self._call(adapter.send(channel.chat, replace(card, key=key)), items, channel.platform,
                                       channel.chat, "send", lost=self._findable(adapter, key))
            if ref is None:
                return 1
            # The post draws the incident as it is now, so what was queued before it is in it; escalation lines and
            # pages sent by hand (who was paged, what comes next) are the thread's story and still follow it, as do
            # the lines a card posted afresh was to carry (FOLLOWS).
            folded = [i for i in items if not i.event.startswith("escalation.") and i.event not in HAND_PAGE_EVENTS
                      and not (i.details or {}).get(FOLLOWS)]
            async with self.db.transaction() as session:
                session.add(IncidentMessage(incident_id=incident.id, channel=channel_id, platform=channel.platform,
                                            chat_id=ref.chat_id, message_id=ref.message_id, thread_id=ref.thread_id,
                                            posted_at=now, updated_at=now))
                await self._mark(session, folded, "sent")
                if isinstance(found, tuple):  # drawn as the incident was when it was posted: draw it as it is now
                    session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=channel_id,
                                           kind="update", event="incident.changed", details={}))
            if len(folded) < len(items) or isinstance(found, tuple):
                self.nudge()
            return 1
        ref = MessageRef(parent.platform, parent.chat_id, parent.message_id, parent.thread_id)
        calls = 0
        reposting = False

        async def repost() -> None:
            """Deleted in the chat, or left behind in a group that became a supergroup: post the card afresh (the rows
            stay pending). The thread's lines waiting then (the one that found the card gone among them) follow the
            new card, in its thread: the post folds in what was queued before a first post, not the story the old
            thread was still to tell."""
            nonlocal reposting
            assert parent is not None and incident is not None
            reposting = True
            follow = [i for i in items if i.kind == "reply" and i.event not in MERGED_EVENTS]
            for item in follow:  # (a line the platform refused for its card gone did not arrive: nothing to look for)
                item.details = {**{k: v for k, v in (item.details or {}).items() if k != UNANSWERED}, FOLLOWS: True}
            async with self.db.transaction() as session:
                await session.execute(delete(IncidentMessage).where(IncidentMessage.id == parent.id))
                for item in follow:
                    await session.execute(update(OutboxItem).where(OutboxItem.id == item.id)
                                          .values(details=item.details))
            log.warning("outbox: the message of incident #%s in %s is gone; posting it again", incident.id, channel_id)
            self.nudge()

        updates = [i for i in items if i.kind in ("update", "post")]
        lines = _thread_lines([i for i in items if i.kind == "reply"], now)
        # Where an edit spends the chat's own budget (a Telegram group), a redraw that only shows alert traffic waits
        # for the lines that are due: else, in a storm, each token the budget refills goes to the next redraw, and
        # "Acknowledged by Alice" waits until the storm ends.
        churn = lines and self.buckets.edits_share_chat(channel.platform) and all(
            i.event in ROUTINE_EVENTS for i in updates)
        if updates and any(i.due_at <= now for i in updates) and not churn:
            if self.buckets.allow(channel.platform, channel.chat, edit=True, now=tick):
                calls += 1
                card = incident_card(incident, alerts, now=now, tz=self.config.timezone, names=self.names,
                                     next_step=next_step, escalation_mark=escalation_mark)
                if await self._call(adapter.update(ref, card), updates, channel.platform, channel.chat, "update",
                                    gone=repost) is not None:
                    await self._finish(updates, "sent")
                elif reposting:
                    return calls  # the card is posted afresh next round, drawn as the incident is then
        for line_items, text in lines:
            if not self.buckets.allow(channel.platform, channel.chat, edit=False, now=tick):
                break
            calls += 1
            found = await self._look_first(adapter, line_items, "line", channel.platform, channel.chat,
                                           ref.thread_id or ref.message_id)
            if found is False:
                break  # (it waits to be looked for again, and holds back the lines after it)
            if isinstance(found, tuple):  # it had arrived; rows merged into the line since go in a line of their own
                await self._finish(found[1], "sent")
                continue
            context: dict[str, Any] = {"line": text, "incident_id": incident.id}
            mention = self._mention(line_items, channel.platform)
            if mention:
                context["mention"] = mention
            key = f"line-{line_items[0].id}"
            message = Outbound("thread", context, text=text, key=key)
            if await self._call(adapter.reply(ref, message), line_items, channel.platform, channel.chat, "reply",
                                gone=repost, lost=self._findable(adapter, key)) is None:
                break  # (a thread whose message is gone: the card is posted afresh, and the lines follow it)
            await self._finish(line_items, "sent")
        return calls

    def _mention(self, items: Sequence[OutboxItem], platform: str) -> str | None:
        """A line that asks someone for something mentions them: "here" (everyone in the chat: Slack's `<!here>`, a
        Telegram reply that notifies, where the story's other lines are silent), or on Slack a person (`<@U...>`)."""
        for item in items:
            wanted = item.details.get("mention")
            if wanted == "here":
                return "here"
            person = self.people.get(str(wanted or "")) if platform == "slack" else None
            if person is not None and person.slack:
                return person.slack
        return None

    # -- pages, direct messages and channel notices ---------------------------------------------

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
            task = asyncio.create_task(self._lane(mine, now, loop=not wait), name=f"outbox-{min(keys)}")
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

    async def _lane(self, rows: Sequence[OutboxItem], now: datetime, *, loop: bool = True) -> int:
        """One person's (or chat's, or incident's) rows of a round, in order (see _people_and_notices); one of the
        loop's stops when the worker stops (run_once's, called as such, goes on)."""
        calls = 0
        behind: dict[int, tuple[Any, Attempt]] = {}  # incident -> the step of a page of it that did not go here, why
        for row in rows:
            if (loop and self._stopping) or not await self._leading():
                break  # (stopping: the rest wait for the next start, pending, not claimed)
            if row.kind == "page":
                assert row.id is not None
                self._claimed[row.id] = row.incident_id  # claimed (SENDING) by _page: this worker's own call
                try:
                    calls += await self._page(row, now, behind)
                finally:
                    self._claimed.pop(row.id, None)
            elif row.kind == "pages":
                calls += await self._redraw_pages(row, now)
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
        async with self.db.sessions() as session:
            incident = await session.get(Incident, row.incident_id)
            sent = [p for p in (await session.execute(select(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.incident_id == row.incident_id,
                OutboxItem.status.in_(("sent", "dead"))).order_by(OutboxItem.id))).scalars().all()
                    if p.id not in drawn and ((p.details or {}).get("message") or _lost_page(p))]
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
                if not exc.permanent:  # the platform in trouble: the pages not redrawn yet, later
                    await self._redrawn(row, drawn)
                    await self._failed([row], str(exc), exc.retry_after, permanent=False, platform_trouble=True)
                    return calls
                log.warning("outbox: cannot redraw the page to %s about #%s: %s", page.channel, row.incident_id, exc)
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
            await session.execute(update(OutboxItem).where(
                OutboxItem.kind == "pages", OutboxItem.incident_id == row.incident_id,
                OutboxItem.status == "pending", OutboxItem.id <= row.id).values(status="sent"))
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
            words = step_words(step, total, str(details.get("next") or "") if here else note,
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
        text = str(row.details.get("text") or "")
        buttons = [button_from(spec) for spec in row.details.get("buttons") or []]
        order = row.details.get("platforms") or page_order(person)
        message = Outbound("text", {"text": text}, buttons, text=text)
        attempt = await send_page(self.adapters, person, message, order, allow=self._budget)
        if attempt.waiting:
            await self._wait(row, attempt, self.clock.now())
            return 1 if attempt.retry_after else 0
        if attempt.platform is not None:
            self.metrics.chat_calls.labels(attempt.platform, "direct", "ok").inc()
            await self._finish([row], "sent")
            if self.token_refused.pop(attempt.platform, None) is not None:
                await self._token_accepted()
            return 1
        if attempt.unknown:
            # It may have arrived: as a page, it is sent neither again nor on the next platform (the person would
            # read it twice), and whoever waits on it is not told it never arrived (`if_undeliverable`).
            problem = attempt.problem(person, self.adapters, what="message")
            log.warning("outbox: the %s message to %s is unconfirmed: %s", row.event, person.id, problem)
            async with self.db.transaction() as session:
                await self._mark(session, [row], "dead", (UNCONFIRMED + problem)[:500])
            return 1
        problem = attempt.problem(person, self.adapters, off=self.off, order=order)
        # A refused token is the bot's trouble, not the person's: the message waits for a token that works.
        trouble = attempt.transient or bool(attempt.refused)
        self._refused_tokens(attempt, problem)
        await self._failed([row], problem, None, permanent=not trouble, platform_trouble=trouble)
        return 1

    def _refused_tokens(self, attempt: Attempt, problem: str) -> None:
        """Remember the platforms that refused the bot's token in `attempt`, each with what it said (for /readyz, and
        until a call there works again: see _token_accepted)."""
        for platform in attempt.refused:
            self.token_refused[platform] = next((t for t in attempt.tried if t.startswith(platform)), problem)

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
        if waited:  # drawn as things are now: its "Carol in 5 min" may have come and gone
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
        async with self.db.transaction() as session:  # claimed: a crash from here on leaves it SENDING (see _recover)
            claimed = (await session.execute(update(OutboxItem).where(OutboxItem.id == row.id,
                                                                      OutboxItem.status == "pending")
                                             .values(status=SENDING, details=row.details))).rowcount
        if not claimed:
            return 0
        row.status = SENDING
        try:
            attempt = await send_page(self.adapters, person, replace(message, key=key), order, allow=self._budget)
        except Exception as exc:  # a fault before any platform took it (drawing it, say): pending again, as retries go
            log.exception("outbox: paging %s about #%s failed", person.id, incident.id)
            await self._failed([row], f"{type(exc).__name__}: {exc}", None, permanent=False, unmark=True)
            return 1
        if attempt.waiting:
            await self._wait(row, attempt, now)
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
        self.metrics.pages.labels(*attempt.counted()).inc()
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
                             None if attempt.platform else ((UNCONFIRMED if attempt.unknown else "") + problem)[:500])
            if kept != (row.details or {}) or "due_at" in settled:
                await session.execute(update(OutboxItem).where(OutboxItem.id == row.id).values(**settled))
            if attempt.platform is not None:
                tardy = late_words(row.details.get("late"), self.config.timezone, now)
                line = f"Paged {person.name} on {attempt.platform.capitalize()}{tardy}. {after}".strip()
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
                         and await self.escalations.move_on(session, incident.id, step, now, manual=manual))
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
        await self._record(row, f"the page to {person.id} about #{incident.id} went out{where}" if attempt.platform
                           else f"the page to {person.id} about #{incident.id} was tried", record)
        self.nudge()
        return 1

    async def _record(self, row: OutboxItem, what: str, work: Callable[[Any], Awaitable[None]]) -> None:
        """Write what the platform answered to a page (`work`, in one transaction). The call was made, so its outcome
        is kept (in memory) and written once the database answers again, tried again with back-off: a failed
        recording left the row SENDING until another change of leader settled it as unconfirmed, and the audit log
        never showed the page. The pages loop waits meanwhile (it could read nothing either), and the row stays this
        worker's own call (_claimed), which _recover leaves alone. A second try writes only while the row is still
        SENDING: if it is not, the first committed without the answer reaching us, or a leader settled it."""
        delay, tries = 1.0, 0
        while True:
            try:
                async with self.db.transaction() as session:
                    if tries and (await session.execute(select(OutboxItem.status).where(
                            OutboxItem.id == row.id))).scalar_one_or_none() != SENDING:
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
                    log.error("outbox: %s, but recording it failed (%s) and the bot is stopping: the page stays "
                              "`sending`, settled as unconfirmed when a replica next takes the lead", what, why)
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
        """What a page that waited for the bot's token, going while its escalation is still at its step, says comes
        next: the next step, in the time left until it fires ("Carol in 2 min if nobody acknowledges."), not the
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
        """A platform took a call again after refusing the bot's token: the pages waiting for that go now, not at
        their next try (up to 5 minutes away)."""
        async with self.db.transaction() as session:
            await session.execute(update(OutboxItem).where(
                OutboxItem.kind == "page", OutboxItem.status == "pending", OutboxItem.due_at > self.clock.now(),
                _WAITED).values(due_at=self.clock.now()))
        self.nudge()

    async def _call(self, call: Any, items: Sequence[OutboxItem], platform: str, chat: str, method: str,
                    gone: Callable[[], Awaitable[None]] | None = None, lost: str | None = None) -> Any:
        """Await a platform call; on failure, schedule the retry or the dead letter and return None. `gone`: what
        to do instead when the message the call edits is not there any more. `lost`: the key a post carried, where
        the platform can find the post by it: the rows are marked (UNANSWERED) before it goes, so that a post cut
        off by a crash (SIGKILL, a lost machine) while the platform answers is looked for after the restart instead
        of made twice; an answer lost marks them anew, a post that surely failed clears the mark."""
        if lost is not None:
            await self._premark(items, lost)
        try:
            result = await call
        except DeliveryError as exc:
            self.metrics.chat_calls.labels(platform, method, "error").inc()
            if exc.token_refused:
                self.token_refused[platform] = str(exc)
            if exc.gone and gone is not None:
                await gone()
                return None
            if exc.retry_after:
                self.buckets.pause(platform, chat, self._monotonic() + exc.retry_after)
            await self._failed(items, str(exc), exc.retry_after, permanent=exc.permanent and not exc.token_refused,
                               platform_trouble=True, lost=lost if exc.unknown else None,
                               unmark=lost is not None and not exc.unknown)
            return None
        except Exception as exc:  # a bug or a rendering problem: retry a few times, then dead-letter
            self.metrics.chat_calls.labels(platform, method, "error").inc()
            log.exception("outbox: %s to %s failed", method, chat)
            await self._failed(items, f"{type(exc).__name__}: {exc}", None, permanent=False)
            return None
        self.metrics.chat_calls.labels(platform, method, "ok").inc()
        if self.token_refused.pop(platform, None) is not None:
            await self._token_accepted()
        return result if result is not None else True

    async def _failed(self, items: Sequence[OutboxItem], error: str, retry_after: float | None, *, permanent: bool,
                      platform_trouble: bool = False, lost: str | None = None, unmark: bool = False) -> None:
        """Schedule the retry, or give up. `retry_after`: the platform said when to come back (a rate limit, not a
        failure: no attempt is spent). `platform_trouble`: the platform failed, not our code: wait for it longer.
        `lost`: the post, carrying this key, may have arrived: the retry looks for it first (UNANSWERED)."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            for item in items:
                row = await session.get(OutboxItem, item.id)
                if row is None or row.status not in UNSETTLED:
                    continue
                row.status = "pending"  # a page claimed for sending (SENDING) that did not go: due again, or dead below
                if lost is not None:
                    row.details = {**(row.details or {}), UNANSWERED: {"key": lost, "at": time.time()}}
                elif unmark and UNANSWERED in (row.details or {}):  # the platform said no: nothing to look for
                    row.details = {k: v for k, v in row.details.items() if k != UNANSWERED}
                if retry_after and not permanent and now - row.created_at < self.give_up_after:
                    # (a platform that has answered nothing but "later" for a day counts its tries again)
                    row.due_at = now + timedelta(seconds=retry_after)
                    row.last_error = f"rate-limited; retrying in {retry_after:g}s ({error})"[:500]
                    session.add(row)
                    continue
                row.attempts += 1
                row.last_error = error[:500]
                exhausted = row.attempts >= self.max_attempts and (
                    not platform_trouble or now - row.created_at >= self.give_up_after)
                if permanent or exhausted:
                    row.status = "dead"
                    self.metrics.outbox_dead.labels(row.channel).inc()
                    log.error("outbox: gave up on %s %s for incident #%s in %s after %d attempt(s): %s",
                              row.kind, row.event, row.incident_id, row.channel, row.attempts, error)
                    fallback = (row.details or {}).get("if_undeliverable") if row.kind == "direct" else None
                    if fallback and fallback.get("swap") is not None:  # only while the swap still waits for it
                        swap = await session.get(SwapRequest, int(fallback["swap"]))
                        if swap is None or swap.status != "pending":
                            fallback = None
                    if fallback:  # somebody is waiting on this message: tell them it did not arrive, and why
                        session.add(direct_row(fallback["to"], f"{fallback['text']} ({error})", now,
                                               event=f"{row.event}.undeliverable"))
                else:
                    delay = retry_after if retry_after else min(300.0, 2.0 ** row.attempts)
                    row.due_at = now + timedelta(seconds=max(delay, LOOK_AFTER) if lost is not None else delay)
                session.add(row)

    async def _premark(self, items: Sequence[OutboxItem], key: str) -> None:
        """Mark the rows of a post about to go with the key it carries (see _call)."""
        mark = {"key": key, "at": time.time()}
        for item in items:
            item.details = {**(item.details or {}), UNANSWERED: mark}
        await self._save_details(items)

    async def _save_details(self, items: Sequence[OutboxItem]) -> None:
        """Write the rows' details as they are in memory, in one transaction."""
        async with self.db.transaction() as session:
            for item in items:
                await session.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(details=item.details))

    @staticmethod
    def _findable(adapter: Adapter, key: str) -> str | None:
        """`key`, if the platform can find a post by it (bot.chat.Finder): its answer lost, it is looked for."""
        return key if getattr(adapter, "find", None) is not None else None

    async def _look_first(self, adapter: Adapter, items: Sequence[OutboxItem], kind: str, platform: str, chat: str,
                          thread: str | None) -> tuple[MessageRef, list[OutboxItem]] | bool:
        """Before a post is made again whose answer was lost (its rows marked UNANSWERED: the platform may have
        it), it is looked for in the chat by the key it carried. Found: the message and the rows it was posted for
        (rows merged into a line since are not). True: post it (not there, or the platform refuses to look: a
        missing card is worse than two). False: not yet (the look is not due), or looking failed for now (the
        platform in trouble): the rows wait for their next try, as after a failed post."""
        find = getattr(adapter, "find", None)
        mark = next((m for m in ((i.details or {}).get(UNANSWERED) for i in items)
                     if isinstance(m, dict) and str(m.get("key", "")).startswith(f"{kind}-")), None)
        if find is None or mark is None:
            return True
        key = mark["key"]
        mine = [i for i in items if ((i.details or {}).get(UNANSWERED) or {}).get("key") == key]
        now = self.clock.now()
        if any(i.due_at > now for i in mine):
            # Not yet (LOOK_AFTER, or a rate limit on looking): rows of the same message that are due (an alert
            # storm's redraws and lines) do not bring the look forward; it, and what follows it, waits.
            return False
        try:
            found = await find(chat, key, thread=thread, sent_at=float(mark.get("at") or time.time()))
        except DeliveryError as exc:
            self.metrics.chat_calls.labels(platform, "find", "error").inc()
            if exc.permanent and not exc.token_refused:
                log.warning("outbox: cannot look in %s for %s, whose answer was lost (%s), so it is posted again "
                            "and may show twice (Slack lets the bot look with channels:history, groups:history in "
                            "a private channel, and the bot in the channel)", chat, key, exc)
                found = None
            else:
                if exc.token_refused:
                    self.token_refused[platform] = str(exc)
                # (a rate limit on looking delays the look, not the chat's other posts and edits: it is its own
                # budget, one a minute for some apps)
                await self._failed(items, f"looking for the {kind} whose answer was lost: {exc}", exc.retry_after,
                                   permanent=False, platform_trouble=True)
                return False
        else:
            self.metrics.chat_calls.labels(platform, "find", "ok").inc()
        if found is not None:
            log.warning("outbox: %s in %s, whose answer was lost, had arrived (%s); recorded, not posted again",
                        key, chat, found.message_id)
            return found, mine
        log.info("outbox: %s, whose answer was lost, is not in %s; posting it again", key, chat)
        for item in mine:  # looked for once: a failure of the new post marks it anew
            item.details = {k: v for k, v in (item.details or {}).items() if k != UNANSWERED}
        await self._save_details(mine)
        return True

    async def _finish(self, items: Sequence[OutboxItem], status: str, error: str | None = None) -> None:
        async with self.db.transaction() as session:
            await self._mark(session, items, status, error)
        if status == "dead":  # given up at once (no such channel, person or incident): counted as _failed counts
            for item in items:
                self.metrics.outbox_dead.labels(item.channel).inc()

    @staticmethod
    async def _mark(session: Any, items: Sequence[OutboxItem], status: str, error: str | None = None) -> None:
        """One statement for all the rows; a row something else already settled stays as it is."""
        ids = [item.id for item in items]
        if ids:
            await session.execute(update(OutboxItem).where(OutboxItem.id.in_(ids), OutboxItem.status.in_(UNSETTLED))
                                  .values(status=status, last_error=error))


def step_words(step: Any, total: Any, after: str, late: str = "") -> str:
    """What an escalation's page says of its step (`late`: that it fired late, see late_words) and what comes after
    it."""
    return f"Step {step} of {total} of the escalation{late}. {after}".strip()


def _promised_past(details: Mapping[str, Any], now: datetime) -> bool:
    """Whether the next step a page or a line promises ("Bob in 5 min if nobody acknowledges", due at `next_at`) has
    fallen due by `now`: the promise is spent, and said after that it misleads (Bob was paged already)."""
    until = details.get("next_at")
    return bool(until) and datetime.fromisoformat(str(until)) <= now


def _kept_promise(details: Mapping[str, Any], now: datetime) -> Mapping[str, Any]:
    """A thread line's details as it goes: without the promise it ends with once that is spent (_promised_past)."""
    after, line = str(details.get("next") or ""), str(details.get("line") or "")
    if not after or not line.endswith(after) or not _promised_past(details, now):
        return details
    return {**details, "line": line[: -len(after)].rstrip()}


def superseded(step: Any, name: str) -> str:
    """Why a page that waited for the bot's token was not sent (its outbox row's error): a newer one went instead."""
    return (f"superseded by the page of step {step}: it waited for the bot's token while the escalation went on, and "
            f"{name} gets the newer page instead")


def _lost_page(page: OutboxItem) -> bool:
    """A page the platform took without answering (unconfirmed), marked to be looked for (see _page)."""
    details = page.details or {}
    return (page.status == "dead" and (page.last_error or "").startswith(UNCONFIRMED)
            and isinstance(details.get(UNANSWERED), dict) and not details.get("message"))


def _lane_of(row: OutboxItem) -> str:
    """Whom a page, direct message or notice goes to (a person, a channel); an incident's pages, for a redraw."""
    return f"pages-{row.incident_id}" if row.kind == "pages" else row.channel


def _step(row: OutboxItem) -> tuple[Any, Any]:
    """A page's escalation run and step."""
    details = row.details or {}
    return details.get("run", 0), details.get("step")


def _look_waits(items: Sequence[OutboxItem], kind: str, now: datetime) -> bool:
    """A post whose answer was lost (its rows marked UNANSWERED) whose look is not due yet (see _look_first)."""
    mark = next((m for m in ((i.details or {}).get(UNANSWERED) for i in items)
                 if isinstance(m, dict) and str(m.get("key", "")).startswith(f"{kind}-")), None)
    return mark is not None and any(((i.details or {}).get(UNANSWERED) or {}).get("key") == mark["key"]
                                    and i.due_at > now for i in items)


def _unmarked() -> Any:
    """Rows not waiting to be looked for (UNANSWERED), in SQL."""
    return OutboxItem.details[UNANSWERED].as_string().is_(None)


def _thread_lines(replies: list[OutboxItem], now: datetime) -> list[tuple[list[OutboxItem], str]]:
    """Replies that are due, in order, with "N new alerts" lines of one kind merged into one. A line waiting to
    be tried again (it failed) holds back the lines after it, so the thread keeps the order things happened in."""
    # (a line that is not merged is due when it is queued: one due later is waiting to be tried again, after a
    # failure or a rate limit; the merged "N new alerts" lines wait on purpose and hold nothing back)
    held = next((i for i, r in enumerate(replies) if r.event not in MERGED_EVENTS and r.due_at > now), None)
    if held is not None:
        replies = replies[:held]
    if not any(r.due_at <= now for r in replies):
        return []
    # A merged line queued before a line that goes now goes now too, before it: "3 new alerts" came before
    # "Acknowledged by Alice" or "Resolved by the source", and the thread says so in that order.
    going = [r.id or 0 for r in replies if r.event not in MERGED_EVENTS and r.due_at <= now]
    before = max(going) if going else 0
    out: list[tuple[list[OutboxItem], str]] = []
    merged: dict[str, list[OutboxItem]] = {}
    for r in replies:
        if r.event in MERGED_EVENTS:
            merged.setdefault(r.event, []).append(r)
        elif r.due_at <= now:
            out.append(([r], thread_line(r.event, _kept_promise(r.details, now),
                                         actor_name=r.details.get("name") or r.details.get("by"))))
    for event, rows in merged.items():
        early = [r for r in rows if (r.id or 0) < before]
        rest = [r for r in rows if (r.id or 0) >= before]
        for group in (early, rest if any(r.due_at <= now for r in rest) else []):
            if group:
                # (the sources that sent them, named when there is one: "3 alerts resolved by am")
                sources = list(dict.fromkeys(str(r.details["source"]) for r in group if r.details.get("source")))
                out.append((group, thread_line(event, {"count": sum(int(r.details.get("count", 1)) for r in group),
                                                       "source": ", ".join(sources)}, actor_name=None)))
    out.sort(key=lambda pair: pair[0][0].id or 0)
    return out
