"""`chatops serve` as a user runs it: a real process on the example config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import select

from storage.db import SCHEMA_VERSION, Database
from storage.models import Escalation, Incident
from tests.conftest import ROOT, free_port
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram

CHATOPS = str(Path(sys.executable).with_name("chatops"))


def start_bot(workdir: Path, port: int, extra_env: dict[str, str] | None = None,
              *more: str) -> subprocess.Popen[str]:
    """`chatops serve` in `workdir`; its log is `proc.stdout` (a file: a long DEBUG log never fills a pipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TELEGRAM_", "TEAMS_", "CHATOPS_"))}
    env.update({"CHATOPS_PORT": str(port), **(extra_env or {})})
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - read by the test, closed with proc
    proc = subprocess.Popen([CHATOPS, "serve", *more], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.stdout = _Log(log)  # type: ignore[assignment]
    return proc


@contextlib.contextmanager
def serving(workdir: Path, port: int, extra_env: dict[str, str] | None = None,
            *more: str) -> Iterator[subprocess.Popen[str]]:
    """`chatops serve` (start_bot) for the block, then SIGTERM, which must stop it cleanly (exit 0) within 15 s; killed
    if the block fails. Its log (`proc.stdout.read()`) stays readable after."""
    proc = start_bot(workdir, port, extra_env, *more)
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


class _Log:
    """What the tests read of a bot's log: all of it so far."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def read(self) -> str:
        self.file.seek(0)
        return self.file.read()


def wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"bot exited early with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status, json.loads(resp.read())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def test_serve_starts_on_the_example_config_and_stops_cleanly(tmp_path: Path) -> None:
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    proc = start_bot(tmp_path, port)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", proc) == (200, {"status": "ok"})
        status, ready = wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        assert status == 200 and ready["database"] == "ok"
        assert ready["adapters"]["slack"] == "off (SLACK_BOT_TOKEN is not set)"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = resp.read().decode()
            assert 'chatops_http_requests_total{route="/healthz",status="200"} 1.0' in metrics
            assert 'chatops_adapter_up{adapter="slack"} 0.0' in metrics  # off, and says so for alerting
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "slack: off (SLACK_BOT_TOKEN is not set)" in log
    assert "telegram: off (TELEGRAM_BOT_TOKEN is not set)" in log
    assert "audit: no hmac_key" in log
    assert "stopped" in log
    assert (tmp_path / "chatops.db").exists()


def test_stopping_says_how_many_messages_wait_for_a_platform_that_is_off(tmp_path: Path) -> None:
    """SIGTERM said nothing of the cards queued for Slack, off in this run (the start's warning names the channel,
    not what waits for it)."""
    from bot.auth import sign

    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    with serving(tmp_path, port, {"GENERIC_SECRET": "generic-secret-for-tests"}) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        for host in ("db-01", "db-02"):
            body = json.dumps({"asset_name": host, "signature": "DiskFull", "severity": "high",
                               "message": "disk full", "tool_source": "zabbix"}).encode()
            stamp = str(int(time.time()))
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/alerts/generic", data=body, method="POST",
                headers={"Content-Type": "application/json", "X-Timestamp": stamp,
                         "X-Signature": "sha256=" + sign("generic-secret-for-tests", body, stamp)})
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
    log = proc.stdout.read()
    assert ("outbox: 2 message(s) wait for slack, which is off in this run (ops-slack); they go once the bot runs "
            "with it on (`chatops outbox list` shows them)") in log, log
    assert "wait for telegram" not in log  # (nothing was routed there)


def test_requests_that_are_not_http_are_refused_with_a_line_at_info_not_a_traceback(tmp_path: Path) -> None:
    """aiohttp logs a request it cannot parse at ERROR with a traceback: anyone reaching the port could fill the log
    and page whoever watches ERRORs. A body sent on HTTP/1.0 with no length is read as the next request; a request
    line that is not HTTP: each refused, said once a minute at INFO, with how many since."""
    import socket

    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()

    def send(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    with serving(tmp_path, port) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        no_length = send(b'POST /alerts/alertmanager HTTP/1.0\r\nAuthorization: Bearer x\r\n\r\n{"version": "4"}')
        assert b" 400 " in no_length.split(b"\r\n", 1)[0] or b"HTTP/1.1 400" in no_length, no_length
        for _ in range(3):
            garbage = send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01 not http\r\n\r\n")
            assert b"400" in garbage.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0] or b"400 Bad" in garbage, garbage
        assert wait_http(f"http://127.0.0.1:{port}/healthz", proc) == (200, {"status": "ok"})
    log = proc.stdout.read()
    assert "Traceback" not in log and "ERROR" not in log, log
    said = [line for line in log.splitlines() if "not HTTP the bot can read" in line]
    assert len(said) == 1 and " INFO " in said[0] and said[0].endswith("refused (said at most once a minute)"), said


def test_a_second_bot_on_the_same_store_or_port_stops_before_it_touches_anything(tmp_path: Path) -> None:
    """A second `chatops serve` by mistake: on the same SQLite file it stops, naming the running one's pid; on the same
    port it stops before it opens the store (its start would have settled the running bot's pages as cut off)."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    first = start_bot(tmp_path, port)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", first)[0] == 200
        same_store = start_bot(tmp_path, free_port())
        assert same_store.wait(timeout=30) == 1
        said = same_store.stdout.read()
        assert f"another chatops serve (pid {first.pid}) is running on ./chatops.db" in said, said
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(ROOT / "app.yaml", other / "app.yaml")
        same_port = start_bot(other, port)
        assert same_port.wait(timeout=30) == 1
        assert "(is another chatops running? change server.port)" in same_port.stdout.read()
        assert not (other / "chatops.db").exists()  # it stopped before it opened (or made) a store
        assert wait_http(f"http://127.0.0.1:{port}/healthz", first)[0] == 200  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0


async def test_the_telegram_bot_token_stays_out_of_the_log(tmp_path: Path) -> None:
    """python-telegram-bot's HTTP client (httpx) logs every request's URL, whose path carries the bot token, and
    python-telegram-bot its API URL at DEBUG: neither is written, even with --log-level DEBUG."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    async with FakeTelegram() as tg:
        proc = start_bot(tmp_path, port, {"TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_API_URL": tg.api_url,
                                          "TELEGRAM_WEBHOOK_SECRET": "tg-webhook-secret-0123456789"},
                         "--log-level", "DEBUG")
        try:
            await tg.wait_for(lambda: tg.called("getMe"), timeout=20)
            await asyncio.sleep(0.3)  # the call's log line, if any, is written
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = proc.stdout.read()
    assert "telegram: on" in log and "stopped" in log
    secret = tg.token.split(":", 1)[1]
    assert secret not in log, [line for line in log.splitlines() if secret in line]


async def test_a_platform_that_is_off_says_why_on_its_endpoint(tmp_path: Path) -> None:
    from tests.botkit import running_bot

    teams = "adapters:\n  teams: {app_id: 00000000-0000-0000-0000-000000000001, app_password: secret}\n"
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") as h:
        for path, name in (("/slack/events", "slack"), ("/telegram/webhook", "telegram"), ("/api/messages", "teams")):
            resp = await h.client.post(path, data=b"{}")
            assert resp.status == 503 and resp.headers["Retry-After"] == "60"
            error = (await resp.json())["error"]
            assert error.startswith(f"{name} is off: ") and error.endswith("; set it up in app.yaml and restart the bot")
    # Off because a variable app.yaml reads is not set: the fix is in the environment, and it says so
    unset = "adapters:\n  slack: {bot_token: '${SLACK_TOKEN_UNSET_HERE}', signing_secret: signing-secret}\n"
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", unset) as h:
        resp = await h.client.post("/slack/events", data=b"{}")
        assert (await resp.json())["error"] == ("slack is off: SLACK_TOKEN_UNSET_HERE is not set; set it and restart "
                                                "the bot")
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", teams) as h:
        resp = await h.client.post("/api/messages", data=b'{"type": "message"}')
        assert resp.status == 401  # on, and it takes only what the Bot Framework signed
        assert (await resp.json())["error"].startswith("unauthorized")
        ready = await (await h.client.get("/readyz")).json()
        assert ready["adapters"]["teams"] == "on"


async def test_readiness_says_when_the_database_does_not_answer_and_pings_once_at_a_time(tmp_path: Path) -> None:
    from tests.botkit import running_bot

    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") as h:
        calls, release = [], asyncio.Event()

        async def stuck() -> None:  # a ping stuck behind a lock
            calls.append(1)
            await release.wait()

        real, h.bot.db.ping = h.bot.db.ping, stuck  # type: ignore[method-assign]
        started = time.monotonic()
        first, second = await asyncio.gather(h.client.get("/readyz"), h.client.get("/readyz"))
        assert time.monotonic() - started < 4
        for resp in (first, second):
            assert resp.status == 503
            assert (await resp.json())["database"] == ("unreachable: no answer within 2 s (down, or locked by a "
                                                       "long transaction)")
        assert calls == [1]  # the second probe waited on the first one's ping
        release.set()
        h.bot.db.ping = real  # type: ignore[method-assign]
        await asyncio.sleep(0)
        resp = await h.client.get("/readyz")
        assert resp.status == 200 and (await resp.json())["database"] == "ok"


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_sqlite_file_deleted_or_replaced_under_the_running_bot_makes_it_unready(tmp_path: Path,
                                                                                      writer: str) -> None:
    """Its connections write on into the deleted file, which nobody can open after: /readyz and chatops_database_up
    say so, with what to do, instead of ok."""
    from tests.botkit import running_bot

    path = tmp_path / "a.db"
    async with running_bot(f"sqlite+aiosqlite:///{path}", storage_options=f"writer: {writer}") as h:
        assert (await h.client.get("/readyz")).status == 200
        path.rename(tmp_path / "elsewhere.db")
        resp = await h.client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["database"] == (
            f"the SQLite file {path} was deleted while the bot runs: what it writes now is lost when it stops; "
            "restore the file from a backup or restart the bot")
        assert "chatops_database_up 0.0" in await (await h.client.get("/metrics")).text()
        # Alerts get 503 (a sender retries), not a 200 for an alert written into the lost file.
        alert = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down", "tool_source": "t"}
        status, answer, headers = await h.post("open", alert)
        assert (status, headers.get("Retry-After")) == (503, "5"), answer
        path.write_bytes(b"")  # another file at its path
        assert "was replaced while the bot runs" in (await (await h.client.get("/readyz")).json())["database"]
        path.unlink()
        (tmp_path / "elsewhere.db").rename(path)  # the one it opened, back in place
        assert (await h.client.get("/readyz")).status == 200
        assert (await h.post("open", alert))[0] == 200
        assert len(await h.incidents()) == 1  # only the alert that got its 200
        assert "chatops_database_up 1.0" in await (await h.client.get("/metrics")).text()


async def test_metrics_answer_within_seconds_when_the_database_does_not(tmp_path: Path) -> None:
    """A scrape waits 2 s for the store's figures (Prometheus gives up after 10 s, losing every metric), says the
    database is down, and reads the store once at a time."""
    from tests.botkit import running_bot

    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") as h:
        real, stuck_in = h.bot.db.sessions, asyncio.Event()

        @contextlib.asynccontextmanager
        async def stuck() -> AsyncIterator[Any]:  # a store that takes the connection and never answers
            await stuck_in.wait()
            async with real() as session:
                yield session

        async def no_answer() -> None:  # readiness's ping, which chatops_database_up is set from, as stuck
            await stuck_in.wait()

        real_ping = h.bot.db.ping
        h.bot.db.sessions, h.bot.db.ping = stuck, no_answer  # type: ignore[method-assign]
        started = time.monotonic()
        first, second = await asyncio.wait_for(asyncio.gather(h.client.get("/metrics"), h.client.get("/metrics")), 8)
        assert time.monotonic() - started < 4 and first.status == second.status == 200
        assert "chatops_database_up 0.0" in await first.text()
        stuck_in.set()
        h.bot.db.sessions, h.bot.db.ping = real, real_ping  # type: ignore[method-assign]
        await asyncio.sleep(0.1)
        assert "chatops_database_up 1.0" in await (await h.client.get("/metrics")).text()


def test_json_log_format(tmp_path: Path) -> None:
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
    proc = subprocess.Popen([CHATOPS, "serve", "--log-format", "json"], cwd=tmp_path, text=True,
                            env={**env, "CHATOPS_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"] == "slack: off (SLACK_BOT_TOKEN is not set)" for r in records)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    db = Database(url)
    await db.start()
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
    await db.dispose()
    (tmp_path / "app.yaml").write_text(f"storage: {{url: '{url}'}}\n")
    result = subprocess.run([CHATOPS, "audit", "verify", "-c", str(tmp_path / "app.yaml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"has schema version {SCHEMA_VERSION + 1}, but this chatops understands up to version {SCHEMA_VERSION}" in result.stderr


@contextlib.asynccontextmanager
async def upgraded(db: Database) -> AsyncIterator[Any]:
    """The store started again by this version (which upgrades it): a session on it, once it says so."""
    await db.dispose()
    again = Database(db.url, schema=db.schema)
    await again.start()
    try:
        async with again.sessions() as session:
            assert (await session.execute(text("SELECT version FROM schema_version"))).scalar_one() == SCHEMA_VERSION
            yield session
    finally:
        await again.dispose()


async def test_a_version_1_store_is_brought_up_to_date(db: Database) -> None:
    """Version 1 had no timers, no escalations and no incidents.route: create_all makes the new tables whole
    (escalations with version 3's `run`), and only the missing column is added (adding `run` again failed)."""
    async with db.engine.begin() as conn:
        await conn.execute(text("DROP TABLE escalations"))
        await conn.execute(text("DROP TABLE timers"))
        await conn.execute(text("ALTER TABLE incidents DROP COLUMN route"))
        await conn.execute(text("UPDATE schema_version SET version = 1"))
    async with upgraded(db) as session:
        assert (await session.execute(text("SELECT count(*) FROM escalations WHERE run = 0"))).scalar_one() == 0
        assert (await session.execute(text("SELECT count(*) FROM incidents WHERE route IS NULL"))).scalar_one() == 0


async def test_a_version_2_store_is_brought_up_to_date_keeping_its_rows(db: Database) -> None:
    """Version 3 added escalations.run: a store of version 2 (no such column) gets it, 0 for the rows it holds."""
    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    async with db.transaction() as session:
        session.add(Incident(group_key="k", title="t", status="triggered", severity="high", opened_at=now,
                             first_seen=now, last_seen=now))
    async with db.engine.begin() as conn:
        await conn.execute(text("INSERT INTO escalations (incident_id, policy, snapshot, state, next_step, note, "
                                "started_at, updated_at, run) VALUES (1, 'p', '{}', 'active', 2, '', :t, :t, 0)"),
                           {"t": now})
        await conn.execute(text("ALTER TABLE escalations DROP COLUMN run"))
        await conn.execute(text("UPDATE schema_version SET version = 2"))
    async with upgraded(db) as session:
        esc = await session.get(Escalation, 1)
        assert esc is not None and (esc.next_step, esc.run) == (2, 0)


async def test_a_version_3_store_keeps_its_long_keys_as_intake_now_makes_them(db: Database) -> None:
    """Version 3 kept a 600-character group key or fingerprint as it came; version 4's intake keeps such a key as
    its start and a hash (it had to fit PostgreSQL's index). The upgrade rewrites the rows, so the next alert of
    that key joins its open incident instead of opening a second one that never resolves the first."""
    from bot.alerts import bounded_key
    from storage.models import AlertRecord

    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    long_key, long_print = "dedup:open:" + "k" * 600, "f" * 600
    async with db.transaction() as session:
        session.add(Incident(group_key=long_key, title="t", status="triggered", severity="high", opened_at=now,
                             first_seen=now, last_seen=now))
        session.add(Incident(group_key="short", title="t", status="triggered", severity="high", opened_at=now,
                             first_seen=now, last_seen=now))
    async with db.transaction() as session:
        session.add(AlertRecord(incident_id=1, source="open", fingerprint=long_print, status="firing", severity="high",
                                summary="s", first_received=now, last_received=now))
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE schema_version SET version = 3"))
    async with upgraded(db) as session:
        keys = [i.group_key for i in (await session.execute(select(Incident).order_by(Incident.id))).scalars()]
        assert keys == [bounded_key(long_key), "short"]
        [alert] = (await session.execute(select(AlertRecord))).scalars().all()
        assert alert.fingerprint == bounded_key(long_print)


async def test_a_version_4_store_gets_the_index_of_alerts_by_incident(db: Database) -> None:
    """Version 4 had no index of alerts by incident: `incidents show` and the check a reopen makes (are its alerts
    firing in a later incident?) read the whole alerts table, with the store's write lock held for the reopen."""
    async with db.engine.begin() as conn:
        await conn.execute(text("DROP INDEX ix_alerts_incident"))
        await conn.execute(text("UPDATE schema_version SET version = 4"))
    async with upgraded(db) as session:
        if db.is_postgres:
            found = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_alerts_incident' AND schemaname = :s"
            assert "(incident_id)" in (await session.execute(text(found), {"s": db.schema})).scalar_one()
        else:
            plan = " ".join(str(row[-1]) for row in await session.execute(text(
                "EXPLAIN QUERY PLAN SELECT id FROM alerts WHERE incident_id = 1")))
            assert "USING INDEX ix_alerts_incident" in plan or "USING COVERING INDEX ix_alerts_incident" in plan, plan



async def test_a_version_5_store_gets_the_deliveries_digest_and_its_rows_keep_their_answers(db: Database) -> None:
    """Version 6 keeps a digest of each delivery's body, to tell a retry from another body under a reused id: a
    delivery stored before has none (NULL), and is answered as it was."""
    from storage.models import Delivery

    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    async with db.transaction() as session:
        session.add(Delivery(source="open", delivery_id="d-1", received_at=now, status_code=200, response={"a": 1}))
    async with db.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE deliveries DROP COLUMN digest"))
        await conn.execute(text("UPDATE schema_version SET version = 5"))
    async with upgraded(db) as session:
        row = await session.get(Delivery, ("open", "d-1"))
        assert row is not None and (row.status_code, row.response, row.digest) == (200, {"a": 1}, None)

# What an app.yaml that started before may hold (a deployment's own, or one copied from an earlier example): a short
# audit key, a role the bot does not know, a Slack user token, a catch-all route that tells nobody.
DOUBTFUL = """\
storage: {{url: 'sqlite+aiosqlite:///{db}'}}
server: {{port: {port}}}
audit: {{hmac_key: k3y}}
adapters:
  slack: {{bot_token: {token}, signing_secret: slack-signing-secret, api_url: '{api_url}'}}
people:
  - {{id: alice, name: Alice, roles: [responder, aprover], slack: U01ALICE}}
channels:
  - {{id: ops-slack, platform: slack, chat: C0OPS}}
sources:
  - {{id: am, kind: alertmanager, auth: {{bearer: am-bearer-token}}}}
routes:
  - {{match: {{team: dba}}, channels: [ops-slack]}}
  - {{match: {{}}}}
"""
DOUBTS = [
    "audit.hmac_key: (a secret, not shown) is shorter than 16 characters, so it is weak: give a longer one, such as "
    "the output of `openssl rand -hex 32`, and change to it with `chatops audit rekey --old-key-env VAR` (VAR holding "
    "this key; see the README, The audit log)",
    "adapters.slack.bot_token: (a secret, not shown) is not a bot token (expected a Slack bot token, which starts with "
    "xoxb-: the Bot User OAuth Token on the app's OAuth & Permissions page)",
    "people[0].roles[1]: unknown role 'aprover' (did you mean `approver`? known roles: approver, manager, "
    "responder)",
    "routes[1]: the catch-all route has neither channels nor escalation, so an alert no other route takes opens an "
    "incident nobody is told of: give it channels or an escalation policy",
]


async def test_serve_starts_on_what_an_earlier_version_took_and_warns_once(tmp_path: Path) -> None:
    """Code outside the project starts the bot with its own app.yaml: what it took before it still takes, each doubt
    said once, at WARNING, as the bot starts."""
    async with FakeSlack(token="xoxp-user-token") as slack:
        port = free_port()
        (tmp_path / "app.yaml").write_text(DOUBTFUL.format(db=tmp_path / "bot.db", port=port, token=slack.token,
                                                           api_url=slack.api_url))
        with serving(tmp_path, port) as proc:
            status, ready = await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", proc)
            assert status == 200 and ready["adapters"]["slack"] == "on", ready
    log = proc.stdout.read()
    for doubt in DOUBTS:
        assert log.count(doubt) == 1, log
        assert f"WARNING chatops.server: {doubt}" in log, log
    assert "xoxp-user-token" not in log and "k3y" not in log


def test_serve_with_a_broken_config_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text("server: {port: eighty}\n")
    result = subprocess.run([CHATOPS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "CHATOPS_CONFIG"})
    assert result.returncode == 2
    assert "server.port: expected a whole number, got 'eighty'" in result.stderr


def test_serve_refuses_an_override_template_that_would_break_every_card(tmp_path: Path) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "incident.slack.json.j2").write_text('{"text": "{{ incident.title }", "blocks": []}\n')
    (tmp_path / "app.yaml").write_text(f"server: {{port: {free_port()}}}\ntemplates: {{dir: tpl}}\n")
    result = subprocess.run([CHATOPS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "CHATOPS_CONFIG"})
    assert result.returncode == 2
    assert (f"templates.dir: template incident.slack.json.j2 ({tmp_path / 'tpl' / 'incident.slack.json.j2'}): "
            "line 1: unexpected '}'") in result.stderr
    assert not (tmp_path / "chatops.db").exists()  # refused before it opened the store


@pytest.mark.parametrize("folder_is", ["missing", "a file"])
def test_serve_on_a_store_whose_folder_is_not_there_says_which_folder_and_what_to_do(tmp_path: Path,
                                                                                      folder_is: str) -> None:
    folder = tmp_path / "var" / "chatops"  # as for /var/lib/chatops, before a package made it
    if folder_is == "a file":
        folder.parent.mkdir()
        folder.write_text("")
    (tmp_path / "app.yaml").write_text(f"server: {{port: {free_port()}}}\n"
                                       f"storage: {{url: 'sqlite+aiosqlite:///{folder}/chatops.db'}}\n")
    result = subprocess.run([CHATOPS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "CHATOPS_CONFIG"})
    assert result.returncode == 1
    said = f"the folder {folder} does not exist: create it" if folder_is == "missing" else f"{folder} is not a folder"
    assert f"cannot open the database at {folder / 'chatops.db'}: {said}" in result.stderr
    assert "fix storage.url in app.yaml" in result.stderr
    assert "unable to open database file" not in result.stderr and "sqlalche.me" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_serve_on_a_store_in_a_folder_it_may_not_write_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    (tmp_path / "app.yaml").write_text(f"server: {{port: {free_port()}}}\n"
                                       f"storage: {{url: 'sqlite+aiosqlite:///{folder}/chatops.db'}}\n")
    result = subprocess.run([CHATOPS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "CHATOPS_CONFIG"})
    assert result.returncode == 1
    assert f"the folder {folder} is not writable by this user" in result.stderr


def test_serve_where_there_is_no_app_yaml_runs_on_the_example_one_and_says_so(tmp_path: Path) -> None:
    """app.yaml is the embedded default (DESIGN.md): `chatops serve` in a folder without one, and without -c or
    $CHATOPS_CONFIG, runs on the example shipped with the code, and its log says which file and how to give another."""
    port = free_port()
    with serving(tmp_path, port) as proc:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", proc) == (200, {"status": "ok"})
    log = proc.stdout.read()
    assert (f"WARNING chatops.config: no -c, no $CHATOPS_CONFIG and no ./app.yaml: using the example config "
            f"shipped with the bot, {ROOT / 'app.yaml'}") in log
    assert "give your own with -c PATH or CHATOPS_CONFIG" in log
    assert (tmp_path / "chatops.db").exists()  # its storage.url, ./chatops.db, is where the bot was started


async def test_database_up_says_what_readiness_says_while_another_process_holds_the_store_write_locked(
        tmp_path: Path) -> None:
    """The scrape's counts are reads, which SQLite (WAL) answers while another process holds the write lock: the
    gauge said 1 while /readyz and intake answered 503."""
    import sqlite3

    from tests.botkit import running_bot

    path = tmp_path / "a.db"
    async with running_bot(f"sqlite+aiosqlite:///{path}") as h:
        for _ in range(50):  # (its first look may meet the bot's own writes as it starts, under load: a CI run did)
            if "chatops_database_up 1.0" in await (await h.client.get("/metrics")).text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("chatops_database_up was not 1 with the store free")
        # (the bot may be writing as it starts: tried again with the event loop free to let the bot finish, since a
        # connection's own busy wait blocks this loop, which is the bot's too)
        locker = sqlite3.connect(path, isolation_level=None, timeout=0.05)
        try:
            for _ in range(200):
                try:
                    locker.execute("BEGIN EXCLUSIVE")
                    break
                except sqlite3.OperationalError:
                    await asyncio.sleep(0.05)
            assert locker.in_transaction, "could not take the write lock"
            started = time.monotonic()
            scrape = await h.client.get("/metrics")
            assert scrape.status == 200 and time.monotonic() - started < 4
            assert "chatops_database_up 0.0" in await scrape.text()
            assert (await h.client.get("/readyz")).status == 503
            assert "chatops_database_up 0.0" in await (await h.client.get("/metrics")).text()
        finally:
            if locker.in_transaction:
                locker.execute("ROLLBACK")
            locker.close()
        for _ in range(50):  # the ping that waited on the lock ends once it is let go
            if "chatops_database_up 1.0" in await (await h.client.get("/metrics")).text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("chatops_database_up stayed 0 after the lock was let go")


def test_serve_on_a_file_that_is_no_database_or_beside_a_lock_file_not_its_own_stops_having_touched_nothing(
        tmp_path: Path) -> None:
    """storage.url naming another program's file (a typo): serve refused it, but had first made `<file>.lock` beside
    it, or emptied one that was there; a `<file>.lock` of another program's beside the store was emptied too."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    notes = tmp_path / "notes.txt"
    notes.write_text("some other program's data\n", encoding="utf-8")
    port = free_port()
    proc = start_bot(tmp_path, port, {"CHATOPS_DATABASE_URL": "sqlite+aiosqlite:///./notes.txt"})
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert ("cannot open the database at ./notes.txt: the file is there and is not a SQLite database (another "
            "program's file?): fix storage.url in app.yaml; nothing was written beside it") in log, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.yaml", "notes.txt"]
    assert notes.read_text(encoding="utf-8") == "some other program's data\n"

    lock = tmp_path / "chatops.db.lock"  # beside the store the bot would make
    lock.write_text("another tool's lock: 1\n", encoding="utf-8")
    proc = start_bot(tmp_path, port)
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert ("./chatops.db.lock is there and is not the bot's lock file (the bot writes its process id in it): another "
            "program uses that name; move it away, or give the bot a storage.url of its own") in log, log
    assert lock.read_text(encoding="utf-8") == "another tool's lock: 1\n"
    assert not (tmp_path / "chatops.db").exists()


def test_serve_says_a_database_error_without_sqlalchemys_background_link(tmp_path: Path) -> None:
    """A damaged SQLite file (its header, then no database): the log line ended with "(Background on this error at:
    https://sqlalche.me/...)", a link to SQLAlchemy's documentation, not what to do."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    (tmp_path / "chatops.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    proc = start_bot(tmp_path, free_port())
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    [said] = [line for line in proc.stdout.read().splitlines() if " ERROR " in line]
    assert said.endswith("cannot open the database at sqlite+aiosqlite:///./chatops.db: DatabaseError: file is not a "
                         "database"), said


def test_serve_waits_for_a_postgresql_that_does_not_answer_yet(tmp_path: Path, pg_schema: str) -> None:
    """A replica started while PostgreSQL failed over (or before it was up) exited at once, "cannot open the
    database", and stayed down unless something restarted it. It tries again for a minute, saying so, and starts once
    the server answers. (Here the server is reached through a forwarder that starts listening a few seconds late.)"""
    from sqlalchemy.engine import make_url

    from tests.conftest import drop_schema, postgres_url

    real = make_url(postgres_url())
    port, late = free_port(), free_port()
    url = real.set(host="127.0.0.1", port=late).render_as_string(hide_password=False)
    example = (ROOT / "app.yaml").read_text(encoding="utf-8")
    storage = "  url: ${CHATOPS_DATABASE_URL:-sqlite+aiosqlite:///./chatops.db}"
    assert storage in example
    (tmp_path / "app.yaml").write_text(example.replace(storage, f"{storage}\n  schema: {pg_schema}", 1),
                                       encoding="utf-8")
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(real.host or "127.0.0.1", real.port or 5432)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with serving(tmp_path, port, {"CHATOPS_DATABASE_URL": url}, "--log-level", "INFO") as proc:
            deadline = time.monotonic() + 20
            while "does not answer" not in proc.stdout.read():
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
            server = asyncio.run_coroutine_threadsafe(asyncio.start_server(forward, "127.0.0.1", late), loop).result()
            assert wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=30)[0] == 200
        said = proc.stdout.read()
        assert f"WARNING chatops.server: the database at postgresql+asyncpg://" in said
        assert "; trying again in 1 s, for up to 60 s in all" in said and "cannot open the database" not in said, said
        loop.call_soon_threadsafe(server.close)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        asyncio.run(drop_schema(postgres_url(), pg_schema))


def test_what_counts_as_a_database_that_does_not_answer_at_start() -> None:
    """What serve waits for (bot.server.no_answer): a refused or reset connection, none of a name's several addresses
    answering (Python's "Multiple exceptions"), a server starting up, wrapped as SQLAlchemy wraps them; not a name
    that does not resolve, nor a server that answered no."""
    from socket import gaierror

    from sqlalchemy.exc import OperationalError

    from bot.server import no_answer

    several = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), [Errno 111] Connect "
                      "call failed ('127.0.0.1', 5432)")
    assert no_answer(several) is several
    wrapped = OperationalError("connect", None, ConnectionRefusedError(111, "Connect call failed"))
    assert isinstance(no_answer(wrapped), ConnectionRefusedError)
    starting = type("CannotConnectNowError", (Exception,), {})("the database system is starting up")
    assert no_answer(RuntimeError("x").with_traceback(None)) is None
    try:
        raise RuntimeError("connect failed") from starting
    except RuntimeError as exc:
        assert no_answer(exc) is starting
    assert no_answer(gaierror(-2, "Name or service not known")) is None
    assert no_answer(type("InvalidPasswordError", (Exception,), {})("password authentication failed")) is None
