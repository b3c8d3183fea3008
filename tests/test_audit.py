"""The audit chain: tampering of every kind is detected, concurrent appends stay linear."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.cli import main
from bot.model import Actor
from storage.audit import AuditLog, Entry
from storage.db import Database
from tests.conftest import ROOT, drop_schema, postgres_url

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
ALICE = Actor("slack", "U01ALICE", "Alice", "alice")


async def write_events(db: Database, audit: AuditLog, n: int = 6) -> None:
    for i in range(1, n + 1):
        async with db.transaction() as session:
            await audit.append(session, Entry(
                "incident.acknowledged", ALICE, "incident", str(i), T0 + timedelta(minutes=i),
                details={"note": f"event {i}", "n": i}, incident_id=i % 2 + 1,
            ))


async def verify(db: Database, audit: AuditLog):
    async with db.sessions() as session:
        return await audit.verify(session)


async def sql(db: Database, *statements: str) -> None:
    async with db.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_intact_chain_verifies(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    verdict = await verify(db, audit)
    assert verdict.ok and verdict.checked == 6 and verdict.problem is None
    # A different key means the events cannot be vouched for.
    other = await verify(db, AuditLog("not-the-key"))
    assert not other.ok and "audit event #1" in other.problem


async def test_modified_event_is_detected(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, "UPDATE audit_events SET actor_user_id = 'U666MALLORY' WHERE seq = 3")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.checked == 2
    assert verdict.problem.startswith("audit event #3 (incident.acknowledged at 2026-11-25T09:03:00+00:00): its hash does not match")


async def test_deleted_event_is_detected(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, "DELETE FROM audit_events WHERE seq = 4")
    verdict = await verify(db, audit)
    assert not verdict.ok
    assert verdict.problem.startswith("audit event #5 ") and "expected #4 here; event #4 was deleted" in verdict.problem


async def test_deleted_newest_event_is_detected(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, "DELETE FROM audit_events WHERE seq = 6")
    verdict = await verify(db, audit)
    assert not verdict.ok and "the chain ends at event #5 but its head says #6" in verdict.problem


async def test_a_chain_growing_while_it_is_verified_is_intact_up_to_where_the_check_began(db: Database) -> None:
    """On PostgreSQL each batch of the walk sees what committed since the one before: events appended meanwhile
    were walked, then the head read after them said "the newest events were deleted" (a false alarm, every busy
    minute, for a cron job that verifies)."""
    audit = AuditLog("k3y")
    await write_events(db, audit)

    class Busy(AuditLog):  # the running bot appends while the walk is under way
        async def _walk(self, session, batch, walk):  # type: ignore[no-untyped-def]
            async with db.transaction() as other:
                await audit.append(other, Entry("incident.resolved", ALICE, "incident", "1", T0, incident_id=1))
            return await super()._walk(session, batch, walk)

    verdict = await verify(db, Busy("k3y"))
    assert verdict.ok and verdict.checked == 6, verdict.problem  # the seventh is newer than the check
    assert (await verify(db, audit)).checked == 7


async def test_a_modified_head_is_named_as_such(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, f"UPDATE audit_head SET hash = '{'ab' * 32}'")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.checked == 6
    assert verdict.problem == ("the head names event #6 with a hash that is not that event's: the head was modified")
    await sql(db, "UPDATE audit_head SET seq = 4")
    assert (await verify(db, audit)).problem.startswith("the chain ends at event #6 but its head says #4: the head "
                                                        "was set back")


@pytest.mark.parametrize(("column", "value"), [("details", "'not json'"), ("at", "'garbage'")])
async def test_a_damaged_row_is_named_not_a_crash(tmp_path: Path, column: str, value: str) -> None:
    """A row the store hands back but that cannot be decoded (only SQLite lets such a value in): verify names it."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    await db.start()
    try:
        audit = AuditLog("k3y")
        await write_events(db, audit)
        await sql(db, f"UPDATE audit_events SET {column} = {value} WHERE seq = 4")
        verdict = await verify(db, audit)
        assert not verdict.ok and verdict.checked == 3
        assert verdict.problem.startswith("audit event #4 cannot be read (") and verdict.problem.endswith(
            "): the row was damaged")
        config = tmp_path / "app.yaml"
        config.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'audit.db'}'}}\n")
        stored = value.strip("'")
        # Export, what one runs next, writes every event: the damaged one with what can be read of it, marked (it
        # wrote nothing at all, exit 1), and says so on stderr.
        for export in ("jsonl", "csv"):
            proc = subprocess.run([sys.executable, "-m", "bot.cli", "audit", "export", "--format", export,
                                   "-c", str(config)], capture_output=True, text=True, cwd=ROOT)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            said = proc.stderr.splitlines()
            assert said[0].startswith(f"audit event #4 is damaged, cannot read its {column} (") and said[0].endswith(
                "): exported with what can be read of it, marked damaged"), said
            assert said[1:] == ["1 damaged audit event exported with what can be read of them (marked damaged); "
                                "`chatops audit verify` checks the chain"]
            if export == "jsonl":
                events = [json.loads(line) for line in proc.stdout.splitlines()]
                assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
                assert ["damaged" in e for e in events] == [False] * 3 + [True] + [False] * 2
                assert events[3]["damaged"].startswith(f"cannot read its {column} (")
                assert events[3][column] == stored and events[3]["actor"]["person"] == "alice"
                assert events[5]["details"] == {"note": "event 6", "n": 6}
            else:
                rows = list(csv.DictReader(io.StringIO(proc.stdout)))
                assert [r["seq"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
                assert [bool(r["damaged"]) for r in rows] == [False] * 3 + [True] + [False] * 2
                assert rows[3][column] == stored and rows[3]["damaged"].startswith(f"cannot read its {column} (")
                assert json.loads(rows[5]["details"]) == {"note": "event 6", "n": 6}
    finally:
        await db.dispose()


async def test_inserted_event_is_detected(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    # Make room at #3 and slip in a forged event that links to #2.
    async with db.sessions() as session:
        prev = (await session.execute(text("SELECT hash FROM audit_events WHERE seq = 2"))).scalar_one()
    await sql(db, *[f"UPDATE audit_events SET seq = {s + 1} WHERE seq = {s}" for s in range(6, 2, -1)])
    await sql(db, "INSERT INTO audit_events (seq, at, actor_platform, actor_user_id, action, subject_type, subject_id, details, prev_hash, hash) "
                  f"VALUES (3, '2026-11-25 09:02:30', 'slack', 'U01ALICE', 'incident.resolved', 'incident', '1', '{{}}', '{prev}', '{'ab' * 32}')")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.problem.startswith("audit event #3 (incident.resolved")


async def test_an_event_numbered_before_the_chain_is_detected(db: Database) -> None:
    """A copy of #3 (its hashes too, no key needed) written as #0, or #-5, was in no chain the walk checked: verify
    said intact while `chatops report` counted it (an acknowledgement that never happened)."""
    audit = AuditLog("k3y")
    await write_events(db, audit)
    for seq in (0, -5):
        await sql(db, "INSERT INTO audit_events (seq, at, actor_platform, actor_user_id, action, subject_type, "
                      "subject_id, incident_id, details, prev_hash, hash) SELECT "
                      f"{seq}, at, actor_platform, actor_user_id, action, subject_type, subject_id, incident_id, "
                      "details, prev_hash, hash FROM audit_events WHERE seq = 3")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.problem == (
        "audit event #-5 is numbered before the chain's first (#1): it was added around the bot"), verdict.problem


async def test_an_events_time_stored_in_another_form_is_detected_on_sqlite(tmp_path: Path) -> None:
    """The same instant written `2026-11-25T09:03:00` decodes (and hashes) as the bot wrote it, but SQLite compares
    the text: the report took it for the later of two acknowledgements, the export's --since misplaced it."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    await db.start()
    try:
        audit = AuditLog("k3y")
        await write_events(db, audit)
        assert (await verify(db, audit)).ok
        await sql(db, "UPDATE audit_events SET at = '2026-11-25T09:03:00' WHERE seq = 3")
        verdict = await verify(db, audit)
        assert not verdict.ok and verdict.problem == (
            "audit event #3: its time is stored as '2026-11-25T09:03:00', not as the bot writes it ('YYYY-MM-DD "
            "HH:MM:SS.ffffff'), so the report and the export, which compare the stored text, would place it "
            "elsewhere: the row was modified"), verdict.problem
    finally:
        await db.dispose()


async def test_reordered_events_are_detected(db: Database) -> None:
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, "UPDATE audit_events SET seq = 100 WHERE seq = 3",
              "UPDATE audit_events SET seq = 3 WHERE seq = 4",
              "UPDATE audit_events SET seq = 4 WHERE seq = 100")
    verdict = await verify(db, audit)
    assert not verdict.ok
    assert verdict.problem.startswith("audit event #3 ") and "does not link to the event before it" in verdict.problem


async def test_200_concurrent_appends_give_one_linear_chain(db: Database) -> None:
    audit = AuditLog("k3y")

    async def one(i: int) -> None:
        async with db.transaction() as session:
            await audit.append(session, Entry("alert.received", Actor.source("am"), "alert", str(i), T0))

    await asyncio.gather(*(one(i) for i in range(200)))
    verdict = await verify(db, audit)
    assert verdict.ok and verdict.checked == 200
    async with db.sessions() as session:
        subjects = {row[0] for row in await session.execute(text("SELECT subject_id FROM audit_events"))}
    assert subjects == {str(i) for i in range(200)}


async def test_rolled_back_transaction_leaves_no_event(db: Database) -> None:
    audit = AuditLog("k3y")
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await audit.append(session, Entry("incident.opened", Actor.system(), "incident", "1", T0))
            raise RuntimeError("the state change failed")
    await write_events(db, audit, 2)
    verdict = await verify(db, audit)
    assert verdict.ok and verdict.checked == 2


async def test_two_processes_on_one_postgres_give_one_linear_chain(pg_schema: str) -> None:
    url = postgres_url()
    db = Database(url, schema=pg_schema)
    await db.start()
    try:
        procs = [
            subprocess.Popen([sys.executable, "-m", "tests.audit_writer", url, pg_schema, name, "100"], cwd=ROOT)
            for name in ("proc-a", "proc-b")
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        verdict = await verify(db, AuditLog("shared-key"))
        assert verdict.ok and verdict.checked == 200
        async with db.sessions() as session:
            rows = (await session.execute(text("SELECT actor_user_id, count(*) FROM audit_events GROUP BY 1"))).all()
        assert dict(rows) == {"proc-a": 100, "proc-b": 100}
    finally:
        await db.dispose()
        await drop_schema(url, pg_schema)


def _cli_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'cli.db'}'}}\naudit: {{hmac_key: k3y}}\n")
    return cfg


def test_csv_export_is_readable_text_and_runs_no_formula(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cli_config(tmp_path)

    async def setup() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
        await db.start()
        async with db.transaction() as session:
            await AuditLog("k3y").append(session, Entry(
                "alert.received", Actor.source("generic"), "alert", '=HYPERLINK("http://evil","click")', T0,
                details={"summary": "Диск /var полон", "labels": {"team": "+dba"}}))
        await db.dispose()

    asyncio.run(setup())
    assert main(["audit", "export", "-c", str(cfg), "--format", "csv"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert json.loads(row["details"]) == {"summary": "Диск /var полон", "labels": {"team": "+dba"}}
    assert "Диск" in row["details"]  # as written, not \\u0414...
    assert row["subject_id"] == "'=HYPERLINK(\"http://evil\",\"click\")"  # a spreadsheet shows it and runs nothing


def test_cli_verify_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cli_config(tmp_path)

    async def setup() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
        await db.start()
        await write_events(db, AuditLog("k3y"))
        await db.dispose()

    asyncio.run(setup())
    assert main(["audit", "verify", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 6 events, head ")

    assert main(["audit", "export", "-c", str(cfg), "--incident", "2", "--since", "2026-11-25T09:02:00Z"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in lines] == [3, 5]
    assert lines[0]["actor"] == {"person": "alice", "platform": "slack", "user_id": "U01ALICE"}
    assert lines[0]["details"] == {"note": "event 3", "n": 3}

    assert main(["audit", "export", "-c", str(cfg), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and rows[5]["action"] == "incident.acknowledged" and rows[5]["actor_person"] == "alice"

    async def tamper() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
        await sql(db, "UPDATE audit_events SET action = 'incident.resolved' WHERE seq = 2")
        await db.dispose()

    asyncio.run(tamper())
    assert main(["audit", "verify", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit chain broken after 1 good events: audit event #2 (incident.resolved at")


async def test_appends_are_counted_once_their_transaction_commits_and_not_when_it_rolls_back(db: Database) -> None:
    audit, counted = AuditLog("k"), []
    audit.counted = counted.append
    entry = Entry("incident.acknowledged", ALICE, "incident", "1", T0, details={}, incident_id=1)
    async with db.transaction() as session:
        await audit.append_many(session, [entry, entry])
        await audit.append(session, entry)
        assert counted == []  # not committed yet
    assert counted == [3]
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await audit.append(session, entry)
            raise RuntimeError("the handler failed after appending")
    async with db.transaction() as session:
        await audit.append(session, entry)
    assert counted == [3, 1]  # the rolled-back append is not counted
    assert (await verify(db, audit)).ok


async def test_details_stored_with_a_key_twice_are_named_though_the_value_read_hashes_right(db: Database) -> None:
    """Event #3's details were {"note": "event 3", "n": 3}. An edit that puts `"note": "forged"` BEFORE the real one
    leaves the value a reader decoding last-wins gets (and hashes) as it was, while a reader taking the first (SQLite's
    json_extract, a person reading the row) sees "forged": verify said "intact". A rewrite that keeps the meaning
    (other spacing) is no finding."""
    audit = AuditLog("k3y")
    await write_events(db, audit)
    await sql(db, """UPDATE audit_events SET details = '{"n": 2,   "note":  "event 2"}' WHERE seq = 2""")
    assert (await verify(db, audit)).ok
    await sql(db, """UPDATE audit_events SET details = '{"note": "forged", "note": "event 3", "n": 3}' WHERE seq = 3""")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.problem == (
        "audit event #3: its stored details hold the key 'note' twice, so readers may disagree on its value: the row "
        "was modified"), verdict.problem


async def test_details_with_a_key_twice_padded_to_the_length_the_bot_writes_are_named(db: Database) -> None:
    """A look at the length alone (a row as long as the bot would write it was taken as written) let a compact edit
    padded with spaces through."""
    audit = AuditLog("k3y")
    details = {"from": "triggered", "to": "acknowledged", **{f"k{i}": f"v{i}" for i in range(8)}}
    async with db.transaction() as session:
        await audit.append(session, Entry("incident.acknowledged", ALICE, "incident", "1", T0, details=details,
                                          incident_id=1))
    written = json.dumps(details)
    forged = json.dumps(details, separators=(",", ":")).replace('"to":', '"to":"resolved","to":')
    assert len(forged) <= len(written)
    forged = forged[:-1] + " " * (len(written) - len(forged)) + "}"
    await sql(db, f"UPDATE audit_events SET details = '{forged}' WHERE seq = 1")
    verdict = await verify(db, audit)
    assert not verdict.ok and verdict.problem == (
        "audit event #1: its stored details hold the key 'to' twice, so readers may disagree on its value: the row "
        "was modified"), verdict.problem
