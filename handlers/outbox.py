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
at once (`chatops outbox list --status dead`, `chatops_outbox_dead_total`). So
does a row for a channel no longer in app.yaml (the bot restarted without it,
while an incident routed there was open): no loop serves that channel, and it
would wait for ever (see _give_up_gone).

A posted message is recorded as an `IncidentMessage` in the same transaction
that marks its rows sent. A post's rows are marked with the key it carries
before it goes, so one cut off by the process dying while the platform answers
is treated after the restart as one whose answer was lost. A post
whose answer was lost (the connection dropped or timed out after the request
went, so the platform may have it) is looked for before it is made again, where
the platform can find it by the key it carried (Slack, by message metadata);
elsewhere (Telegram, whose bots cannot read a chat) it is made again.

Pages, direct messages and channel notices go in a loop of their own, in lanes
side by side (handlers/page_lanes.py), so that nothing slow to send holds back
a page.
"""

from __future__ import annotations

import asyncio
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
from bot.config import Config
from bot.incidents import TRIGGERED
from bot.metrics import Metrics
from bot.ratelimit import TokenBucket, Window
from bot.tables import counted
from bot.view import incident_card, thread_line
from handlers.escalation import Escalations, drawn_with
from handlers.notify import ASKS, UNACKNOWLEDGED, button_from, decided_words, direct_row
from handlers.page_lanes import (PERSONAL_KINDS, RECENT_ALERTS, STOP_CALLS_WAIT, TOKEN_WAIT, UNSETTLED, PageLanes,
                                 _promised_past, all_settled)
from handlers.paging import HAND_PAGE_EVENTS, LOOK_AFTER, UNANSWERED
from storage.audit import AuditLog
from storage.db import Database, StoreReplaced, busy_store
from storage.models import AlertRecord, Escalation, Incident, IncidentMessage, OutboxItem, SwapRequest
from storage.queries import recent_alerts

log = logging.getLogger("chatops.outbox")
MERGED_EVENTS = ("alerts.grouped", "alerts.resolved")  # thread lines that add up their counts
PER_CHANNEL = 10  # incident messages of one channel looked at in a round (a second's budget is a few)
# A thread line that was due under a card that went (deleted, or left in a group that became a supergroup): it
# follows the card posted afresh, in its thread, instead of being folded into it (see _deliver's repost).
FOLLOWS = "follows"
ROUTINE_EVENTS = ("alerts.changed", "alerts.grouped", "alerts.resolved")  # redraws and counts from alert traffic
# A message is redrawn for alert traffic alone (more alerts, a later "last seen", the priority they move) at most once
# in this long, with what the incident is then: a storm costs a redraw per incident every 30 s, not one per alert
# (Slack's chat.update budget is 50 a minute for the whole workspace, and one noisy incident took it all). 30 s, as
# the "N new alerts" lines gather (handlers/intake.py THREAD_LINE_DELAY), so the card's count and the thread move
# together. A state change (a click, a command, the source resolving it, a severity rise) redraws it at once.
REFRESH = timedelta(seconds=30)
# A card, thread line or notice whose answer was lost, on a platform that can find it by the key it carried (see
# bot.chat.Finder), is marked on its rows (UNANSWERED), {"key": that key, "at": when it was given up on (Unix
# time)}: their next try looks for it, not before LOOK_AFTER, before posting again (_look_first). Folding leaves
# marked rows alone: what they count was posted. A page is never sent again: its mark says where to look for it when
# it is to be redrawn (_look_for_pages).
# What stopping leaves of a message the platform took whose recording failed (see PageLanes._record): a post marked
# with its key (UNANSWERED, where the platform can find it) is looked for after the next start; else it goes again.
# On PostgreSQL, rows for a channel no longer in app.yaml are given up once they have waited this long (see
# OutboxWorker._gone): a rolling deploy has finished by then.
GONE_GRACE = timedelta(minutes=10)
UNRECORDED = "its rows stay pending, and it goes again after the next start unless the platform can find it by its key"


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


class OutboxWorker(PageLanes):
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
        self._stopping = False
        self._stopped = asyncio.Event()  # set by stop(): a page's recording waits no longer (_record)
        self._gone_told: set[str] = set()  # channels no longer in app.yaml whose rows the log has warned of
        super().__init__()  # the pages loop's lanes, and what it settles after a crash

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
        await self._let_calls_end(self._tasks, calls)
        self._tasks = []

    async def _drain(self, seconds: float) -> None:
        if self.may_deliver is not None and not await self.may_deliver():
            return  # another replica delivers: it sends them
        try:
            await self._send_due(seconds)
        finally:
            await self._say_off_waiting()

    async def _say_off_waiting(self) -> None:
        """At stop, the messages that wait for a platform that was off in this run (its card, lines, notices): how
        many, for which platform. Stopping said nothing of them (the start's warning names the channel, not what
        waits for it)."""
        off: dict[str, list[str]] = {}
        for cid, channel in self.channels.items():
            if channel.platform not in self.adapters:
                off.setdefault(channel.platform, []).append(cid)
        for platform, ids in sorted(off.items()):
            (waiting,) = await self.db.read_row(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.status == "pending", OutboxItem.channel.in_(ids)))
            if waiting:
                log.warning("outbox: %d message(s) wait for %s, which is off in this run (%s); they go once the bot "
                            "runs with it on (`chatops outbox list` shows them)", waiting, platform, ", ".join(ids))

    async def _send_due(self, seconds: float) -> None:
        started = time.monotonic()  # real time, whatever the clock says
        due = await self._due_now()
        # A page on its way (its lane) queues its thread line once the platform answers: waited for too, else the
        # line saying who was just paged was left for the next start when SIGTERM came during the call.
        if not due and not self._lane_pages:
            return
        log.info("outbox: %s queued, %s on their way; sending them before stopping (up to %g s)",
                 counted(due, "message"), counted(len(self._lane_pages), "delivery", "deliveries"), seconds)
        while (due or self._lane_pages) and time.monotonic() - started < seconds:
            self.nudge()
            await asyncio.sleep(0.1)
            due = await self._due_now()
        if due:
            log.warning("outbox: stopping with %d message(s) still queued after %g s; they go after the next start%s",
                        due, seconds, ", or from another replica" if self.db.is_postgres else "")
        else:
            log.info("outbox: sent what was queued before stopping, in %.1f s", time.monotonic() - started)

    async def _due_now(self) -> int:
        """Rows due now that a loop of this worker could send: people's, and those of the channels on a platform that
        is on (not those for a platform that is off, nor for a channel no longer in app.yaml, which no start sends)."""
        on = [cid for cid, ch in self.channels.items() if ch.platform in self.adapters]
        (due,) = await self.db.read_row(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.status == "pending", OutboxItem.due_at <= self.clock.now(),
            OutboxItem.channel.in_(on) | OutboxItem.channel.startswith("@")))
        return int(due or 0)

    def _gone(self, now: datetime) -> Any:
        """Rows for a channel no longer in app.yaml that this worker gives up (_give_up_gone), in SQL. On PostgreSQL only
        those queued GONE_GRACE ago or more: in a rolling deploy that adds a channel, replicas already on the new
        app.yaml queue rows for it while the leader may still run the old one, to which it is unknown."""
        return _gone(self.channels, now - GONE_GRACE if self.db.is_postgres else None)

    async def _give_up_gone(self, now: datetime) -> int:
        """Dead letters of the pending rows for a channel no longer in app.yaml: the bot restarted without it while
        an incident routed there was open (its card, lines and redraws, queued before or since), or a notice was
        queued for it. No loop serves such a channel, so they waited for ever, and stopping said they would go
        after the next start. Each says why (`chatops outbox list --status dead`); put the channel back in app.yaml
        and `chatops outbox retry` sends them. The log warns once per channel, with the count; later ones (an open
        incident's redraws) are logged as info. Returns how many rows it gave up."""
        async with self.db.sessions() as session:
            counts = (await session.execute(
                select(OutboxItem.channel, func.count()).where(OutboxItem.status == "pending", self._gone(now))
                .group_by(OutboxItem.channel).order_by(OutboxItem.channel))).all()
        if not counts:
            return 0
        given_up: dict[str, int] = {}
        async with self.db.transaction() as session:
            for channel, _ in counts:
                given_up[channel] = (await session.execute(
                    update(OutboxItem).where(OutboxItem.status == "pending", OutboxItem.channel == channel,
                                             self._gone(now))
                    .values(status="dead", last_error=f"channel {channel} is no longer in app.yaml"))).rowcount or 0
        for channel, n in given_up.items():
            if not n:
                continue
            self.metrics.outbox_dead.labels(channel).inc(n)
            if channel in self._gone_told:
                log.info("outbox: %d more message(s) for channel %s (no longer in app.yaml) marked dead", n, channel)
                continue
            self._gone_told.add(channel)
            log.warning("outbox: %d message(s) for channel %s, which is no longer in app.yaml, will never be sent; "
                        "marked dead (`chatops outbox list --status dead`; to send them, put the channel back in "
                        "app.yaml, restart, and `chatops outbox retry` them)", n, channel)
        return sum(given_up.values())

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
            except Exception as exc:  # the loop must outlive any one bad round; the rows stay pending
                busy = busy_store(exc)
                if busy is not None:  # expected now and then (another writer held the store): a line, no traceback
                    log.warning("outbox round found the store busy (%s); retrying in %.1fs", busy, self.poll_seconds)
                else:
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
        await self._recover_on_lead(now)
        # One cheap read first: most rounds of a quiet bot end here. Rows for a platform that is off wait for it
        # out of sight, so that they neither hold back the others nor keep a quiet bot polling.
        off = [cid for cid, ch in self.channels.items() if ch.platform not in self.adapters]
        waiting = OutboxItem.kind.in_(PERSONAL_KINDS)
        if personal:
            waiting &= ~and_(OutboxItem.kind == "notice", OutboxItem.channel.in_(off))
            waiting |= self._gone(now)  # no loop serves those: this one gives them up (_give_up_gone)
        else:
            mine = [cid for cid, ch in self.channels.items() if ch.platform == key]
            waiting = ~waiting & OutboxItem.channel.in_(mine)
        (earliest,) = await self.db.read_row(select(func.min(OutboxItem.due_at)).where(
            OutboxItem.status == "pending", waiting))
        self._idle[key] = earliest is None
        if earliest is None or earliest > now:
            return 0
        if personal:
            await self._give_up_gone(now)
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
            if any(i.attempts and i.due_at > now for i in items):
                # Its post failed, and waits out its back-off: rows queued since (an alert storm's) do not bring the
                # next try forward, or an ailing platform would be tried at the channel's pace, and the bot's own
                # errors would spend their tries in seconds.
                return 0
            if not self.buckets.allow(channel.platform, channel.chat, edit=False, now=tick):
                return 0
            found = await self._look_first(adapter, items, "card", channel.platform, channel.chat, None)
            if found is False:
                return 1
            if isinstance(found, tuple):
                ref: MessageRef | None = found[0]
            else:
                card = incident_card(incident, alerts, now=now, tz=self.config.timezone, names=self.names,
                                     next_step=next_step, escalation_mark=escalation_mark, runbooks=self.config.runbooks)
                key = f"card-{items[0].id}"
                ref = await self._call(adapter.send(channel.chat, replace(card, key=key)), items, channel.platform,
                                       channel.chat, "send", lost=self._findable(adapter, key))
            if ref is None:
                return 1
            # The post draws the incident as it is now, so what was queued before it is in it; escalation lines,
            # pages sent by hand (who was paged, what comes next) and runbook lines (a request with its Approve /
            # Reject, a run's output: the card draws none of them) are the thread's story and still follow it, as do
            # the lines a card posted afresh was to carry (FOLLOWS).
            folded = [i for i in items if not i.event.startswith(("escalation.", "runbook."))
                      and i.event not in HAND_PAGE_EVENTS and not (i.details or {}).get(FOLLOWS)]
            posted, incident_id = ref, incident.id  # (as the closures below see them)

            async def record(session: Any) -> None:
                session.add(IncidentMessage(incident_id=incident_id, channel=channel_id, platform=channel.platform,
                                            chat_id=posted.chat_id, message_id=posted.message_id,
                                            thread_id=posted.thread_id, posted_at=now, updated_at=now))
                await self._mark(session, folded, "sent")
                if isinstance(found, tuple):  # drawn as the incident was when it was posted: draw it as it is now
                    session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident_id, channel=channel_id,
                                           kind="update", event="incident.changed", details={}))

            async def recorded(session: Any) -> bool:  # (the parent message is one per incident and channel)
                return (await session.execute(select(IncidentMessage.id).where(
                    IncidentMessage.incident_id == incident_id, IncidentMessage.channel == channel_id)
                )).first() is not None

            # (a failed recording is tried again, not the post: the loop waits meanwhile, and nothing posts it again)
            await self._record(f"the card of #{incident.id} went out in {channel_id}", record, recorded, UNRECORDED)
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
        due = [i for i in updates if i.due_at <= now]
        held = _refresh_after(due, parent, now)
        if held is not None and not churn:
            await self._hold(due, held)  # (what the incident is when it goes is drawn: nothing is lost)
        elif due and not churn:
            if self.buckets.allow(channel.platform, channel.chat, edit=True, now=tick):
                calls += 1
                card = incident_card(incident, alerts, now=now, tz=self.config.timezone, names=self.names,
                                     next_step=next_step, escalation_mark=escalation_mark, runbooks=self.config.runbooks)
                if await self._call(adapter.update(ref, card), updates, channel.platform, channel.chat, "update",
                                    gone=repost) is not None:
                    await self._finish(updates, "sent", redrawn=parent.id)
                elif reposting:
                    return calls  # the card is posted afresh next round, drawn as the incident is then
        for line_items, text in lines:
            if incident.status != TRIGGERED and any((i.details or {}).get(UNACKNOWLEDGED) for i in line_items):
                # "nobody has acknowledged yet" to everyone, held up (a rate limit) until someone had: as a page is
                await self._finish(line_items, "cancelled", f"not sent: #{incident.id} was {incident.status} first")
                continue
            if not self.buckets.allow(channel.platform, channel.chat, edit=False, now=tick):
                break
            calls += 1
            found = await self._look_first(adapter, line_items, "line", channel.platform, channel.chat,
                                           ref.thread_id or ref.message_id)
            if found is False:
                break  # (it waits to be looked for again, and holds back the lines after it)
            if isinstance(found, tuple):  # it had arrived; rows merged into the line since go in a line of their own
                await self._finish(found[1], "sent", where=found[0])
                continue
            context: dict[str, Any] = {"line": text, "incident_id": incident.id}
            mention = self._mention(line_items, channel.platform)
            if mention:
                context["mention"] = mention
            key = f"line-{line_items[0].id}"
            # (a line that asks for a decision carries its buttons: a runbook request's Approve / Reject, the Reject
            # its requester withdraws it with; the click is checked on the server whatever the button says)
            buttons = [button_from(spec) for item in line_items for spec in (item.details or {}).get("buttons") or []]
            asks = next((i.details for i in line_items if (i.details or {}).get(ASKS) is not None), None)
            ended = await self._decided(int(asks[ASKS])) if asks is not None else None
            if asks is not None and ended is not None:  # decided before it went: it says how, and asks nothing
                text = thread_line(line_items[0].event, {"line": decided_words(asks, ended)}, actor_name=None)
                context["line"], buttons = text, []
            message = Outbound("thread", context, buttons=buttons, text=text, key=key)
            posted_at = await self._call(adapter.reply(ref, message), line_items, channel.platform, channel.chat,
                                         "reply", gone=repost, lost=self._findable(adapter, key))
            if posted_at is None:
                break  # (a thread whose message is gone: the card is posted afresh, and the lines follow it)
            await self._finish(line_items, "sent", where=posted_at if isinstance(posted_at, MessageRef) else None,
                               settled=ended is not None)
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
            if exc.unknown and lost is None and not getattr(self.adapters.get(platform), "says_lost_answers", False):
                # (the platform cannot be asked whether it has it: posted again; Teams' adapter says so itself)
                log.warning("outbox: the answer to a %s in %s was lost (%s), and the platform cannot be asked whether "
                            "it has it, so it is posted again and may show twice", method, chat, exc)
            await self._failed(items, str(exc), exc.retry_after, permanent=exc.permanent and not exc.token_refused,
                               platform_trouble=True, lost=lost if exc.unknown else None,
                               unmark=lost is not None and not exc.unknown, token_refused=exc.token_refused)
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
                      platform_trouble: bool = False, lost: str | None = None, unmark: bool = False,
                      token_refused: bool = False) -> None:
        """Schedule the retry, or give up. `retry_after`: the platform said when to come back (a rate limit, not a
        failure: no attempt is spent). `platform_trouble`: the platform failed, not our code: wait for it longer.
        `lost`: the post, carrying this key, may have arrived: the retry looks for it first (UNANSWERED).
        `token_refused`: the platform refused the bot's token: the rows are marked (TOKEN_WAIT), and go at once when
        a call there works again or the bot starts again (PageLanes._token_accepted, _recover), not at their back-off."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            for item in items:
                row = await session.get(OutboxItem, item.id)
                if row is None or row.status not in UNSETTLED:
                    continue
                row.status = "pending"  # a page claimed for sending (SENDING) that did not go: due again, or dead below
                if token_refused and row.kind != "page":  # (a page has its own mark: PageLanes._page_waits)
                    row.details = {**(row.details or {}), TOKEN_WAIT: True}
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

    async def _finish(self, items: Sequence[OutboxItem], status: str, error: str | None = None, *,
                      redrawn: int | None = None, where: MessageRef | None = None, settled: bool = False) -> None:
        """Settle the rows. Sent, the platform took them: a failed recording is tried again, and the call is not
        made again (PageLanes._record); it was, by the next round, which found them still pending. `redrawn`: the
        IncidentMessage the rows redrew, whose `updated_at` says when (alert traffic waits REFRESH after it).
        `where`: the message the platform made, kept by rows that ask to decide a runbook request, to be redrawn
        once it is decided (`settled`: it went saying how it ended already; see PageLanes._keep_where)."""
        at = self.clock.now()

        async def mark(session: Any) -> None:
            await self._mark(session, items, status, error)
            if redrawn is not None:
                await session.execute(update(IncidentMessage).where(IncidentMessage.id == redrawn)
                                      .values(updated_at=at))
            if where is not None:
                await self._keep_where(session, items, where, settled=settled)

        if status == "sent" and items:
            await self._record(_went(items), mark, all_settled(items), UNRECORDED)
        else:
            async with self.db.transaction() as session:
                await mark(session)
        if status == "dead":  # given up at once (no such channel, person or incident): counted as _failed counts
            for item in items:
                self.metrics.outbox_dead.labels(item.channel).inc()

    async def _hold(self, items: Sequence[OutboxItem], until: datetime) -> None:
        """Alert traffic's redraws of a message redrawn a moment ago wait until `until` (see REFRESH). Their rows
        say so (due then), so the wait outlives a restart and holds on whichever replica delivers; those queued
        meanwhile join them."""
        async with self.db.transaction() as session:
            await session.execute(update(OutboxItem).where(
                OutboxItem.id.in_([i.id for i in items]), OutboxItem.status == "pending", OutboxItem.due_at < until)
                .values(due_at=until))

    @staticmethod
    async def _mark(session: Any, items: Sequence[OutboxItem], status: str, error: str | None = None, *,
                    tried: bool = False) -> None:
        """One statement for all the rows; a row something else already settled stays as it is. `tried`: the rows
        failed a try that this settles (a page refused or unconfirmed): it counts in `attempts`, as a retried try
        does (_failed), where a dead page said ATTEMPTS 0."""
        ids = [item.id for item in items]
        if ids:
            tries = {"attempts": OutboxItem.attempts + 1} if tried else {}
            await session.execute(update(OutboxItem).where(OutboxItem.id.in_(ids), OutboxItem.status.in_(UNSETTLED))
                                  .values(status=status, last_error=error, **tries))


def _went(items: Sequence[OutboxItem]) -> str:
    """What went out, for the log: "the reply escalation.paged about #3 in ops-slack went out"."""
    item = items[0]
    about = f" about #{item.incident_id}" if item.incident_id is not None else ""
    more = f" (with {len(items) - 1} more row(s))" if len(items) > 1 else ""
    return f"the {item.kind} {item.event}{about} in {item.channel}{more} went out"


def _kept_promise(details: Mapping[str, Any], now: datetime) -> Mapping[str, Any]:
    """A thread line's details as it goes: without the promise it ends with once that is spent (_promised_past)."""
    after, line = str(details.get("next") or ""), str(details.get("line") or "")
    if not after or not line.endswith(after) or not _promised_past(details, now):
        return details
    return {**details, "line": line[: -len(after)].rstrip()}


def _look_waits(items: Sequence[OutboxItem], kind: str, now: datetime) -> bool:
    """A post whose answer was lost (its rows marked UNANSWERED) whose look is not due yet (see _look_first)."""
    mark = next((m for m in ((i.details or {}).get(UNANSWERED) for i in items)
                 if isinstance(m, dict) and str(m.get("key", "")).startswith(f"{kind}-")), None)
    return mark is not None and any(((i.details or {}).get(UNANSWERED) or {}).get("key") == mark["key"]
                                    and i.due_at > now for i in items)


def _gone(channels: Mapping[str, Any], queued_before: datetime | None = None) -> Any:
    """Rows for a channel no longer in app.yaml, in SQL (a person's own, "@...", are not a channel's), queued before
    `queued_before` if given."""
    gone = OutboxItem.channel.not_in(list(channels)) & ~OutboxItem.channel.startswith("@")
    return gone if queued_before is None else gone & (OutboxItem.created_at <= queued_before)


def _refresh_after(due: Sequence[OutboxItem], parent: IncidentMessage, now: datetime) -> datetime | None:
    """When the message may be redrawn, if what is due is alert traffic alone (ROUTINE_EVENTS) and it was redrawn
    (or posted) less than REFRESH ago; else None: it goes now. A redraw time ahead of now (a clock that went back,
    another replica's clock ahead of this one's) holds nothing: held until then, the rows were held again round after
    round, REFRESH at a time, until the clock caught up; redrawn now, the message's time is this clock's again."""
    if not due or any(i.event not in ROUTINE_EVENTS for i in due) or parent.updated_at > now:
        return None
    after = parent.updated_at + REFRESH
    return after if after > now else None


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
