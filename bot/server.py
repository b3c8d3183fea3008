"""The composition root for `chatops serve`: wires config, storage and HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.exc import StatementError

from adapters.settings import ENDPOINTS
from bot.auth import AuthError, verify_bearer, verify_query_token
from bot.clock import Clock, SystemClock
from bot.chat import Adapter, DeliveryError
from bot.config import Loaded, Person, template_dir
from bot.model import Actor
from bot.dispatch import Dispatcher
from bot.metrics import Metrics
from bot.render import Renderer
from handlers.alert_http import AlertEndpoint
from handlers.chat import ChatHandlers
from handlers.runbooks import SWEEP_EVERY, RunbookHandlers
from handlers.escalation import Escalations
from handlers.incident_actions import OBSERVED, observed_later
from handlers.intake import Intake
from handlers.oncall import OncallHandlers
from handlers.outbox import OutboxWorker
from handlers.overrides import MANAGER, OVERRIDE_USAGE, OverrideHandlers
from handlers.silences import SilenceEnds
from handlers.timers import STALLED_AFTER, TimerService
from storage.audit import AuditLog, Entry, KeyMismatch
from storage.db import (Database, DiskFull, Leader, StoreReplaced, busy_store, explain_failure, is_sqlite_file_url,
                        room_problem)
from storage.models import Incident
from storage.queries import open_incidents_by_severity, outbox_counts, outbox_oldest_due
from storage.replays import SharedReplays
from storage.timers import overdue as overdue_timers

CHECK_WAIT = 5.0  # seconds a platform's start-up token check may take
RECHECK_FIRST = 5.0  # seconds before a platform not reachable at start is asked again (then twice as long, up to 5 min)
# Seconds the outbox may take, on SIGTERM, to send what is already queued (a thread line saying who was just paged):
# sent later, after the next start, it may promise a step that has fired meanwhile. Short, as an orchestrator's
# grace period before SIGKILL is (Kubernetes: 30 s, with up to 10 s for requests in flight before it).
SHUTDOWN_DRAIN = 5.0
PURGE_EVERY = 600.0  # seconds between deletions of expired replay claims
DB_WAIT = 15.0  # seconds PostgreSQL may take to connect or answer a statement before the work gives up (503 to senders)
# Answers no cache in between may keep (the feed's secret is in its URL; the figures are the operator's)
PRIVATE = {"Cache-Control": "private, no-store"}
# Seconds a connection may go without a complete request head, from its opening or from its last answer (an idle
# keep-alive connection included): longer than the 60 s nginx keeps an idle connection to its upstream, so that a proxy
# in front closes one first.
IDLE_WAIT = 75.0
ACCEPT_SAID_EVERY = 60.0  # seconds between log lines saying that new connections cannot be taken
log = logging.getLogger("chatops.server")
# PostgreSQL not answering at start (down for a moment, failing over, not up yet beside the bot): tried again, each wait
# twice the one before up to STORE_RETRY_MAX, for STORE_START_WAIT seconds, before the bot gives up (exit 1).
STORE_START_WAIT = 60.0
STORE_RETRY_MAX = 10.0
# Errors that mean the server did not answer, or not yet (asyncpg's CannotConnectNowError: "the database system is
# starting up"), as opposed to one that answered no (a wrong password, no such database), which waiting cannot fix.
_NO_ANSWER = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_NO_ANSWER_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}


def no_answer(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the database server did not answer (or is starting up), else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _NO_ANSWER) or type(e).__name__ == "CannotConnectNowError" or (
                isinstance(e, OSError) and not isinstance(e, socket.gaierror) and (
                    e.errno in _NO_ANSWER_ERRNOS
                    # a name with several addresses (localhost: ::1 and 127.0.0.1), none of which answered
                    or (e.errno is None and str(e).startswith("Multiple exceptions: ")))):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return None

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Bot:
    """Everything one running bot owns; built from a validated config."""

    def __init__(self, loaded: Loaded, *, clock: Clock | None = None):
        self.loaded = loaded
        self.config = loaded.config
        self.clock = clock or SystemClock()
        self.db = Database(self.config.storage.url, schema=self.config.storage.schema_name, wait=DB_WAIT)
        self.audit = AuditLog(self.config.audit.hmac_key)
        self.metrics = Metrics()
        self._rechecks: set[asyncio.Task[None]] = set()  # platforms not reachable at start, asked again (_recheck)
        self.audit.counted = self.metrics.audit_events.inc  # what people, escalations and the outbox record
        for name in (*loaded.adapters, *loaded.adapters_off):  # a series for every platform, so `== 0` can alert
            self.metrics.adapter_up.labels(name).set(0)
        self.renderer = Renderer(template_dir(loaded))
        self.dispatcher = Dispatcher(self.config, busy=busy_store)
        self.dispatcher.on_refused = self._audit_refused
        self.adapters: dict[str, Adapter] = {}
        self.leaders: list[Leader] = []
        self._ping: asyncio.Future[None] | None = None  # the readiness probe's database ping, while it runs
        self._counting: asyncio.Future[None] | None = None  # /metrics reading the store's figures, while it runs
        self.escalations = Escalations(audit=self.audit, config=self.config)
        self.leaders.append(delivery := Leader(self.db, "outbox"))  # with several replicas, one delivers chat work
        # Why each platform that is not on is off (its settings unset; its token refused at start, see start): a
        # page that reached nobody names it.
        self.adapters_off: dict[str, str] = dict(loaded.adapters_off)
        self.outbox = OutboxWorker(db=self.db, config=self.config, adapters=self.adapters, clock=self.clock,
                                   metrics=self.metrics, audit=self.audit, escalations=self.escalations,
                                   may_deliver=delivery.held, off=self.adapters_off)
        self.timers = TimerService(db=self.db, clock=self.clock, metrics=self.metrics, after_commit=self.outbox.nudge)
        self.escalations.register(self.timers)
        self.timers.handler(OBSERVED)(observed_later(self.metrics))  # the command line's changes, in /metrics
        # The end of a maintenance window: an incident it muted whose alerts still fire speaks then (silence.end).
        self.silence_ends = SilenceEnds(audit=self.audit, config=self.config, escalations=self.escalations)
        self.silence_ends.register(self.timers)
        self.intake = Intake(db=self.db, audit=self.audit, config=self.config, clock=self.clock, metrics=self.metrics,
                             after_commit=self.outbox.nudge, timers_due=self.timers.nudge,
                             on_open=self.escalations.start_all, on_raise=self.escalations.reconsider,
                             writer=self.config.storage.writer)
        self.alerts = AlertEndpoint(loaded=loaded, intake=self.intake, clock=self.clock, metrics=self.metrics)
        # A request taken is claimed in the store: other replicas, and this one after a restart, refuse a replay.
        self.replays = SharedReplays(self.db, self.clock)
        self.timers.add_job(self.replays.purge, seconds=PURGE_EVERY, name="purge-seen-requests")
        # Runbooks: the cards' Run buttons, the approvals, the runs (a Run button for those that apply to a card)
        self.runbooks = RunbookHandlers(db=self.db, audit=self.audit, config=self.config, clock=self.clock,
                                        delivered=self._changed)
        self.runbooks.register(self.dispatcher)
        # (on PostgreSQL, runs another replica was running when it stopped: once they are past their time)
        self.timers.add_job(self.runbooks.sweep, seconds=SWEEP_EVERY, name="runbooks-overdue")
        ChatHandlers(db=self.db, audit=self.audit, config=self.config, clock=self.clock, metrics=self.metrics,
                     delivered=self._changed, adapters=self.adapters, adapters_off=self.adapters_off,
                     escalations=self.escalations, runbooks=self.runbooks).register(self.dispatcher)
        self.oncall = OncallHandlers(db=self.db, config=self.config, clock=self.clock)
        covers = OverrideHandlers(db=self.db, audit=self.audit, config=self.config, clock=self.clock, view=self.oncall.view)
        self.oncall.take, self.oncall.cancel = covers.take, covers.cancel_own
        self.oncall.register(self.dispatcher)
        self.dispatcher.command("override", usage=f"{OVERRIDE_USAGE} | /override cancel ID",
                                help="a manager puts someone on call for a stretch, or cancels an override",
                                role=MANAGER)(covers.override)
        # -- rotations: swaps and handoff notices (register commands, buttons, timer kinds and jobs here) --
        from handlers.handoffs import Handoffs
        from handlers.swaps import SwapHandlers

        self.handoffs = Handoffs(db=self.db, audit=self.audit, config=self.config, clock=self.clock,
                                 view=self.oncall.view, after_commit=self._changed)
        covers.changed = self.handoffs.plan  # a cover taken or put replans the notices at once, as a swap does
        self.handoffs.register(self.timers)  # handoff.notice, handoff.reminder; the plan-handoffs job (10 min)
        self.swaps = SwapHandlers(db=self.db, audit=self.audit, config=self.config, clock=self.clock,
                                  view=self.oncall.view, after_commit=self._changed, changed=self.handoffs.plan)
        self.swaps.register(self.dispatcher, self.timers)  # /swap, the swap buttons, swap.expire
        # -- end of rotations --
        if "slack" in loaded.adapters:
            from adapters.slack import SlackAdapter

            slack = SlackAdapter(loaded.adapters["slack"], renderer=self.renderer, dispatcher=self.dispatcher)
            slack.claim = self.replays.begin  # a replay refused at every replica, and after a restart
            slack.settled = self.timers.settled  # a private card is redrawn once a click's step has run
            self.adapters["slack"] = slack
        if "telegram" in loaded.adapters:
            from adapters.telegram import TelegramAdapter

            telegram = TelegramAdapter(loaded.adapters["telegram"], renderer=self.renderer, dispatcher=self.dispatcher)
            if loaded.adapters["telegram"].mode == "polling":  # (chatops_leading{job} only for a job this bot has)
                self.leaders.append(leader := Leader(self.db, "telegram-polling"))
                telegram.may_poll = leader.held  # with several replicas on PostgreSQL, one polls
            telegram.claim = self.replays.begin
            self.adapters["telegram"] = telegram
        if "teams" in loaded.adapters:
            from adapters.teams import TeamsAdapter

            teams = TeamsAdapter(loaded.adapters["teams"], renderer=self.renderer, dispatcher=self.dispatcher)
            teams.claim = self.replays.begin  # a redelivered activity acted on once, at every replica
            self.adapters["teams"] = teams
        self.adapters_failed: dict[str, str] = {}

    async def _open_store(self) -> None:
        """Create or upgrade the store's tables; PostgreSQL that does not answer is waited for (STORE_START_WAIT), so
        that a replica started while the database fails over, or before it is up, starts once it answers rather than
        exit at once. A refusal (a wrong password, no such database) is no reason to wait: it is raised at once."""
        started, delay = time.monotonic(), 1.0
        while True:
            try:
                await self.db.start()
                return
            except Exception as exc:
                why = no_answer(exc) if self.db.is_postgres else None
                left = STORE_START_WAIT - (time.monotonic() - started)
                if why is None or left <= 0:
                    raise
                delay = min(delay, left)
                log.warning("the database at %s does not answer (%s); trying again in %g s, for up to %g s in all",
                            self.db.safe_url, str(why) or type(why).__name__, delay, STORE_START_WAIT)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)

    async def start(self) -> None:
        """Open the store and start the background workers; KeyMismatch, before anything is written, if the audit
        chain was written with another key than the one in hand (or none, or with one)."""
        await self._open_store()
        async with self.db.sessions() as session:
            await self.audit.check_key(session)
        restored = await self.alerts.restore(self.db)
        if restored:
            log.info("replays: %d alert signature(s) taken before the restart are refused as replays until their "
                     "windows end", restored)
        self.intake.start()
        await self.intake.ready()
        for name, adapter in list(self.adapters.items()):
            starting = getattr(adapter, "start", None)
            try:
                if starting is not None:
                    await starting()
            except DeliveryError as exc:  # a refused token: this platform is off, the rest of the bot runs
                log.error("%s: off (%s); fix its settings in app.yaml and restart", name, exc)
                self.adapters_failed[name] = str(exc)
                self.adapters_off[name] = str(exc)
                if exc.token_refused:  # pages to it wait for the token, as for one refused since (a restart sends them)
                    self.outbox.token_refused[name] = str(exc)
                del self.adapters[name]
                continue
            await self._check(name, adapter)
            self.metrics.adapter_up.labels(name).set(0 if name in self.outbox.token_refused else 1)
        # Muted incidents as app.yaml's silences find them now (it may have changed while the bot was down; an older
        # version wrote no timer at a window's end): before the outbox and the timers run what it queues.
        await self.silence_ends.at_start(self.db, self.clock)
        await self.runbooks.at_start()  # runs a stop cut short: interrupted, never run again on their own
        self.outbox.start()
        await self.timers.start()

    async def _check(self, name: str, adapter: Adapter) -> None:
        """A platform that can say at start whether it takes the token (Slack's auth.test): a refused one is
        marked as the outbox marks it (its messages wait until a call works); an unreachable one is said."""
        checking = getattr(adapter, "check", None)
        if checking is None:
            return
        problem = await self._checked(name, checking)
        if problem is not None and problem.token_refused:
            self.outbox.token_refused[name] = str(problem)
            log.error("%s: the token was refused (%s); messages wait until it works: fix %s", name, problem,
                      getattr(adapter, "token_setting", f"adapters.{name} in app.yaml"))
        elif problem is not None:
            log.warning("%s: not reachable at start (%s); messages wait and are retried", name, problem)
            adapter.unreachable = str(problem)  # (/readyz, chatops_adapter_up: until it answers)
            task = asyncio.create_task(self._recheck(name, adapter, checking))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    @staticmethod
    async def _checked(name: str, checking: Any) -> DeliveryError | None:
        try:
            return await asyncio.wait_for(checking(), CHECK_WAIT)
        except asyncio.TimeoutError:
            return DeliveryError(f"{name}: no answer within {CHECK_WAIT:g} s")

    async def _recheck(self, name: str, adapter: Any, checking: Any) -> None:
        """A platform not reachable at start is asked again (its check), waiting longer each time (up to 5 min),
        until it answers: a quiet bot makes no other call that would show it is back (chatops_adapter_up stayed
        0 for hours after a blip at start)."""
        delay = RECHECK_FIRST
        while adapter.unreachable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 300.0)
            if not adapter.unreachable:  # (a call since worked)
                break
            problem = await self._checked(name, checking)
            if problem is None:
                adapter.unreachable = None
            elif problem.token_refused:
                adapter.unreachable = None
                self.outbox.token_refused[name] = str(problem)
                log.error("%s: the token was refused (%s); messages wait until it works", name, problem)
                return
            else:
                adapter.unreachable = str(problem)
        log.info("%s: reachable now", name)

    def _changed(self) -> None:
        """Something committed that may have queued chat work or a timer due now."""
        self.outbox.nudge()
        self.timers.nudge()

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop; `drain`: seconds the outbox may take to send what is already due (see OutboxWorker.stop), once
        intake and the timers, which queue more, have stopped."""
        for task in list(self._rechecks):
            task.cancel()
        await asyncio.gather(*self._rechecks, return_exceptions=True)
        await self.intake.stop()
        await self.runbooks.stop()  # (their processes killed; marked interrupted at the next start)
        await self.timers.stop()
        await self.outbox.stop(drain=drain)
        for adapter in self.adapters.values():
            stopping = getattr(adapter, "stop", None)
            if stopping is not None:
                await stopping()
        for leader in self.leaders:
            await leader.close()
        await self.db.dispose()

    async def _audit_refused(self, actor: Actor, person: Person, what: str, incident_id: int | None,
                             role: str) -> None:
        """A person's click or command refused for a role they lack, in the audit log (`access.refused`): who tried
        what, where, and the role it needs. (A stranger, whom app.yaml does not know, is told how to be added and
        is not audited: anyone on Telegram can write to the bot.)"""
        who = Actor(actor.platform, actor.user_id, person.name, person.id)
        async with self.db.transaction() as session:
            # (a typed number no incident has yet is the subject, not the incident: its timeline would show it later)
            known = incident_id if incident_id and await session.get(Incident, incident_id) is not None else None
            await self.audit.append_many(session, [Entry(
                "access.refused", who, "incident" if incident_id else "command", str(incident_id or what),
                self.clock.now(), {"what": what, "needs": role, "roles": list(person.roles)}, known)])

    def _adapters_up(self) -> None:
        """chatops_adapter_up as things are now: 0 for a platform whose token was refused since it started."""
        for name, adapter in self.adapters.items():
            down = name in self.outbox.token_refused or getattr(adapter, "unreachable", None)
            self.metrics.adapter_up.labels(name).set(0 if down else 1)

    def adapter_states(self) -> dict[str, str]:
        states = {name: f"off ({why})" for name, why in self.loaded.adapters_off.items()}
        for name in self.loaded.adapters:
            if name in self.adapters_failed:
                states[name] = f"off ({self.adapters_failed[name]})"
            elif name in self.outbox.token_refused:  # refused since start: messages wait for a new token
                states[name] = f"token refused ({self.outbox.token_refused[name]}); messages wait for it to be fixed"
            else:
                states[name] = "configured, but this version has no adapter for it"
                if name in self.adapters:  # (Teams' emulator mode takes activities from anyone: said wherever it is on)
                    unchecked = getattr(self.loaded.adapters[name], "unauthenticated", False)
                    states[name] = "on, unauthenticated" if unchecked else "on"
                    if unreachable := getattr(self.adapters[name], "unreachable", None):  # (since start, until it answers)
                        states[name] += f", not reachable ({unreachable}); messages wait and are retried"
        return dict(sorted(states.items()))

    def web_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._observe],
            client_max_size=self.config.server.max_body_bytes,
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_post("/alerts/{source}", self.alerts.handle)
        app.router.add_get("/oncall/{rotation}.ics", self.oncall_calendar)
        for adapter in self.adapters.values():
            register = getattr(adapter, "register", None)
            if register is not None:
                register(app)
        for name, path in ENDPOINTS.items():  # a platform that is off says why, as an alert source that is off does
            if name not in self.adapters:
                app.router.add_post(path, functools.partial(self._adapter_off, name))
        return app

    def runner(self) -> web.AppRunner:
        """What `chatops serve` runs: the web app on server_options(), no access log, signals left to serve(). A
        handler whose client hangs up is not cancelled (aiohttp's default; its test server cancels): it finds out when
        it reads the body (counted as `client_aborted`) or has its answer dropped after the commit."""
        return web.AppRunner(self.web_app(), access_log=None, handle_signals=False, **server_options())

    async def _adapter_off(self, name: str, _request: web.Request) -> web.Response:
        if name in self.loaded.adapters and name not in self.loaded.built:
            return web.json_response({"error": f"{name} is configured, but this version of the bot has no {name} "
                                               "adapter"}, status=501)
        why = self.adapters_failed.get(name) or self.loaded.adapters_off.get(name) or f"adapters.{name} is not configured"
        # (a variable app.yaml reads, unset: the fix is in the environment, as for an alert source)
        unset = name not in self.adapters_failed and why.endswith((" is not set", " is empty"))
        fix = "set it and restart the bot" if unset else "set it up in app.yaml and restart the bot"
        return web.json_response({"error": f"{name} is off: {why}; {fix}"}, status=503, headers={"Retry-After": "60"})

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource else "unmatched"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if status in (404, 405) and resource is None:  # the router's own refusals: said in JSON, with a hint
                return self._nowhere(request, exc)
            raise
        except Exception:
            log.exception("unhandled error answering %s %r", request.method, request.path[:200])  # decoded: a repr
            return web.json_response({"error": "internal error; the details are in the bot's log"}, status=500)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - started)

    def _nowhere(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        """No such endpoint, or not that method on it, said as every other answer is (JSON), with a hint. Under
        /alerts/ the known sources go to the log (AlertEndpoint.unknown_source), not to the caller."""
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            return web.json_response({"error": f"{request.method} is not allowed on {request.path[:200]}; use "
                                               f"{allowed or 'another method'}"}, status=405, headers={"Allow": allowed})
        message = f"no endpoint at {request.path[:200]}"
        if request.path.startswith("/alerts/"):
            self.alerts.unknown_source(request)
            message += ("; alerts go to POST /alerts/SOURCE, SOURCE the id of one of sources: in app.yaml (no slash "
                        "after it; the bot's log lists the known ones)")
        return web.json_response({"error": message}, status=404)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready or not (the status is what a probe needs), and why. With server.metrics_token set, why (a file's
        path, the driver's words naming a host or a user, the adapters' states) is told only with that token, as
        /metrics is."""
        database = await self._database_state()
        self._adapters_up()
        body: dict[str, Any] = {"status": "ok" if database == "ok" else "unavailable", "database": database,
                                "adapters": self.adapter_states()}
        token = self.config.server.metrics_token
        if token is not None:
            try:
                verify_bearer(request.headers, token)
            except AuthError:
                body = {"status": body["status"], "database": "ok" if database == "ok" else "unavailable",
                        "detail": "send server.metrics_token as `Authorization: Bearer` for the details (the "
                                  "adapters' states, and why when not ready)"}
        return web.json_response(body, status=200 if database == "ok" else 503, headers=PRIVATE)

    async def _database_state(self) -> str:
        """"ok", or why the store is not ready, within 2 s: a ping on the writers' engine (a transaction that begins
        as a write's does), so a store another process holds write-locked is not ready, as intake finds it.
        chatops_database_up is set from it, by /readyz and by a scrape alike."""
        # asyncio.wait, not wait_for: a ping stuck in a driver's thread (a locked SQLite file) cannot be
        # cancelled, and wait_for would wait for it anyway; it is left to finish on its own.
        # One ping at a time: probes that come while one is stuck wait on it rather than start more.
        ping = self._ping
        if ping is None or ping.done():
            ping = self._ping = asyncio.ensure_future(self.db.ping())
            ping.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, even if nobody waits
        done, _ = await asyncio.wait({ping}, timeout=2)
        if not done:
            database = "unreachable: no answer within 2 s (down, or locked by a long transaction)"
        elif isinstance(exc := ping.exception(), (StoreReplaced, DiskFull)):
            database = str(exc)
        elif exc is not None:  # any failure to reach it means not ready
            database = f"unreachable: {error_said(exc)}"[:300]
        else:
            database = "ok"
        self.metrics.db_up.set(1 if database == "ok" else 0)
        return database

    async def oncall_calendar(self, request: web.Request) -> web.Response:
        """A rotation's effective schedule as an iCalendar feed. Calendar apps cannot send headers, so its secret,
        server.calendar_token when set, is in the URL (`?token=`), as PagerDuty's and Grafana OnCall's feeds have
        it; without one the feed is open, and reveals only names and shift times (the README says so). The token is
        checked before the rotation, so that a caller without it learns nothing, not even which rotations exist."""
        token = self.config.server.calendar_token
        if token is not None:
            try:
                verify_query_token(request.query.getall("token", []), token)
            except AuthError as exc:
                return web.json_response({"error": f"{exc}: this feed is private; subscribe to its URL with "
                                                   "?token=, the value of server.calendar_token in app.yaml"},
                                         status=401)
        rotation = request.match_info["rotation"]
        body = await self.oncall.calendar(rotation)
        if body is None:
            known = ", ".join(sorted(self.oncall.view.schedules)) or "none configured"
            return web.json_response({"error": f"unknown rotation {rotation[:80]!r} (known: {known}); "
                                      "add it under rotations: in app.yaml"}, status=404)
        schedule = self.oncall.view.find(rotation)  # (its id as app.yaml writes it, not as the caller spelt it)
        return web.Response(body=body.encode(), content_type="text/calendar", charset="utf-8",
                            headers={"Content-Disposition": f'inline; filename="{schedule.id if schedule else "oncall"}.ics"',
                                     **PRIVATE})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        token = self.config.server.metrics_token
        if token is not None:  # checked before any work: a caller without it costs no store query
            try:
                verify_bearer(request.headers, token)
            except AuthError as exc:
                return web.json_response({"error": f"{exc}; /metrics wants `Authorization: Bearer` and the value "
                                                   "of server.metrics_token in app.yaml (Prometheus sends it with "
                                                   "`authorization: {credentials: ...}` in the scrape config)"},
                                         status=401, headers={"WWW-Authenticate": 'Bearer realm="chatops"'})
        # The store's figures within 2 s, as /readyz waits (a scrape times out after 10 s by default, and then loses
        # every metric); one count at a time, left to finish on its own when late (see _database_state).
        # chatops_database_up is readiness's check, run beside the count: the counts are reads, which SQLite (WAL)
        # answers while another process holds the store write-locked and intake answers 503.
        counting = self._counting
        if counting is None or counting.done():
            counting = self._counting = asyncio.ensure_future(self._count())
            counting.add_done_callback(lambda t: t.cancelled() or t.exception())
        _, (done, _) = await asyncio.gather(self._database_state(), asyncio.wait({counting}, timeout=2))
        if not done:
            log.warning("metrics: the database did not answer within 2 s; its figures are the last ones read")
        elif (exc := counting.exception()) is not None:  # metrics still answer when the store does not
            log.warning("metrics: cannot read the store's figures: %s", error_said(exc))
        self._adapters_up()
        for leader in self.leaders:
            self.metrics.leading.labels(leader.name).set(1 if leader.leading else 0)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type, **PRIVATE})

    async def _count(self) -> None:
        self.db.check_file()
        async with self.db.sessions() as session:
            counts = await open_incidents_by_severity(session)
            outbox = await outbox_counts(session)
            stalled = await overdue_timers(session, self.clock.now() - STALLED_AFTER)
            on = [ch.id for ch in self.config.channels if ch.platform in self.adapters]
            oldest = await outbox_oldest_due(session, self.clock.now(), on)
        self.metrics.outbox_oldest_due.set(oldest)
        for severity in ("critical", "high", "medium", "low", "info"):
            self.metrics.incidents_open.labels(severity).set(counts.get(severity, 0))
        for status in ("pending", "sending", "sent", "dead", "cancelled"):
            self.metrics.outbox.labels(status).set(outbox.get(status, 0))
        self.metrics.timers_overdue.set(stalled)


def error_said(exc: BaseException) -> str:
    """An error on one line, as the bot says it to people: a database error as its driver worded it, without the
    statement, its parameters and the "(Background on this error at: https://sqlalche.me/...)" that SQLAlchemy adds
    on lines of their own."""
    orig = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    return f"{type(orig).__name__}: {orig}"


def server_options() -> dict[str, Any]:
    """How the HTTP server runs the web app (`chatops serve`, and the tests' server). Bodies come as they were sent:
    aiohttp would inflate a gzip or deflate body on the event loop, to any size, and go on inflating its unread rest
    after the answer, for anyone on any route; the endpoints read bodies with bot.bodies, and alert intake inflates
    one itself, up to its size limit. A connection that has sent no complete request head within IDLE_WAIT of its
    opening or of its last answer is closed: aiohttp's keep-alive timer, which also runs while a head trickles in."""
    return {"auto_decompress": False, "keepalive_timeout": IDLE_WAIT}


def raise_file_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one, as servers do: each connection holds a file, and 1024, a
    common soft limit, is soon reached by clients that hold connections open. The limit before, and now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)  # (macOS: no more than its own maximum)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


class AcceptErrors:
    """The event loop's exception handler: `socket.accept() out of system resource` (no file left for a new
    connection) said at most once every ACCEPT_SAID_EVERY seconds, with how many went unsaid; anything else goes to
    the handler before it. asyncio says it at every accept that fails, and Python 3.11's loop goes on trying (the
    rest of its accept loop, and a retry scheduled for each failure): about ten thousand lines a second while the
    files are used up, hundreds of megabytes of log a minute."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.before = loop.get_exception_handler()
        self.said: float | None = None
        self.since = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self.MESSAGE:
            if self.before is not None:
                self.before(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if self.said is not None and now - self.said < ACCEPT_SAID_EVERY:
            self.since += 1
            return
        more = f"; {self.since} more since" if self.since else ""
        self.said, self.since = now, 0
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.error("cannot take new connections: %s (the limit on open files is %s); they wait in the listen queue "
                  "until connections close (said at most once a minute%s)", context.get("exception"), limit, more)


def log_startup(loaded: Loaded, bot: Bot) -> None:
    log.info("config: %s", Path(loaded.path).resolve())
    for warning in loaded.warnings:
        log.warning("%s", warning)
    for name, state in bot.adapter_states().items():
        log.info("%s: %s", name, state)
    for source in loaded.config.sources:
        why = loaded.sources_off.get(source.id)
        log.info("source %s (%s): %s", source.id, source.kind, f"off ({why})" if why else "on")
    server = loaded.config.server
    log.info("GET /metrics: %s", "wants its bearer token (server.metrics_token)" if server.metrics_token
             else "open to anyone who can reach the bot (set server.metrics_token to require a token)")
    log.info("GET /oncall/ROTATION.ics: %s", "wants ?token= (server.calendar_token)" if server.calendar_token
             else "open to anyone who can reach the bot (set server.calendar_token to require a token)")
    log.info("storage: %s%s", bot.db.safe_url, f" (schema {bot.db.schema})" if bot.db.schema else "")


async def serve(loaded: Loaded, *, clock: Clock | None = None) -> int:
    """Run until SIGTERM or Ctrl-C; then stop accepting, finish in-flight work, close the store.

    The port, and a SQLite store, are taken before anything starts: a second bot started by mistake stops there,
    before its workers could touch what the running one is doing (recovering its pages in flight as if it had
    crashed, posting its cards a second time)."""
    server = loaded.config.server
    before, files = raise_file_limit()
    log.info("open files: up to %s%s (each connection holds one)", files,
             f", raised from {before}" if files != before else "")
    problem = store_folder_problem(loaded.config.storage.url)
    if problem is not None:  # SQLite would say only "unable to open database file"
        log.error("cannot open the database at %s: %s", make_url(loaded.config.storage.url).database, problem)
        return 1
    if is_sqlite_file_url(loaded.config.storage.url):
        full = room_problem(make_url(loaded.config.storage.url).database or "")
        if full is not None:  # (else a traceback, from the lock file's first write)
            log.error("cannot start: %s; free space there, or give storage.url a file on another disk", full)
            return 1
    try:
        socks = _listen(server.host, server.port)
    except OSError as exc:
        hint = " (is another chatops running? change server.port)" if exc.errno == errno.EADDRINUSE else ""
        log.error("cannot listen on %s:%s: %s%s", server.host, server.port, exc.strerror, hint)
        return 1
    with contextlib.ExitStack() as held:  # closed (the port and the lock let go) when the bot has stopped
        for sock in socks:
            held.enter_context(sock)
        try:
            store = hold_store(loaded.config.storage.url)
        except (StoreInUse, NotAStore) as exc:
            log.error("%s", exc)
            return 1
        if store is not None:
            held.enter_context(store)
        return await _serve(loaded, socks, clock)


async def _serve(loaded: Loaded, socks: list[socket.socket], clock: Clock | None) -> int:
    server = loaded.config.server
    bot = Bot(loaded, clock=clock)
    log_startup(loaded, bot)
    try:
        await bot.start()
    except KeyMismatch as exc:  # every event written from now on would break the chain for good
        log.error("not starting: %s", exc)
        await bot.stop()
        return 2
    except Exception as exc:
        why = (error_said(exc) if isinstance(exc, StatementError) else str(exc)) or (
            f"no answer within {DB_WAIT:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__)
        if busy_store(exc) is not None and not bot.db.is_postgres:  # another process holds the file's write lock
            why = (f"{explain_failure(exc)}; end that transaction (a sqlite3 shell, a backup, another program), then "
                   "start the bot again")
        log.error("cannot open the database at %s: %s", bot.db.safe_url, why)
        await bot.stop()
        return 1
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrors(loop))
    runner = bot.runner()
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock, shutdown_timeout=10).start()
    log.info("listening on http://%s:%s (public URL %s)", server.host, server.port, server.public_url)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new requests, finishing those in flight")
    await runner.cleanup()
    await bot.stop(drain=SHUTDOWN_DRAIN)
    log.info("stopped")
    return 0


def _listen(host: str, port: int) -> list[socket.socket]:
    """The listening sockets, bound now: one for each address of `host` (`localhost` is 127.0.0.1 and ::1), as
    aiohttp's TCPSite binds them."""
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the IPv4 address is a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class StoreInUse(RuntimeError):
    """Another `chatops serve` runs on this SQLite file."""


class NotAStore(RuntimeError):
    """The SQLite file storage.url names is another program's (not a database), or its `<file>.lock` is: refused
    before anything is written beside it."""


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def not_a_database(path: str) -> str | None:
    """Why the file at `path` is not one the bot can keep its store in: there, and not a SQLite database. None for a
    database, an empty file (SQLite makes its tables in it) or none at all (the bot makes it), and for a file it
    cannot read (opening it says why)."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except IsADirectoryError:
        return "it is a folder, not a SQLite database: fix storage.url in app.yaml"
    except OSError:
        return None
    if head and head != SQLITE_HEADER:
        return ("the file is there and is not a SQLite database (another program's file?): fix storage.url in "
                "app.yaml; nothing was written beside it")
    return None


def store_folder_problem(url: str) -> str | None:
    """For a SQLite file: why the bot cannot make it (and the journal beside it) in its folder, said with the fix;
    None when it can, and for PostgreSQL."""
    if not is_sqlite_file_url(url):
        return None
    path = Path(make_url(url).database or "")
    folder = path.resolve().parent
    relative = "" if path.is_absolute() else f" (a relative storage.url starts at the current directory, {os.getcwd()})"
    if not folder.exists():
        return f"the folder {folder} does not exist: create it{relative} (or fix storage.url in app.yaml)"
    if not folder.is_dir():
        return f"{folder} is not a folder: fix storage.url in app.yaml{relative}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"the folder {folder} is not writable by this user (uid {os.geteuid()}), and SQLite writes its "
                "journal beside the file: let the bot's user write there (or fix storage.url in app.yaml)")
    return None


def store_held(url: str) -> bool | None:
    """Whether a chatops serve holds the SQLite file `url` names (its `<file>.lock`, see hold_store); None for
    PostgreSQL, which replicas share (the command line cannot tell whether one runs)."""
    if not is_sqlite_file_url(url):
        return None
    try:
        lock = open(f"{make_url(url).database}.lock", encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:  # none: no bot ever ran on it
        return False
    except OSError:  # not ours to read (a bot running as another user, say): cannot tell
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def hold_store(url: str) -> IO[str] | None:
    """For a SQLite file: an exclusive lock on `<file>.lock`, held while the bot runs (the kernel lets it go when the
    process ends, SIGKILL included); None for PostgreSQL, where replicas share the store by design."""
    if not is_sqlite_file_url(url):
        return None
    path = make_url(url).database
    if (problem := not_a_database(path)) is not None:  # before `<file>.lock` is made beside another program's file
        raise NotAStore(f"cannot open the database at {path}: {problem}")
    try:
        lock = open(f"{path}.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held for the bot's life
    except OSError:  # no such folder, not writable: said by store_folder_problem before
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise StoreInUse(f"another chatops serve (pid {holder}) is running on {path}; stop it first, or give this "
                         "one a storage.url of its own") from None
    lock.seek(0)
    held = lock.read().strip()
    if held and not held.isdigit():  # a process id is all the bot writes there: emptied, it would be lost
        lock.close()
        raise NotAStore(f"{path}.lock is there and is not the bot's lock file (the bot writes its process id in it): "
                        "another program uses that name; move it away, or give the bot a storage.url of its own")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
