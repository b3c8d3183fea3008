"""The intake writer process (`storage.writer: process`): the same guarantees as the writer thread.

A 2xx only after the commit, the `now` of the bot's clock (a FakeClock here), idempotency, order, isolation of
a submission that breaks its batch, metrics and commit hooks in the bot; 503 when the process dies with a batch
in flight, and a new process for the next; no writer process outlives a bot killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from bot.alerts import parse_generic
from bot.clock import FakeClock
from bot.logs import JsonFormatter, TextFormatter
from storage.db import Database
from storage.models import AlertRecord, AuditEvent, Escalation, Incident, Timer
from storage.writer import from_wire_time, wire_time
from tests import botkit
from tests.botkit import T0, Harness, running_bot
from tests.conftest import free_port
from tests.intake_writer_hooks import explode_on_boom
from tests.test_intake_crash import every_acked_alert_stored_once, stream, streaming
from tests.test_intake_pipeline import post_in_order, received_order
from tests.test_serve import CHATOPS, wait_http

ESCALATING = """
audit: {hmac_key: writer-key-0123456789ab}
timezone: Europe/Berlin
channels: [{id: ops, platform: slack, chat: C0OPS}]
sources: [{id: open, kind: generic, auth: none}]
rotations:
  - {id: primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02}
escalation_policies:
  - {id: standard, steps: [{notify: {rotation: primary}, wait: 5m}]}
routes: [{match: {}, channels: [ops], escalation: standard}]
"""


@asynccontextmanager
async def process_bot(tmp_path: Path, *, base: str = botkit.CONFIG, people: str = botkit.PEOPLE,
                      clock: FakeClock | None = None, on_open: Callable[..., None] | None = None
                      ) -> AsyncIterator[Harness]:
    """The bot in-process on a fake clock (tests.botkit.running_bot), its intake writing through a writer process."""
    def prepare(bot: Any) -> None:
        if on_open is not None:
            bot.intake.on_open = on_open
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", base=base, people=people, clock=clock,
                           storage_options="writer: process", prepare=prepare) as harness:
        yield harness


def alert(asset: str = "web-1", message: str = "latency", status: str = "firing", **more: Any) -> dict[str, Any]:
    return {"asset_name": asset, "signature": "Latency", "severity": "high", "message": message,
            "tool_source": "bench", "status": status, **more}


def writer_pid(h: Harness) -> int:
    process = h.bot.intake._process
    assert process is not None and process.pid is not None, "no writer process"
    return process.pid


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (reaped between the open and the read: ESRCH)
        return False


async def gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not running(pid), f"process {pid} is still running"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return out


@asynccontextmanager
async def write_lock(db: Path) -> AsyncIterator[None]:
    """Hold SQLite's write lock (as another writer would): the writer process waits in BEGIN IMMEDIATE.

    Taken off the event loop: the bot's own writers (the timer tick) may hold it for a moment and need the loop."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.bot.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_alerts_are_committed_by_the_writer_process_and_counted_here(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        assert h.bot.intake._in_process()
        bodies = [alert(f"web-{i}") for i in range(3)] + [alert("web-0", "again")]
        results = await post_in_order(h, bodies)
        assert [r[0] for r in results] == [200] * 4
        assert [r[1]["results"][0]["change"] for r in results] == ["opened", "opened", "opened", "duplicate"]
        assert results[0][2]["Content-Type"] == "application/json; charset=utf-8"
        pid = writer_pid(h)
        assert pid != os.getpid() and pid in children(os.getpid())
        assert len(await h.incidents()) == 3
        assert await h.count(AlertRecord) == 3
        assert {o[3] for o in await h.outbox()} >= {"incident.opened"}
        assert sample(h, "chatops_alerts_received_total", source="open", status="firing") == 4
        assert sample(h, "chatops_audit_events_total") == await h.count(AuditEvent) > 0
        async with h.bot.db.sessions() as s:
            assert (await h.bot.audit.verify(s)).ok
    await gone(pid)  # the writer process does not outlive the bot's stop()


async def test_the_fake_clock_now_travels_with_each_batch(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        assert (await h.post("open", alert()))[0] == 200
        h.clock.advance(timedelta(minutes=20))  # past grouping.window (15m): the next one opens a new incident
        status, answer, _ = await h.post("open", alert(message="later"))
        assert status == 200 and answer["results"][0]["change"] == "duplicate"  # the same alert, still firing
        h.clock.advance(timedelta(seconds=90))
        status, answer, _ = await h.post("open", alert(message="resolved", status="resolved"))
        assert answer["results"][0]["change"] == "resolved"
        h.clock.advance(timedelta(minutes=1))
        status, answer, _ = await h.post("open", alert(message="back"))
        assert answer["results"][0]["change"] == "opened"
        first, second = await h.incidents()
        assert first.opened_at == T0 and first.last_seen == T0 + timedelta(minutes=21, seconds=30)
        assert first.resolved_at == T0 + timedelta(minutes=21, seconds=30)
        assert second.opened_at == T0 + timedelta(minutes=22, seconds=30) and second.previous_id == first.id
        async with h.bot.db.sessions() as s:
            times = (await s.execute(select(AuditEvent.at).order_by(AuditEvent.seq))).scalars().all()
        assert times[0] == T0 and times[-1] == T0 + timedelta(minutes=22, seconds=30)
        # time to resolve, as Intake._answer observes it, from the writer process's figures
        assert sample(h, "chatops_time_to_resolve_seconds_count", severity="high") == 1
        assert sample(h, "chatops_time_to_resolve_seconds_sum", severity="high") == 21 * 60 + 30


def test_a_batch_time_travels_as_microseconds_and_comes_back_the_same() -> None:
    for moment in (T0, datetime(2026, 3, 29, 0, 59, 59, 999_999, tzinfo=UTC), datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC),
                   datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)):
        sent = wire_time(moment)
        assert type(sent) is int
        back = from_wire_time(pickle.loads(pickle.dumps(sent)))
        assert back == moment and back.tzinfo is UTC
    # A clock in another zone: its time travels as it is (pickled whole), so nothing of it is lost.
    berlin = datetime(2026, 3, 29, 3, 0, 0, 5, tzinfo=ZoneInfo("Europe/Berlin"))
    assert wire_time(berlin) is berlin
    back = from_wire_time(pickle.loads(pickle.dumps(wire_time(berlin))))
    assert back == berlin and back.tzinfo == ZoneInfo("Europe/Berlin")


async def test_truncated_alerts_travel_to_the_writer_process(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        payload = json.loads(botkit.fixture("alertmanager/03-highcpu-firing.json"))
        payload["truncatedAlerts"] = 7
        status, body, _ = await h.post("am", payload)
        assert status == 200 and body["truncated"] == 7
        [inc] = await h.incidents()
        assert (await h.actions(inc.id))[-1] == "alerts.truncated"
        assert sample(h, "chatops_alerts_truncated_total", source="am") == 7


async def test_a_repeated_delivery_id_is_replayed_not_applied(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        first = await h.post("open", alert(), headers={"X-Delivery-ID": "d-1"})
        again = await h.post("open", alert(), headers={"X-Delivery-ID": "d-1"})
        assert first[0] == again[0] == 200 and again[1] == first[1]
        assert again[2]["X-Idempotent-Replay"] == "true" and "X-Idempotent-Replay" not in first[2]
        both = await asyncio.gather(h.post("open", alert("web-9"), headers={"X-Delivery-ID": "d-2"}),
                                    h.post("open", alert("web-9"), headers={"X-Delivery-ID": "d-2"}))
        assert [b[1] for b in both][0] == [b[1] for b in both][1]
        async with h.bot.db.sessions() as s:
            counts = (await s.execute(select(AlertRecord.received_count).order_by(AlertRecord.id))).scalars().all()
        assert counts == [1, 1]


async def test_escalations_start_in_the_batch_and_wake_the_timers(tmp_path: Path) -> None:
    async with process_bot(tmp_path, base=ESCALATING) as h:
        commits, wakes = [], []
        after_commit, timers_due = h.bot.intake.after_commit, h.bot.intake.timers_due
        assert after_commit is not None and timers_due is not None

        def committed() -> None:
            commits.append(1)
            after_commit()

        def due() -> None:
            wakes.append(1)
            timers_due()

        h.bot.intake.after_commit, h.bot.intake.timers_due = committed, due
        assert (await h.post("open", alert(severity="critical")))[0] == 200
        async with h.bot.db.sessions() as s:
            esc = await s.get(Escalation, 1)
            timers = (await s.execute(select(Timer.kind))).scalars().all()
        assert esc is not None and esc.policy == "standard" and "escalation.step" in timers
        assert (commits, wakes) == ([1], [1])
        # The same alert again: no escalation starts and no chat work is queued, so neither is woken.
        assert (await h.post("open", alert(message="again")))[0] == 200
        assert (commits, wakes) == ([1], [1])
        # Another tool reports it: grouped into the incident, whose message is redrawn (outbox rows).
        assert (await h.post("open", alert(message="again", tool_source="zabbix")))[0] == 200
        assert (commits, wakes) == ([1, 1], [1])
        deadline = time.monotonic() + 10  # the woken tick runs the first step (due at once)
        while "escalation.step" not in await h.actions() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "escalation.step" in await h.actions()


async def test_a_rise_to_critical_brings_a_step_waiting_for_the_morning_forward_in_the_writer_process(
        tmp_path: Path) -> None:
    async def audited(action: str) -> None:
        deadline = time.monotonic() + 10
        while action not in await h.actions() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert action in await h.actions()

    async with process_bot(tmp_path, base=ESCALATING) as h:  # 05:00 in Berlin: after hours
        assert (await h.post("open", alert(severity="medium")))[0] == 200
        await audited("escalation.deferred")  # medium pages nobody at night
        assert "escalation.step" not in await h.actions()
        assert (await h.post("open", alert(severity="critical")))[0] == 200
        await audited("escalation.resumed")  # written by the writer process, in the alert's transaction
        await audited("escalation.step")  # and the woken tick pages


async def test_a_submission_that_breaks_its_batch_is_isolated_in_the_writer_process(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="chatops.intake")
    async with process_bot(tmp_path, base=ESCALATING, on_open=explode_on_boom) as h:
        assert (await h.post("open", alert("warm-up")))[0] == 200
        bodies = [alert(f"host-{i}", "boom" if i == 4 else f"m{i}") for i in range(10)]
        async with write_lock(tmp_path / "bot.db"):  # they queue up and are applied together
            pending = asyncio.create_task(post_in_order(h, bodies))
            await asyncio.sleep(0.3)
        results = await pending
        assert [r[0] for r in results] == [200] * 4 + [500] + [200] * 5
        assert results[4][1] == {"error": "internal error; nothing was stored"}
        assert await received_order(h) == ["latency"] + [f"m{i}" for i in range(10) if i != 4]
        assert "boom" not in {i.title for i in await h.incidents()}
    # The log says so with the writer process's traceback, its lines kept (it was one line of \n escapes)
    [record] = [r for r in caplog.records if r.getMessage() == "intake failed for a delivery from open"]
    said = TextFormatter().format(record).splitlines()
    assert said[0] == "intake failed for a delivery from open"
    boom = "RuntimeError: boom (tests/intake_writer_hooks.py)"
    assert said[1] == "Traceback (most recent call last):" and said[-1] == boom
    assert json.loads(JsonFormatter().format(record))["exception"].endswith(boom)


async def test_the_writer_process_dying_mid_batch_answers_503_and_the_next_batch_gets_a_new_one(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        assert (await h.post("open", alert("before")))[0] == 200
        first = writer_pid(h)
        async with write_lock(tmp_path / "bot.db"):
            posting = asyncio.create_task(h.post("open", [alert("lost-1"), alert("lost-2")]))
            bad = asyncio.create_task(h.post("open", b'{"asset_name": "web-1"'))  # no JSON: no retry can store it
            await asyncio.sleep(0.3)  # the writer took the batch and waits for the lock
            assert not posting.done() and not bad.done()
            os.kill(first, signal.SIGKILL)
            status, answer, headers = await asyncio.wait_for(posting, 10)
            bad_status, bad_answer, _ = await asyncio.wait_for(bad, 10)
        assert status == 503 and headers["Retry-After"] == "5"
        assert answer == {"error": "the database is unavailable; nothing was stored, retry later"}
        # The bad body went to the writer process unread; unanswered, it is read here: 400, not "retry later".
        assert (bad_status, bad_answer) == (400, {"error": "malformed JSON at line 1, column 23: Expecting ',' delimiter"})
        assert sample(h, "chatops_alert_rejected_total", source="open", reason="malformed") == 1
        await gone(first)
        status, answer, _ = await h.post("open", alert("after"))
        assert status == 200, answer
        assert writer_pid(h) != first
        async with h.bot.db.sessions() as s:
            stored = (await s.execute(select(AlertRecord.fingerprint))).scalars().all()
        assert len(stored) == 2  # "before" and "after", nothing of the lost batch
        assert sample(h, "chatops_alerts_received_total", source="open", status="firing") == 2
        async with h.bot.db.sessions() as s:
            assert (await h.bot.audit.verify(s)).ok


async def test_a_writer_process_that_stops_answering_is_given_up_and_the_next_batch_gets_a_new_one(
        tmp_path: Path) -> None:
    """A writer process stopped (SIGSTOP; hung) held every alert request, and the bot's stop, for as long as it was:
    no answer after 200 s, nothing in the log. Past writer_wait it is killed: 503, and the next batch is stored."""
    async with process_bot(tmp_path) as h:
        assert (await h.post("open", alert("before")))[0] == 200
        first = writer_pid(h)
        h.bot.intake.writer_wait = 1.0
        os.kill(first, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, answer, headers = await asyncio.wait_for(h.post("open", alert("held")), 10)
            assert (status, headers["Retry-After"]) == (503, "5") and time.monotonic() - started < 5
        finally:
            if running(first):
                os.kill(first, signal.SIGCONT)
        await gone(first)
        h.bot.intake.writer_wait = 30.0  # (the new process's start counts in its first batch's wait)
        status, answer, _ = await h.post("open", alert("after"))
        assert status == 200, answer
        assert writer_pid(h) != first
        async with h.bot.db.sessions() as s:
            assert len((await s.execute(select(AlertRecord.fingerprint))).scalars().all()) == 2  # not "held"


async def test_database_unavailable_answers_503_then_the_retry_lands(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        good = h.bot.db
        broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
        h.bot.intake.db = broken  # a writer process for that database, which cannot open it
        results = await post_in_order(h, [alert(f"web-{i}") for i in range(3)])
        assert [r[0] for r in results] == [503] * 3
        h.bot.intake.db = good
        await broken.dispose()
        assert (await h.post("open", alert()))[0] == 200
        assert await h.count(AlertRecord) == 1 and await h.count(Incident) == 1


async def test_stop_answers_everything_queued(tmp_path: Path) -> None:
    async with process_bot(tmp_path) as h:
        intake = h.bot.intake
        source = next(s for s in h.bot.config.sources if s.id == "open")
        pending = [asyncio.create_task(intake.submit(source, parse_generic(alert(f"h{i % 5}", f"m{i}"), "open"), None))
                   for i in range(50)]
        await asyncio.sleep(0)
        await intake.stop()
        assert [t.result().status for t in pending] == [200] * 50
        assert await received_order(h) == [f"m{i}" for i in range(50)]
        intake.start()  # process_bot stops the bot again on the way out


async def test_sigkill_of_the_bot_leaves_no_writer_process_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"""
storage: {{url: "sqlite+aiosqlite:///{tmp_path / 'crash.db'}", writer: process}}
server: {{port: {port}}}
audit: {{hmac_key: crash-key-0123456789ab}}
channels: [{{id: ops, platform: slack, chat: C0OPS}}]
sources: [{{id: gen, kind: generic, auth: none}}]
routes: [{{match: {{}}, channels: [ops]}}]
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([CHATOPS, "serve", "-c", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True)

    proc = start()
    acked: list[str] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        sending = await streaming(port, acked, 300)
        writers = children(proc.pid)
        assert len(writers) == 1, f"expected one writer process under the bot, found {writers}"
        proc.send_signal(signal.SIGKILL)  # requests are in flight, the writer is in or between transactions
        proc.wait(timeout=10)
        await asyncio.wait_for(sending, timeout=30)
        await gone(writers[0])  # the writer process does not outlive the bot it wrote for
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 300

    proc = start()  # a new bot on the same database: every acknowledged alert is there once
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        await stream(port, [], 5)  # its own writer process starts and commits
        writers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert writers
        for writer in writers:  # nor a clean stop
            await gone(writer)
    finally:
        if proc.poll() is None:
            proc.kill()
    every_acked_alert_stored_once(tmp_path / "crash.db", acked, cfg)


async def test_a_delivery_id_reused_for_a_different_body_is_a_422(tmp_path: Path) -> None:
    """The writer process reads the body: a different one under a stored id, or under one id in one batch, is
    refused as the writer thread refuses it, and counted."""
    import gzip

    async with process_bot(tmp_path) as h:
        first = await h.post("open", alert(), headers={"X-Delivery-ID": "d-1"})
        status, answer, headers = await h.post("open", alert(status="resolved"), headers={"X-Delivery-ID": "d-1"})
        assert (status, "X-Idempotent-Replay" in headers) == (422, False)
        assert answer == {"error": "X-Delivery-ID 'd-1' was used within the last 24 h for a different body: give "
                                   "each delivery its own id"}
        again = await h.post("open", gzip.compress(json.dumps(alert()).encode()),
                             headers={"X-Delivery-ID": "d-1", "Content-Encoding": "gzip"})
        assert (again[0], again[1], again[2]["X-Idempotent-Replay"]) == (200, first[1], "true")
        answers = await asyncio.gather(*(h.post("open", alert(f"db-{i}"), headers={"X-Delivery-ID": "d-2"})
                                         for i in range(10)))
        assert sorted(status for status, _, _ in answers) == [200] + [422] * 9
        assert sample(h, "chatops_alert_rejected_total", source="open", reason="delivery_id_reused") == 10
        [inc, _] = await h.incidents()
        assert (inc.status, inc.firing_count) == ("triggered", 1)
