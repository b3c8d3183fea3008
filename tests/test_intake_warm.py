"""Intake's writer keeps the incidents and alerts it last wrote between batches (handlers/intake.py, _Warm): the
store must come out exactly as when every batch reads them again, whatever happens between batches.

The same stream of batches goes to two writers (the intake writer process's handler, run here), one that keeps
them and one made to read everything each time; between batches, other connections change the store as people
do (a resolve, a reopen), and a batch fails and is rolled back. The incidents, alerts, audit chain and outbox of
the two stores are compared row by row, and the writer that keeps them is shown to have skipped its reads.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters import SETTINGS_MODELS
from bot.config import parse_config
from handlers.intake_child import writer_process_handler
from storage.db import Database
from tests.botkit import T0
from tests.intake_writer_hooks import explode_on_boom

CONFIG = """
audit: {hmac_key: warm-key-0123456789ab}
timezone: Europe/Berlin
channels: [{id: ops, platform: slack, chat: C0OPS}]
sources:
  - {id: gen, kind: generic, auth: none}
  - {id: am, kind: alertmanager, auth: none}
people: [{id: alice, name: Alice, slack: U01ALICE}]
rotations: [{id: primary, members: [alice], shift: 1w, handoff: "mon 09:00", start: 2026-11-02}]
escalation_policies: [{id: standard, steps: [{notify: {rotation: primary}, wait: 5m}]}]
silences:
  - {id: quiet, matchers: {instance: "=~quiet-.*"}, starts: 2026-11-24T00:00:00Z, ends: 2026-11-24T05:00:00Z}
routes:
  - {match: {team: dba}, channels: [ops], escalation: standard}
  - {match: {}, channels: [ops], escalation: standard}
"""


def generic(asset: str, signature: str = "HighLatency", severity: str = "high", status: str = "firing",
            message: str = "p99 above 2s") -> bytes:
    return json.dumps({"asset_name": asset, "signature": signature, "severity": severity, "message": message,
                       "tool_source": "bench", "status": status}).encode()


def alertmanager(status: str, *names: str) -> bytes:
    return json.dumps({"version": "4", "status": status, "receiver": "bot", "groupKey": "{}:{}",
                       "alerts": [{"status": status, "labels": {"alertname": n, "instance": "db-01", "team": "dba",
                                                                "severity": "critical"},
                                   "annotations": {"summary": f"{n} on db-01"}, "fingerprint": f"fp-{n}",
                                   "startsAt": "2026-11-24T03:00:00Z", "endsAt": "0001-01-01T00:00:00Z"}
                                  for n in names]}).encode()


def outside(db: Path, sql: str, *args: Any) -> None:
    """A change made by another connection, as the bot's other writers (a person's click) make them."""
    with sqlite3.connect(db) as conn:
        conn.execute(sql, args)


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
                for table in ("incidents", "alerts", "audit_events", "outbox", "escalations", "timers")}


async def writer(tmp: Path, name: str, *, warm: bool) -> tuple[Any, Path, list[str]]:
    path = tmp / f"{name}.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    await database.start()
    await database.dispose()
    config = parse_config(CONFIG, adapter_models=SETTINGS_MODELS, env={}).config
    handler = writer_process_handler(url=f"sqlite:///{path}", config=config, on_open=explode_on_boom,
                                     max_batch=1000)
    if not warm:
        keeper = handler.intake._warm

        def never(raw: Any) -> bool:
            keeper.forget()
            return False
        keeper.check = never  # type: ignore[method-assign]
    reads: list[str] = []
    handler.traced = reads  # (the statements are traced once the connection is open: see run)
    return handler, path, reads


def incident_reads(reads: list[str]) -> int:
    return sum(1 for sql in reads if sql.startswith("SELECT") and "FROM incidents WHERE group_key IN" in sql)


def run(handler: Any, now: Any, *bodies: tuple[str, bytes]) -> list[int]:
    """One transaction's worth: every body in one message, as the HTTP front sends what queued together."""
    traced = getattr(handler, "traced_conn", None)
    if traced is not None and traced is not handler.conn:  # a failed transaction closed it: trace the next one
        handler.traced_conn = None
    answers = handler([(now, [(source, body, None, 0, None, None) for source, body in bodies])])
    trace(handler)
    return [status for status, *_ in answers[0][0]]


def trace(handler: Any) -> None:
    """Record the statements of the writer's connection from now on."""
    conn = handler.conn
    if conn is not None and getattr(handler, "traced_conn", None) is not conn:
        conn.connection.driver_connection.set_trace_callback(handler.traced.append)
        handler.traced_conn = conn


async def test_warm_writer_stores_what_a_cold_one_does(tmp_path: Path) -> None:
    stores = [await writer(tmp_path, "warm", warm=True), await writer(tmp_path, "cold", warm=False)]
    statuses: list[list[list[int]]] = [[], []]

    def step(minutes: float, *bodies: tuple[str, bytes]) -> None:
        for (handler, _, _), out in zip(stores, statuses):
            out.append(run(handler, T0 + timedelta(minutes=minutes), *bodies))

    def both(sql: str, *args: Any) -> None:
        for _, path, _ in stores:
            outside(path, sql, *args)

    step(0, ("gen", generic("web-01")), ("gen", generic("web-02")), ("am", alertmanager("firing", "DiskFull")))
    # New alerts' records are read again once (inserted without asking their ids): DiskSlow is new here.
    for minutes in (1, 1.5):
        step(minutes, ("gen", generic("web-01")), ("gen", generic("web-02")),
             ("am", alertmanager("firing", "DiskFull", "DiskSlow")))
    marks = [len(reads) for _, _, reads in stores]
    for i in range(2, 6):  # repeats: the warm writer reads nothing for these
        step(i, ("gen", generic("web-01", message=f"repeat {i}")), ("gen", generic("web-02")),
             ("am", alertmanager("firing", "DiskFull", "DiskSlow")))
    repeats = [incident_reads(reads[mark:]) for (_, _, reads), mark in zip(stores, marks)]
    step(6, ("gen", generic("web-01", severity="critical")))  # the severity rises: rerouted, escalation reconsidered
    step(7, ("gen", generic("web-02", status="resolved")))  # its source resolves it
    step(8, ("gen", generic("web-02")))  # fires again: a new incident, linked to the last
    # A person resolves the first incident (another connection): the next repeat must not join it.
    both("UPDATE incidents SET status = 'resolved', resolved_at = '2026-11-24 04:08:30.000000' WHERE id = 1")
    step(9, ("gen", generic("web-01", message="after the resolve")))
    both("UPDATE incidents SET status = 'acknowledged' WHERE id = 3")  # acknowledged elsewhere, nothing else changes
    step(10, ("am", alertmanager("firing", "DiskFull")), ("gen", generic("quiet-01")))
    # A batch that fails (a new incident titled boom breaks on_open): rolled back, retried one at a time.
    step(11, ("gen", generic("web-01", message="in the failed batch")),
         ("gen", generic("boom-01", signature="Boom", message="boom")), ("gen", generic("web-02")))
    step(12, ("gen", generic("web-01")), ("gen", generic("web-02")), ("am", alertmanager("resolved", "DiskFull")))
    both("UPDATE incidents SET status = 'triggered', resolved_at = NULL WHERE id = 1")  # reopened by a person
    step(13, ("gen", generic("web-01", status="resolved")), ("am", alertmanager("resolved", "DiskSlow")))
    for i in range(14, 17):
        step(i, ("gen", generic("web-01")), ("gen", generic("web-03")), ("gen", generic("quiet-01")))

    (warm, warm_path, warm_reads), (_, cold_path, cold_reads) = stores
    assert statuses[0] == statuses[1]
    assert [500] == [s for batch in statuses[0] for s in batch if s != 200]  # only the boom alert failed
    warm_dump, cold_dump = dump(warm_path), dump(cold_path)
    for table in warm_dump:
        assert warm_dump[table] == cold_dump[table], table
    assert len(warm_dump["incidents"]) >= 5 and len(warm_dump["audit_events"]) > 60
    # The cold writer read the incidents for each repeat; the warm one kept them from the batch before. Elsewhere
    # (the person's changes, the failed batch, alerts new to it) it read them again, and stored what the cold one did.
    assert repeats == [0, 4]
    assert incident_reads(warm_reads) < incident_reads(cold_reads)
    assert warm.intake._warm.incidents  # kept after the last batch


@pytest.mark.parametrize("change", ["outside", "rolled back"])
async def test_a_kept_incident_is_read_again_after_another_write(tmp_path: Path, change: str) -> None:
    handler, path, reads = await writer(tmp_path, "one", warm=True)
    assert run(handler, T0, ("gen", generic("web-01"))) == [200]
    assert run(handler, T0 + timedelta(seconds=30), ("gen", generic("web-01"))) == [200]  # reads its new record
    reads.clear()
    assert run(handler, T0 + timedelta(minutes=1), ("gen", generic("web-01"))) == [200]
    assert incident_reads(reads) == 0  # the repeat was served from what the writer kept
    if change == "outside":
        outside(path, "UPDATE incidents SET status = 'resolved' WHERE id = 1")
        expected_incidents = 2  # the resolved one, and the one the repeat opened
    else:
        # Rolled back after the batch was applied (as a failed COMMIT would): the head it expected never came.
        conn = handler.conn
        with conn.begin() as transaction:
            handler.intake._apply(conn, [handler._submission(("gen", generic("web-01"), None, 0, None, None),
                                                             [])[2]], T0 + timedelta(minutes=2))
            transaction.rollback()
        expected_incidents = 1
    assert run(handler, T0 + timedelta(minutes=3), ("gen", generic("web-01"))) == [200]
    assert incident_reads(reads) == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM incidents").fetchone()[0] == expected_incidents
        count = conn.execute("SELECT received_count FROM alerts ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert count == (1 if change == "outside" else 4)


async def test_what_is_kept_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its limit the writer forgets everything and reads again: a flood of new alerts (or of "resolved" for
    alerts it never heard of) cannot grow it without end, and what it stores is unchanged."""
    from handlers.intake import _Warm

    monkeypatch.setattr(_Warm, "LIMIT", 4)
    handler, path, _ = await writer(tmp_path, "small", warm=True)
    sizes = []
    for minute in range(8):
        bodies = [("gen", generic(f"host-{minute}-{i}")) for i in range(3)]
        bodies.append(("gen", generic(f"gone-{minute}", status="resolved")))  # no such alert: a key kept with nothing
        bodies.append(("gen", generic("host-0-0")))
        assert run(handler, T0 + timedelta(minutes=minute), *bodies) == [200] * 5
        kept = handler.intake._warm
        sizes.append(max(len(kept.incidents), len(kept.records), len(kept.open_by_key)))
    assert max(sizes) <= 4 + 5  # the limit, plus one batch's worth read since it was last forgotten
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM incidents").fetchone()[0] == 8 * 3
        assert conn.execute("SELECT received_count FROM alerts WHERE id = 1").fetchone()[0] == 9


async def test_a_repeat_with_its_links_in_another_order_is_stored_as_a_cold_writer_stores_it(tmp_path: Path) -> None:
    """JSON columns are kept as their text, as a read gives them: a dict compared with == does not see its keys
    change order, and the warm writer left the row as it was where a cold one rewrote it."""
    def body(links: dict[str, str]) -> bytes:
        return json.dumps({"asset_name": "web-01", "signature": "A", "severity": "high", "message": "m",
                           "tool_source": "t", "links": links}).encode()

    stores = [await writer(tmp_path, "warm", warm=True), await writer(tmp_path, "cold", warm=False)]
    ab = {"runbook": "http://r/1", "dash": "http://d/1"}
    ba = {"dash": "http://d/1", "runbook": "http://r/1"}
    for minute, links in ((0, ab), (1, ab), (2, ba)):  # new; repeated (kept since); repeated, its keys reordered
        for handler, _, _ in stores:
            assert run(handler, T0 + timedelta(minutes=minute), ("gen", body(links))) == [200]
    stored = []
    for _, path, _ in stores:
        with sqlite3.connect(path) as conn:
            stored.append(conn.execute("SELECT links FROM alerts").fetchall())
    assert stored[0] == stored[1] == [('{"dash": "http://d/1", "runbook": "http://r/1"}',)]
