"""`chatops report`: MTTA, MTTR, breakdowns, escalation rate, noise reduction and pages over a window.

A real store (SQLite in tmp_path; PostgreSQL in a schema of its own when CI has one) holds six incidents,
their alerts, and audit events written through the real chain; the command's output is read as a user would.

    #1 critical dba   opened 2 Nov 09:00  acked +4 min (again +30 min), resolved +1 h   3 alerts  step 1 page
                                          (reopened 4 Nov 09:00, resolved again 5 Nov 09:00: measured once)
    #2 critical dba   opened 3 Nov 09:00  acked +6 min, resolved +2 h                    4 alerts  step 2 page
    #3 high     -     opened 4 Nov 09:00  triggered, Escalate pressed                    2 alerts
    #4 info     web   opened 5 Nov 09:00  triggered                                      1 alert
    #5 critical dba   opened 20 Oct (before the window): acked +60 min, step 3           5 alerts
    #6 low      web   opened 9 Nov 00:00, exactly at the window's end: not in it         1 alert
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.cli import main
from bot.model import Actor
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import AlertRecord, Incident
from storage.report import Durations, human_duration, percent
from tests.conftest import drop_schema, postgres_url

SINCE, UNTIL = datetime(2026, 11, 2, 9, 0, tzinfo=UTC), datetime(2026, 11, 9, tzinfo=UTC)
WINDOW = ["--since", "2026-11-02T09:00:00Z", "--until", "2026-11-09T00:00:00+00:00"]
KEY = "r3port-k3y-0123456789"
ALICE = Actor("slack", "U01ALICE", "Alice", "alice")
DAY, MIN = timedelta(days=1), timedelta(minutes=1)


def incident(severity: str, route: str | None, opened: datetime, *, status: str = "triggered",
             resolved: datetime | None = None) -> Incident:
    return Incident(group_key=f"{severity}-{opened.isoformat()}", title=f"{severity} trouble", status=status,
                    severity=severity, route=route, opened_at=opened, first_seen=opened, last_seen=opened,
                    resolved_at=resolved, resolved_by="alice" if resolved else None)


async def seed(db: Database) -> None:
    """The six incidents of the module docstring, their alerts, and their audit trail."""
    t0 = SINCE
    specs = [  # (incident, alerts)
        (incident("critical", "dba", t0, status="resolved", resolved=t0 + 3 * DAY), 3),  # its last resolution
        (incident("critical", "dba", t0 + DAY, status="resolved", resolved=t0 + DAY + timedelta(hours=2)), 4),
        (incident("high", None, t0 + 2 * DAY), 2),
        (incident("info", "web", t0 + 3 * DAY), 1),
        (incident("critical", "dba", datetime(2026, 10, 20, 9, tzinfo=UTC), status="resolved",
                  resolved=datetime(2026, 10, 20, 12, tzinfo=UTC)), 5),
        (incident("low", "web", UNTIL), 1),
    ]
    async with db.transaction() as session:
        for inc, _ in specs:
            session.add(inc)
        await session.flush()
        ids = [inc.id for inc, _ in specs]
        for (inc, count), incident_id in zip(specs, ids):
            for n in range(count):
                session.add(AlertRecord(incident_id=incident_id, source="am", fingerprint=f"fp-{n}", status="firing",
                                        severity=inc.severity, summary="trouble", first_received=inc.opened_at,
                                        last_received=inc.opened_at))
    i1, i2, i3, _i4, i5, _i6 = ids
    old = datetime(2026, 10, 20, 9, tzinfo=UTC)
    system = Actor.system()
    entries = [
        Entry("incident.opened", Actor.source("am"), "incident", str(i1), t0, incident_id=i1),
        Entry("escalation.step", system, "incident", str(i1), t0, {"step": 1, "policy": "dba"}, i1),
        Entry("incident.paged", system, "incident", str(i1), t0 + MIN, {"person": "bob", "platform": "telegram"}, i1),
        Entry("incident.acknowledged", ALICE, "incident", str(i1), t0 + 4 * MIN, incident_id=i1),
        Entry("incident.acknowledged", ALICE, "incident", str(i1), t0 + 30 * MIN, incident_id=i1),  # not the first
        Entry("incident.resolved", ALICE, "incident", str(i1), t0 + 60 * MIN, incident_id=i1),
        Entry("incident.reopened", ALICE, "incident", str(i1), t0 + 2 * DAY, incident_id=i1),
        Entry("incident.resolved", Actor.source("am"), "incident", str(i1), t0 + 3 * DAY, incident_id=i1),  # again
        Entry("escalation.step", system, "incident", str(i2), t0 + DAY, {"step": 1, "policy": "dba"}, i2),
        Entry("incident.paged", system, "incident", str(i2), t0 + DAY, {"person": "bob", "platform": "telegram"}, i2),
        Entry("escalation.step", system, "incident", str(i2), t0 + DAY + 5 * MIN, {"step": 2, "policy": "dba"}, i2),
        Entry("incident.paged", system, "incident", str(i2), t0 + DAY + 5 * MIN,
              {"person": "carol", "platform": "slack"}, i2),
        Entry("incident.acknowledged", ALICE, "incident", str(i2), t0 + DAY + 6 * MIN, incident_id=i2),
        Entry("incident.resolved", ALICE, "incident", str(i2), t0 + DAY + 2 * 60 * MIN, incident_id=i2),
        Entry("incident.escalated", ALICE, "incident", str(i3), t0 + 2 * DAY + MIN, incident_id=i3),
        Entry("incident.page_failed", system, "incident", str(i3), t0 + 2 * DAY + MIN,
              {"person": "carol", "tried": [], "problem": "no platform"}, i3),
        # #5 opened before the window: its measures are not counted, but a page about it inside the window is.
        Entry("incident.paged", system, "incident", str(i5), old, {"person": "bob", "platform": "telegram"}, i5),
        Entry("incident.acknowledged", ALICE, "incident", str(i5), old + 60 * MIN, incident_id=i5),
        Entry("incident.resolved", ALICE, "incident", str(i5), old + 3 * 60 * MIN, incident_id=i5),
        Entry("escalation.step", system, "incident", str(i5), old + 10 * MIN, {"step": 3, "policy": "dba"}, i5),
        Entry("incident.paged", system, "incident", str(i5), t0 + 3 * DAY, {"person": "bob", "platform": "teams"}, i5),
    ]
    async with db.transaction() as session:
        await AuditLog(KEY).append_many(session, entries)


@pytest.fixture
async def sqlite_config(tmp_path: Path) -> AsyncIterator[Path]:
    """An app.yaml whose store (a SQLite file) holds the seeded incidents."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'report.db'}"
    db = Database(url)
    await db.start()
    try:
        await seed(db)
    finally:
        await db.dispose()
    yield write_config(tmp_path, url)


def write_config(tmp_path: Path, url: str, schema: str | None = None) -> Path:
    config = tmp_path / "app.yaml"
    storage = f"{{url: '{url}'" + (f", schema: {schema}" if schema else "") + "}"
    config.write_text(f"storage: {storage}\naudit: {{hmac_key: {KEY}}}\ntimezone: Europe/Berlin\n")
    return config


async def chatops(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI as a user would (in a thread: it runs its own event loop); (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cells(text: str, title: str) -> list[list[str]]:
    """The table under `title` in the report, as rows of cells (split on two or more spaces)."""
    block = text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
    return [re.split(r"\s{2,}", line.strip()) for line in block.splitlines()]


async def test_report_shows_the_measures_of_the_window(sqlite_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), *WINDOW)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "Incidents opened from 2026-11-02T09:00:00+00:00 to 2026-11-09T00:00:00+00:00 (6 d 15 h)"
    assert lines[2:8] == [
        "incidents        4",
        "MTTA             5 min (p50 5 min, p90 5 min 48 s); 2 of 4 acknowledged",
        "MTTR             1 h 30 min (p50 1 h 30 min, p90 1 h 54 min); 2 of 4 resolved",
        "escalation rate  50% (2 of 4 incidents escalated)",
        "noise reduction  60% (10 alerts became 4 incidents)",
        "pages sent       4 (telegram 2, slack 1, teams 1); 1 failed",
    ]
    assert cells(out, "By severity") == [
        ["SEVERITY", "INCIDENTS", "ACKNOWLEDGED", "MTTA", "RESOLVED", "MTTR"],
        ["critical", "2", "2", "5 min", "2", "1 h 30 min"],
        ["high", "1", "0", "-", "0", "-"],
        ["info", "1", "0", "-", "0", "-"],
    ]
    assert cells(out, "By route") == [
        ["ROUTE", "INCIDENTS", "ACKNOWLEDGED", "MTTA", "RESOLVED", "MTTR"],
        ["dba", "2", "2", "5 min", "2", "1 h 30 min"],
        ["web", "1", "0", "-", "0", "-"],
        ["(unknown)", "1", "0", "-", "0", "-"],
    ]
    # The events were written through the real chain: the audit log still verifies.
    code, out, _ = await chatops(capsys, "audit", "verify", "-c", str(sqlite_config))
    assert code == 0 and out.startswith("audit chain intact: 21 events")


async def test_an_event_written_outside_the_chain_is_not_counted(sqlite_config: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of an acknowledgement written as event #0 (no key needed: its hashes copied too) for #3, which nobody
    acknowledged: the report counted 3 of 4 acknowledged, while `audit verify` walked from #1 and said intact."""
    import sqlite3
    with sqlite3.connect(tmp_path / "report.db") as conn:
        conn.execute("INSERT INTO audit_events SELECT 0, at, actor_person, actor_platform, actor_user_id, action, "
                     "subject_type, '3', 3, details, prev_hash, hash FROM audit_events "
                     "WHERE action = 'incident.acknowledged' ORDER BY seq LIMIT 1")
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), *WINDOW)
    assert code == 0 and "2 of 4 acknowledged" in out, out
    code, out, _ = await chatops(capsys, "audit", "verify", "-c", str(sqlite_config))
    assert code == 1 and "audit event #0 is numbered before the chain's first (#1)" in out + _


async def test_a_wider_window_takes_in_the_earlier_incident(sqlite_config: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), "--since", "2026-10-01T00:00:00Z",
                                 "--until", "2026-11-09T00:00:01Z")  # now #6 (opened at 9 Nov 00:00) is in too
    assert code == 0
    assert "incidents        6" in out
    # Acknowledged after 4 min, 6 min and 60 min: mean 23 min 20 s, median 6 min, p90 6 + 0.8 * 54 min.
    assert "MTTA             23 min 20 s (p50 6 min, p90 49 min 12 s); 3 of 6 acknowledged" in out
    # Resolved after 1 h, 2 h and 3 h.
    assert "MTTR             2 h (p50 2 h, p90 2 h 48 min); 3 of 6 resolved" in out
    assert "escalation rate  50% (3 of 6 incidents escalated)" in out  # #5 reached step 3
    assert "noise reduction  62.5% (16 alerts became 6 incidents)" in out
    assert "pages sent       5 (telegram 3, slack 1, teams 1); 1 failed" in out
    assert cells(out, "By severity")[1:] == [
        ["critical", "3", "3", "23 min 20 s", "3", "2 h"],
        ["high", "1", "0", "-", "0", "-"],
        ["low", "1", "0", "-", "0", "-"],
        ["info", "1", "0", "-", "0", "-"],
    ]


async def test_report_as_json(sqlite_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), *WINDOW, "--format", "json")
    assert code == 0
    assert json.loads(out) == {
        "since": "2026-11-02T09:00:00+00:00", "until": "2026-11-09T00:00:00+00:00",
        "incidents": 4, "acknowledged": 2, "resolved": 2,
        "mtta": {"count": 2, "mean_seconds": 300.0, "p50_seconds": 300.0, "p90_seconds": 348.0},
        "mttr": {"count": 2, "mean_seconds": 5400.0, "p50_seconds": 5400.0, "p90_seconds": 6840.0},
        "by_severity": [
            {"severity": "critical", "incidents": 2, "acknowledged": 2, "resolved": 2, "mtta_seconds": 300.0,
             "mttr_seconds": 5400.0},
            {"severity": "high", "incidents": 1, "acknowledged": 0, "resolved": 0, "mtta_seconds": None,
             "mttr_seconds": None},
            {"severity": "info", "incidents": 1, "acknowledged": 0, "resolved": 0, "mtta_seconds": None,
             "mttr_seconds": None},
        ],
        "by_route": [
            {"route": "dba", "incidents": 2, "acknowledged": 2, "resolved": 2, "mtta_seconds": 300.0,
             "mttr_seconds": 5400.0},
            {"route": "web", "incidents": 1, "acknowledged": 0, "resolved": 0, "mtta_seconds": None,
             "mttr_seconds": None},
            {"route": None, "incidents": 1, "acknowledged": 0, "resolved": 0, "mtta_seconds": None,
             "mttr_seconds": None},
        ],
        "escalated": 2, "escalation_rate": 0.5,
        "alerts": 10, "noise_reduction": 0.6,
        "pages": {"sent": 4, "failed": 1, "by_platform": {"telegram": 2, "slack": 1, "teams": 1}},
    }


async def test_an_empty_window_says_so(sqlite_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), "--since", "2025-01-01T00:00:00Z",
                                 "--until", "2025-02-01T01:00:00+01:00")
    assert (code, out) == (0, "No incidents opened between 2025-01-01T00:00:00+00:00 and "
                              "2025-02-01T01:00:00+01:00.\n")
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), "--since", "2025-01-01",
                                 "--until", "2025-01-02")  # no offset: midnight where the bot is, and shown so
    assert (code, out) == (0, "No incidents opened between 2025-01-01T00:00:00+01:00 and 2025-01-02T00:00:00+01:00.\n")
    code, out, _ = await chatops(capsys, "report", "-c", str(sqlite_config), "--since", "2025-01-01T00:00:00Z",
                                 "--until", "2025-02-01T00:00:00Z", "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["incidents"] == 0 and report["mtta"]["mean_seconds"] is None
    assert report["escalation_rate"] is None and report["noise_reduction"] is None and report["by_route"] == []


async def test_the_default_window_is_the_last_30_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'now.db'}"
    db = Database(url)
    await db.start()
    now = datetime.now(UTC)
    async with db.transaction() as session:
        session.add(incident("high", "web", now - timedelta(days=29)))
        session.add(incident("high", "web", now - timedelta(days=31)))
    await db.dispose()
    config = write_config(tmp_path, url)
    code, out, _ = await chatops(capsys, "report", "-c", str(config))
    assert code == 0 and "incidents        1\n" in out and "(30 d)" in out.splitlines()[0]
    assert "noise reduction  n/a (no alerts recorded)" in out
    code, out, _ = await chatops(capsys, "report", "-c", str(config), "--until", (now - timedelta(days=30)).isoformat())
    assert code == 0 and "incidents        1\n" in out  # the 30 days before --until: the older one


async def test_a_window_that_ends_before_it_starts_is_a_usage_error(sqlite_config: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await chatops(capsys, "report", "-c", str(sqlite_config), "--since", "2026-11-09T00:00:00Z",
                                   "--until", "2026-11-09T01:00:00+01:00")
    assert (code, out) == (2, "")
    assert err.strip() == "--until (2026-11-09T01:00:00+01:00) must be after --since (2026-11-09T00:00:00+00:00)"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "-c", str(sqlite_config), "--since", "last tuesday"])
    assert exit_info.value.code == 2
    assert "argument --since: not an ISO 8601 time: 'last tuesday'" in capsys.readouterr().err


async def test_report_on_postgres(tmp_path: Path, pg_schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres_url()
    db = Database(url, schema=pg_schema)
    await db.start()
    try:
        await seed(db)
        config = write_config(tmp_path, url, pg_schema)
        code, out, _ = await chatops(capsys, "report", "-c", str(config), *WINDOW, "--format", "json")
        assert code == 0
        report = json.loads(out)
        assert (report["incidents"], report["acknowledged"], report["resolved"]) == (4, 2, 2)
        assert report["mtta"] == {"count": 2, "mean_seconds": 300.0, "p50_seconds": 300.0, "p90_seconds": 348.0}
        assert report["mttr"]["mean_seconds"] == 5400.0
        assert [(g["route"], g["incidents"]) for g in report["by_route"]] == [("dba", 2), ("web", 1), (None, 1)]
        assert (report["escalation_rate"], report["alerts"], report["noise_reduction"]) == (0.5, 10, 0.6)
        assert report["pages"] == {"sent": 4, "failed": 1, "by_platform": {"telegram": 2, "slack": 1, "teams": 1}}
        code, out, _ = await chatops(capsys, "report", "-c", str(config), *WINDOW)
        assert code == 0 and "MTTA             5 min (p50 5 min, p90 5 min 48 s); 2 of 4 acknowledged" in out
    finally:
        await db.dispose()
        await drop_schema(url, pg_schema)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59.4, "59 s"), (59.6, "1 min"), (250, "4 min 10 s"), (300, "5 min"), (3599, "59 min 59 s"),
    (7380, "2 h 3 min"), (7410, "2 h 4 min"), (7200, "2 h"), (86370, "1 d"), (97200, "1 d 3 h"), (-90, "-1 min 30 s"),
])
def test_human_durations(seconds: float, text: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == text


def test_percentiles_and_percentages() -> None:
    d = Durations.of([timedelta(minutes=m) for m in (10, 1, 4, 2)])
    assert (d.count, d.mean, d.p50, d.p90) == (4, timedelta(minutes=4, seconds=15), timedelta(minutes=3),
                                               timedelta(minutes=8, seconds=12))  # 4 + 0.7 * (10 - 4) min
    assert Durations.of([]) == Durations(0)
    assert [percent(x) for x in (0.5, 1 / 3, 0.625, 1.0, 0.0)] == ["50%", "33.3%", "62.5%", "100%", "0%"]


async def test_a_reopened_incident_is_measured_once_in_metrics_too(tmp_path: Path) -> None:
    """Acknowledged after 5 min and resolved after 10, reopened two days later and acknowledged and resolved again
    (by a person, then by its source): /metrics counted it twice, the second time as two days to acknowledge."""
    from tests.test_escalation import NIGHT, world

    async with world(tmp_path, NIGHT) as w:
        await w.alert("critical", team="solo")

        async def command(text: str, advance: timedelta) -> str:
            w.h.clock.advance(advance)
            return str((await w.slack.answer(await w.slack.command("/incident", text, user="U02BOB")))["text"])

        assert await command("ack 1", 5 * MIN) == "Acknowledged #1."
        assert await command("resolve 1", 5 * MIN) == "Resolved #1."
        assert await command("reopen 1", 2 * DAY) == "Reopened #1."
        assert await command("ack 1", MIN) == "Acknowledged #1."
        assert await command("resolve 1", MIN) == "Resolved #1."
        assert await command("reopen 1", MIN) == "Reopened #1."
        await w.alert("critical", team="solo", status="resolved")  # its source resolves it a third time
        assert (await w.h.incidents())[0].status == "resolved"
        body = await (await w.h.client.get("/metrics")).text()
        assert 'chatops_time_to_acknowledge_seconds_count{severity="critical"} 1.0' in body
        assert 'chatops_time_to_acknowledge_seconds_sum{severity="critical"} 300.0' in body
        assert 'chatops_time_to_resolve_seconds_count{severity="critical"} 1.0' in body
        assert 'chatops_time_to_resolve_seconds_sum{severity="critical"} 600.0' in body
