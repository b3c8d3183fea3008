"""The audit key: one event hashed with another key (or none) would break the chain for good, so whatever appends
checks the key against the chain first and refuses; the key is introduced or changed on purpose with `chatops audit
rekey`, after which `audit verify` still checks the whole chain and still finds tampering on both sides of the
change."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.cli import main
from storage.audit import AuditLog, KeyMismatch, key_fingerprint
from storage.db import Database
from storage.models import AuditEvent, OutboxItem
from tests.conftest import ROOT, free_port
from tests.test_audit import sql, verify, write_events
from tests.test_serve import start_bot, wait_http

BOT_KEY = "the-bots-audit-key-0001"
NEW_KEY = "the-new-audit-key-0002"
SHELL_KEY = "a-shells-other-key-0003"
KEYS = (BOT_KEY, NEW_KEY, SHELL_KEY)


def app_yaml(folder: Path, db: Database) -> Path:
    """A config whose audit key comes from $CHATOPS_AUDIT_KEY, as a deployment's secret does."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = f", schema: {db.schema}" if db.schema else ""
    path = folder / "app.yaml"
    path.write_text(f"server: {{port: ${{CHATOPS_PORT:-8080}}}}\nstorage: {{url: '{db.url}'{schema}}}\n"
                    "audit: {hmac_key: '${CHATOPS_AUDIT_KEY}'}\n", encoding="utf-8")
    return path


async def dead_delivery(db: Database) -> int:
    async with db.transaction() as session:
        item = OutboxItem(created_at=datetime.now(UTC), due_at=datetime.now(UTC), channel="ops", kind="post",
                          event="incident.opened", status="dead", attempts=5, last_error="channel_not_found")
        session.add(item)
    return item.id


async def events(db: Database) -> list[str]:
    async with db.sessions() as session:
        return list((await session.execute(select(AuditEvent.action).order_by(AuditEvent.seq))).scalars())


async def status(db: Database, item: int) -> str:
    async with db.sessions() as session:
        return (await session.execute(select(OutboxItem.status).where(OutboxItem.id == item))).scalar_one()


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        key: str | None, **env: str) -> tuple[int, str, str]:
    """`chatops ARGV` in a shell whose CHATOPS_AUDIT_KEY is `key` (None: not set); its exit code, stdout, stderr."""
    if key is None:
        monkeypatch.delenv("CHATOPS_AUDIT_KEY", raising=False)
    else:
        monkeypatch.setenv("CHATOPS_AUDIT_KEY", key)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    for secret in KEYS:  # a key is never shown, whatever happens
        assert secret not in out + err
    return code, out, err


@pytest.mark.parametrize(("written_with", "shell_key", "said"), [
    (BOT_KEY, None, "the audit chain was written with a key, and no audit.hmac_key is set here"),
    (BOT_KEY, SHELL_KEY, "the audit chain was written with another key than this audit.hmac_key (fingerprint "
                         f"{key_fingerprint(SHELL_KEY)})"),
    (None, SHELL_KEY, "the audit chain was written without a key, and audit.hmac_key is set here"),
])
async def test_a_cli_command_that_appends_with_another_key_or_none_is_refused_and_changes_nothing(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        written_with: str | None, shell_key: str | None, said: str) -> None:
    await write_events(db, AuditLog(written_with), 3)
    item = await dead_delivery(db)
    cfg = str(app_yaml(tmp_path, db))
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "--dead", "-c", cfg],
                                             shell_key)
    assert code == 2 and out == ""
    assert f"refused, nothing was changed: {said}" in err
    assert ("chatops audit rekey --from-no-key" if written_with is None else "Set audit.hmac_key to the key the chain "
            "was written with (every replica of the bot and every shell that runs chatops needs that one key)") in err
    assert await status(db, item) == "dead" and len(await events(db)) == 3
    assert (await verify(db, AuditLog(written_with))).ok
    # In a shell with the chain's key the same command goes through, and the chain stays whole.
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "--dead", "-c", cfg],
                                           written_with)
    assert code == 0 and "1 delivery queued again" in out
    assert await status(db, item) == "pending" and (await events(db))[-1] == "outbox.retried"
    assert (await verify(db, AuditLog(written_with))).ok


async def test_an_empty_chain_takes_any_key(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    await dead_delivery(db)
    code, _, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "--dead", "-c",
                                                                    str(app_yaml(tmp_path, db))], SHELL_KEY)
    assert code == 0 and await events(db) == ["outbox.retried"]


@pytest.mark.parametrize("bot_key", [SHELL_KEY, None])
async def test_a_bot_or_replica_with_another_key_refuses_to_start(db: Database, tmp_path: Path,
                                                                  bot_key: str | None) -> None:
    """A second replica (on PostgreSQL), or the bot restarted with its key's variable missing or another key: it stops
    with exit 2 before it writes anything; with the chain's key it starts."""
    await write_events(db, AuditLog(BOT_KEY), 3)
    app_yaml(tmp_path, db)
    port = free_port()
    proc = start_bot(tmp_path, port, {"CHATOPS_AUDIT_KEY": bot_key} if bot_key else {})
    assert proc.wait(timeout=60) == 2
    log = proc.stdout.read()
    said = ("the audit chain was written with another key than this audit.hmac_key" if bot_key else
            "the audit chain was written with a key, and no audit.hmac_key is set here")
    assert f"not starting: {said}" in log, log
    assert "chatops audit rekey --old-key-env VAR" in log or not bot_key
    assert not any(key in log for key in KEYS)
    assert len(await events(db)) == 3 and (await verify(db, AuditLog(BOT_KEY))).ok
    proc = start_bot(tmp_path, port, {"CHATOPS_AUDIT_KEY": BOT_KEY})
    try:
        assert (await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", proc))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


async def test_a_key_added_with_rekey_from_no_key(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The quick start ran without a key; the key is set later, with `audit rekey --from-no-key`: the events before
    are still checked (as plain SHA-256), those after with the key, and tampering on either side is found."""
    await write_events(db, AuditLog(None), 6)
    cfg = str(app_yaml(tmp_path, db))
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "rekey", "--from-no-key", "-c", cfg],
                                             NEW_KEY)
    assert code == 0, err
    assert out.startswith("the audit key changed at event #7 (audit.rekeyed): events #1-#6 were written with no key "
                          f"and verify with it, those from #7 on are hashed with audit.hmac_key "
                          f"({key_fingerprint(NEW_KEY)}, fingerprint)")
    # Again: the chain is written with the key now. It said "does not verify with the old key (no key): audit event
    # #7 ... was modified", exit 1, as a broken chain would.
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "rekey", "--from-no-key", "-c", cfg],
                                             NEW_KEY)
    assert (code, out, err) == (2, "", "the key was not changed: this chain is written with audit.hmac_key already "
                                       "(`chatops audit verify` checks it); nothing to do\n")
    item = await dead_delivery(db)
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "--dead", "-c", cfg], NEW_KEY)
    assert code == 0, err
    assert (await events(db))[6:] == ["audit.rekeyed", "outbox.retried"] and await status(db, item) == "pending"
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("audit chain intact: 8 events, head ") and "continuity" not in lines[0]
    assert lines[1:] == [
        "  events #1-#6, written without a key before one was introduced at event #7: checked as plain SHA-256 "
        "(evident of accidents, not of deliberate edits)",
        f"  events #7-#8, since the key changed at event #7 (audit.rekeyed): checked fully with the key with "
        f"fingerprint {key_fingerprint(NEW_KEY)}"]
    # A shell, or a bot, still without the key is refused now.
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "1", "-c", cfg], None)
    assert code == 2 and (f"the audit chain was rekeyed to another key (fingerprint {key_fingerprint(NEW_KEY)}) at "
                          "event #7 by `chatops audit rekey`, and no audit.hmac_key is set here") in err

    await sql(db, "UPDATE audit_events SET subject_id = '5' WHERE seq = 3")  # before the rekey
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 1 and out.startswith("audit chain broken after 2 good events: audit event #3 ")
    await sql(db, "UPDATE audit_events SET subject_id = '3' WHERE seq = 3",
              "UPDATE audit_events SET actor_user_id = 'mallory' WHERE seq = 8")  # after it
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 1 and out.startswith("audit chain broken after 7 good events: audit event #8 ")


async def test_a_key_changed_with_rekey_verifies_with_and_without_the_old_key(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    await write_events(db, AuditLog(BOT_KEY), 6)
    cfg = str(app_yaml(tmp_path, db))
    rekey = ["audit", "rekey", "--old-key-env", "OLD_AUDIT_KEY", "-c", cfg]
    # A wrong old key, or the new one given as the old: refused, nothing written.
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, rekey, NEW_KEY, OLD_AUDIT_KEY=SHELL_KEY)
    assert code == 1 and err.startswith(f"the key was not changed: the audit chain does not verify with the old key "
                                        f"(the key with fingerprint {key_fingerprint(SHELL_KEY)}): audit event #1 ")
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, rekey, NEW_KEY, OLD_AUDIT_KEY=NEW_KEY)
    assert code == 2 and "the key in OLD_AUDIT_KEY is audit.hmac_key itself" in err
    assert len(await events(db)) == 6

    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, rekey, NEW_KEY, OLD_AUDIT_KEY=BOT_KEY)
    assert code == 0, err
    assert f"events #1-#6 were written with the old key ({key_fingerprint(BOT_KEY)}, fingerprint)" in out
    async with db.sessions() as session:
        rekeyed = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 7))).scalar_one()
    assert rekeyed.action == "audit.rekeyed" and rekeyed.details == {
        "after": 6, "old_key": key_fingerprint(BOT_KEY), "new_key": key_fingerprint(NEW_KEY)}

    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("audit chain intact: 7 events, head ")
    assert lines[0].endswith("; 6 of them only for continuity, written with an earlier key not given (below)")
    assert lines[1] == (f"  events #1-#6, written with the earlier key {key_fingerprint(BOT_KEY)} (fingerprint), not "
                        "given: checked only for continuity (each event links to the one before it), not their "
                        "contents; give that key with --old-key-env VAR to check them fully")
    verify_old = ["audit", "verify", "--old-key-env", "OLD_AUDIT_KEY", "-c", cfg]
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, verify_old, NEW_KEY, OLD_AUDIT_KEY=BOT_KEY)
    assert code == 0 and "continuity" not in out
    assert (f"  events #1-#6, written with the earlier key {key_fingerprint(BOT_KEY)} (fingerprint), given in "
            "OLD_AUDIT_KEY: checked fully") in out.splitlines()
    # The bot with the old key, a replica not yet given the new one, is refused.
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, ["outbox", "retry", "1", "-c", cfg], BOT_KEY)
    assert code == 2 and (f"the audit chain was rekeyed to another key (fingerprint {key_fingerprint(NEW_KEY)}) at "
                          f"event #7 by `chatops audit rekey`, and this audit.hmac_key has fingerprint "
                          f"{key_fingerprint(BOT_KEY)}") in err

    # An event before the rekey modified: found with the old key; without it, its contents cannot be vouched for.
    await sql(db, "UPDATE audit_events SET subject_id = '5' WHERE seq = 3")
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, verify_old, NEW_KEY, OLD_AUDIT_KEY=BOT_KEY)
    assert code == 1 and out.startswith("audit chain broken after 2 good events: audit event #3 ") \
        and "its hash does not match its contents" in out
    # One deleted before the rekey: found without the old key too.
    await sql(db, "UPDATE audit_events SET subject_id = '3' WHERE seq = 3", "DELETE FROM audit_events WHERE seq = 4")
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 1 and "audit event #5 " in out and "event #4 was deleted" in out


async def test_rekey_to_a_third_key_and_verify_with_both_old_keys(db: Database) -> None:
    """Two changes of key: each stretch is checked with its own old key, given; without them only for continuity."""
    first, second, third = AuditLog(BOT_KEY), AuditLog(NEW_KEY), AuditLog(SHELL_KEY)
    await write_events(db, first, 3)
    for old, new in ((first, second), (second, third)):
        await rekey(db, old, new)
    async with db.sessions() as session:
        bare = await third.verify(session)
        full = await third.verify(session, old_keys={"A": BOT_KEY, "B": NEW_KEY})
        wrong = await third.verify(session, old_keys={"C": "not-a-key-of-this-chain"})
    assert bare.ok and bare.checked == 5 and bare.unchecked == 4
    assert full.ok and full.unchecked == 0 and [n.split(",")[0] for n in full.notes] == [
        "events #1-#3", "event #4", "event #5"]
    assert wrong.ok and wrong.notes[-1] == "the key in C is not one this chain records: it checked nothing"


def first_actor():
    from bot.model import Actor

    return Actor("cli", "ops", "ops")


async def rekey(db: Database, old: AuditLog, new: AuditLog) -> int:
    """`chatops audit rekey`'s work: the chain verified with `old`, then changed to `new`; the rekey event's seq."""
    async with db.sessions() as session:
        verdict = await old.verify(session)
    async with db.transaction() as session:
        return (await new.rekey(session, old, first_actor(), datetime.now(UTC), verdict))["seq"]


def test_rekey_is_refused_while_the_bot_holds_its_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from bot.server import hold_store

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'chatops.db'}")

    async def setup() -> None:
        await db.start()
        await write_events(db, AuditLog(BOT_KEY), 2)
        await db.dispose()

    asyncio.run(setup())
    cfg = str(app_yaml(tmp_path, db))
    with hold_store(db.url):  # what a running `chatops serve` holds
        code, _, err = run(monkeypatch, capsys, ["audit", "rekey", "--old-key-env", "OLD", "-c", cfg], NEW_KEY,
                           OLD=BOT_KEY)
    assert code == 1 and "the key changes only while the bot is stopped" in err
    code, _, _ = run(monkeypatch, capsys, ["audit", "rekey", "--old-key-env", "OLD", "-c", cfg], NEW_KEY, OLD=BOT_KEY)
    assert code == 0


def test_the_warning_of_a_bot_without_a_key_says_a_key_is_added_later_with_rekey(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")  # the quick start's: no key
    assert main(["check-config", "-c", str(tmp_path / "app.yaml")]) == 0
    [said] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: audit:")]
    assert said == ("warning: audit: no hmac_key, so the chain is plain SHA-256 and only tamper-evident against "
                    "accidents; to detect deliberate edits, set audit.hmac_key before the bot's first start, or add it "
                    "later with `chatops audit rekey --from-no-key` (a key only set on a chain written without one "
                    "makes the bot refuse to start)")


async def test_a_key_change_forged_into_the_chain_does_not_excuse_the_events_after_it(db: Database) -> None:
    """An event turned into an `audit.rekeyed` to a key nobody has would leave the events after it checked only for
    continuity, so free to edit: the next change of key, which records the key before it, gives it away."""
    first, second, third = AuditLog(BOT_KEY), AuditLog(NEW_KEY), AuditLog(SHELL_KEY)
    await write_events(db, first, 3)
    async with db.sessions() as session:
        verdict = await first.verify(session)
    async with db.transaction() as session:
        await second.rekey(session, first, first_actor(), datetime.now(UTC), verdict)
    await write_events(db, second, 2)
    async with db.sessions() as session:
        verdict = await second.verify(session, old_keys={"A": BOT_KEY})
    assert verdict.ok and verdict.checked == 6
    async with db.transaction() as session:
        await third.rekey(session, second, first_actor(), datetime.now(UTC), verdict)
    forged = json.dumps({"after": 4, "old_key": key_fingerprint(NEW_KEY), "new_key": "f" * 16})
    await sql(db, f"UPDATE audit_events SET action = 'audit.rekeyed', details = '{forged}' WHERE seq = 5",
              "UPDATE audit_events SET subject_id = 'edited' WHERE seq = 6")
    async with db.sessions() as session:
        verdict = await third.verify(session, old_keys={"A": BOT_KEY, "B": NEW_KEY})
    assert not verdict.ok and verdict.problem.startswith("audit event #7 ") and verdict.problem.endswith(
        "the key it changes from is not the one the change at event #5 changed to; one of the two was modified or "
        "inserted")


def alerting_app_yaml(folder: Path, db: Database) -> Path:
    """app_yaml, with an Alertmanager source that intake stores alerts from."""
    path = app_yaml(folder, db)
    path.write_text(path.read_text(encoding="utf-8") + "timezone: UTC\npeople: [{id: alice, name: Alice, roles: "
                    "[responder]}]\nchannels: []\nsources: [{id: am, kind: alertmanager, auth: {bearer: "
                    "'amtoken12345'}}]\n", encoding="utf-8")
    return path


def post_alert(port: int, name: str) -> int:
    """An Alertmanager webhook with one firing alert; the HTTP status intake answers."""
    import urllib.error
    import urllib.request

    body = json.dumps({"version": "4", "status": "firing", "alerts": [{
        "status": "firing", "labels": {"alertname": name}, "annotations": {}, "startsAt": "2026-12-06T08:00:00Z",
        "fingerprint": name}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/alerts/am", data=body, method="POST",
                                     headers={"Authorization": "Bearer amtoken12345"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_running_bot_on_the_old_key_stops_appending_after_a_rekey(db: Database, tmp_path: Path) -> None:
    """PostgreSQL lets a rekey commit beside a running bot (the CLI refuses, below; an older chatops did not): the
    bot, on the old key, must not hash one more event after the `audit.rekeyed`, or the chain breaks for good. Intake
    answers 503 (the sender retries once the bot runs on the new key) and the log says why."""
    if not db.is_postgres:
        pytest.skip("on SQLite the running bot holds the store: a rekey cannot run beside it")
    alerting_app_yaml(tmp_path, db)
    port = free_port()
    proc = start_bot(tmp_path, port, {"CHATOPS_AUDIT_KEY": BOT_KEY})
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", proc)
        assert await asyncio.to_thread(post_alert, port, "one") < 300
        old, new = AuditLog(BOT_KEY), AuditLog(NEW_KEY)
        rekeyed = await rekey(db, old, new)
        assert await asyncio.to_thread(post_alert, port, "two") == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    log = proc.stdout.read()
    assert (f"the audit chain was rekeyed to another key (fingerprint {key_fingerprint(NEW_KEY)}) at event "
            f"#{rekeyed} by `chatops audit rekey`, and this audit.hmac_key has fingerprint "
            f"{key_fingerprint(BOT_KEY)}") in log and "answering 503 so senders retry" in log, log
    assert (await events(db))[-1] == "audit.rekeyed"
    async with db.sessions() as session:
        assert (await new.verify(session, old_keys={"OLD": BOT_KEY})).ok
        assert await new.key_problem(session) is None and await old.key_problem(session) is not None


async def test_an_append_with_the_old_key_after_a_rekey_is_refused(db: Database) -> None:
    """The same in one process: the log that wrote the head before the rekey finds the change at its next append."""
    old, new = AuditLog(BOT_KEY), AuditLog(NEW_KEY)
    await write_events(db, old, 2)
    await rekey(db, old, new)
    with pytest.raises(KeyMismatch, match=r"rekeyed to another key \(fingerprint [0-9a-f]{16}\) at event #3 by "
                                          "`chatops audit rekey`.*restart this bot"):
        await write_events(db, old, 1)
    await write_events(db, new, 1)
    assert await events(db) == ["incident.acknowledged"] * 2 + ["audit.rekeyed", "incident.acknowledged"]
    assert (await verify(db, new)).ok


async def test_a_chain_broken_by_a_bot_that_kept_the_old_key_is_said_as_it_is(db: Database) -> None:
    """After a rekey, a bot that kept the old key (before appends checked for a change) wrote on: a restart with the
    new key is told what happened (not that the key differs from itself), and one with the old key is refused even
    though the newest event verifies with it."""
    old, new = AuditLog(BOT_KEY), AuditLog(NEW_KEY)
    await write_events(db, old, 2)
    await rekey(db, old, new)
    async with db.sessions() as session:
        head = (await session.execute(select(AuditEvent.hash).where(AuditEvent.seq == 3))).scalar_one()
    old._known_head = head  # as a bot that checked its key only at its start
    await write_events(db, old, 2)
    async with db.sessions() as session:
        with_new, with_old = await new.key_problem(session), await old.key_problem(session)
    assert with_new == (f"the audit chain was rekeyed to this audit.hmac_key (fingerprint {key_fingerprint(NEW_KEY)}) "
                        "at event #3, but its newest event, #5, does not verify with it: events after the rekey were "
                        "written with another key (a bot that kept running with the old key), or modified; the chain "
                        "is broken there, as `chatops audit verify` says. Events hashed now would carry on from a "
                        "broken chain")
    assert with_old.startswith(f"the audit chain was rekeyed to another key (fingerprint {key_fingerprint(NEW_KEY)}) "
                               f"at event #3 by `chatops audit rekey`, and this audit.hmac_key has fingerprint "
                               f"{key_fingerprint(BOT_KEY)}")
    assert with_old.endswith("events after it (up to #5) were hashed with this old key, by a bot that kept running "
                             "with it: the chain is broken there, as `chatops audit verify` says")


async def test_rekey_is_refused_while_a_replica_runs_on_postgresql(db: Database, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if not db.is_postgres:
        pytest.skip("SQLite: test_rekey_is_refused_while_the_bot_holds_its_sqlite_store")
    await write_events(db, AuditLog(BOT_KEY), 2)
    cfg = str(app_yaml(tmp_path, db))
    rekey = ["audit", "rekey", "--old-key-env", "OLD", "-c", cfg]
    port = free_port()
    proc = start_bot(tmp_path, port, {"CHATOPS_AUDIT_KEY": BOT_KEY})
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", proc)
        for _ in range(100):  # the outbox takes its lock at its first round
            if "this replica leads outbox" in proc.stdout.read():
                break
            await asyncio.sleep(0.1)
        code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, rekey, NEW_KEY, OLD=BOT_KEY)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert code == 1 and "a bot is running on this store" in err and "stop every replica first" in err, err
    assert await events(db) == ["incident.acknowledged"] * 2
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, rekey, NEW_KEY, OLD=BOT_KEY)
    assert code == 0 and out.startswith("the audit key changed at event #3 (audit.rekeyed)"), err


async def test_rekey_with_an_old_key_on_a_chain_written_without_one_says_so(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    await write_events(db, AuditLog(None), 2)
    cfg = str(app_yaml(tmp_path, db))
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "rekey", "--old-key-env", "OLD",
                                                                        "-c", cfg], NEW_KEY, OLD=SHELL_KEY)
    assert code == 2 and out == "" and err == ("the key was not changed: this chain was written without a key, not "
                                               "with the key in OLD: use --from-no-key\n")
    assert len(await events(db)) == 2


async def test_a_second_rekey_says_how_each_stretch_before_it_was_written(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    await write_events(db, AuditLog(None), 2)
    cfg = str(app_yaml(tmp_path, db))
    code, _, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "rekey", "--from-no-key", "-c", cfg],
                                           BOT_KEY)
    assert code == 0, err
    code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "rekey", "--old-key-env", "OLD",
                                                                        "-c", cfg], NEW_KEY, OLD=BOT_KEY)
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "the audit key changed at event #4 (audit.rekeyed): the events before it, as checked now with the old key:",
        "  events #1-#2, written without a key before one was introduced at event #3: checked as plain SHA-256 "
        "(evident of accidents, not of deliberate edits)",
        f"  event #3, since the key changed at event #3 (audit.rekeyed): checked fully with the key with fingerprint "
        f"{key_fingerprint(BOT_KEY)}"]
    assert "events #1-#3 were written with" not in out


@pytest.mark.parametrize(("written_with", "shell_key", "code", "said"), [
    # The key's variable is not set here (a cron job's environment): nothing could be checked (2)
    (BOT_KEY, None, 2, "audit chain not checked: none of its 3 event(s) verifies without a key: the chain was written "
                       "with a key, and no audit.hmac_key is set here (is the environment variable it reads set where "
                       "this runs?), or every one of them was modified. Set audit.hmac_key to the key the chain was "
                       "written with (the bot's) and run this again"),
    # Another key: nothing in the chain tells that from every event modified, which is a finding (1), said with both
    (BOT_KEY, SHELL_KEY, 1, "audit chain broken after 0 good events: audit event #1 "),
    # A key on a chain that verifies without one: proven, nothing checked (2)
    (None, SHELL_KEY, 2, "audit chain not checked: the chain was written without a key, and audit.hmac_key is set here "
                         f"(fingerprint {key_fingerprint(SHELL_KEY)}): none of its 3 event(s) verifies with it. Leave "
                         "audit.hmac_key unset, as it is where the chain was written, and run this again (a key is "
                         "introduced on purpose with `chatops audit rekey --from-no-key`)"),
])
async def test_audit_verify_with_another_key_or_none_says_it_checked_nothing_not_that_the_chain_was_modified(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        written_with: str | None, shell_key: str | None, code: int, said: str) -> None:
    """A cron job's environment without the key's variable: verify said "audit event #1 was modified" and exited 1,
    the status of tampering, where serve on the same config says the key is missing (exit 2)."""
    await write_events(db, AuditLog(written_with), 3)
    cfg = str(app_yaml(tmp_path, db))
    got, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], shell_key)
    if code == 2:
        assert (got, out) == (2, "") and said in err.splitlines(), (got, out, err)
    else:
        assert got == 1 and out.startswith(said) and (
            f"the chain was written with another key, or every one of them was modified" in out), out
    if shell_key is None:  # the config's warnings, as check-config prints them
        assert "warning: audit.hmac_key: CHATOPS_AUDIT_KEY is not set" in err.splitlines()
    got, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], written_with)
    assert got == 0 and out.startswith("audit chain intact: 3 events")
    # The first event modified is tampering, with the chain's key: the others still verify with it.
    await sql(db, "UPDATE audit_events SET subject_id = '9' WHERE seq = 1")
    got, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], written_with)
    assert got == 1 and out.startswith("audit chain broken after 0 good events: audit event #1 ")


@pytest.mark.parametrize("written_with", [BOT_KEY, None])
async def test_audit_verify_of_a_chain_whose_every_event_was_modified_is_tampering_not_a_wrong_key(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        written_with: str | None) -> None:
    """Every event modified (one UPDATE) with the chain's own key in hand, or on a chain that never had a key with
    none configured: verify said the key was not the chain's (exit 2), which a monitor watching for 1 missed."""
    await write_events(db, AuditLog(written_with), 3)
    await sql(db, "UPDATE audit_events SET actor_person = 'mallory'")
    cfg = app_yaml(tmp_path, db)
    if written_with is None:  # a config without audit.hmac_key at all (not a variable that is unset)
        cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if "hmac_key" not in line) + "\n")
    got, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", str(cfg)], written_with)
    assert got == 1 and out.startswith("audit chain broken after 0 good events: audit event #1 "), (got, out, err)
    assert "every one of them was modified" in out, out


async def test_audit_verify_after_a_rekey_with_the_old_key_or_none_names_the_key_the_chain_changed_to(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = AuditLog(BOT_KEY), AuditLog(NEW_KEY)
    await write_events(db, old, 2)
    await rekey(db, old, new)
    await write_events(db, new, 2)
    cfg = str(app_yaml(tmp_path, db))
    for shell_key, here in ((BOT_KEY, f"this audit.hmac_key (fingerprint {key_fingerprint(BOT_KEY)})"),
                            (None, "no audit.hmac_key is set here (is the environment variable it reads set where "
                                   "this runs?)")):
        code, out, err = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], shell_key)
        assert (code, out) == (2, ""), err
        assert (f"audit chain not checked: the chain was rekeyed to another key (fingerprint "
                f"{key_fingerprint(NEW_KEY)}) at event #3 by `chatops audit rekey`, and {here}: none of the 3 "
                "event(s) from #3 on verifies with it. Set audit.hmac_key to that key and run this again"
                ) in err.splitlines(), err
    # An event after the change modified, with the new key: tampering, as before.
    await sql(db, "UPDATE audit_events SET subject_id = '9' WHERE seq = 4")
    code, out, _ = await asyncio.to_thread(run, monkeypatch, capsys, ["audit", "verify", "-c", cfg], NEW_KEY)
    assert code == 1 and out.startswith("audit chain broken after 3 good events: audit event #4 ")
