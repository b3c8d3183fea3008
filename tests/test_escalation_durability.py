"""Escalation through restarts and replicas: real `chatops serve` processes against the fake Telegram Bot API.

- SIGKILL in the middle of a step's wait (SQLite): the next step, due while the bot was down, fires once
  after the restart; nobody is paged twice; one `escalation.step` audit event per step; the chain verifies.
- SIGKILL after step 1 fired but while its page was still in flight (the fake holds the request unanswered):
  the page may have arrived, so after the restart it is not sent again (as GoAlert does: an unknown outcome
  is not retried into a double page); the thread and the audit say it is unconfirmed, and step 2 fires once,
  after step 1's wait.
- Two replicas on one PostgreSQL schema: 200 incidents with 3-step policies, alerts posted to both; every
  step fires exactly once across both replicas, and every (person, incident) gets exactly one page.
- Two pages of one step failing at the same moment (PostgreSQL): one of them moves the escalation on.

Business hours are set to a weekday that is never today (UTC), so every step is "after hours" and pages go
to Telegram first; severity is critical, above `paging.after_hours_min_severity`, so nothing is deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from storage.db import Database
from tests.botkit import bot_on, untagged
from tests.conftest import drop_schema, free_port, postgres_url
from tests.fake_telegram import FakeTelegram
from tests.test_serve import CHATOPS

TG_SECRET = "durability-webhook-secret"
ALICE, BOB, CAROL = 111111, 222222, 333333
GROUP = "-100123"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

CONFIG = """
storage: {storage}
server: {{port: {port}}}
timezone: UTC
business_hours: {{days: [{day}], start: "09:00", end: "18:00", timezone: UTC}}
paging: {{after_hours_min_severity: high}}
audit: {{hmac_key: durability-key-0123456789ab}}
adapters:
  telegram: {{bot_token: '{token}', webhook_secret: {secret}, api_url: '{api_url}'}}
people:
  - {{id: alice, name: Alice, roles: [responder], telegram: {alice}}}
  - {{id: bob, name: Bob, roles: [responder], telegram: {bob}}}
  - {{id: carol, name: Carol, roles: [responder], telegram: {carol}}}
channels:
  - {{id: ops-telegram, platform: telegram, chat: "{group}"}}
sources:
  - {{id: gen, kind: generic, auth: none}}
escalation_policies:
  - id: night
    steps:
{steps}
    repeat: 0
routes:
  - {{match: {{}}, channels: [ops-telegram], escalation: night}}
"""


def off_day() -> str:
    """A weekday three days from today (UTC): business hours never cover the test, even across midnight."""
    return WEEKDAYS[(datetime.now(UTC).weekday() + 3) % 7]


def write_config(path: Path, *, storage: str, port: int, tg: FakeTelegram, steps: list[tuple[str, str]]) -> Path:
    lines = "\n".join(f"      - {{notify: {{people: [{who}]}}, wait: {wait}}}" for who, wait in steps)
    path.write_text(CONFIG.format(storage=storage, port=port, day=off_day(), token=tg.token, secret=TG_SECRET,
                                  api_url=tg.api_url, alice=ALICE, bob=BOB, carol=CAROL, group=GROUP, steps=lines))
    return path


class Serve:
    """One `chatops serve` process; its output goes to a file (a pipe nobody reads would fill and block it)."""

    def __init__(self, cfg: Path, port: int, log: Path):
        self.cfg, self.port, self.log = cfg, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "TELEGRAM_", "SLACK_"))}
        with self.log.open("ab") as out:
            out.write(f"---- start {datetime.now(UTC).isoformat()}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([CHATOPS, "serve", "-c", str(self.cfg)], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_up(self, timeout: float = 30) -> None:
        """/healthz answers. Async: the fake Telegram runs on this event loop and must answer getMe meanwhile."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"bot exited early with {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"the bot on port {self.port} did not answer within {timeout}s:\n{self.tail()}")

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time; its exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # not proc.wait(): the fake must keep answering while the bot drains
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None
        return self.proc.returncode


async def until(predicate: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {describe()}")
        await asyncio.sleep(0.05)


def keys(call: Any) -> list[str]:
    markup = call.params.get("reply_markup") or {}
    return [untagged(b.get("callback_data", "")) for row in markup.get("inline_keyboard", []) for b in row]


def pages_to(tg: FakeTelegram, chat: int) -> list[int]:
    """Indexes in tg.calls of the sendMessage calls to a private chat that Telegram accepted (status 200)."""
    return [i for i, c in enumerate(tg.calls) if c.method == "sendMessage" and c.status == 200
            and c.params.get("chat_id") == chat]


def incident_of(call: Any) -> int:
    [ack] = [k for k in keys(call) if k.startswith("ack:")]
    return int(ack.split(":")[1])


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


class Store:
    """Read-only looks into the bot's SQLite file while it runs (WAL: readers never block the writer)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.path, timeout=5)) as db:
            try:
                return list(db.execute(sql, args))
            except sqlite3.OperationalError as exc:  # the tables are not created yet
                if "no such table" in str(exc):
                    return []
                raise

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [_json(d) | {"_incident": i} for i, d in
                self.rows("SELECT incident_id, details FROM audit_events WHERE action = ? ORDER BY seq", action)]

    def step_timers(self, incident: int = 1) -> list[dict[str, Any]]:
        return [{"id": r[0], "step": _json(r[1]).get("step"), "status": r[2], "claimed_by": r[3], "fired_at": r[4],
                 "due_at": r[5]} for r in self.rows(
            "SELECT id, payload, status, claimed_by, fired_at, due_at FROM timers "
            "WHERE kind = 'escalation.step' AND subject = ? ORDER BY id", str(incident))]


def iso(value: str) -> datetime:
    at = datetime.fromisoformat(value.replace(" ", "T"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def post_alert(port: int, i: int = 1, team: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"asset_name": f"db-{i:03d}", "signature": f"DiskFull{i}", "severity": "critical",
                            "message": f"Disk almost full on db-{i:03d}", "tool_source": "zabbix"}
    if team is not None:
        body["labels"] = {"team": f"t{team}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.post(f"http://127.0.0.1:{port}/alerts/gen", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            return answer


def audit_verify(cfg: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
    verify = subprocess.run([CHATOPS, "audit", "verify", "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- 1. SIGKILL in the middle of a wait (SQLite) ----------------------------------------------------


async def test_sigkill_mid_wait_next_step_fires_once_after_restart(tmp_path: Path) -> None:
    async with FakeTelegram() as tg:
        port, db = free_port(), tmp_path / "bot.db"
        cfg = write_config(tmp_path / "app.yaml", storage=f'{{url: "sqlite+aiosqlite:///{db}"}}', port=port, tg=tg,
                           steps=[("alice", "4s"), ("carol", "4s")])
        bot, store = Serve(cfg, port, tmp_path / "bot.log"), Store(db)
        try:
            bot.start()
            await bot.wait_up()
            assert (await post_alert(port))["results"][0]["change"] == "opened"

            # Step 1: Alice's page arrives, with Acknowledge, Escalate and Resolve; it is committed (incident.paged).
            await until(lambda: pages_to(tg, ALICE), 10, lambda: f"no page to Alice; calls {[c.method for c in tg.calls]}")
            [first] = pages_to(tg, ALICE)
            assert keys(tg.calls[first]) == ["ack:1", "esc:1:1", "?res:1"], keys(tg.calls[first])  # Escalate names step 1
            await until(lambda: store.audit("incident.paged"), 5, lambda: "incident.paged for Alice never committed")
            [step1] = store.audit("escalation.step")
            due2 = iso(step1["next_at"])

            # SIGKILL in the middle of the 4 s wait.
            killed_at = datetime.now(UTC)
            bot.sigkill()
            assert killed_at < due2, f"killed at {killed_at}, after step 2 was due ({due2}): not mid-wait"
            assert (due2 - killed_at).total_seconds() > 1, "the kill came too late in the wait to mean anything"
            pending = [t for t in store.step_timers() if t["status"] == "pending"]
            assert [t["step"] for t in pending] == [1], store.step_timers()
            assert not pages_to(tg, CAROL)

            # Down while step 2 falls due, and a little longer.
            await asyncio.sleep(max(0.0, (due2 - datetime.now(UTC)).total_seconds()) + 1.5)
            assert not pages_to(tg, CAROL)
            calls_before_restart = len(tg.calls)
            bot.start()
            await bot.wait_up()
            up_at = time.monotonic()
            await until(lambda: pages_to(tg, CAROL), 10, lambda: f"no page to Carol after the restart\n{bot.tail()}")
            assert time.monotonic() - up_at < 5, "step 2, overdue at the restart, did not fire at once"

            # The escalation runs on to its end (exhausted after step 2's wait), and nothing fires twice.
            await until(lambda: store.audit("escalation.exhausted"), 12,
                        lambda: f"escalation never finished: {store.step_timers()}\n{bot.tail()}")
            await asyncio.sleep(1.0)
            assert await bot.terminate() == 0, bot.tail()
        finally:
            await bot.terminate(timeout=5)

        alice, carol = pages_to(tg, ALICE), pages_to(tg, CAROL)
        assert alice == [first], f"Alice paged {len(alice)} times"
        assert len(carol) == 1, f"Carol paged {len(carol)} times"
        assert carol[0] >= calls_before_restart, "Carol's page came before the restart"
        assert keys(tg.calls[carol[0]]) == ["ack:1", "esc:1:2", "?res:1"]
        steps = [e["step"] for e in store.audit("escalation.step")]
        assert steps == [1, 2], f"escalation.step events: {steps}"
        assert [(e["person"], e["platform"], e["step"]) for e in store.audit("incident.paged")] == [
            ("alice", "telegram", 1), ("carol", "telegram", 2)]
        assert len(store.audit("escalation.exhausted")) == 1
        timers = store.step_timers()
        assert [(t["step"], t["status"]) for t in timers] == [(0, "done"), (1, "done"), (2, "done")], timers
        assert timers[1]["claimed_by"] != timers[0]["claimed_by"], "step 2 should have run on the restarted process"
        assert iso(timers[1]["fired_at"]) > killed_at
        assert [r[0] for r in store.rows("SELECT status FROM outbox WHERE kind = 'page'")] == ["sent", "sent"]
        audit_verify(cfg)


class HoldingTelegram(FakeTelegram):
    """The fake, except that sendMessage to the chats in `hold` is never answered (until `release()`), and is not
    counted as delivered: a page in flight when the bot dies."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hold: set[int] = set()
        self.held: list[int] = []
        self._release = asyncio.Event()

    def release(self) -> None:
        self._release.set()

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["method"] == "sendMessage" and self.hold:
            params: dict[str, Any] = dict(request.query)
            params.update(await request.json() if request.content_type == "application/json" else await request.post())
            chat = int(params.get("chat_id") or 0)
            if chat in self.hold:
                self.held.append(chat)
                await self._release.wait()
                return web.json_response({"ok": False, "error_code": 502, "description": "Bad Gateway"}, status=502)
        return await super()._api(request)


async def test_sigkill_with_step_one_page_in_flight(tmp_path: Path) -> None:
    """Step 1 fired (its page row is committed) but the page is still in flight when the bot dies: claimed for
    sending, never settled. After the restart it is settled as unconfirmed, not sent again."""
    async with HoldingTelegram() as tg:
        port, db = free_port(), tmp_path / "bot.db"
        cfg = write_config(tmp_path / "app.yaml", storage=f'{{url: "sqlite+aiosqlite:///{db}"}}', port=port, tg=tg,
                           steps=[("alice", "3s"), ("carol", "3s")])
        bot, store = Serve(cfg, port, tmp_path / "bot.log"), Store(db)
        tg.hold = {ALICE}
        try:
            bot.start()
            await bot.wait_up()
            await post_alert(port)
            await until(lambda: tg.held, 10, lambda: f"the page to Alice never left; {[c.method for c in tg.calls]}")
            killed_at = datetime.now(UTC)
            bot.sigkill()
            assert [e["step"] for e in store.audit("escalation.step")] == [1]
            assert not store.audit("incident.paged"), "the page was recorded as sent, yet Telegram never answered"
            assert [r[0] for r in store.rows("SELECT status FROM outbox WHERE kind = 'page'")] == ["sending"]
            [step1] = store.audit("escalation.step")
            due2 = iso(step1["next_at"])
            assert killed_at < due2
            tg.hold = set()

            await asyncio.sleep(max(0.0, (due2 - datetime.now(UTC)).total_seconds()) + 1.0)
            assert not pages_to(tg, ALICE) and not pages_to(tg, CAROL)
            bot.start()
            await bot.wait_up()
            await until(lambda: pages_to(tg, CAROL), 10,
                        lambda: f"pages after the restart: alice {pages_to(tg, ALICE)}, carol {pages_to(tg, CAROL)}"
                                f"\n{bot.tail()}")
            await until(lambda: store.audit("escalation.exhausted"), 10, lambda: f"never finished\n{bot.tail()}")
            await asyncio.sleep(1.0)
            assert await bot.terminate() == 0, bot.tail()
        finally:
            tg.release()
            await bot.terminate(timeout=5)

        assert tg.held == [ALICE]
        assert not pages_to(tg, ALICE), "the page cut off by the kill was sent again"
        assert len(pages_to(tg, CAROL)) == 1, f"Carol paged {len(pages_to(tg, CAROL))} times"
        assert [e["step"] for e in store.audit("escalation.step")] == [1, 2]
        assert [(e["person"], e["step"]) for e in store.audit("incident.paged")] == [("carol", 2)]
        [unconfirmed] = store.audit("incident.page_failed")
        assert (unconfirmed["person"], unconfirmed["step"], unconfirmed["unknown"]) == ("alice", 1, "restart")
        assert [r[0] for r in store.rows("SELECT last_error FROM outbox WHERE kind = 'page' AND status = 'dead'")] == [
            "outcome unknown: the bot stopped while sending it, so it may have arrived; it is not sent again, so as "
            "not to page twice"]
        lines = [c.params["text"] for c in tg.called("sendMessage") if str(c.params["chat_id"]) == GROUP]
        assert any(t.startswith("The page to Alice is unconfirmed: the bot stopped while sending it") for t in lines)
        assert [(t["step"], t["status"]) for t in store.step_timers()] == [(0, "done"), (1, "done"), (2, "done")]
        audit_verify(cfg)


async def test_sigterm_lets_what_is_queued_go_before_the_bot_stops(tmp_path: Path) -> None:
    """SIGTERM a moment after step 1 paged Alice: the thread line saying so (queued after the page went) goes out
    before the bot exits, not after its next start, when Bob's step may have fired and "Bob in 1 min" is untrue."""
    async with FakeTelegram() as tg:
        port, db = free_port(), tmp_path / "bot.db"
        cfg = write_config(tmp_path / "app.yaml", storage=f'{{url: "sqlite+aiosqlite:///{db}"}}', port=port, tg=tg,
                           steps=[("alice", "60s"), ("bob", "60s")])
        bot = Serve(cfg, port, tmp_path / "bot.log")
        try:
            bot.start()
            await bot.wait_up()
            await post_alert(port)
            await until(lambda: pages_to(tg, ALICE), 10, lambda: f"no page to Alice\n{bot.tail()}")
            assert await bot.terminate() == 0, bot.tail()
        finally:
            await bot.terminate(timeout=5)
        lines = [c.params["text"] for c in tg.called("sendMessage")
                 if str(c.params["chat_id"]) == GROUP and c.params.get("reply_parameters")]
        assert lines == ["Paged Alice on Telegram. Bob in 1 min if nobody acknowledges."], bot.tail()
        assert "outbox: sent what was queued before stopping" in bot.tail(), bot.tail()


# -- 2. Two replicas on one PostgreSQL database -----------------------------------------------------

INCIDENTS = 200
TEAMS = 20  # each with a 3-step policy of its own three people: 10 pages per person, which Telegram allows
            # in about 8 s (1 message/s per chat after a burst of 3); 600 pages to three people would take 200 s


def member(team: int, step: int) -> tuple[str, int]:
    """The person a team's step pages: (person id, Telegram chat id)."""
    return f"p{team:02d}s{step}", 500000 + team * 10 + step


def team_config(cfg: Path) -> Path:
    """The single-policy config made into TEAMS teams: people, policies and one route per team."""
    text = cfg.read_text()
    head, _, _ = text.partition("people:\n")
    people = "people:\n" + "".join(
        f"  - {{id: {pid}, name: {pid.upper()}, roles: [responder], telegram: {chat}}}\n"
        for t in range(TEAMS) for pid, chat in (member(t, s) for s in (1, 2, 3)))
    policies = "escalation_policies:\n" + "".join(
        f"  - id: team{t}\n    steps:\n" + "".join(
            f"      - {{notify: {{people: [{member(t, s)[0]}]}}, wait: 2s}}\n" for s in (1, 2, 3)) + "    repeat: 0\n"
        for t in range(TEAMS))
    routes = "routes:\n" + "".join(f"  - {{match: {{team: t{t}}}, channels: [ops-telegram], escalation: team{t}}}\n"
                                   for t in range(TEAMS)) + "  - {match: {}, channels: [ops-telegram]}\n"
    rest = text[text.index("channels:\n"):text.index("escalation_policies:")]
    cfg.write_text(head + people + rest + policies + routes)
    return cfg


async def test_two_replicas_fire_every_step_exactly_once(tmp_path: Path) -> None:
    url = postgres_url()  # skips, saying why, when CHATOPS_TEST_POSTGRES_URL is not set
    schema = f"t_{uuid.uuid4().hex[:12]}"
    # Telegram's own per-chat pace for the private chats (the bot paces pages to it); the group chat, which
    # gets a thread line per page, is left unlimited so that 800 lines do not crowd the test's time.
    async with FakeTelegram(group_per_minute=100_000) as tg:
        storage = f'{{url: "{url}", schema: {schema}}}'
        bots = []
        for name in ("a", "b"):
            port = free_port()
            cfg = team_config(write_config(tmp_path / f"app-{name}.yaml", storage=storage, port=port, tg=tg,
                                           steps=[("alice", "2s"), ("bob", "2s"), ("carol", "2s")]))
            bots.append(Serve(cfg, port, tmp_path / f"bot-{name}.log"))
        engine = create_async_engine(url)
        try:
            # Both start together on a schema that does not exist yet (they must not race creating it).
            for bot in bots:
                bot.start()
            await asyncio.gather(*(bot.wait_up() for bot in bots))

            # Eight requests in flight per replica, so intake groups them into shared transactions.
            async def sender(replica: int) -> list[str]:
                gate = asyncio.Semaphore(8)

                async def one(i: int) -> str:
                    async with gate:
                        return (await post_alert(bots[replica].port, i, team=i % TEAMS))["results"][0]["change"]
                return list(await asyncio.gather(*(one(i) for i in range(replica, INCIDENTS, 2))))

            started = time.monotonic()
            changes = [c for part in await asyncio.gather(sender(0), sender(1)) for c in part]
            assert Counter(changes) == {"opened": INCIDENTS}, Counter(changes)
            print(f"posted {INCIDENTS} alerts to two replicas in {time.monotonic() - started:.1f}s")

            async def counts() -> dict[str, int]:
                async with engine.connect() as conn:
                    rows = (await conn.execute(text(
                        f'SELECT action, count(*) FROM "{schema}".audit_events '
                        "WHERE action IN ('escalation.step', 'incident.paged', 'escalation.exhausted') GROUP BY action"
                    ))).all()
                return {a: n for a, n in rows}

            deadline, last_print, seen = time.monotonic() + 90, 0.0, {}
            chats = [member(t, s)[1] for t in range(TEAMS) for s in (1, 2, 3)]
            total_pages = lambda: sum(len(pages_to(tg, chat)) for chat in chats)  # noqa: E731
            while time.monotonic() < deadline:
                seen = await counts()
                done = (seen.get("escalation.step", 0) >= 3 * INCIDENTS and seen.get("incident.paged", 0) >= 3 * INCIDENTS
                        and seen.get("escalation.exhausted", 0) >= INCIDENTS and total_pages() >= 3 * INCIDENTS)
                if time.monotonic() - last_print > 2 or done:
                    last_print = time.monotonic()
                    print(f"[{last_print - started:5.1f}s] steps {seen.get('escalation.step', 0)}/{3 * INCIDENTS}, "
                          f"paged {seen.get('incident.paged', 0)}/{3 * INCIDENTS}, "
                          f"exhausted {seen.get('escalation.exhausted', 0)}/{INCIDENTS}, pages at the fake "
                          f"{total_pages()}/{3 * INCIDENTS}")
                if done:
                    break
                for bot in bots:
                    assert bot.proc is not None and bot.proc.poll() is None, f"a replica died:\n{bot.tail()}"
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"not every step fired within 90 s: {seen}, pages at the fake {total_pages()}\n"
                                     + "\n".join(bot.tail(20) for bot in bots))
            await asyncio.sleep(2.0)  # anything fired twice would show up now

            async with engine.connect() as conn:
                steps = (await conn.execute(text(
                    f"SELECT incident_id, details FROM \"{schema}\".audit_events WHERE action = 'escalation.step'"))).all()
                paged = (await conn.execute(text(
                    f"SELECT incident_id, details FROM \"{schema}\".audit_events WHERE action = 'incident.paged'"))).all()
                timers = (await conn.execute(text(
                    f"SELECT subject, payload, status, claimed_by FROM \"{schema}\".timers "
                    "WHERE kind = 'escalation.step'"))).all()
                page_rows = (await conn.execute(text(
                    f"SELECT status, count(*) FROM \"{schema}\".outbox WHERE kind = 'page' GROUP BY status"))).all()
            codes = await asyncio.gather(*(bot.terminate() for bot in bots))
            print("replicas stopped with", codes)
            audit_verify(bots[0].cfg)  # one chain, extended by both replicas
        finally:
            await asyncio.gather(*(bot.terminate(timeout=5) for bot in bots))
            await engine.dispose()
            await drop_schema(url, schema)

        # Exactly one escalation.step per (incident, step): 600, no duplicates.
        per_step = Counter((iid, _json(d)["step"]) for iid, d in steps)
        dupes = {k: n for k, n in per_step.items() if n > 1}
        assert not dupes, f"steps recorded more than once: {sorted(dupes.items())[:10]}"
        assert set(per_step) == {(i, s) for i in range(1, INCIDENTS + 1) for s in (1, 2, 3)}, len(per_step)
        team_of = {}  # incident id -> team, from who its first step paged
        for iid, d in steps:
            d = _json(d)
            [pid] = d["people"]
            team, step = int(pid[1:3]), int(pid[4])
            assert step == d["step"] and d["of"] == 3, (iid, d)
            assert team_of.setdefault(iid, team) == team, (iid, d)

        # Every escalation.step timer ran exactly once (done), four per incident (3 steps + the end); who ran them.
        by_incident: dict[str, list[int]] = defaultdict(list)
        for subject, payload, status, _ in timers:
            assert status == "done", (subject, payload, status)
            by_incident[subject].append(_json(payload)["step"])
        assert len(by_incident) == INCIDENTS
        bad = {s: v for s, v in by_incident.items() if sorted(v) != [0, 1, 2, 3]}
        assert not bad, f"incidents whose step timers are not exactly 0..3 once: {sorted(bad.items())[:10]}"
        pids = {str(bot.pid): f"replica {name}" for bot, name in zip(bots, "ab")}
        fired_by = Counter(pids.get(str(claimed).split(":")[1], claimed) for *_, claimed in timers)
        print(f"escalation.step timers run per replica: {dict(fired_by)}")
        assert set(fired_by) <= set(pids.values()), fired_by
        if len(fired_by) < 2:
            print("NOTE: every timer ran on one replica (allowed: SKIP LOCKED only has to keep them apart)")

        # Exactly one page per (person, incident) at the fake, and in the store.
        at_fake = Counter((chat, incident_of(tg.calls[i])) for chat in chats for i in pages_to(tg, chat))
        assert sum(at_fake.values()) == 3 * INCIDENTS, sum(at_fake.values())
        assert set(at_fake) == {(member(team_of[i], s)[1], i) for i in range(1, INCIDENTS + 1) for s in (1, 2, 3)}
        assert max(at_fake.values()) == 1, [k for k, n in at_fake.items() if n > 1][:10]
        recorded = Counter((_json(d)["person"], iid) for iid, d in paged)
        assert len(recorded) == 3 * INCIDENTS and max(recorded.values()) == 1
        assert dict(page_rows) == {"sent": 3 * INCIDENTS}, page_rows


async def test_replicas_start_together_on_a_new_schema() -> None:
    """Replicas starting at once on a schema that does not exist yet all open the store (CREATE SCHEMA IF NOT
    EXISTS is not safe against itself: it must run under the init lock)."""
    url = postgres_url()
    for _ in range(5):
        schema = f"t_{uuid.uuid4().hex[:12]}"
        dbs = [Database(url, schema=schema) for _ in range(4)]
        try:
            results = await asyncio.gather(*(d.start() for d in dbs), return_exceptions=True)
        finally:
            for d in dbs:
                await d.dispose()
            await drop_schema(url, schema)
        failed = [r for r in results if isinstance(r, Exception)]
        assert not failed, f"{len(failed)} of 4 replicas could not open the store: {failed[0]!r}"


async def test_postgres_intake_answers_alerts_that_arrive_during_a_commit(tmp_path: Path, pg_schema: str) -> None:
    """An alert posted while intake's transaction for an earlier one is still running is written and answered
    once that transaction ends, without waiting for yet another request to arrive."""
    url = postgres_url()
    body = {"severity": "high", "message": "disk", "tool_source": "test"}
    async with bot_on("postgres", tmp_path, pg_schema) as h:
        engine = create_async_engine(url)
        second: asyncio.Task[Any] | None = None
        answered = False
        try:
            async with engine.connect() as conn:
                held = await conn.begin()  # hold the audit chain's head row: intake's transaction waits on it
                await conn.execute(text(f'SELECT seq FROM "{pg_schema}".audit_head FOR UPDATE'))
                first = asyncio.create_task(h.post("open", {**body, "asset_name": "db-1", "signature": "A"}))
                await asyncio.sleep(0.5)  # its transaction has begun and waits for the head row
                second = asyncio.create_task(h.post("open", {**body, "asset_name": "db-2", "signature": "B"}))
                await asyncio.sleep(0.3)  # queued behind it
                await held.rollback()
            status, _, _ = await asyncio.wait_for(first, 10)
            assert status == 200
            done, _ = await asyncio.wait({second}, timeout=5)
            answered = second in done
            if answered:
                assert (await second)[0] == 200
        finally:
            await engine.dispose()
            if second is not None and not second.done():
                second.cancel()
                with contextlib.suppress(BaseException):
                    await second
    assert answered, ("an alert queued while the previous intake transaction ran got no answer 5 s after that "
                      "transaction ended: no transaction was started for it until another request arrived")


async def test_two_pages_of_a_step_failing_at_once_move_the_escalation_on(tmp_path: Path, pg_schema: str) -> None:
    """PostgreSQL: Bob's and Carol's pages of step 1 fail at the same moment, each recorded by its own transaction.
    Each saw the other's page still `sending` (not committed yet), so neither moved the escalation on, and step 2
    waited out step 1's whole wait with nobody paged. Now the second to decide waits for the first's commit, sees
    both pages failed, and moves on: exactly one of them does."""
    from sqlalchemy import update

    from storage.models import Escalation, Incident, OutboxItem, Timer

    async with bot_on("postgres", tmp_path, pg_schema) as h:
        db, escalations, now = h.bot.db, h.bot.escalations, h.clock.now()
        async with db.transaction() as session:
            incident = Incident(group_key="disk", title="Disk full", severity="critical", opened_at=now,
                                first_seen=now, last_seen=now)
            session.add(incident)
            await session.flush()
            session.add(Escalation(incident_id=incident.id, policy="default", next_step=1, started_at=now,
                                   updated_at=now))
            # (pending, due tomorrow: on their way, and not the outbox worker's to take meanwhile)
            pages = [OutboxItem(created_at=now, due_at=now + timedelta(days=1), incident_id=incident.id,
                                channel=f"@{who}", kind="page", event="escalation.page", status="pending",
                                details={"person": who, "step": 1, "run": 0}) for who in ("bob", "carol")]
            session.add_all(pages)
            await session.flush()
            iid, (bob, carol) = incident.id, [p.id for p in pages]
        b_marked, a_decided, b_decided = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def dead(session: Any, page: int) -> None:
            await session.execute(update(OutboxItem).where(OutboxItem.id == page).values(status="dead"))

        async def first() -> bool:
            async with db.transaction() as session:
                await dead(session, bob)
                await b_marked.wait()
                moved = await escalations.move_on(session, iid, 1, now)
                a_decided.set()
                with contextlib.suppress(TimeoutError):  # the other decides before this commits (or waits for it)
                    await asyncio.wait_for(b_decided.wait(), 1.0)
            return moved

        async def second() -> bool:
            async with db.transaction() as session:
                await dead(session, carol)
                b_marked.set()
                await a_decided.wait()
                moved = await escalations.move_on(session, iid, 1, now)
                b_decided.set()
            return moved

        assert sorted(await asyncio.wait_for(asyncio.gather(first(), second()), 10)) == [False, True]
        async with db.sessions() as session:
            esc = await session.get(Escalation, iid)
            assert esc is not None and esc.timer_id is not None
            timer = await session.get(Timer, esc.timer_id)
            assert timer is not None and timer.payload == {"step": 1}
