"""Shift swaps with the counterpart's consent: `/swap`, its buttons and its expiry timer.

`/swap PERSON [ROTATION] DATE|next` asks PERSON (the counterpart) to take the requester's shift: the
stretch of the effective schedule the requester holds on DATE (a day in the rotation's time zone: the
one of theirs that starts that day, else the one under way at its start), at a time (`2026-11-25T09:00`,
in the requester's time zone), or their next one that has not started (`next`). A request is a
`SwapRequest` row, an audit event, a `swap.expire` timer and two direct messages (Accept / Decline to
the counterpart, Cancel to the requester), all in one transaction.

    pending --accept--> accepted                  (the override is written)
            --accept--> awaiting_approval --approve--> approved   (rotations[].swap_approval)
                                          --reject---> declined
    pending | awaiting_approval --decline (counterpart) / cancel (requester) / expiry--> declined | cancelled | expired
    accepted | approved --undo (either side, before it starts)--> undone   (the override is cancelled)

Taking a swap writes one override: the counterpart covers [start, end) (a cover, not an exchange);
a request for a stretch already under way covers what is left of it from the moment it is taken.
Accepting or approving checks again that the requester still holds the whole stretch, so a swap
never silently replaces a manager's override made in the meantime, and that the counterpart is still a
member of the rotation (if not, the swap is called off: cancelled by nobody). So is an open swap whose
requester left the rotation (or app.yaml: they could not even cancel it), when anyone comes upon it.
Approval: the clicker must hold the role and must be neither the requester nor the counterpart, unless
nobody else holds the role (then they may approve, and the audit event says `self_approved`). An
accepted swap waiting for approval gets a fresh `swap_expiry` (never past the end of the shift) for the
approvers.

Every transition is a conditional change of the row read `FOR UPDATE` (PostgreSQL; SQLite's writes are
serialised), so two clicks, on one replica or two, change a swap once; the second is told what happened.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import or_, select

from bot.actions import MAX_ID, Action, typed_id
from bot.chat import ActionEvent, Button, CommandEvent, Reply, echoed
from bot.clock import Clock
from bot.config import Config, Person, Rotation, find_person, unknown_person
from bot.dispatch import Dispatcher
from bot.durations import format_duration
from bot.model import Actor
from bot.rotations import Schedule, Shift, first_instant, shifts_between
from bot.tables import table
from bot.view import and_list
from handlers.handoffs import load_overrides
from handlers.notify import LIVE_WHILE, SWAP_ASKS, queue_direct, queue_notice, swap_changed_row
from handlers.paging import page_where
from handlers.oncall import Oncall, when
from handlers.overrides import join_date_time, schedule_lock
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import Override as OverrideRow
from storage.models import SwapRequest

log = logging.getLogger("chatops.swaps")

USAGE = "/swap PERSON [ROTATION] DATE|next | /swap list | /swap cancel ID | /swap undo ID"
EXPIRE = "swap.expire"
PENDING, AWAITING, ACCEPTED, APPROVED = "pending", "awaiting_approval", "accepted", "approved"
DECLINED, EXPIRED, CANCELLED, UNDONE = "declined", "expired", "cancelled", "undone"
OPEN = (PENDING, AWAITING)  # waiting for someone
TAKEN = (ACCEPTED, APPROVED)  # an override is in force
NEXT_HORIZON = timedelta(days=366)  # how far `next` looks
PLATFORMS = ("telegram", "slack", "teams")
SUBCOMMANDS = ("list", "cancel", "undo", "accept", "decline", "approve", "reject")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TICK = timedelta(microseconds=1)


class BadInput(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    """A `/swap` request the help shows, made of app.yaml's rotations and people."""
    rotation: Rotation
    counterpart_id: str
    counterpart_name: str
    command: str  # `/swap bob dba-primary 2026-11-30`


@dataclass
class SwapHandlers:
    db: Database
    audit: AuditLog
    config: Config
    clock: Clock
    view: Oncall
    after_commit: Callable[[], None] | None = None  # wake the outbox and the timer tick
    changed: Callable[[list[str]], Awaitable[Any]] | None = None  # a swap was taken or undone: replan handoffs
    rotations: dict[str, Rotation] = field(init=False)
    people: dict[str, Person] = field(init=False)

    def __post_init__(self) -> None:
        self.rotations = {r.id: r for r in self.config.rotations}
        self.people = {p.id: p for p in self.config.people}

    def register(self, dispatcher: Dispatcher, timers: TimerService) -> None:
        dispatcher.command("swap", usage=USAGE, help="ask someone to take your shift; list, cancel or undo swaps")(
            self.swap)
        # role=None: who may press each button depends on the swap, and is checked by its handler
        for action, label, fn in ((Action.SWAP_ACCEPT, "Accept", self.accept),
                                  (Action.SWAP_DECLINE, "Decline", self.decline),
                                  (Action.SWAP_APPROVE, "Approve", self.approve),
                                  (Action.SWAP_REJECT, "Reject", self.reject),
                                  (Action.SWAP_CANCEL, "Cancel", self.cancel),
                                  (Action.SWAP_UNDO, "Undo", self.undo)):
            dispatcher.action(action, role=None, label=label)(self._button(action, fn))
        timers.handler(EXPIRE)(self.expire_timer)

    def _button(self, action: str, fn: Callable[[int, Person, Actor], Awaitable[Reply]]
                ) -> Callable[[ActionEvent, Person], Awaitable[Reply]]:
        """A swap button's handler. Once this click moved the swap past what the button does, the clicked message
        settles: its text becomes the answer, and its buttons go. A click that changed nothing (a double tap, a
        button something else had made moot) is answered to the clicker alone, and the message stays as it is: a
        second tap of Accept replaced "Accepted: you are on call ... from ... until ..." with "Swap #1 was already
        accepted by Carol."."""
        async def handle(event: ActionEvent, person: Person) -> Reply:
            async with self.db.sessions() as session:
                before = await session.get(SwapRequest, event.incident_id)
                status = before.status if before is not None else None
            clicked = _CLICKED.set((event.incident_id, event.source))
            try:
                reply = await fn(event.incident_id, person, event.actor)
            finally:
                _CLICKED.reset(clicked)
            async with self.db.sessions() as session:
                swap = await session.get(SwapRequest, event.incident_id)
            if swap is None or not self._party(swap, person):  # not this person's swap message: leave it be
                return reply
            if swap.status == status:  # (the dispatcher runs one click of a swap at a time)
                return reply
            if swap.status not in _BUTTON_APPLIES[action] or (
                    action == Action.SWAP_UNDO and self.clock.now() >= swap.starts_at):
                return dataclasses.replace(reply, settle=reply.text)
            return reply
        handle.__name__ = fn.__name__
        return handle

    # -- the command ----------------------------------------------------------------------------------

    async def swap(self, event: CommandEvent, person: Person) -> Reply:
        args = [a for a in event.args if a]
        if not args or args[0].lower() in ("help", "-h", "--help"):
            return Reply(await self.help(person))
        sub = args[0].lower()
        if sub in SUBCOMMANDS:
            if sub == "list":
                return await self.listing(person) if len(args) == 1 else Reply("Usage: `/swap list`.")
            swap_id = _swap_id(args[1:])
            if swap_id is None:
                return Reply(f"Usage: `/swap {sub} ID`, with the swap's number (`/swap list` shows yours).")
            if swap_id > MAX_ID:  # no swap has it, and PostgreSQL would refuse to look it up
                return Reply(f"There is no swap #{echoed(str(swap_id))}.")
            fn = {"cancel": self.cancel, "undo": self.undo, "accept": self.accept, "decline": self.decline,
                  "approve": self.approve, "reject": self.reject}[sub]
            return await fn(swap_id, person, event.actor)
        return await self.request(event, person, args)

    async def request(self, event: CommandEvent, person: Person, args: list[str]) -> Reply:
        tokens = join_date_time(args)
        if len(tokens) not in (2, 3):
            example = await self.example(person)
            examples = (f", for example `{example.command}` or `/swap {example.counterpart_id} next`"
                        if example is not None else "")
            return Reply(f"Usage: `{USAGE}`{examples} "
                         "(a name with a space goes in quotes: `/swap \"Bob Jones\" next`).")
        counterpart = self.resolve(tokens[0])
        if counterpart is None:
            return Reply(unknown_person(self.config.people, tokens[0]))
        if counterpart.id == person.id:
            return Reply("You cannot swap with yourself: name the person who should take your shift.")
        schedule, problem = self._rotation(person, counterpart, tokens[1] if len(tokens) == 3 else None)
        if schedule is None:
            return Reply(problem)
        if counterpart.id not in schedule.members:
            return Reply(f"{counterpart.name} is not a member of `{schedule.id}` (members: "
                         f"{', '.join(schedule.members)}), so they cannot take a shift in it.")
        now = self.clock.now()
        tz = self._tz(person, schedule)
        try:
            stretch = await self._shift(schedule, person, tokens[-1], now, tz)
        except BadInput as exc:
            return Reply(str(exc))
        assert stretch.start is not None
        start, end = max(stretch.start, now), stretch.end
        rest = await self._rest_words(schedule, stretch, person, counterpart, now, tz)
        rotation = self.rotations[schedule.id]
        actor = _actor(event.actor, person)
        async with self.db.transaction() as session:
            # Two requests at once must not both pass the overlap check: on PostgreSQL they queue on the rotation
            # (SQLite's write transactions already run one at a time).
            await self.db.lock_for_transaction(session, schedule_lock(schedule.id))
            clashes = (await session.execute(select(SwapRequest).where(
                SwapRequest.rotation == schedule.id, SwapRequest.status.in_(OPEN),
                SwapRequest.starts_at < end, SwapRequest.ends_at > start).order_by(SwapRequest.id))).scalars().all()
            clash = None
            for other in clashes:
                if now >= other.expires_at:  # over, though its expiry timer has not run yet: expire it now
                    await self._expire(session, other, now)
                elif self._left(other):  # one of its two left the rotation: it can never be taken
                    await self._call_off(session, other, person, now)
                elif clash is None:
                    clash = other
            if clash is not None:
                return Reply(f"That overlaps swap #{clash.id} ({self.name(clash.requester)} asked "
                             f"{self.name(clash.counterpart)} to take `{clash.rotation}` from "
                             f"{when(clash.starts_at, tz, now)} until {when(clash.ends_at, tz, now)}), which is still "
                             f"{_status_words(clash.status)}. {self._clash_words(clash, person, tz, now)}")
            swap = SwapRequest(rotation=schedule.id, requester=person.id, counterpart=counterpart.id, starts_at=start,
                               ends_at=end, status=PENDING, created_at=now,
                               expires_at=min(now + rotation.swap_expiry, end), requested_on=event.actor.platform)
            session.add(swap)
            await session.flush()
            assert swap.id is not None
            await self.audit.append_many(session, [Entry("swap.requested", actor, "swap", str(swap.id), now, {
                **self._facts(swap), "expires_at": swap.expires_at.isoformat()})])
            await timer_store.schedule(session, EXPIRE, swap.id, swap.expires_at, now, payload={"swap": swap.id})
            approval = (f" Once you accept, someone with the `{rotation.swap_approval}` role approves it."
                        if rotation.swap_approval else "")
            self._direct(session, swap, swap.counterpart, now, "swap.requested",
                         lambda z: (f"{person.name} asks you to take their `{schedule.id}` shift from "
                                    f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)} (swap #{swap.id})."
                                    f"{approval} Please answer by {when(swap.expires_at, z, now)}."),
                         [Button(Action.SWAP_ACCEPT, swap.id, label="Accept", style="primary"),
                          Button(Action.SWAP_DECLINE, swap.id, label="Decline", style="danger")],
                         if_undeliverable=(swap.requester, (
                             f"I could not deliver your swap #{swap.id} request to {counterpart.name}, so they have "
                             f"not seen it. Ask them yourself (they can answer with `/swap accept {swap.id}`), or "
                             f"cancel it with `/swap cancel {swap.id}`.")))
            self._direct(session, swap, swap.requester, now, "swap.asked",
                         lambda z: (f"You asked {counterpart.name} to take your `{schedule.id}` shift from "
                                    f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)} (swap #{swap.id}). "
                                    f"I will tell you when they answer; the request expires "
                                    f"{when(swap.expires_at, z, now)}.{rest}"),
                         [Button(Action.SWAP_CANCEL, swap.id, label="Cancel request",
                                 confirm=f"Cancel swap #{swap.id}?")])
            swap_id = swap.id
        self._committed()
        return Reply(f"Asked {counterpart.name} to take your `{schedule.id}` shift from {when(start, tz, now)} until "
                     f"{when(end, tz, now)} (swap #{swap_id}); it expires "
                     f"{when(min(now + rotation.swap_expiry, end), tz, now)}. `/swap cancel {swap_id}` cancels it.{rest}",
                     sent_direct=True)  # (the "You asked" message above, with its Cancel request button)

    async def help(self, person: Person) -> str:
        """`/swap` alone: the usage, with an example built from app.yaml for the one asking, so that it can be copied."""
        example = await self.example(person)
        if example is None:
            said = ("No rotations are configured, so there is no shift to swap yet (add them under `rotations:` in "
                    "app.yaml).")
        else:
            who = example.counterpart_name
            said = (f"`{example.command}` asks {who} to take your `{example.rotation.id}` shift on that day "
                    "(`next`: your next shift; ROTATION may be left out when you are in one rotation with them). "
                    f"{who} gets Accept and Decline buttons; the request expires after the rotation's `swap_expiry` "
                    f"({format_duration(example.rotation.swap_expiry)}).")
        return f"Usage: `{USAGE}`.\n{said} `/swap accept|decline|approve|reject ID` do what the buttons do."

    async def example(self, person: Person) -> Example | None:
        """A `/swap` this person could send: a rotation of theirs (one they share with someone first), someone else
        in it (else anyone else), and the day their next shift in it starts (else tomorrow); None without rotations.
        """
        if not self.config.rotations:
            return None
        mine = [r for r in self.config.rotations if person.id in r.members]
        rotation = next((r for r in mine if set(r.members) - {person.id}), mine[0] if mine else self.config.rotations[0])
        candidates = [m for m in rotation.members if m != person.id] + [p.id for p in self.config.people]
        counterpart = next((self.people[c] for c in candidates if c != person.id and c in self.people), None)
        schedule = self.view.schedules[rotation.id]
        now = self.clock.now()
        shift = await self._next_of(schedule, person.id, now) if person.id in rotation.members else None
        day = shift.start if shift is not None and shift.start is not None else now + timedelta(days=1)
        who_id, who = (counterpart.id, counterpart.name) if counterpart is not None else ("PERSON", "PERSON")
        return Example(rotation, who_id, who,
                       f"/swap {who_id} {rotation.id} {day.astimezone(schedule.tz).date().isoformat()}")

    async def listing(self, person: Person) -> Reply:
        """`/swap list`: your open swaps, your taken ones that have not ended, and the ones you may approve."""
        now = self.clock.now()
        approvable = [r.id for r in self.config.rotations if r.swap_approval and r.swap_approval in person.roles]
        mine = or_(SwapRequest.requester == person.id, SwapRequest.counterpart == person.id)
        async with self.db.sessions() as session:
            query = select(SwapRequest).where(
                or_(mine, SwapRequest.rotation.in_(approvable)),
                or_(SwapRequest.status.in_(OPEN), SwapRequest.status.in_(TAKEN)),
                SwapRequest.ends_at > now).order_by(SwapRequest.starts_at, SwapRequest.id)
            swaps = list((await session.execute(query)).scalars().all())
        swaps = [s for s in swaps if person.id in (s.requester, s.counterpart) or s.status == AWAITING]
        if not swaps:
            return Reply("You have no open or upcoming swaps. Ask for one with "
                         "`/swap PERSON [ROTATION] DATE|next`.")
        rows = []
        for s in swaps:
            schedule = self.view.schedules.get(s.rotation)
            tz = self._tz(person, schedule) if schedule else ZoneInfo(self.config.timezone)
            rows.append((f"#{s.id}", s.rotation, f"{self.name(s.counterpart)} for {self.name(s.requester)}",
                         when(s.starts_at, tz, now), when(s.ends_at, tz, now), self._state(s, tz, now)))
        text = table(["swap", "rotation", "who", "from", "until", "state"], rows)
        return Reply(f"Your swaps:\n```\n{text}\n```\n`/swap cancel ID` withdraws a request of yours; "
                     "`/swap undo ID` undoes a taken swap before it starts.")

    # -- the transitions (buttons and subcommands) --------------------------------------------------

    async def accept(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        now = self.clock.now()
        async with self.db.transaction() as session:
            swap = await self._locked_with_rotation(session, swap_id)
            if swap is None:
                return Reply(f"There is no swap #{swap_id}.")
            if person.id != swap.counterpart:
                return Reply(f"Only {self.name(swap.counterpart)} can accept swap #{swap_id}.")
            if swap.status != PENDING:
                return Reply(self._settled(swap, person, now))
            if now >= swap.expires_at:
                await self._expire(session, swap, now)
                return Reply(f"Swap #{swap_id} expired {self._when(swap.expires_at, person, swap, now)}; "
                             f"{self.name(swap.requester)} can ask again.")
            if self._left(swap):
                reply = await self._call_off(session, swap, person, now)
                rotation_id, taken = swap.rotation, False
            else:
                reply, rotation_id, taken = await self._accepted(session, swap, person, actor, now)
        await self._after(rotation_id if taken else None)
        return reply

    async def _accepted(self, session: AsyncSession, swap: SwapRequest, person: Person, actor: Actor,
                        now: datetime) -> tuple[Reply, str, bool]:
        """The counterpart's accept, once it may be taken: the override, or the wait for approval."""
        swap_id = swap.id
        start = max(swap.starts_at, now)
        problem = await self._holds(session, swap, start, person, now)
        if problem:
            return Reply(problem), swap.rotation, False
        rotation = self.rotations.get(swap.rotation)
        actor = _actor(actor, person)
        swap.decided_at, swap.decided_by = now, person.id
        if rotation is not None and rotation.swap_approval:
            reply = await self._await_approval(session, swap, rotation, now, actor)
        else:
            await self._take(session, swap, start, now, actor, ACCEPTED, "swap.accepted")
            reply = Reply(f"Accepted: you are on call for `{swap.rotation}` from "
                          f"{self._when(swap.starts_at, person, swap, now)} until "
                          f"{self._when(swap.ends_at, person, swap, now)} instead of {self.name(swap.requester)} "
                          f"(swap #{swap_id}).")
        return reply, swap.rotation, swap.status in TAKEN

    async def decline(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        now = self.clock.now()
        async with self.db.transaction() as session:
            swap = await _locked(session, swap_id)
            if swap is None:
                return Reply(f"There is no swap #{swap_id}.")
            if person.id != swap.counterpart:
                return Reply(f"Only {self.name(swap.counterpart)} can decline swap #{swap_id}.")
            if swap.status not in OPEN:
                return Reply(self._settled(swap, person, now))
            if now >= swap.expires_at:  # over, though its expiry timer has not run yet: it expired, as for accept
                await self._expire(session, swap, now, but=person.id)
                return Reply(f"Swap #{swap_id} expired {self._when(swap.expires_at, person, swap, now)}; there is "
                             "nothing left to decline.")
            if self._left(swap) == "requester":  # nobody would read "declined": it is called off instead
                reply = await self._call_off(session, swap, person, now)
            else:
                reply = await self._declined(session, swap, person, actor, now)
        await self._after(None)
        return reply

    async def _declined(self, session: AsyncSession, swap: SwapRequest, person: Person, actor: Actor,
                        now: datetime) -> Reply:
        swap_id, was = swap.id, swap.status
        swap.decided_at, swap.decided_by = now, person.id
        await self._close(session, swap, DECLINED, "swap.declined", _actor(actor, person), now)
        if was == AWAITING:
            self._tell_approvers(session, swap, now, "swap.declined", f"was withdrawn by {person.name}")
        self._direct(session, swap, swap.requester, now, "swap.declined",
                     lambda z: (f"{person.name} declined to take your `{swap.rotation}` shift from "
                                f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)} "
                                f"(swap #{swap_id}). It stays yours."))
        return Reply(f"Declined swap #{swap_id}; {self.name(swap.requester)} is told.")

    async def cancel(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        now = self.clock.now()
        async with self.db.transaction() as session:
            swap = await _locked(session, swap_id)
            if swap is None:
                return Reply(f"There is no swap #{swap_id}.")
            if person.id != swap.requester and swap.status in OPEN and self._left(swap) == "requester":
                # whoever asked cannot cancel it any more: whoever comes upon it calls it off
                reply = await self._call_off(session, swap, person, now)
            elif person.id != swap.requester:
                return Reply(f"Only {self.name(swap.requester)}, who asked, can cancel swap #{swap_id}"
                             + (" (you can decline it)." if person.id == swap.counterpart else "."))
            elif swap.status not in OPEN:
                extra = f" `/swap undo {swap_id}` undoes it before it starts." if swap.status in TAKEN else ""
                return Reply(self._settled(swap, person, now) + extra)
            else:
                was = swap.status
                swap.decided_at, swap.decided_by = now, person.id
                await self._close(session, swap, CANCELLED, "swap.cancelled", _actor(actor, person), now)
                if was == AWAITING:
                    self._tell_approvers(session, swap, now, "swap.cancelled", f"was cancelled by {person.name}")
                self._direct(session, swap, swap.counterpart, now, "swap.cancelled",
                             lambda z: (f"{person.name} cancelled swap #{swap_id} (their `{swap.rotation}` shift from "
                                        f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}): "
                                        "nothing to do."))
                reply = Reply(f"Cancelled swap #{swap_id}; {self.name(swap.counterpart)} is told.")
        await self._after(None)
        return reply

    async def approve(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        return await self._review(swap_id, person, actor, approve=True)

    async def reject(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        return await self._review(swap_id, person, actor, approve=False)

    async def _review(self, swap_id: int, person: Person, actor: Actor, *, approve: bool) -> Reply:
        verb = "approve" if approve else "reject"
        now = self.clock.now()
        async with self.db.transaction() as session:
            swap = await self._locked_with_rotation(session, swap_id)
            if swap is None:
                return Reply(f"There is no swap #{swap_id}.")
            rotation = self.rotations.get(swap.rotation)
            role = rotation.swap_approval if rotation is not None else None
            if swap.status != AWAITING:
                return Reply(self._settled(swap, person, now))
            if role is None:  # app.yaml no longer asks for approval: the two of them may finish it
                if person.id not in (swap.requester, swap.counterpart):
                    return Reply(f"`{swap.rotation}` needs no approval any more; only {self.name(swap.requester)} "
                                 f"or {self.name(swap.counterpart)} can {verb} swap #{swap_id}.")
            else:
                if role not in person.roles:
                    return Reply(f"Only someone with the `{role}` role can {verb} swap #{swap_id}, and {person.name} "
                                 f"has {_roles(person)}.")
                allowed = self.approvers(role, swap)
                if person.id not in {p.id for p in allowed}:
                    return Reply(f"You are part of swap #{swap_id}, so someone else with the `{role}` role "
                                 f"{verb}s it ({', '.join(p.name for p in allowed)}).")
            if now >= swap.expires_at:
                await self._expire(session, swap, now, but=person.id)
                return Reply(f"Swap #{swap_id} expired {self._when(swap.expires_at, person, swap, now)} before "
                             "anyone approved it.")
            left = self._left(swap)
            if left == "requester" or (approve and left):  # (a rejection of a cover by someone who left stands)
                reply = await self._call_off(session, swap, person, now)
            else:
                reply = await self._reviewed(session, swap, person, actor, now, role, approve=approve)
            rotation_id, taken = swap.rotation, swap.status in TAKEN
        await self._after(rotation_id if taken else None)
        return reply

    async def _reviewed(self, session: AsyncSession, swap: SwapRequest, person: Person, actor: Actor, now: datetime,
                        role: str | None, *, approve: bool) -> Reply:
        """An approver's answer, once they may give it: the override, or the rejection."""
        swap_id = swap.id
        actor = _actor(actor, person)
        self_approved = person.id in (swap.requester, swap.counterpart)
        if approve:
            start = max(swap.starts_at, now)
            problem = await self._holds(session, swap, start, person, now)
            if problem:  # refused: nobody approved anything
                return Reply(problem)
        swap.approval_at, swap.approval_by = now, person.id
        if approve:
            await self._take(session, swap, start, now, actor, APPROVED, "swap.approved",
                             {"self_approved": self_approved, "role": role})
            return Reply(f"Approved swap #{swap_id}: {self.name(swap.counterpart)} covers `{swap.rotation}` for "
                         f"{self.name(swap.requester)} from {self._when(swap.starts_at, person, swap, now)} until "
                         f"{self._when(swap.ends_at, person, swap, now)}.")
        await self._close(session, swap, DECLINED, "swap.rejected", actor, now, role=role, self_approved=self_approved)
        for who in (swap.requester, swap.counterpart):
            self._direct(session, swap, who, now, "swap.rejected",
                         lambda z: (f"{person.name} did not approve swap #{swap_id}: "
                                    f"{self.name(swap.requester)} stays on call for `{swap.rotation}` from "
                                    f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}."))
        return Reply(f"Rejected swap #{swap_id}; {self.name(swap.requester)} and {self.name(swap.counterpart)} are told.")

    async def undo(self, swap_id: int, person: Person, actor: Actor) -> Reply:
        now = self.clock.now()
        async with self.db.transaction() as session:
            swap = await self._locked_with_rotation(session, swap_id)
            if swap is None:
                return Reply(f"There is no swap #{swap_id}.")
            if person.id not in (swap.requester, swap.counterpart):
                return Reply(f"Only {self.name(swap.requester)} or {self.name(swap.counterpart)} can undo swap "
                             f"#{swap_id}.")
            if swap.status not in TAKEN:
                extra = (f" `/swap cancel {swap_id}` withdraws it." if swap.status in OPEN and person.id == swap.requester
                         else "")
                return Reply(self._settled(swap, person, now) + extra)
            if now >= swap.starts_at:
                return Reply(f"Swap #{swap_id} started {self._when(swap.starts_at, person, swap, now)}, so it can no "
                             "longer be undone; someone with the `manager` role can still `/override` the rest.")
            # A later swap that passed this cover on: undoing this one alone would leave that one standing, and
            # the message saying who is on call would be wrong.
            later = (await session.execute(select(SwapRequest).where(
                SwapRequest.rotation == swap.rotation, SwapRequest.id > swap.id, SwapRequest.status.in_(TAKEN),
                SwapRequest.requester == swap.counterpart, SwapRequest.starts_at < swap.ends_at,
                SwapRequest.ends_at > swap.starts_at).order_by(SwapRequest.id))).scalars().first()
            if later is not None:
                return Reply(f"Swap #{later.id} builds on this one: {self.name(later.counterpart)} took part of "
                             f"{self.name(swap.counterpart)}'s cover. Undo swap #{later.id} first "
                             f"({self.name(later.requester)} or {self.name(later.counterpart)} can), then this one.")
            overrides = list((await session.execute(select(OverrideRow).where(
                OverrideRow.id.in_(swap.override_ids), OverrideRow.cancelled_at.is_(None)))).scalars().all())
            for row in overrides:
                row.cancelled_at = now
                session.add(row)
            swap.status, swap.undone_at, swap.undone_by = UNDONE, now, person.id
            self._changed(session, swap, now)
            await self.audit.append_many(session, [Entry("swap.undone", _actor(actor, person), "swap", str(swap_id),
                                                         now, {**self._facts(swap),
                                                               "overrides": [r.id for r in overrides]})])
            # Who is on call once this cover is gone: the requester again, unless a later override (a manager's,
            # say) covers some of it; the messages say so rather than announce the requester.
            await session.flush()
            held = await self._on_call_then(session, swap)
            back = all(person_id == swap.requester for person_id, _, _, _ in held)
            still = ("a later override still applies" if any(o is not None for _, _, _, o in held)
                     else "the rotation changed since")
            theirs = (f"{self.name(swap.counterpart)} no longer covers `{swap.rotation}` for "
                      f"{self.name(swap.requester)}")

            def on_call(z: ZoneInfo) -> str:
                return "; ".join(f"{self.name(p)}" + (f" (override #{o})" if o is not None else "")
                                 + f" from {when(a, z, now)} until {when(b, z, now)}" for p, a, b, o in held)

            other = swap.counterpart if person.id == swap.requester else swap.requester
            self._direct(session, swap, other, now, "swap.undone",
                         lambda z: (f"{person.name} undid swap #{swap_id}: {self.name(swap.requester)} is on call for "
                                    f"`{swap.rotation}` from {when(swap.starts_at, z, now)} until "
                                    f"{when(swap.ends_at, z, now)} again, not {self.name(swap.counterpart)}." if back else
                                    f"{person.name} undid swap #{swap_id}: {theirs} from {when(swap.starts_at, z, now)} "
                                    f"until {when(swap.ends_at, z, now)}, but {still}. On call "
                                    f"then: {on_call(z)}."))
            self._notice(session, swap, now, lambda z: (
                f"Swap #{swap_id} is undone: {self.name(swap.requester)} is on call for `{swap.rotation}` from "
                f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)} again." if back else
                f"Swap #{swap_id} is undone: {theirs} from {when(swap.starts_at, z, now)} until "
                f"{when(swap.ends_at, z, now)}. On call then: {on_call(z)}."))
            rotation_id = swap.rotation
        await self._after(rotation_id)
        if back:
            return Reply(f"Undone: {self.name(swap.requester)} is on call for `{swap.rotation}` from "
                         f"{self._when(swap.starts_at, person, swap, now)} until "
                         f"{self._when(swap.ends_at, person, swap, now)} again (swap #{swap_id}).")
        schedule = self.view.schedules.get(swap.rotation)
        return Reply(f"Undone (swap #{swap_id}): {theirs} from {self._when(swap.starts_at, person, swap, now)} until "
                     f"{self._when(swap.ends_at, person, swap, now)}, but {still}. On call then: "
                     f"{on_call(self._tz(person, schedule) if schedule else ZoneInfo(self.config.timezone))}.")

    async def _on_call_then(self, session: AsyncSession, swap: SwapRequest
                            ) -> list[tuple[str | None, datetime, datetime, int | None]]:
        """Who the effective schedule has on call over the swap's stretch, as read in `session`: (person, from,
        until, the override's id when one puts them there), back to back stretches of one person joined."""
        schedule = self.view.schedules.get(swap.rotation)
        if schedule is None:  # the rotation left app.yaml: nothing to say but that the requester holds it
            return [(swap.requester, swap.starts_at, swap.ends_at, None)]
        overrides = await load_overrides(session, self.view, swap.starts_at, swap.ends_at, [swap.rotation])
        out: list[tuple[str | None, datetime, datetime, int | None]] = []
        for s in shifts_between(schedule, overrides, swap.starts_at, swap.ends_at):
            a, b = max(s.start or swap.starts_at, swap.starts_at), min(s.end, swap.ends_at)
            if out and out[-1][0] == s.person and out[-1][3] == s.override_id and out[-1][2] == a:
                out[-1] = (s.person, out[-1][1], b, s.override_id)
            else:
                out.append((s.person, a, b, s.override_id))
        return out

    # -- the expiry timer --------------------------------------------------------------------------------

    async def expire_timer(self, session: AsyncSession, timer: Any, now: datetime) -> None:
        """`swap.expire`: a request (or an approval) nobody answered in time expires; the requester is told."""
        swap = await _locked(session, int(timer.payload.get("swap", timer.subject)))
        if swap is None or swap.status not in OPEN or now < swap.expires_at:
            return  # answered, or given a later deadline (an accepted swap waiting for approval)
        await self._expire(session, swap, now)

    async def _expire(self, session: AsyncSession, swap: SwapRequest, now: datetime, *, but: str | None = None) -> None:
        """Close an open swap whose deadline passed and tell those waiting on it (but `but`, who is being answered)."""
        was = swap.status
        swap.decided_at = now
        if was == PENDING:
            swap.decided_by = None
        await self._close(session, swap, EXPIRED, "swap.expired", Actor.system(), now,
                          expires_at=swap.expires_at.isoformat())
        # A request made during the shift expires at its end at the latest: by then the stretch is not "yours" to keep.
        over = now >= swap.ends_at
        if was == PENDING:
            self._direct(session, swap, swap.requester, now, "swap.expired",
                         lambda z: (f"Your swap #{swap.id} expired: {self.name(swap.counterpart)} did not answer by "
                                    f"{when(swap.expires_at, z, now)}. Your `{swap.rotation}` shift from "
                                    f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)} "
                                    + ("ended without anyone taking it." if over else "stays yours.")))
            self._direct(session, swap, swap.counterpart, now, "swap.expired",
                         lambda z: (f"Swap #{swap.id} ({self.name(swap.requester)}'s `{swap.rotation}` shift from "
                                    f"{when(swap.starts_at, z, now)}) expired unanswered; its buttons do nothing now."))
        else:
            role = self.rotations[swap.rotation].swap_approval if swap.rotation in self.rotations else None
            for who in (swap.requester, swap.counterpart):
                self._direct(session, swap, who, now, "swap.expired",
                             lambda z: (f"Swap #{swap.id} expired: nobody with the `{role}` role approved it by "
                                        f"{when(swap.expires_at, z, now)}. " + (
                                            f"The `{swap.rotation}` shift from {when(swap.starts_at, z, now)} until "
                                            f"{when(swap.ends_at, z, now)} ended without it: "
                                            f"{self.name(swap.requester)} stayed on call." if over else
                                            f"{self.name(swap.requester)} stays on call for `{swap.rotation}` from "
                                            f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}.")))
            self._tell_approvers(session, swap, now, "swap.expired", "expired before anyone approved it", but=but)

    # -- steps shared by the transitions ------------------------------------------------------------------

    async def _close(self, session: AsyncSession, swap: SwapRequest, status: str, event: str, actor: Actor,
                     now: datetime, **details: Any) -> None:
        """An open request ends (declined, cancelled, rejected, expired): its status, no expiry timer, the audit
        event with what it was before."""
        was = swap.status
        swap.status = status
        self._changed(session, swap, now, was=was)
        await timer_store.cancel(session, EXPIRE, swap.id or 0, now)
        await self.audit.append_many(session, [Entry(event, actor, "swap", str(swap.id), now,
                                                     {**self._facts(swap), "was": was, **details})])

    async def _await_approval(self, session: AsyncSession, swap: SwapRequest, rotation: Rotation, now: datetime,
                              actor: Actor) -> Reply:
        role = rotation.swap_approval
        assert role is not None and swap.id is not None
        swap.status = AWAITING
        self._changed(session, swap, now)
        swap.expires_at = min(now + rotation.swap_expiry, swap.ends_at)  # the approvers' own window
        await timer_store.cancel(session, EXPIRE, swap.id, now)
        await timer_store.schedule(session, EXPIRE, swap.id, swap.expires_at, now, payload={"swap": swap.id})
        approvers = self.approvers(role, swap)
        await self.audit.append_many(session, [Entry("swap.accepted", actor, "swap", str(swap.id), now, {
            **self._facts(swap), "needs_approval": role, "approvers": [p.id for p in approvers],
            "expires_at": swap.expires_at.isoformat()})])
        self._direct(session, swap, swap.requester, now, "swap.accepted",
                     lambda z: (f"{self.name(swap.counterpart)} accepted swap #{swap.id} (your `{swap.rotation}` shift "
                                f"from {when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}). It now waits "
                                f"for approval by someone with the `{role}` role, until {when(swap.expires_at, z, now)}."),
                     [Button(Action.SWAP_CANCEL, swap.id, label="Cancel request", confirm=f"Cancel swap #{swap.id}?")])
        for approver in approvers:
            self._direct(session, swap, approver.id, now, "swap.approval",
                         lambda z: (f"{self.name(swap.counterpart)} agreed to take {self.name(swap.requester)}'s "
                                    f"`{swap.rotation}` shift from {when(swap.starts_at, z, now)} until "
                                    f"{when(swap.ends_at, z, now)} (swap #{swap.id}). It needs approval by someone "
                                    f"with the `{role}` role, by {when(swap.expires_at, z, now)}."),
                         [Button(Action.SWAP_APPROVE, swap.id, label="Approve", style="primary"),
                          Button(Action.SWAP_REJECT, swap.id, label="Reject", style="danger")])
        names = ", ".join(p.name for p in approvers)
        return Reply(f"Accepted swap #{swap.id}. It needs approval by someone with the `{role}` role ({names}); "
                     "I will tell you when it is approved.")

    async def _take(self, session: AsyncSession, swap: SwapRequest, start: datetime, now: datetime, actor: Actor,
                    status: str, action: str, details: dict[str, Any] | None = None) -> None:
        """Write the override (the counterpart covers the stretch), record it, tell both sides and the channel."""
        assert swap.id is not None
        reason = f"swap #{swap.id}: {self.name(swap.counterpart)} covers for {self.name(swap.requester)}"
        row = OverrideRow(rotation=swap.rotation, person=swap.counterpart, starts_at=start, ends_at=swap.ends_at,
                          created_at=now, created_by=swap.requester, reason=reason)
        session.add(row)
        await session.flush()
        assert row.id is not None
        swap.starts_at, swap.status, swap.override_ids = start, status, [row.id]
        self._changed(session, swap, now)
        await timer_store.cancel(session, EXPIRE, swap.id, now)
        await self.audit.append_many(session, [
            Entry(action, actor, "swap", str(swap.id), now, {**self._facts(swap), "override": row.id, **(details or {})}),
            Entry("oncall.override", actor, "rotation", swap.rotation, now, {
                "override": row.id, "person": swap.counterpart, "from": start.isoformat(),
                "until": swap.ends_at.isoformat(), "reason": reason, "swap": swap.id})])
        # Undo works until the cover starts: one taken during the shift (it starts now) offers none.
        later = start > now
        undo = [Button(Action.SWAP_UNDO, swap.id, label="Undo swap",
                       confirm=f"Undo swap #{swap.id}? {self.name(swap.requester)} is on call again.")] if later else []
        self._direct(session, swap, swap.requester, now, action,
                     lambda z: (f"{self.name(swap.counterpart)} takes your `{swap.rotation}` shift from "
                                f"{when(start, z, now)} until {when(swap.ends_at, z, now)} (swap #{swap.id}"
                                + (", approved" if status == APPROVED else "") + ")." + (
                                    " Either of you can undo it before it starts: the button, or "
                                    f"`/swap undo {swap.id}`." if later else "")), undo)
        self._direct(session, swap, swap.counterpart, now, action,
                     lambda z: (f"You are on call for `{swap.rotation}` from {when(start, z, now)} until "
                                f"{when(swap.ends_at, z, now)} instead of {self.name(swap.requester)} (swap #{swap.id}"
                                + (", approved" if status == APPROVED else "") + ")."), undo)
        self._notice(session, swap, now, lambda z: (
            f"{self.name(swap.counterpart)} covers `{swap.rotation}` for {self.name(swap.requester)} from "
            f"{when(start, z, now)} until {when(swap.ends_at, z, now)} (swap #{swap.id})."))

    def _left(self, swap: SwapRequest) -> str:
        """Which of the two is no longer a member of the swap's rotation (app.yaml changed since the swap was asked
        for): "counterpart", "requester", or "" (neither; or the rotation itself is gone, which `_holds` says).

        The counterpart's cover would make someone the rotation does not have the one on call, and paged: in a
        rotation an escalation pages, the `responder` role comes from membership (bot.config), so they could not even
        acknowledge. A requester who left holds no shift there to give away, and one no longer in app.yaml cannot
        even cancel their request: it would block that stretch for anyone else's request until it expired."""
        schedule = self.view.schedules.get(swap.rotation)
        if schedule is None:
            return ""
        if swap.counterpart not in schedule.members:
            return "counterpart"
        if swap.requester not in schedule.members:
            return "requester"
        return ""

    def _gone(self, person_id: str, rotation: str) -> str:
        """Why someone a swap names is out of it, in words: "no longer in app.yaml" or "no longer a member of `web`"."""
        return "no longer in app.yaml" if person_id not in self.people else f"no longer a member of `{rotation}`"

    async def _call_off(self, session: AsyncSession, swap: SwapRequest, person: Person, now: datetime) -> Reply:
        """Close an open swap one of whose two left the rotation (`_left`): it can never be taken, and waiting for
        its expiry would keep the stretch blocked for other requests. Cancelled, by nobody (the audit event's actor
        is the system, with the reason); whoever of the two is still in app.yaml is told, and whoever else was
        waiting on it. `person`: who came upon it (answered here, not in a direct message)."""
        assert swap.id is not None
        left = self._left(swap)
        was, swap_id, rotation = swap.status, swap.id, swap.rotation
        requester, counterpart = self.name(swap.requester), self.name(swap.counterpart)
        swap.decided_at, swap.decided_by = now, None
        await self._close(session, swap, CANCELLED, "swap.cancelled", Actor.system(), now,
                          reason=f"{left}_left_rotation", noticed_by=person.id)
        if left == "requester":
            gone = self._gone(swap.requester, rotation)
            if person.id != swap.counterpart and swap.counterpart in self.people:
                self._direct(session, swap, swap.counterpart, now, "swap.cancelled",
                             lambda z: (f"Swap #{swap_id} ({requester}'s `{rotation}` shift from "
                                        f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}) is called "
                                        f"off: {requester} is {gone}. Nothing to do."))
            if person.id != swap.requester and swap.requester in self.people:  # out of the rotation only
                self._direct(session, swap, swap.requester, now, "swap.cancelled",
                             lambda z: (f"Swap #{swap_id} is called off: you are no longer a member of `{rotation}`, "
                                        f"so the shift from {when(swap.starts_at, z, now)} until "
                                        f"{when(swap.ends_at, z, now)} is not yours to give away."))
            if was == AWAITING:
                self._tell_approvers(session, swap, now, "swap.cancelled", f"is called off ({requester} is {gone})",
                                     but=person.id)
            return Reply(f"{requester}, who asked for swap #{swap_id}, is {gone}, so it is called off: "
                         f"{counterpart} does not take that `{rotation}` stretch, and it is not blocked for other "
                         "swaps any more.")
        if swap.requester in self.people:
            self._direct(session, swap, swap.requester, now, "swap.cancelled",
                         lambda z: (f"Swap #{swap_id} is called off: {counterpart} is no longer a member of `{rotation}`, "
                                    f"so they cannot take your shift from {when(swap.starts_at, z, now)} until "
                                    f"{when(swap.ends_at, z, now)}. It stays yours; ask someone else with `/swap`."))
        if person.id != swap.counterpart and swap.counterpart in self.people:
            self._direct(session, swap, swap.counterpart, now, "swap.cancelled",
                         lambda z: (f"Swap #{swap_id} ({requester}'s `{rotation}` shift from "
                                    f"{when(swap.starts_at, z, now)}) is called off: you are no longer a member of "
                                    f"`{rotation}`, so you cannot take its shifts."))
        if was == AWAITING:
            self._tell_approvers(session, swap, now, "swap.cancelled", f"is called off ({counterpart} is no longer a "
                                 f"member of `{rotation}`)", but=person.id)
        if person.id == swap.counterpart:
            return Reply(f"You are no longer a member of `{rotation}`, so you cannot take its shifts: swap #{swap_id} "
                         f"is called off, and {requester} is told. If that is a mistake, ask whoever maintains "
                         f"app.yaml to add you back; then {requester} can ask you again.")
        if person.id == swap.requester:
            return Reply(f"{counterpart} is no longer a member of `{rotation}`, so they cannot take its shifts: swap "
                         f"#{swap_id} is called off. Ask someone else with `/swap`.")
        return Reply(f"{counterpart} is no longer a member of `{rotation}`, so they cannot take its shifts: swap "
                     f"#{swap_id} is called off, and {requester} is told; they can ask someone else.")

    def _tell_approvers(self, session: AsyncSession, swap: SwapRequest, now: datetime, event: str, what: str,
                        *, but: str | None = None) -> None:
        """A swap that was waiting for approval ended without one: the people who were asked to approve it (but the
        one who ended it) learn it needs nothing more from them, rather than find out when they press Approve."""
        rotation = self.rotations.get(swap.rotation)
        role = rotation.swap_approval if rotation is not None else None
        if role is None:
            return
        for approver in self.approvers(role, swap):
            if approver.id in (but, swap.requester, swap.counterpart):
                continue  # one of the two (who approves only when nobody else can) hears about it as such
            self._direct(session, swap, approver.id, now, event,
                         lambda z: (f"Swap #{swap.id} ({self.name(swap.counterpart)} taking "
                                    f"{self.name(swap.requester)}'s `{swap.rotation}` shift from "
                                    f"{when(swap.starts_at, z, now)} until {when(swap.ends_at, z, now)}) {what}; it "
                                    "needs nothing more from you."))

    async def _holds(self, session: AsyncSession, swap: SwapRequest, start: datetime, person: Person,
                     now: datetime) -> str | None:
        """Why the swap can no longer be taken (the requester does not hold all of it any more), or None; when the
        schedule changed under it, the requester (if `person`, who tried to accept or approve it, is someone else) is
        told by direct message, with the `/swap cancel` that frees the stretch."""
        schedule = self.view.schedules.get(swap.rotation)
        if schedule is None:
            return f"The rotation `{swap.rotation}` is no longer in app.yaml; swap #{swap.id} cannot be taken."
        if start >= swap.ends_at:
            return f"The shift of swap #{swap.id} is over already."
        overrides = await load_overrides(session, self.view, start, swap.ends_at, [swap.rotation])
        others = [s for s in shifts_between(schedule, overrides, start, swap.ends_at) if s.person != swap.requester]
        if not others:
            return None
        first = others[0]

        def words(tz: ZoneInfo, then: str) -> str:
            return (f"The schedule changed since swap #{swap.id} was asked for: {self.view.who(first)} is on call for "
                    f"`{swap.rotation}` from {when(max(first.start or start, start), tz, now)}, not "
                    f"{self.name(swap.requester)}. Nothing was changed; {then}")

        if person.id != swap.requester:
            # The requester is told too (else their request stayed open, blocking another for that stretch, unsaid).
            verb = "approve" if swap.status == AWAITING else "accept"
            self._direct(session, swap, swap.requester, now, "swap.refused",
                         lambda z: f"{person.name} could not {verb} swap #{swap.id}. " + words(
                             z, f"`/swap cancel {swap.id}` and ask again."))
        return words(self._tz(person, schedule), f"{self.name(swap.requester)} can cancel it and ask again.")

    def _clash_words(self, clash: SwapRequest, person: Person, tz: ZoneInfo, now: datetime) -> str:
        """What someone whose request overlaps an open swap can do about it: only its requester can cancel it, and
        its counterpart decline it; anyone else waits for its answer or expiry, or asks its requester."""
        expires = f"it expires {when(clash.expires_at, tz, now)}"
        if person.id == clash.requester:
            return f"Wait for it, or cancel it with `/swap cancel {clash.id}`."
        if person.id == clash.counterpart and clash.status == PENDING:
            return f"Answer it first: `/swap decline {clash.id}` frees that stretch ({expires})."
        return (f"Wait for it ({expires}), or ask {self.name(clash.requester)}, who asked for it, to cancel it.")

    def _party(self, swap: SwapRequest, person: Person) -> bool:
        """Someone the swap's direct messages go to: its two people, or one who may approve it."""
        if person.id in (swap.requester, swap.counterpart):
            return True
        rotation = self.rotations.get(swap.rotation)
        role = rotation.swap_approval if rotation is not None else None
        return role is not None and any(p.id == person.id for p in self.approvers(role, swap))

    def approvers(self, role: str, swap: SwapRequest) -> list[Person]:
        """Who may approve: people with the role other than the two in the swap; them only if nobody else has it."""
        holders = [p for p in self.config.people if role in p.roles]
        others = [p for p in holders if p.id not in (swap.requester, swap.counterpart)]
        return others or holders

    def _direct(self, session: AsyncSession, swap: SwapRequest, person_id: str, now: datetime, event: str,
                text: Callable[[ZoneInfo], str], buttons: Sequence[Button] = (),
                if_undeliverable: tuple[str, str] | None = None) -> None:
        """A direct message about `swap`, its times in the person's time zone, on the platform it began on first.
        `if_undeliverable`: who is told what (with the reason) if it cannot be delivered."""
        person = self.people.get(person_id)
        if person is None:  # no longer in app.yaml: there is nobody to deliver it to (it would be a dead letter)
            log.info("swap #%s: no %s message for %s, who is no longer in app.yaml", swap.id, event, person_id)
            return
        schedule = self.view.schedules.get(swap.rotation)
        tz = self._tz(person, schedule) if schedule else ZoneInfo(self.config.timezone)
        order = [swap.requested_on] if swap.requested_on in PLATFORMS else []
        order += [p for p in ((person.page_via if person else []) or PLATFORMS) if p not in order]
        order += [p for p in PLATFORMS if p not in order]
        # Its buttons, while the swap is in a state where they do something; after, it is redrawn without them.
        live = sorted({state for b in buttons for state in _BUTTON_APPLIES[b.action]})
        queue_direct(session, person_id, text(tz), now, buttons=list(buttons), event=event, platforms=order,
                     if_undeliverable=if_undeliverable, swap=swap.id if if_undeliverable else None,
                     extra={SWAP_ASKS: swap.id, LIVE_WHILE: live} if buttons else None)

    def _changed(self, session: AsyncSession, swap: SwapRequest, now: datetime, *, was: str | None = None) -> None:
        """The swap's state changed (in this transaction): its messages whose buttons now do nothing are redrawn
        saying what happened, without them, but the one clicked for it (the click's answer redraws that one)."""
        assert swap.id is not None
        clicked = _CLICKED.get()  # (a task the click started copies it: only this swap's click counts)
        source = clicked[1] if clicked is not None and clicked[0] == swap.id else None
        session.add(swap_changed_row(swap.id, swap.status, self._outcome(swap, was), now,
                                     clicked=page_where(source) if source is not None else None))

    def _outcome(self, swap: SwapRequest, was: str | None) -> str:
        """What happened to the swap, as a message that asked something of it ends once redrawn."""
        by = self.name
        match swap.status:
            case "awaiting_approval":
                return f"Accepted by {by(swap.counterpart)}; it waits for approval."
            case "accepted":
                return f"Accepted by {by(swap.counterpart)}."
            case "approved":
                return f"Approved by {by(swap.approval_by)}."
            case "declined":
                return (f"Rejected by {by(swap.approval_by)}." if swap.approval_by else
                        f"Declined by {by(swap.decided_by)}.")
            case "expired":
                return "Expired before anyone approved it." if was == AWAITING else "Expired unanswered."
            case "cancelled":
                if swap.decided_by is not None:
                    return f"Cancelled by {by(swap.decided_by)}."
                if self._left(swap) == "requester":
                    return f"Called off: {by(swap.requester)} is {self._gone(swap.requester, swap.rotation)}."
                return f"Called off: {by(swap.counterpart)} had left `{swap.rotation}`."
            case "undone":
                return f"Undone by {by(swap.undone_by)}."
        return f"Now {swap.status}."

    def _notice(self, session: AsyncSession, swap: SwapRequest, now: datetime, text: Callable[[ZoneInfo], str]) -> None:
        """A line in the rotation's channel, when it has one."""
        rotation = self.rotations.get(swap.rotation)
        schedule = self.view.schedules.get(swap.rotation)
        if rotation is None or rotation.channel is None or schedule is None:
            return
        queue_notice(session, rotation.channel, text(schedule.tz), now, event="swap.notice")

    async def _after(self, taken_or_undone: str | None) -> None:
        self._committed()
        if taken_or_undone is not None and self.changed is not None:
            try:
                await self.changed([taken_or_undone])
            except Exception:  # planning runs again within minutes; the swap itself is committed
                log.exception("replanning the handoffs of %s failed", taken_or_undone)

    def _committed(self) -> None:
        if self.after_commit is not None:
            self.after_commit()

    async def _locked_with_rotation(self, session: AsyncSession, swap_id: int) -> SwapRequest | None:
        """The swap, locked, after its rotation's schedule (as `request` takes it): what changes who is on call (an
        accept, an approval, an undo, an override) runs one at a time per rotation, so that each judges the
        schedule as the one before it left it (PostgreSQL replicas, or two people at once)."""
        rotation = (await session.execute(select(SwapRequest.rotation).where(SwapRequest.id == swap_id))).scalar()
        if rotation is not None:
            await self.db.lock_for_transaction(session, schedule_lock(rotation))
        return await _locked(session, swap_id)

    # -- reading ------------------------------------------------------------------------------------------

    def resolve(self, text: str) -> Person | None:
        return find_person(self.config.people, text)

    def _rotation(self, person: Person, counterpart: Person, text: str | None) -> tuple[Schedule | None, str]:
        if text is not None:
            schedule = self.view.find(text)
            return (schedule, "") if schedule is not None else (None, self.view.unknown(text))
        mine = [s for s in self.view.schedules.values() if person.id in s.members]
        both = [s for s in mine if counterpart.id in s.members]
        if len(both) == 1:
            return both[0], ""
        if not mine:
            return None, (f"You are not a member of any rotation; name one: `/swap {counterpart.id} ROTATION DATE`. "
                          f"Known rotations: {self.view.known() or 'none'}.")
        if not both:
            return None, (f"{counterpart.name} is not a member of any of your rotations (yours: "
                          f"{', '.join(f'`{s.id}`' for s in mine)}).")
        return None, (f"Which rotation? You are both in {', '.join(f'`{s.id}`' for s in both)}: "
                      f"`/swap {counterpart.id} ROTATION DATE|next`.")

    async def _shift(self, schedule: Schedule, person: Person, text: str, now: datetime, tz: ZoneInfo) -> Shift:
        """The stretch of `schedule` the requester holds that `text` (DATE, DATE-TIME or `next`) names."""
        if text.lower() == "next":
            found = await self._next_of(schedule, person.id, now)
            if found is None:
                raise BadInput(f"You have no shift in `{schedule.id}` in the next year.")
            return found
        zone = schedule.tz
        if _DATE.match(text):
            try:
                day = date.fromisoformat(text)
            except ValueError:
                raise BadInput(_not_a_date(text, zone)) from None
            _near(day.year, text)
            today = now.astimezone(zone).date()
            if day < today:
                raise BadInput(f"{day.isoformat()} is in the past (today is {today.isoformat()} in {zone.key}).")
            start = first_instant(datetime.combine(day, time()), zone)
            end = first_instant(datetime.combine(day + timedelta(days=1), time()), zone)
            stretches = await self._stretches(schedule, start, end)
            held = [s for s in stretches if s.person == person.id]
            mine = [s for s in held if s.end > now]
            if not mine:
                if held:
                    raise BadInput(f"Your `{schedule.id}` shift on {day:%a} {day.day} {day:%b} is over already (it "
                                   f"ended {when(held[-1].end, tz, now)}).")
                others = list(dict.fromkeys(self.view.who(s) for s in stretches))
                raise BadInput(f"You are not on call for `{schedule.id}` on {day:%a} {day.day} {day:%b} "
                               f"({and_list(others)} {'is' if len(others) == 1 else 'are'}), so there is no shift of "
                               f"yours to swap." + await self._hint(schedule, person, now, tz))
            starting = [s for s in mine if s.start is not None and s.start >= start]
            return (starting or mine)[0]
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise BadInput(_not_a_date(text, zone)) from None
        _near(value.year, text)
        # A wall time the clock skips is the moment of the skip, one it repeats the first of them (as /oncall take).
        at = first_instant(value, tz) if value.tzinfo is None else value.astimezone(UTC)
        if at < now:
            raise BadInput(f"{when(at, tz, now)} is in the past.")
        [stretch] = await self._stretches(schedule, at, at + _TICK)
        if stretch.person != person.id:
            raise BadInput(f"You are not on call for `{schedule.id}` at {when(at, tz, now)} ({self.view.who(stretch)} "
                           "is), so there is no shift of yours to swap." + await self._hint(schedule, person, now, tz))
        return stretch

    async def _rest_words(self, schedule: Schedule, stretch: Shift, person: Person, counterpart: Person,
                          now: datetime, tz: ZoneInfo) -> str:
        """A swap covers one unbroken stretch: when an override (someone else's cover) splits the requester's shift,
        the stretch asked for is only its part up to that cover, and the rest stays theirs. What to say of it, with
        the request that asks for the next part ("" when the stretch is the rest of the shift)."""
        if stretch.source != "rotation" or stretch.index is None:
            return ""
        shift_end = schedule.boundary(stretch.index + 1)
        if stretch.end >= shift_end:
            return ""
        after = await self._stretches(schedule, stretch.end, shift_end)
        rest = [s for s in after if s.person == person.id and s.start is not None and s.start >= stretch.end]
        if not rest:
            return ""
        between = ", ".join(dict.fromkeys(self.view.who(s) for s in after
                                          if s.start is not None and s.start < rest[0].start))
        nxt = rest[0]
        assert nxt.start is not None
        typed = typed_time(nxt.start, tz)
        more = " (and the same for any later part)" if len(rest) > 1 else ""
        return (f" That is only part of your shift, which {between} covers from {when(stretch.end, tz, now)}; the "
                f"rest of it stays yours unless you ask for it too: `/swap {counterpart.id} {schedule.id} {typed}` "
                f"asks for the part from {when(nxt.start, tz, now)} until {when(nxt.end, tz, now)}{more}.")

    async def _hint(self, schedule: Schedule, person: Person, now: datetime, tz: ZoneInfo) -> str:
        upcoming = await self._next_of(schedule, person.id, now)
        if upcoming is None or upcoming.start is None:
            return ""
        return f" Your next `{schedule.id}` shift starts {when(upcoming.start, tz, now)} (`next`)."

    async def _stretches(self, schedule: Schedule, start: datetime, end: datetime) -> list[Shift]:
        async with self.db.sessions() as session:
            overrides = await load_overrides(session, self.view, start, end, [schedule.id])
        return shifts_between(schedule, overrides, start, end)

    async def _next_of(self, schedule: Schedule, person_id: str, now: datetime) -> Shift | None:
        """The requester's first stretch that begins after `now`."""
        span = schedule.shift * (len(schedule.members) + 1)
        while True:
            end = now + min(span, NEXT_HORIZON)
            for s in await self._stretches(schedule, now, end):
                if s.person == person_id and s.start is not None and s.start > now:
                    return s
            if span >= NEXT_HORIZON:
                return None
            span *= 4

    def _tz(self, person: Person | None, schedule: Schedule) -> ZoneInfo:
        return ZoneInfo(person.timezone) if person is not None and person.timezone else schedule.tz

    def _when(self, at: datetime, person: Person, swap: SwapRequest, now: datetime) -> str:
        schedule = self.view.schedules.get(swap.rotation)
        tz = self._tz(person, schedule) if schedule else ZoneInfo(self.config.timezone)
        return when(at, tz, now)

    def name(self, person_id: str | None) -> str:
        return self.view.name(person_id)

    def _facts(self, swap: SwapRequest) -> dict[str, Any]:
        return {"rotation": swap.rotation, "requester": swap.requester, "counterpart": swap.counterpart,
                "from": swap.starts_at.isoformat(), "until": swap.ends_at.isoformat()}

    def _settled(self, swap: SwapRequest, person: Person, now: datetime) -> str:
        """What already happened to a swap that is not in the state the action needs; to whoever did it, that they
        did (their second tap of the same button)."""
        by = self.name
        yours = {"accepted": swap.counterpart, "approved": swap.approval_by, "cancelled": swap.decided_by,
                 "declined": swap.approval_by or swap.decided_by, "undone": swap.undone_by}
        if person.id == yours.get(swap.status):
            verb = {"undone": "undid"}.get(swap.status, swap.status)
            return f"You already {verb} swap #{swap.id}."
        match swap.status:
            case "pending":
                return f"Swap #{swap.id} is still waiting for {by(swap.counterpart)} to answer."
            case "awaiting_approval":
                return f"Swap #{swap.id} was accepted by {by(swap.counterpart)} and is waiting for approval."
            case "accepted":
                return f"Swap #{swap.id} was already accepted by {by(swap.counterpart)}."
            case "approved":
                return f"Swap #{swap.id} was already approved by {by(swap.approval_by)}."
            case "declined":
                who = swap.approval_by if swap.approval_by else swap.decided_by
                return f"Swap #{swap.id} was declined by {by(who)}."
            case "expired":
                return f"Swap #{swap.id} expired {self._when(swap.expires_at, person, swap, now)}."
            case "cancelled":
                if swap.decided_by is None and self._left(swap) == "requester":  # `_call_off`
                    return (f"Swap #{swap.id} was called off: {by(swap.requester)} is "
                            f"{self._gone(swap.requester, swap.rotation)}.")
                if swap.decided_by is None:
                    return f"Swap #{swap.id} was called off: {by(swap.counterpart)} had left `{swap.rotation}`."
                return f"Swap #{swap.id} was cancelled by {by(swap.decided_by)}."
            case "undone":
                return f"Swap #{swap.id} was undone by {by(swap.undone_by)}."
        return f"Swap #{swap.id} is {swap.status}."

    def _state(self, swap: SwapRequest, tz: ZoneInfo, now: datetime) -> str:
        if swap.status == PENDING:
            return f"waiting for {self.name(swap.counterpart)} until {when(swap.expires_at, tz, now)}"
        if swap.status == AWAITING:
            role = self.rotations[swap.rotation].swap_approval if swap.rotation in self.rotations else None
            return f"waiting for approval ({role}) until {when(swap.expires_at, tz, now)}"
        return "taken (approved)" if swap.status == APPROVED else "taken"


# The swap and the message whose button is being handled (a swap button's click), for `_changed`.
_CLICKED: contextvars.ContextVar[Any] = contextvars.ContextVar("swap_clicked", default=None)

# The swap states in which each button still means something.
_BUTTON_APPLIES = {Action.SWAP_ACCEPT: (PENDING,), Action.SWAP_DECLINE: (PENDING,), Action.SWAP_CANCEL: OPEN,
                   Action.SWAP_APPROVE: (AWAITING,), Action.SWAP_REJECT: (AWAITING,), Action.SWAP_UNDO: TAKEN}


async def _locked(session: AsyncSession, swap_id: int) -> SwapRequest | None:
    """The swap, locked for this transaction (PostgreSQL `FOR UPDATE`; SQLite's writer lock is already held)."""
    query = select(SwapRequest).where(SwapRequest.id == swap_id).with_for_update()
    return (await session.execute(query.execution_options(populate_existing=True))).scalars().first()


def _actor(actor: Actor, person: Person) -> Actor:
    return Actor(actor.platform, actor.user_id, person.name, person.id)


def _swap_id(args: Sequence[str]) -> int | None:
    if len(args) != 1:
        return None
    return typed_id(args[0])


def _not_a_date(text: str, zone: ZoneInfo) -> str:
    return (f"{echoed(text)!r} is not a date: give DATE as `2026-12-24` (a day in {zone.key}), a time such as "
            "`2026-12-24T09:00`, or `next` for your next shift.")


def _status_words(status: str) -> str:
    return "waiting for an answer" if status == PENDING else "waiting for approval"


def _roles(person: Person) -> str:
    return "the roles " + ", ".join(f"`{r}`" for r in person.roles) if person.roles else "no roles"


def _near(year: int, text: str) -> None:
    """Years /oncall take and /override accept too: past them the calendar arithmetic overflows."""
    if not 1970 <= year <= 9000:
        raise BadInput(f"{echoed(text)!r} is too far away: give a year from 1970 to 9000.")


def typed_time(at: datetime, tz: ZoneInfo) -> str:
    """`at` as a person types it back to the bot, naming that very moment: the wall time in `tz`, with its seconds when
    it has some, and with its UTC offset when the clock shows that time twice (the night it goes back; typed bare, the
    first is read). `2026-10-25T02:45` named 02:45 CEST where 02:45 CET was meant, and a cover ending at 10:00:30 was
    named from 10:00, inside it."""
    local = at.astimezone(tz)
    typed = local.strftime("%Y-%m-%dT%H:%M" + (":%S" if local.second else ""))
    wall = local.replace(tzinfo=None)
    if wall.replace(tzinfo=tz, fold=0).utcoffset() != wall.replace(tzinfo=tz, fold=1).utcoffset():
        offset = local.strftime("%z")
        typed += f"{offset[:3]}:{offset[3:]}"
    return typed

