"""Runbooks: a card's "Run: <title>" button (or `/incident runbook ID RUNBOOK`), an approval when its risk asks for
one, and the run itself.

A request is a `RunbookRun` row, written with its audit event and its thread line in one transaction. Low risk is
approved by the click; medium and high wait for an approver, who is asked in a direct message with Approve / Reject
(and the thread says who asks to run what, with the same buttons); once it is decided, those messages are redrawn to
say how it ended, without buttons (handlers/notify.py asked_row). The server decides every approval: the clicker has
the `approver` role (the dispatcher), is not the one who asked (four eyes), the run still waits (a double click
approves once) and the incident is open; else they are told why. What is approved is still what app.yaml says now: the
runbook still applies to the incident and runs the same steps, and the incident was not resolved since it was asked
for; else the request is cancelled (it could never be approved as asked). A request nobody decides expires after
REQUEST_TTL, and one whose incident is resolved is cancelled (`sweep`): neither waits for ever in the way of asking
again.

What runs is the argv app.yaml gives, word for word, as it was when the run was asked for: no shell, and nothing of
an alert (its labels, annotations, text) is put into it. Each step runs in a process group of its own, stdin closed,
with only PATH and LANG in its environment, bounded by its timeout (its whole group is killed then, and when it exits:
nothing it started outlives it); the steps run in order and stop at the first that fails. A replica runs a run only
after claiming it (approved -> running, one conditional UPDATE: one replica wins); a run still `running` when the bot
starts was cut short by a stop and becomes `interrupted`, never run again on its own (on PostgreSQL, once it is past
its steps' timeouts: another replica may be running it).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from bot.actions import MAX_ID, Action, stamp, typed_id
from bot.chat import ActionEvent, Button, Reply, echoed
from bot.clock import Clock
from bot.config import APPROVER, Config, Person
from bot.incidents import RESOLVED
from bot.model import Actor
from bot.tables import BIDI_CONTROLS
from bot.view import code, command_line, one_line, plain, runbooks_for, span
from handlers.notify import ASKED_WORDS, ASKS, asked_row, button_spec, queue_direct, queue_thread_line
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import AuditEvent, Incident, RunbookRun

log = logging.getLogger("chatops.runbooks")
SYSTEM = Actor("system", "runbooks", "Runbooks")  # the bot running what was approved

TAIL_LINES, TAIL_CHARS = 20, 3000  # the output kept and shown: its end
RECENT_RUNS = 5  # the runs `/incident runbook ID` lists
LINE_MAX, HEAD_MAX = 300, 200  # a thread line (bot.view.thread_line cuts it there); of it, what the steps may take
# Of a step's command on the line that asks for approval, at least: STEP_ALL when every step is shown; else fewer
# steps, each with STEP_MIN, and how many more
STEP_ALL, STEP_MIN = 20, 40
COMMAND_MAX = 80  # of a step's command on that line (the dialog, the request and `/incident runbook` show it whole)
# A request or an approval that comes while the bot stops (the adapters take clicks until they stop, after the runs)
STOPPING = "The bot is stopping (a restart or an upgrade), so {what}: {again} in a minute, once it is back."
# The same, when the bot began to stop while the request or approval was being stored: approved, it did not start,
# and it is `interrupted` at the next start, which says so in the thread
STOPPED_MEANWHILE = ("The bot began to stop (a restart or an upgrade) as this was stored, so {what} did not start; "
                     "ask for it again in a minute, once it is back.")
READ_LIMIT = 64 * 1024  # bytes of a step's output held while it runs (its end)
EXIT_POLL = 0.05  # seconds between looks at whether a step's process exited
WAITING, APPROVED, REJECTED, RUNNING = "requested", "approved", "rejected", "running"
SUCCEEDED, FAILED, INTERRUPTED = "succeeded", "failed", "interrupted"
EXPIRED, CANCELLED = "expired", "cancelled"  # a request nobody decided in time; one that can no longer be approved
REQUEST_TTL = timedelta(hours=1)  # how long a request waits for an approver
EXPIRY = f"nobody approved it within {span(REQUEST_TTL)}"
OPEN_STATES = (WAITING, APPROVED, RUNNING)
GRACE = timedelta(minutes=1)  # past a run's time limit: it was killed, or its bot is gone, by then
SWEEP_EVERY = 60.0  # seconds between looks for runs whose bot stopped (another replica's, on PostgreSQL)
FOREIGN_CARD = ("This card belongs to an incident that no longer exists in this bot's store, so nothing was run. "
                "Use the buttons on the incident's latest message.")


def environment() -> dict[str, str]:
    """A step's whole environment: where to find programs and the language, nothing of the bot's (its tokens)."""
    return {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin", "LANG": os.environ.get("LANG") or "C.UTF-8"}


_BIDI = frozenset(BIDI_CONTROLS)


def tail(raw: bytes) -> str:
    """The end of a step's output as text people can read safely: its last lines and characters, with control
    characters (a terminal's escapes, a NUL) written as `\\xNN` escapes, and bidi controls as `\\u202e`."""
    text = raw.decode("utf-8", errors="replace")
    text = "".join(c if c in "\n\t" or (ord(c) >= 32 and not 127 <= ord(c) < 160 and c not in _BIDI) else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)
    text = "\n".join(text.rstrip("\n").split("\n")[-TAIL_LINES:])
    return text[-TAIL_CHARS:]


@dataclass
class StepResult:
    step: int
    argv: list[str]
    exit: int | None
    seconds: float
    timed_out: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.exit == 0 and not self.timed_out and not self.error

    def said(self, width: int = 200) -> str:
        """`step 1 `systemctl restart nginx` exit 0 in 1.2 s`, timed out, or could not start (the command cut to
        `width` characters)."""
        head = f"step {self.step} {code(command_line(self.argv, width))}"
        if self.timed_out:
            return f"{head} timed out after {self.seconds:.1f} s and was killed"
        if self.error:
            return f"{head} could not start ({self.error})"
        return f"{head} exit {self.exit} in {self.seconds:.1f} s"


@functools.cache
def _prctl() -> Any:
    # (the C library's, as the interpreter has it loaded: find_library would run ldconfig, in the event loop)
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: what a step's process runs before its command so that it is killed (SIGKILL) when the bot's process
    dies, SIGKILL included, when no `finally` of the bot's can kill it (prctl PR_SET_PDEATHSIG). Elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = _prctl()
    parent = os.getpid()

    def arm() -> None:  # (in the child, between fork and exec: nothing here may take a lock)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the bot died before the signal was armed
            os._exit(1)

    return arm


PR_SET_PDEATHSIG = 1


async def run_step(argv: list[str], timeout: float, number: int) -> tuple[StepResult, bytes]:
    """One step: `argv` as given (no shell), stdin closed, stdout and stderr together, in a new process group. When
    the step ends (it exits, or `timeout` passes), the whole group is killed: nothing it started (`( sleep 300 ) &`)
    outlives it. Its time is until it exits, not until the output pipe closes (which a child it left holds open).
    If the bot is killed while the step runs (SIGKILL, the OOM killer), the step's process is killed with it
    (Linux, _die_with_parent), so that no step runs on unwatched; at the next start its run is `interrupted`."""
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=environment(), start_new_session=True,
            preexec_fn=_die_with_parent())
    except OSError as exc:
        return StepResult(number, argv, None, time.monotonic() - started, error=exc.strerror or str(exc)), b""
    held = bytearray()

    async def read() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            held.extend(chunk)
            del held[:-READ_LIMIT]

    reading = asyncio.ensure_future(read())
    timed_out = False
    try:
        await asyncio.wait_for(exited(proc), timeout)
    except asyncio.TimeoutError:
        timed_out = True
    except BaseException:  # the bot stops: nothing it started is left running
        _kill(proc.pid)
        raise
    seconds = time.monotonic() - started
    _kill(proc.pid)  # (its group: the leader if it still runs, and whatever it left behind)
    try:
        await asyncio.wait_for(reading, 2.0)  # (a child that left the group and kept the pipe open is not waited for)
        await asyncio.wait_for(proc.wait(), 2.0)
    except asyncio.TimeoutError:
        reading.cancel()
    return StepResult(number, argv, proc.returncode, seconds, timed_out=timed_out), bytes(held)


async def exited(proc: asyncio.subprocess.Process) -> None:
    """Until the step's leader exits: `proc.wait()` waits for its output pipe to close too, which never happens
    while a child it left holds it (the step then seemed to run until its timeout)."""
    while proc.returncode is None:
        await asyncio.sleep(EXIT_POLL)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _steps_in(steps: list[dict[str, Any]], room: int) -> str:
    """A run's steps in `room` characters: each command cut to its share; when the steps are too many for every one
    to get STEP_ALL, the first ones, each with STEP_MIN at least, and how many more ("; then 9 more steps")."""
    for shown in range(len(steps), 0, -1):
        more = len(steps) - shown
        rest = f"; then {more} more step{'s' if more != 1 else ''}" if more else ""
        share = (room - len(rest)) // shown - 12  # ("; then " and the backticks)
        if share >= (STEP_ALL if not more else STEP_MIN) or shown == 1:
            said = "; then ".join(code(command_line(step["run"], max(share, 20))) for step in steps[:shown]) + rest
            if len(said) <= room or shown == 1:
                return said
    return ""


@dataclass
class RunbookHandlers:
    db: Database
    audit: AuditLog
    config: Config
    clock: Clock
    delivered: Callable[[], None]  # wakes the outbox worker after a change
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)  # the bot stops: nothing new is run (stop)

    def register(self, dispatcher: Any) -> None:
        dispatcher.action(Action.RUN_RUNBOOK, label="Run runbook")(self.run_button)
        dispatcher.action(Action.APPROVE, role=APPROVER, label="Approve")(self.approve_button)
        # (Reject is also whoever asked withdrawing their request, approver or not: `decide` checks the role)
        dispatcher.action(Action.REJECT, role=None, label="Reject")(self.reject_button)

    @property
    def names(self) -> dict[str, str]:
        return {p.id: p.name for p in self.config.people}

    # -- asking ---------------------------------------------------------------------------------

    async def run_button(self, event: ActionEvent, person: Person) -> Reply:
        return await self.request(event.incident_id, event.arg, event.actor, person, tag=event.tag)

    async def listing(self, incident_id: int) -> Reply:
        """`/incident runbook ID`: the runbooks that apply, and how to run one."""
        async with self.db.sessions() as session:
            incident = await session.get(Incident, incident_id) if incident_id <= MAX_ID else None
            recent = [] if incident is None else list((await session.execute(
                select(RunbookRun).where(RunbookRun.incident_id == incident_id)
                .order_by(RunbookRun.id.desc()).limit(RECENT_RUNS))).scalars().all())
        if incident is None:
            return Reply(f"There is no incident #{echoed(str(incident_id))}.")
        found = runbooks_for(incident, self.config.runbooks)
        if not found:
            said = f"No runbook applies to #{incident_id}: none its route lists matches its labels."
        else:
            said = (f"Runbooks for #{incident_id} (run one with `/incident runbook {incident_id} RUNBOOK`):\n"
                    + "\n".join(f"`{rb.id}`: {rb.title} ({rb.risk} risk): "
                                + "; then ".join(code(command_line(s.run)) for s in rb.steps) for rb in found))
        return Reply(said + self._recent(recent))

    def _recent(self, runs: list[RunbookRun]) -> str:
        """The incident's latest runs with their status, and the output the latest one that ran kept (the thread's
        line has only as much of it as fits)."""
        if not runs:
            return ""
        lines = [f"{run.id}. {run.title}: {run.status} (asked by {self.names.get(run.requested_by, run.requested_by)}"
                 + (f", approved by {self.names.get(run.approved_by, run.approved_by)}" if run.approved_by else "")
                 + (f"; {one_line(run.reason, 200)}" if run.reason else "") + ")" for run in runs]
        said = "\n\nLatest runs, newest first:\n" + "\n".join(lines)
        ran = next((run for run in runs if run.results), None)
        if ran is not None and ran.output:
            said += f"\n\nOutput of {ran.id}. {ran.title} ({ran.status}), its last lines:\n```\n{ran.output}\n```"
        return said

    async def request(self, incident_id: int, runbook_id: str, actor: Actor, person: Person, tag: str = "") -> Reply:
        """Ask to run `runbook_id` on the incident: low risk runs at once, the others wait for an approver."""
        if self._stopping:
            return Reply(STOPPING.format(what="nothing was asked for or run", again="ask again"))
        now = self.clock.now()
        actor = Actor(actor.platform, actor.user_id, person.name, person.id)
        async with self.db.transaction() as session:
            incident = await self._incident(session, incident_id)
            if incident is None or (tag and tag != stamp(incident.opened_at, incident.group_key)):
                return Reply(FOREIGN_CARD if tag else f"There is no incident #{echoed(str(incident_id))}.")
            if incident.status == RESOLVED:
                return Reply(f"#{incident_id} is resolved, so nothing was run; reopen it first.")
            applies = runbooks_for(incident, self.config.runbooks)
            runbook = next((rb for rb in applies if rb.id == runbook_id), None)
            if runbook is None:
                which = ", ".join(f"`{rb.id}`" for rb in applies) or "none"
                return Reply(f"Runbook `{echoed(runbook_id)}` does not apply to #{incident_id} (the ones that do: "
                             f"{which}), so nothing was run.")
            pending = (await session.execute(select(RunbookRun).where(
                RunbookRun.incident_id == incident_id, RunbookRun.runbook_id == runbook.id,
                RunbookRun.status.in_(OPEN_STATES)))).scalars().first()
            if pending is not None:
                state = "waits for an approver" if pending.status == WAITING else "is running"
                return Reply(f"{runbook.title} on #{incident_id} {state} already (asked by "
                             f"{self.names.get(pending.requested_by, pending.requested_by)}): nothing more was done.")
            low = runbook.risk == "low"
            approvers = [] if low else self._approvers(person)
            if not low and not approvers:  # (stored, it would wait for nobody, in the way of asking again)
                return Reply(f"Nobody but you has the `{APPROVER}` role to approve {runbook.title} ({runbook.risk} "
                             f"risk), so it was not asked for: add the role to someone else's `roles` in app.yaml.")
            run = RunbookRun(incident_id=incident_id, runbook_id=runbook.id, title=runbook.title, risk=runbook.risk,
                             steps=asked_steps(runbook),
                             status=APPROVED if low else WAITING, requested_by=person.id, requested_at=now)
            session.add(run)
            await session.flush()
            assert run.id is not None
            await self.audit.append_many(session, [Entry("runbook.requested", actor, "runbook_run", str(run.id), now,
                                                         {"runbook": runbook.id, "risk": runbook.risk,
                                                          "steps": run.steps}, incident_id)])
            if not low:
                self._ask(session, incident, run, person, approvers, now)
        self.delivered()
        if low:
            if not await self.start(run.id) and self._stopping:  # (the bot began to stop meanwhile)
                return Reply(STOPPED_MEANWHILE.format(what=f"{runbook.title} on #{incident_id}"))
            return Reply(f"Running {runbook.title} on #{incident_id} now; the thread gets its result.")
        return Reply(f"Asked to run {runbook.title} on #{incident_id}: it is {runbook.risk} risk, so it runs once an "
                     f"approver ({', '.join(p.name for p in approvers)}) approves it.")

    def _approvers(self, requester: Person) -> list[Person]:
        return [p for p in self.config.people if APPROVER in p.roles and p.id != requester.id]

    def _ask(self, session: AsyncSession, incident: Incident, run: RunbookRun, person: Person,
             approvers: list[Person], now: datetime) -> None:
        """The thread says who asks to run what; each approver gets Approve / Reject in a direct message."""
        assert run.id is not None and incident.id is not None
        tag = stamp(incident.opened_at, incident.group_key)
        buttons = [Button(Action.APPROVE.value, incident.id, arg=str(run.id), label="Approve", style="primary",
                          tag=tag),
                   Button(Action.REJECT.value, incident.id, arg=str(run.id), label="Reject", style="danger", tag=tag)]
        what = "; then ".join(code(command_line(step["run"])) for step in run.steps)  # whole: what is approved
        asks = f"{person.name} asks to run runbook {run.title} ({run.risk} risk): "
        waits = ". It waits for an approver."
        # A thread line holds LINE_MAX characters: commands too long for it are cut, and it says where they are whole.
        shown = what
        if len(asks) + len(what) + len(waits) > LINE_MAX:
            whole = f" (cut here: each approver's message and `/incident runbook {incident.id}` show them whole)"
            shown = _steps_in(run.steps, LINE_MAX - len(asks) - len(waits) - len(whole)) + whole
        # (each keeps the run it asks about and its words once decided: it is redrawn then, see _settle)
        was = f"{person.name} asked to run runbook {run.title} ({run.risk} risk)"
        queue_thread_line(session, incident, now, "runbook.requested",
                          {"line": asks + shown + waits, "buttons": [button_spec(b) for b in buttons], ASKS: run.id,
                           ASKED_WORDS: f"{was}: {shown}."})
        about = f"on #{incident.id} {plain(one_line(incident.title, 100))}"
        text = f"{person.name} asks to run runbook {run.title} ({run.risk} risk) {about}: {what}. Approve it?"
        asked = {ASKS: run.id, ASKED_WORDS: f"{was} {about}: {what}."}
        for approver in approvers:
            queue_direct(session, approver.id, text, now, event="runbook.approval", buttons=buttons, extra=asked)

    # -- deciding -------------------------------------------------------------------------------

    async def approve_button(self, event: ActionEvent, person: Person) -> Reply:
        return await self.decide(event, person, approve=True)

    async def reject_button(self, event: ActionEvent, person: Person) -> Reply:
        return await self.decide(event, person, approve=False)

    async def decide(self, event: ActionEvent, person: Person, *, approve: bool) -> Reply:
        """Approve or reject a run that waits, checked here whatever the button said; a reject by whoever asked
        withdraws the request (cancelled, by them)."""
        if self._stopping and approve:  # (approved now, it would start as the bot stops, and be cut off)
            return Reply(STOPPING.format(what="the request still waits and nothing was run", again="approve it"))
        now = self.clock.now()
        actor = Actor(event.actor.platform, event.actor.user_id, person.name, person.id)
        run_id = typed_id(event.arg)
        async with self.db.transaction() as session:
            incident = await self._incident(session, event.incident_id)
            if incident is None or (event.tag and event.tag != stamp(incident.opened_at, incident.group_key)):
                return Reply(FOREIGN_CARD)
            run = await session.get(RunbookRun, run_id) if run_id is not None and run_id <= MAX_ID else None
            if run is None or run.incident_id != incident.id:
                return Reply(f"There is no runbook request {echoed(event.arg)} for #{incident.id}.")
            refusal = self._refusal(run, incident, person, approve)
            if refusal is not None:
                four_eyes = approve and run.status == WAITING and run.requested_by == person.id
                if four_eyes:  # (audited)
                    await self.audit.append_many(session, [Entry(
                        "access.refused", actor, "runbook_run", str(run.id), now,
                        {"what": "Approve", "needs": "another approver (four eyes): they asked for it",
                         "runbook": run.runbook_id}, incident.id)])
                # (for the clicker alone where a platform has no ephemeral message: a role they lack, four eyes)
                lacks = not approve and APPROVER not in person.roles and run.requested_by != person.id
                return Reply(refusal, refused=four_eyes or lacks)
            asked = self.names.get(run.requested_by, run.requested_by)
            withdrawn = not approve and run.requested_by == person.id  # (whoever asked takes it back)
            expired = now - run.requested_at > REQUEST_TTL  # (the sweep that expires it had not come round yet)
            stale = await self._stale(session, run, incident) if approve and not expired else None
            if expired:
                status, values = EXPIRED, {"reason": EXPIRY}
                line = f"{asked}'s request to run {run.title} expired: {EXPIRY}"
            elif stale is not None:  # (it can never be approved as asked: out of the way of asking again)
                status, values = CANCELLED, {"reason": stale}
                line = f"{asked}'s request to run {run.title} was cancelled: {stale}"
            elif approve:
                status, values = APPROVED, {"approved_by": person.id, "approved_at": now}
                line = f"{person.name} approved running runbook {run.title} (asked by {asked})"
            elif withdrawn:
                status, values = CANCELLED, {"rejected_by": person.id, "rejected_at": now}
                line = f"{person.name} withdrew the request to run runbook {run.title}"
            else:
                status, values = REJECTED, {"rejected_by": person.id, "rejected_at": now}
                line = f"{person.name} rejected running runbook {run.title} (asked by {asked})"
            if not await self._settle(session, run, incident, now, actor, status, values, line):
                return Reply(f"{run.title} on #{incident.id} was decided a moment ago by someone else.")
        self.delivered()
        if expired:
            return Reply(f"{run.title} on #{incident.id} expired ({EXPIRY}): nothing more was done.")
        if stale is not None:
            return Reply(stale)
        if approve:
            if not await self.start(run.id) and self._stopping:  # type: ignore[arg-type]  # (stopping meanwhile)
                return Reply(STOPPED_MEANWHILE.format(what=f"{run.title} on #{incident.id}"))
            return Reply(f"Approved: {run.title} runs on #{incident.id} now.",
                         settle=f"You approved running {run.title} on #{incident.id}.")
        if withdrawn:
            return Reply(f"Withdrawn: {run.title} does not run on #{incident.id}.",
                         settle=f"You withdrew your request to run {run.title} on #{incident.id}.")
        return Reply(f"Rejected: {run.title} does not run on #{incident.id}.",
                     settle=f"You rejected running {run.title} on #{incident.id}.")

    async def _settle(self, session: AsyncSession, run: RunbookRun, incident: Incident | None, now: datetime,
                      actor: Actor, status: str, values: dict[str, Any], line: str) -> bool:
        """End a request's wait (approved, rejected, cancelled or expired), with its audit event and thread line;
        False if it no longer waits (a click at another replica, or a sweep, decided it meanwhile: nothing is done)."""
        values = {"status": status, **values}
        if status in (CANCELLED, EXPIRED):
            values["finished_at"] = now
        done = await session.execute(update(RunbookRun).where(RunbookRun.id == run.id, RunbookRun.status == WAITING)
                                     .values(**values).execution_options(synchronize_session=False))
        if done.rowcount != 1:
            return False
        reason = values.get("reason")
        await self.audit.append_many(session, [Entry(f"runbook.{status}", actor, "runbook_run", str(run.id), now,
                                                     {"runbook": run.runbook_id, "requested_by": run.requested_by,
                                                      **({"reason": reason} if reason else {})}, run.incident_id)])
        if incident is not None:
            queue_thread_line(session, incident, now, f"runbook.{status}", {"line": line})
        # The thread's request line and the approvers' direct messages stop asking: they say how it ended.
        session.add(asked_row(run.incident_id if incident is not None else None, run.id,  # type: ignore[arg-type]
                              outcome(run, status, values, actor), now))
        return True

    async def _stale(self, session: AsyncSession, run: RunbookRun, incident: Incident) -> str | None:
        """Why approving `run` would no longer run what was asked for, or None: app.yaml (as this bot loaded it)
        dropped the runbook from the incident or changed its steps since, or the incident was resolved since (and
        reopened: a request of the incident before is not one of the incident now)."""
        asked = self.names.get(run.requested_by, run.requested_by)
        runbook = next((rb for rb in runbooks_for(incident, self.config.runbooks) if rb.id == run.runbook_id), None)
        if runbook is None:
            return (f"{run.title} no longer applies to #{incident.id} in app.yaml (it changed since {asked} asked), so "
                    "it was not approved.")
        if asked_steps(runbook) != run.steps:
            return f"{run.title} changed in app.yaml since {asked} asked; ask again."
        requested = select(AuditEvent.seq).where(AuditEvent.action == "runbook.requested",
                                                 AuditEvent.subject_id == str(run.id)).scalar_subquery()
        resolved = (await session.execute(select(AuditEvent.seq).where(
            AuditEvent.incident_id == incident.id, AuditEvent.action == "incident.resolved",
            AuditEvent.seq > requested).limit(1))).first()
        if resolved is not None:
            return (f"#{incident.id} was resolved after {asked} asked to run {run.title}, so it was not approved; ask "
                    "again if it still needs it.")
        return None

    def _refusal(self, run: RunbookRun, incident: Incident, person: Person, approve: bool) -> str | None:
        """Why this decision is not taken, in the words the clicker needs; None when it is."""
        what = f"{run.title} on #{incident.id}"
        if not approve and APPROVER not in person.roles and run.requested_by != person.id:  # (Approve: the dispatcher)
            return (f"Reject needs the `{APPROVER}` role, or to be the one who asked, and {person.name} is neither. "
                    "Ask whoever maintains app.yaml to add it to your `roles`.")
        if run.status != WAITING:
            by = run.approved_by or run.rejected_by
            who = "you" if by == person.id else self.names.get(by or "", by or "someone")
            approved = f" (approved by {who})" if run.approved_by else ""  # (low risk: it ran without asking)
            said = {APPROVED: f"was already approved by {who}", RUNNING: f"is already running (approved by {who})",
                    REJECTED: f"was already rejected by {who}", SUCCEEDED: f"already ran{approved}",
                    FAILED: f"already ran{approved}", INTERRUPTED: f"already ran{approved}, and was interrupted",
                    EXPIRED: f"expired ({EXPIRY})",
                    CANCELLED: f"was withdrawn by {who}" if run.rejected_by else f"was cancelled ({run.reason})"
                    }[run.status]
            return f"{what} {said}: nothing more was done."
        if approve and run.requested_by == person.id:
            return (f"You asked to run {what}, so someone else must approve it (four eyes): another person with the "
                    f"`{APPROVER}` role.")
        if approve and incident.status == RESOLVED:
            return f"#{incident.id} is resolved, so {run.title} was not approved; reopen it first if it still needs it."
        return None

    async def _incident(self, session: AsyncSession, incident_id: int) -> Incident | None:
        if not 0 < incident_id <= MAX_ID:
            return None
        query = select(Incident).where(Incident.id == incident_id)
        if self.db.is_postgres:
            query = query.with_for_update()
        return (await session.execute(query)).scalar_one_or_none()

    # -- running --------------------------------------------------------------------------------

    async def start(self, run_id: int) -> bool:
        """Claim an approved run (approved -> running: one replica, one click wins) and run it in the background.
        Not once the bot stops: the run stays approved, and is `interrupted` at the next start."""
        if self._stopping:
            return False
        now = self.clock.now()
        async with self.db.transaction() as session:
            claimed = await session.execute(update(RunbookRun)
                                            .where(RunbookRun.id == run_id, RunbookRun.status == APPROVED)
                                            .values(status=RUNNING, started_at=now)
                                            .execution_options(synchronize_session=False))
            if claimed.rowcount != 1:
                return False
            run = await session.get(RunbookRun, run_id)
            assert run is not None
            await self.audit.append_many(session, [Entry("runbook.started", SYSTEM, "runbook_run", str(run_id), now,
                                                         {"runbook": run.runbook_id,
                                                          "argv": [s["run"] for s in run.steps]}, run.incident_id)])
        task = asyncio.ensure_future(self._execute(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _execute(self, run: RunbookRun) -> None:
        results: list[StepResult] = []
        output = b""  # every step's, in order (tail keeps the end)
        try:
            for number, step in enumerate(run.steps, 1):
                result, said = await run_step(list(step["run"]), float(step["timeout"]), number)
                if output and said and not output.endswith(b"\n"):
                    output += b"\n"
                output = (output + said)[-READ_LIMIT:]
                results.append(result)
                if not result.ok:
                    break
        except asyncio.CancelledError:
            raise  # (stopped: the run stays `running`, and becomes `interrupted` at the next start)
        except Exception:
            log.exception("runbook run %s failed to run", run.id)
        await self._finish(run, results, tail(output))

    async def _finish(self, run: RunbookRun, results: list[StepResult], output: str) -> None:
        now = self.clock.now()
        ok = bool(results) and len(results) == len(run.steps) and all(r.ok for r in results)
        status = SUCCEEDED if ok else FAILED
        kept = [{"step": r.step, "argv": r.argv, "exit": r.exit, "seconds": round(r.seconds, 3),
                 "timed_out": r.timed_out, **({"error": r.error} if r.error else {})} for r in results]
        async with self.db.transaction() as session:
            await session.execute(update(RunbookRun).where(RunbookRun.id == run.id)
                                  .values(status=status, finished_at=now, results=kept, output=output)
                                  .execution_options(synchronize_session=False))
            await self.audit.append_many(session, [Entry("runbook.finished", SYSTEM, "runbook_run", str(run.id), now,
                                                         {"runbook": run.runbook_id, "status": status,
                                                          "steps": [{k: r[k] for k in ("step", "exit", "seconds",
                                                                                       "timed_out", "error") if k in r}
                                                                    for r in kept]},
                                                         run.incident_id)])
            incident = await session.get(Incident, run.incident_id)
            if incident is not None:
                queue_thread_line(session, incident, now, "runbook.finished",
                                  {"line": self._result_line(run, results, ok, output)})
        self.delivered()

    def _result_line(self, run: RunbookRun, results: list[StepResult], ok: bool, output: str) -> str:
        """"Runbook Restart nginx (approved by Bob) finished: step 1 `systemctl restart nginx` exit 0 in 1.2 s",
        or failed, with the end of the output. A thread line holds LINE_MAX characters and is cut at its end, where
        a failure's error is: the line is budgeted here instead, the steps first (each command cut to COMMAND_MAX, the
        whole to HEAD_MAX), then as many of the output's last lines as fit, after a "…" when earlier ones are left
        out (the run keeps them all)."""
        by = (f"approved by {self.names.get(run.approved_by, run.approved_by)}" if run.approved_by
              else f"asked by {self.names.get(run.requested_by, run.requested_by)}")
        said = [r.said(COMMAND_MAX) for r in results]
        steps = "; ".join(said) or "no step ran"
        if len(said) > 1 and len(steps) > HEAD_MAX // 2:  # (the run stopped at the last: the ones before went well)
            steps = ("step 1" if len(said) == 2 else f"steps 1-{len(said) - 1}") + f" exit 0; {said[-1]}"
        head = one_line(f"Runbook {run.title} ({by}) {'finished' if ok else 'failed'}: {steps}", HEAD_MAX)
        lines = [text for text in (" ".join(line.split()) for line in output.split("\n")) if text]
        if not lines:
            return head
        room = LINE_MAX - len(head) - len(". Output: \u2026 ")
        kept: list[str] = []
        for line in reversed(lines):
            if len(" | ".join([line, *kept])) > room:
                break
            kept.insert(0, line)
        end = " | ".join(kept) if kept else lines[-1][-room:]  # (the last line alone too long: its end)
        return f"{head}. Output: " + (end if len(kept) == len(lines) else f"\u2026 {end}")

    async def at_start(self) -> int:
        """Runs a stop cut short become `interrupted` (see `sweep`). On SQLite one bot serves the store, so every run
        still `running` or `approved` was this bot's: all of them, now. On PostgreSQL another replica may be running
        one: only those past their time (the periodic sweep takes the others once they are)."""
        return await self.sweep(every=not self.db.is_postgres)

    async def sweep(self, *, every: bool = False) -> int:
        """Runs whose bot stopped (`running`, or `approved` and never started) become `interrupted`, each with a thread
        line: none is run again on its own (whoever asked decides whether it should run again). Without `every`,
        only runs that cannot still be going anywhere: running longer than their steps' timeouts together, or
        approved and not started, plus GRACE. Then the requests that wait too long, or on a resolved incident, end
        (`_end_waits`). How many runs it ended."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            query = select(RunbookRun).where(RunbookRun.status.in_((RUNNING, APPROVED)))
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            runs = [run for run in (await session.execute(query)).scalars().all() if every or overdue(run, now)]
            for run in runs:
                was = run.status
                run.status, run.finished_at = INTERRUPTED, now
                session.add(run)
                await self.audit.append_many(session, [Entry("runbook.finished", SYSTEM, "runbook_run", str(run.id),
                                                             now, {"runbook": run.runbook_id, "status": INTERRUPTED,
                                                                   "was": was}, run.incident_id)])
                incident = await session.get(Incident, run.incident_id)
                if incident is not None:
                    where = "while it ran" if was == RUNNING else "before it started"
                    queue_thread_line(session, incident, now, "runbook.interrupted", {"line": (
                        f"Runbook {run.title} was interrupted: the bot stopped {where}. It was not run again; run it "
                        "again if it is still needed.")})
        if runs:
            log.warning("runbooks: %d run(s) cut short by a stop marked interrupted", len(runs))
            self.delivered()
        return len(runs) + await self._end_waits(now)

    async def _end_waits(self, now: datetime) -> int:
        """Requests that wait too long expire (REQUEST_TTL), and those of a resolved incident are cancelled: each with
        its audit event and thread line, and out of the way of asking again."""
        ended = 0
        async with self.db.transaction() as session:
            # only the requests it ends: a look that locked every waiting one (PostgreSQL) made a sweep beside it,
            # with a later `now`, skip the very request that had just expired
            query = (select(RunbookRun, Incident).join(Incident, Incident.id == RunbookRun.incident_id)
                     .where(RunbookRun.status == WAITING,
                            or_(Incident.status == RESOLVED, RunbookRun.requested_at < now - REQUEST_TTL)))
            if self.db.is_postgres:
                query = query.with_for_update(of=RunbookRun, skip_locked=True)
            for run, incident in (await session.execute(query)).all():
                asked = self.names.get(run.requested_by, run.requested_by)
                if incident.status == RESOLVED:
                    reason = f"#{incident.id} was resolved before anyone approved it"
                    status = CANCELLED
                elif now - run.requested_at > REQUEST_TTL:
                    reason, status = EXPIRY, EXPIRED
                else:
                    continue
                said = "expired" if status == EXPIRED else "was cancelled"
                ended += await self._settle(session, run, incident, now, SYSTEM, status, {"reason": reason},
                                            f"{asked}'s request to run {run.title} {said}: {reason}")
        if ended:
            self.delivered()
        return ended

    async def stop(self) -> None:
        """Stop the runs in progress (their processes are killed); they are marked interrupted at the next start.
        From now on nothing new runs: a click the adapters still take as the bot stops is told to try again."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait for the runs in progress to end (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def outcome(run: RunbookRun, status: str, values: dict[str, Any], actor: Actor) -> str:
    """How a request ended, as its messages say once it is decided: "Bob approved running Restart nginx: it runs
    now.", "Rejected by Bob.", "Withdrawn by Alice.", "Expired: nobody approved within 1 h.", or why it was
    cancelled."""
    if status == APPROVED:
        return f"{actor.display_name} approved running {run.title}: it runs now."
    if status == REJECTED:
        return f"Rejected by {actor.display_name}."
    if status == EXPIRED:
        return f"Expired: nobody approved within {span(REQUEST_TTL)}."
    if values.get("rejected_by"):
        return f"Withdrawn by {actor.display_name}."
    return f"Cancelled: {str(values.get('reason') or 'it can no longer be approved as asked').rstrip('.')}."


def asked_steps(runbook: Any) -> list[dict[str, Any]]:
    """A runbook's steps as a run keeps them: what was asked for, and what an approval is compared with."""
    return [{"run": list(s.run), "timeout": s.timeout.total_seconds()} for s in runbook.steps]


def overdue(run: RunbookRun, now: datetime) -> bool:
    """Whether `run` cannot still be going at any replica: running past the sum of its steps' timeouts (each step is
    killed at its own), or approved and not started, by more than GRACE."""
    if run.status == RUNNING and run.started_at is not None:
        limit = sum(float(step.get("timeout") or 0) for step in run.steps)
        return now > run.started_at + timedelta(seconds=limit) + GRACE
    return now > (run.approved_at or run.requested_at) + GRACE
