"""`chatops` as people type it: options before or after the command, the wrong folder, numbers and times out of
range, a reader that stops early. Each answer is a message that says what to do, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main
from tests.conftest import ROOT
from tests.test_serve import CHATOPS, DOUBTFUL, DOUBTS

PEOPLE_AND_ROTATION = """
timezone: Europe/Berlin
people:
  - {id: alice, name: Alice, slack: U01ALICE}
  - {id: bob, name: Bob, slack: U02BOB}
rotations:
  - {id: dba, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02}
"""


def config(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "app.yaml"
    path.write_text(f"storage: {{url: '{url}'}}\n" + PEOPLE_AND_ROTATION, encoding="utf-8")
    return path


async def make_store(url: str) -> None:
    from storage.db import Database

    db = Database(url)
    await db.start()
    await db.dispose()


def test_options_before_the_command_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "bot.db"
    cfg = config(tmp_path / "a", f"sqlite+aiosqlite:///{db}")
    asyncio.run(make_store(f"sqlite+aiosqlite:///{db}"))
    assert main(["-c", str(cfg), "incidents", "list"]) == 0  # -c before the command is not lost
    assert capsys.readouterr().out.strip() == "no incidents"
    assert main(["-c", str(tmp_path / "nowhere.yaml"), "incidents", "list", "-c", str(cfg)]) == 0  # the later one
    assert main(["-c", str(tmp_path / "nowhere.yaml"), "incidents", "list"]) == 2
    assert "nowhere.yaml: file not found" in capsys.readouterr().err


def test_options_between_the_two_words_of_a_command_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "bot.db"
    cfg = str(config(tmp_path / "a", f"sqlite+aiosqlite:///{db}"))
    asyncio.run(make_store(f"sqlite+aiosqlite:///{db}"))
    assert main(["audit", "-c", cfg, "verify"]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 0 events")
    assert main(["incidents", "--log-level", "DEBUG", "-c", cfg, "list"]) == 0
    assert capsys.readouterr().out.strip() == "no incidents"
    assert main(["outbox", "--log-format", "json", "--config", cfg, "list"]) == 0
    assert capsys.readouterr().out.startswith("no pending deliveries")
    assert main(["telegram", "-c", cfg, "set-webhook"]) == 2  # read the config: telegram is off in it
    assert "telegram is off (no section under adapters)" in capsys.readouterr().err
    nowhere = str(tmp_path / "nowhere.yaml")  # the one nearest the end wins, wherever each is
    assert main(["-c", nowhere, "incidents", "-c", nowhere, "list", "-c", cfg]) == 0
    assert main(["-c", nowhere, "incidents", "-c", cfg, "list"]) == 0
    assert main(["-c", cfg, "incidents", "-c", nowhere, "list"]) == 2
    assert "nowhere.yaml: file not found" in capsys.readouterr().err


def no_store_exit(command: list[str]) -> int:
    """A command's exit status without a store to work on: 2, as for any problem of the setup, in every command. It
    was 1 but for `audit verify`; 1 says a damaged row was found (`audit export`, `incidents list`), or that nothing
    changed (`incidents ack`): a script must tell those from a wrong path or a database that is down."""
    return 2


async def test_incidents_list_open_leaves_the_resolved_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        for asset in ("web-1", "web-2"):
            body = {"asset_name": asset, "signature": "Down", "severity": "high", "message": f"{asset} down",
                    "tool_source": "t"}
            assert (await h.post("open", body))[0] == 200
        assert (await h.post("open", {**body, "status": "resolved"}))[0] == 200  # web-2 resolves
        [web1, _] = sorted(await h.incidents(), key=lambda i: i.id)
        from bot.model import Actor
        from handlers.incident_actions import perform

        assert (await perform(db=h.bot.db, audit=h.bot.audit, incident_id=web1.id, action="acknowledge",
                              actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())).changed
    for status, titles in (("open", ["web-1 down"]), ("resolved", ["web-2 down"]), ("all", ["web-2 down", "web-1 down"])):
        assert await asyncio.to_thread(main, ["incidents", "list", "--status", status, "--format", "json",
                                              "-c", str(cfg)]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert sorted(i["title"] for i in listed) == sorted(titles), status
    # when it was acknowledged, as when it was resolved (it had only who)
    assert {i["title"]: (i["acknowledged_by"], i["acknowledged_at"]) for i in listed} == {
        "web-1 down": ("alice", h.clock.now().isoformat()), "web-2 down": (None, None)}


async def test_incidents_list_offers_open_only_to_a_list_of_every_status(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--status resolved --limit 1` offered "--status open only those still open"; `--status all` said "incidents
    with status all"."""
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        for asset in ("web-1", "web-2", "web-3"):
            body = {"asset_name": asset, "signature": "Down", "severity": "high", "message": f"{asset} down",
                    "tool_source": "t"}
            assert (await h.post("open", body))[0] == 200
            if asset != "web-1":
                assert (await h.post("open", {**body, "status": "resolved"}))[0] == 200
    for status, said in (
            ([], "the first 1 of 3 incidents, by that order; --limit 3 shows them all, --status open only those still open"),
            (["--status", "all"], "the first 1 of 3 incidents, by that order; --limit 3 shows them all, --status open only those still "
                                  "open"),
            (["--status", "resolved"], "the first 1 of 2 incidents with status resolved, by that order; --limit 2 shows them all")):
        assert await asyncio.to_thread(main, ["incidents", "list", *status, "--limit", "1", "-c", str(cfg)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == said, status
    # JSON: the same, on stderr (the list was cut without a word)
    assert await asyncio.to_thread(main, ["incidents", "list", "--limit", "1", "--format", "json", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 1 and err == "the first 1 of 3 incidents; --limit 3 shows them all\n"
    for status, ids in (("all", ["#1", "#2", "#3"]), ("open", ["#1"]),  # all listed
                        ("firing", ["#1"]), ("silenced", ["no"]),  # (the states the card shows, as DESIGN.md names them)
                        ("acknowledged", ["no"])):
        assert await asyncio.to_thread(main, ["incidents", "list", "--status", status, "-c", str(cfg)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert sorted(line.split()[0] for line in out[1:] or out) == ids, status
    assert out == ["no incidents with status acknowledged"]


def test_a_reading_command_refuses_a_database_that_is_not_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path / "bot", "sqlite+aiosqlite:///./chatops.db")  # relative: to the current directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for command in (["incidents", "list"], ["incidents", "show", "1"], ["audit", "verify"], ["audit", "export"],
                    ["outbox", "list"], ["report"]):
        assert main([*command, "-c", str(cfg)]) == no_store_exit(command), command
        err = capsys.readouterr().err
        assert err.startswith(f"no database at {elsewhere / 'chatops.db'} (a relative path starts at the current "
                              f"directory, {elsewhere}): run this where the bot runs"), err
    assert not (elsewhere / "chatops.db").exists()  # nothing was made there


@pytest.mark.parametrize("name", ["{tmp}/u.db", "u.db", "//localhost{tmp}/u.db"])
def test_a_reading_command_makes_no_store_at_a_sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], name: str) -> None:
    monkeypatch.chdir(tmp_path)  # a relative file: URI starts at the current directory, as a plain path does
    url = f"sqlite+aiosqlite:///file:{name.format(tmp=tmp_path)}?uri=true"
    cfg = config(tmp_path / "bot", url)
    for command in (["incidents", "list"], ["incidents", "show", "1"], ["audit", "verify"], ["audit", "export"],
                    ["outbox", "list"], ["report"]):
        assert main([*command, "-c", str(cfg)]) == no_store_exit(command), command  # (it made one, "no incidents")
        err = capsys.readouterr().err
        assert err.startswith(f"no database at {tmp_path / 'u.db'}"), err
        assert err.rstrip().endswith(("check storage.url in app.yaml", "an absolute path in app.yaml")[name == "u.db"]
                                     + "; starting the bot once (chatops serve) makes a new, empty store"), err
        assert not (tmp_path / "u.db").exists(), command
    assert main(["oncall", "-c", str(cfg)]) == 0  # the rotations answer without it (and make none)
    assert capsys.readouterr().err.strip() == f"no database at {tmp_path / 'u.db'}: overrides are not shown"
    assert not (tmp_path / "u.db").exists()
    asyncio.run(make_store(url))  # once the bot made it, the same URL reads it
    assert main(["incidents", "list", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == "no incidents"
    assert main(["audit", "verify", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 0 events")


@pytest.mark.parametrize("uri", [False, True])
@pytest.mark.parametrize("held", [[], ["customers", "orders"]])
def test_a_reading_command_refuses_a_sqlite_file_without_the_store_and_leaves_it_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], held: list[str], uri: bool) -> None:
    """An empty file (`: > chatops.db`) or another program's database: `audit verify` said "intact: 0 events",
    `incidents list` "no incidents", and the bot's tables were made in it."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as made:
        for name in held:
            made.execute(f"CREATE TABLE {name} (id INTEGER)")
    made.close()
    before = path.read_bytes()
    url = f"sqlite+aiosqlite:///file:{path}?uri=true" if uri else f"sqlite+aiosqlite:///{path}"
    cfg = config(tmp_path / "bot", url)
    said = (f"it holds other tables ({', '.join(held)}), not the bot's: check storage.url in app.yaml (this looks like "
            "another program's database)" if held else "it holds no tables: check storage.url in app.yaml; starting "
            "the bot once (chatops serve) makes a new, empty store in it")
    for command in (["incidents", "list"], ["incidents", "show", "1"], ["audit", "verify"], ["audit", "export"],
                    ["outbox", "list"], ["outbox", "retry", "--dead"], ["report"]):
        assert main([*command, "-c", str(cfg)]) == no_store_exit(command), command
        out, err = capsys.readouterr()
        assert out == "" and err.strip() == f"no chatops store in the SQLite file {path}: {said}", command
    assert main(["oncall", "-c", str(cfg)]) == 0  # the rotations answer without it
    assert capsys.readouterr().err.strip() == f"no chatops store in the SQLite file {path}: {said}; overrides are " \
        "not shown"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bot", "other.db"]
    asyncio.run(make_store(url))  # the bot, started on it, makes its store there (beside what it holds)
    assert main(["audit", "verify", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 0 events")


def test_oncall_answers_without_a_store_and_makes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path / "bot", "sqlite+aiosqlite:///./chatops.db")
    monkeypatch.chdir(tmp_path)
    assert main(["oncall", "dba", "--at", "2026-11-25T12:00", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[2].split()[0] == "Bob"  # the second week of the rotation (it started on 2 November)
    assert out.splitlines()[2].endswith("  at --at")  # (not "now": now is another day)
    assert err.strip() == f"no database at {tmp_path / 'chatops.db'}: overrides are not shown"
    assert not (tmp_path / "chatops.db").exists()
    assert main(["incidents", "list", "-c", str(cfg)]) == 2  # still no store to read: said so, not "no incidents"
    assert capsys.readouterr().err.startswith(f"no database at {tmp_path / 'chatops.db'}")


def test_a_reading_command_on_a_store_whose_folder_is_not_there_does_not_promise_serve_makes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "var" / "chatops"  # not made yet: `chatops serve` cannot make a store there either
    cfg = config(tmp_path / "bot", f"sqlite+aiosqlite:///{folder}/chatops.db")
    assert main(["incidents", "list", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"no database at {folder / 'chatops.db'}, and the folder {folder} does not exist: check "
                           "storage.url in app.yaml (or create the folder; starting the bot once, chatops serve, then "
                           "makes a new, empty store)")
    monkeypatch.chdir(tmp_path)  # a relative path: said as before, and the folder too
    cfg = config(tmp_path / "bot", "sqlite+aiosqlite:///./var/chatops/chatops.db")
    assert main(["audit", "verify", "-c", str(cfg)]) == no_store_exit(["audit", "verify"])
    err = capsys.readouterr().err
    assert err.startswith(f"no database at {folder / 'chatops.db'} (a relative path starts at the current directory, "
                          f"{tmp_path}): run this where the bot runs, or give storage.url an absolute path in app.yaml;")
    assert err.strip().endswith(f"the folder {folder} does not exist either")


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///{tmp}/app.yaml", "sqlite+aiosqlite:///{tmp}/folder",
                                 "postgresql+asyncpg://postgres@127.0.0.1:1/x"])
def test_a_store_that_cannot_be_opened_is_named_without_a_traceback(tmp_path: Path, url: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "folder").mkdir()
    cfg = config(tmp_path, url.format(tmp=tmp_path))  # app.yaml itself: a file that is no database
    for command in (["incidents", "list"], ["audit", "verify"], ["report"]):
        assert main([*command, "-c", str(cfg)]) == no_store_exit(command), command
        err = capsys.readouterr().err
        assert err.startswith(f"cannot open the database at {url.format(tmp=tmp_path)}: "), err
        assert err.rstrip().endswith("check storage.url in app.yaml (and, for PostgreSQL, that the server is running)")
        assert "Traceback" not in err
    # The rotations answer without the store, as without a SQLite file (it exited 1, showing nobody on call).
    assert main(["oncall", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"cannot open the database at {url.format(tmp=tmp_path)}: ") and err.rstrip().endswith(
        "; overrides are not shown"), err
    assert "dba" in out and "Traceback" not in err


@pytest.mark.parametrize(("argv", "problem"), [
    (["incidents", "show", "99999999999999999999"], "99999999999999999999 is out of range (1 to 2147483647)"),
    (["incidents", "show", "2147483648"], "2147483648 is out of range (1 to 2147483647)"),  # a database error on PG
    (["audit", "export", "--incident", "0"], "0 is out of range"),
    (["incidents", "list", "--limit", "-1"], "-1 is out of range (1 to 1000000)"),
    (["oncall", "--at", "9999-12-31T23:00Z"], "'9999-12-31T23:00Z' is out of range (years 1970 to 9000)"),
    (["outbox", "list", "--limit", "ten"], "not a whole number: 'ten'"),
    (["incidents"], "required: {list,show,ack,escalate,resolve,reopen}"),  # (it said "required: ACTION")
])
def test_numbers_and_times_out_of_range_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         argv: list[str], problem: str) -> None:
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    with pytest.raises(SystemExit) as exited:
        main([*argv, "-c", str(cfg)])
    assert exited.value.code == 2 and problem in capsys.readouterr().err


def test_a_time_without_an_offset_is_in_the_configured_time_zone(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    # Monday 30 Nov, 08:30 in Berlin: Bob until 09:00 (07:30 UTC would be the same; 08:30 UTC would be Alice)
    assert main(["oncall", "-c", str(cfg), "--at", "2026-11-30T08:30"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split()
    assert row[:2] == ["dba", "Bob"]
    assert main(["oncall", "-c", str(cfg), "--at", "2026-11-30T09:30"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].split()[:2] == ["dba", "Alice"]


def test_a_report_from_a_future_time_says_there_is_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    asyncio.run(make_store(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"))
    assert main(["report", "-c", str(cfg), "--since", "2999-01-01T00:00Z"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("No incidents opened between ")
    assert said.err == ("--since (2999-01-01T00:00:00+00:00) is after now: nothing can have happened in it yet (a "
                        "mistyped year?)\n")
    assert main(["report", "-c", str(cfg), "--since", "2999-01-01T00:00Z", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)  # still JSON for whoever reads it
    assert (report["incidents"], report["since"], report["until"]) == (0, "2999-01-01T00:00:00+00:00",
                                                                       "2999-01-01T00:00:00+00:00")


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
    subprocess.run([CHATOPS, "oncall", "-c", str(cfg)], env=env, check=True, capture_output=True)
    script = (  # an audit log longer than a pipe's buffer
              f"import asyncio, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
              "from datetime import UTC, datetime\n"
              "from storage.audit import AuditLog, Entry\n"
              "from storage.db import Database\n"
              "from bot.model import Actor\n"
              "async def fill():\n"
              f"    db = Database('sqlite+aiosqlite:///{tmp_path / 'bot.db'}')\n"
              "    await db.start()\n"
              "    async with db.transaction() as s:\n"
              "        await AuditLog(None).append_many(s, [Entry('test.event', Actor.system(), 'test', str(i), "
              "datetime.now(UTC), {'pad': 'x' * 200}) for i in range(2000)])\n"
              "    await db.dispose()\n"
              "asyncio.run(fill())\n")
    subprocess.run([str(Path(CHATOPS).with_name("python")), "-c", script], env=env, check=True)
    piped = subprocess.run(f"set -o pipefail; '{CHATOPS}' audit export -c '{cfg}' | head -n 1", shell=True, env=env,
                           capture_output=True, text=True, executable="/bin/bash")
    assert piped.stdout.count("\n") == 1 and '"test.event"' in piped.stdout
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr
    # As `yes | head -1` ends (SIGPIPE): not 1, which says a damaged event was found
    assert piped.returncode == 141, (piped.returncode, piped.stderr)
    # the same for a short output, whose end the reader missed only at the last flush
    short = subprocess.run(f"set -o pipefail; '{CHATOPS}' incidents list --format json -c '{cfg}' | true",
                           shell=True, env=env, capture_output=True, text=True, executable="/bin/bash")
    assert short.returncode in (0, 141) and "Traceback" not in short.stderr and "Exception" not in short.stderr, (
        short.returncode, short.stderr)


def test_check_config_does_not_call_teams_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text((Path(__file__).parent.parent / "app.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEAMS_APP_ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("TEAMS_APP_PASSWORD", "a-password")
    assert main(["check-config", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("adapters on: teams")


async def test_incidents_show_reads_in_the_bots_time_zone_with_names(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)  # timezone: Europe/Berlin; alice is "Alice"
    async with running_bot(url) as h:  # the harness's clock: Tuesday 24 Nov 2026, 04:00 UTC
        body = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "web-1 down",
                "tool_source": "t", "links": {"graph": "https://grafana.example/graph"}}
        assert (await h.post("open", body))[0] == 200
        [incident] = await h.incidents()
        from bot.model import Actor
        from handlers.incident_actions import perform

        for action in ("acknowledge", "resolve"):
            assert (await perform(db=h.bot.db, audit=h.bot.audit, incident_id=incident.id, action=action,
                                  actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())).changed
    assert await asyncio.to_thread(main, ["incidents", "show", str(incident.id), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "opened:       2026-11-24 05:00:00 CET (" in out
    assert "acknowledged: by Alice at 2026-11-24 05:00:00 CET" in out
    assert "2026-11-24 05:00:00 CET  incident.acknowledged  Alice" in out
    assert "resolved:     by Alice at 2026-11-24 05:00:00 CET" in out
    assert "link: generator: https://grafana.example/graph" in out  # a long name still has its space


async def test_incidents_show_of_an_incident_with_a_damaged_audit_event_shows_the_rest_and_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An audit row whose time is no time (only SQLite lets one in): `incidents show` printed nothing of the incident,
    only that some row cannot be read."""
    import sqlite3

    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "web-1", "signature": "Down", "severity": "high",
                                      "message": "web-1 down", "tool_source": "t"}))[0] == 200
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        seq, fingerprint = conn.execute(
            "SELECT seq, subject_id FROM audit_events WHERE action = 'alert.received'").fetchone()
        conn.execute("UPDATE audit_events SET at = 'yesterday' WHERE seq = ?", (seq,))
    conn.close()
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("#1 web-1 down") and "incident.opened  " in out
    assert [" ".join(line.split()) for line in out.splitlines() if "(damaged)" in line] == [
        f"yesterday alert.received (damaged) source:open {fingerprint}: web-1 down"]
    assert err.startswith(f"audit event #{seq} is damaged, cannot read its at (ValueError: ") and err.rstrip().endswith(
        "; `chatops audit verify` checks the chain"), err


async def test_a_list_cut_short_in_a_storm_keeps_the_most_urgent(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`incidents list` took the newest N and then ranked them: in a storm of low alerts the critical incident opened
    before it was in no listing at all, though the list ranks the highest priority first."""
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "db-01", "signature": "Down", "severity": "critical",
                                      "message": "primary down", "tool_source": "t"}))[0] == 200
        for n in range(5):
            assert (await h.post("open", {"asset_name": f"web-{n}", "signature": "Slow", "severity": "low",
                                          "message": "slow", "tool_source": "t"}))[0] == 200
    assert await asyncio.to_thread(main, ["incidents", "list", "--limit", "3", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:4]] == ["#1", "#6", "#5"]  # the critical one, then the newest
    assert out[-1] == ("the first 3 of 6 incidents, by that order; --limit 6 shows them all, --status open only "
                       "those still open")


async def test_long_lists_say_what_they_leave_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After a storm: `incidents list` says it shows the newest N of more; `incidents show` of an incident with
    hundreds of alerts prints the first 50 (with their hosts) and the latest 50 lines of its timeline, and says how
    many more `--all` prints."""
    from tests.botkit import fixture, running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))  # one group: one incident
        template = payload["alerts"][0]
        payload["alerts"] = [{**template, "fingerprint": f"fp{i:02d}", "labels": {**template["labels"], "instance": f"db-{i}"}}
                             for i in range(60)]  # 60 hosts
        assert (await h.post("am", payload))[0] == 200
        for n in range(3):
            assert (await h.post("open", {"asset_name": f"web-{n}", "signature": "Down", "severity": "low",
                                          "message": "down", "tool_source": "t"}))[0] == 200
        # Two sources telling of web-0 by turns: each notification a line of the timeline of #2.
        cpu = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
        cpu["alerts"][0]["labels"] = {"alertname": "Down", "instance": "web-0", "severity": "low"}
        for _ in range(30):
            assert (await h.post("am-plain", cpu))[0] == 200
            assert (await h.post("open", {"asset_name": "web-0", "signature": "Down", "severity": "low",
                                          "message": "down", "tool_source": "t"}))[0] == 200
    assert await asyncio.to_thread(main, ["incidents", "list", "--limit", "2", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("the first 2 of 4 incidents, by that order; --limit 4 shows them all, --status open "
                                 "only those still open")
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "INSTANCE" in out and " db-0 " in out and " db-49 " in out and " db-50 " not in out
    assert "... and 10 more alerts (--all shows every one)" in out
    # one line for the 60 alerts grouped and received: a group's alerts sent again fill no screen
    assert " alert.received ×60, incident.grouped ×59 " in out and "more events" not in out
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "--all", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert " db-59 " in out and "more alerts" not in out
    # opened, received (open, above); then by turns grouped and received (am-plain), received (open), and 58 more
    # received: 62 lines of 63 events, the 12 lines left out hold 13
    assert await asyncio.to_thread(main, ["incidents", "show", "2", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert len(_timeline(out)) == 1 + 50 and out.rstrip().endswith(
        "... and 13 more events before these (--all shows every one)")
    assert await asyncio.to_thread(main, ["incidents", "show", "2", "--all", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert len(_timeline(out)) == 1 + 62 and "more events" not in out


def _timeline(out: str) -> list[str]:
    """The lines of `incidents show`'s timeline, each with its runs of spaces as one."""
    lines = out.split("\nTimeline\n", 1)[1].splitlines()
    return [" ".join(line.split()) for line in lines if not line.startswith("... and ")]


async def test_incidents_show_puts_a_group_sent_again_on_one_line_and_says_what_each_line_was_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Alertmanager sends a group's alerts again at each repeat interval: one `alert.received` line each, a 10-alert
    group sent six times pushed the opening out of the latest 50 lines, and no line said which alert, which silence
    or how many alerts were left out."""
    from datetime import timedelta

    from tests.botkit import fixture, running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)  # timezone: Europe/Berlin
    async with running_bot(url) as h:  # the harness's clock: Tuesday 24 Nov 2026, 04:00 UTC
        payload = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
        template = payload["alerts"][0]
        payload["alerts"] = [{**template, "fingerprint": f"fp{i:02d}"} for i in range(10)]  # one group, one host
        for _ in range(6):
            assert (await h.post("am-plain", payload))[0] == 200
            h.clock.advance(timedelta(minutes=5))
        assert (await h.post("am-plain", {**payload, "truncatedAlerts": 4}))[0] == 200
        worse = {**template, "fingerprint": "fp10", "labels": {**template["labels"], "severity": "critical", "team": "dba"}}
        assert (await h.post("am-plain", {**payload, "alerts": [worse]}))[0] == 200  # the dba route's channel joins
        assert (await h.post("open", {"asset_name": "web-9", "signature": "Down", "severity": "high",
                                      "message": "web-9 down", "tool_source": "t"}))[0] == 200  # #2, in a silence
        from bot.model import Actor
        from handlers.incident_actions import perform

        assert (await perform(db=h.bot.db, audit=h.bot.audit, incident_id=1, action="acknowledge",
                              actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())).changed
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 0
    assert _timeline(capsys.readouterr().out) == [
        "AT ACTION BY DETAIL",
        "2026-11-24 05:00:00 CET incident.opened source:am-plain medium, to ops-slack",
        # the group's first notification (each alert joining is grouped, then received) and its six repeats
        "2026-11-24 05:00:00-05:30:00 CET alert.received ×70, incident.grouped ×9 source:am-plain "
        "10 alerts: CPU above 90% for 10m",
        "2026-11-24 05:30:00 CET alerts.truncated source:am-plain 4 alerts left out, 10 received",
        "2026-11-24 05:30:00 CET incident.grouped source:am-plain fp10",
        "2026-11-24 05:30:00 CET incident.rerouted source:am-plain critical alert fp10, to ops-telegram",
        "2026-11-24 05:30:00 CET alert.received source:am-plain fp10: CPU above 90% for 10m",
        "2026-11-24 05:30:00 CET incident.acknowledged Alice",
    ]
    assert await asyncio.to_thread(main, ["incidents", "show", "2", "-c", str(cfg)]) == 0
    silenced = _timeline(capsys.readouterr().out)[-1].split(" ", 3)[3]
    assert silenced.startswith("alert.silenced source:open ") and silenced.endswith(
        ": silenced by silence web-maintenance"), silenced
    # The states the chat card shows, as DESIGN.md names them: #1 is acknowledged (neither firing nor silenced), #2
    # is triggered but muted by a maintenance window (silenced, not firing).
    for status, ids in (("silenced", ["#2"]), ("firing", []), ("triggered", ["#2"]), ("acknowledged", ["#1"])):
        assert await asyncio.to_thread(main, ["incidents", "list", "--status", status, "--format", "json",
                                              "-c", str(cfg)]) == 0
        assert [f"#{i['id']}" for i in json.loads(capsys.readouterr().out)] == ids, status
    # The table's status column says it as the card does: #2 is silenced, not "triggered"
    assert await asyncio.to_thread(main, ["incidents", "list", "-c", str(cfg)]) == 0
    statuses = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("#")}
    assert statuses == {"#1": "acknowledged", "#2": "silenced"}, statuses


async def test_incidents_show_gives_each_alerts_values_when_they_have_them(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Grafana's evaluated values were stored and shown nowhere."""
    from tests.botkit import fixture, running_bot
    from tests.test_grafana import FIRING, signed

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        body = fixture(FIRING)
        assert (await h.post("grafana", body, signed(body)))[0] == 200  # two incidents, #1 memory, #2 CPU
        assert (await h.post("am", fixture("alertmanager/03-highcpu-firing.json")))[0] == 200  # #3, no values
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.split("\nAlerts\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert out[0].split()[-1] == "VALUES" and out[1].endswith("  B=93.71044921875, C=1"), out
    assert out[0].split()[-2] == "TIMES"  # how often it was received (headed RECEIVED, it read as a time)
    assert await asyncio.to_thread(main, ["incidents", "show", "3", "-c", str(cfg)]) == 0
    assert "VALUES" not in capsys.readouterr().out  # (Alertmanager's alerts have none: no empty column)


async def test_an_escalate_the_command_line_cannot_do_says_paging_by_hand_is_done_in_chat(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It named `/incident page 1 PERSON` as if the command line had it."""
    from tests.botkit import running_bot

    url, cfg = keyed_store(tmp_path)
    async with running_bot(url) as h:
        assert (await h.post("open", WEB_DOWN))[0] == 200
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["incidents", "escalate", "1", "-c", str(cfg)])
    err = capsys.readouterr().err
    assert code == 1 and err.rstrip().endswith("`/incident page 1 PERSON` in chat."), (code, err)


async def test_incidents_list_puts_the_open_ones_before_the_resolved(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """By priority alone, a resolved critical incident was listed above an open low one."""
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        for asset, severity in (("db-1", "critical"), ("web-1", "low"), ("web-2", "high"), ("db-2", "critical")):
            body = {"asset_name": asset, "signature": "Down", "severity": severity, "message": f"{asset} down",
                    "tool_source": "t"}
            assert (await h.post("open", body))[0] == 200
            if asset == "db-1":
                assert (await h.post("open", {**body, "status": "resolved"}))[0] == 200
        from bot.model import Actor
        from handlers.incident_actions import perform

        assert (await perform(db=h.bot.db, audit=h.bot.audit, incident_id=3, action="acknowledge",
                              actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())).changed
    assert await asyncio.to_thread(main, ["incidents", "list", "-c", str(cfg)]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["#4", "triggered", "critical"], ["#3", "acknowledged", "high"], ["#2", "triggered", "low"],
                    ["#1", "resolved", "critical"]]
    assert await asyncio.to_thread(main, ["incidents", "list", "--format", "json", "-c", str(cfg)]) == 0
    assert [i["id"] for i in json.loads(capsys.readouterr().out)] == [4, 3, 2, 1]


async def test_outbox_list_shows_a_delivery_of_no_incident_and_says_when_an_error_is_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from storage.db import Database
    from storage.models import OutboxItem

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "o", url)
    await make_store(url)
    error = ("slack chat.postMessage: channel_not_found " + "(the bot is not in #handoffs; invite it) " * 2
             + "(its cause)")
    db = Database(url)
    async with db.transaction() as session:
        session.add(OutboxItem(created_at=datetime.now(UTC), due_at=datetime.now(UTC), channel="@alice", kind="dm",
                               event="handoff.notice", status="dead", attempts=1, last_error=error))
    await db.dispose()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["outbox", "list", "--status", "dead", "-c", str(cfg)]) == 0
    [_, row] = capsys.readouterr().out.splitlines()[:2]
    assert row.split()[:3] == ["1", "-", "@alice"]  # no incident: a dash, not "#None"
    assert row.endswith(error)  # written to a pipe: whole
    monkeypatch.setenv("COLUMNS", "150")  # a terminal too narrow for it: cut in the middle (the cause kept), said so
    assert await asyncio.to_thread(main, ["outbox", "list", "--status", "dead", "-c", str(cfg)]) == 0
    [_, row] = capsys.readouterr().out.splitlines()[:2]
    assert len(row) == 150 and " slack chat.postM" in row and "…" in row and row.endswith("invite it) (its cause)")


async def test_outbox_list_says_how_to_see_and_resend_the_dead_deliveries_it_does_not_show(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from storage.db import Database
    from storage.models import OutboxItem

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "o", url)
    await make_store(url)
    db = Database(url)
    async with db.transaction() as session:
        for status in ("dead", "dead", "pending"):
            session.add(OutboxItem(created_at=datetime.now(UTC), due_at=datetime.now(UTC), channel="ops", kind="post",
                                   event="incident.opened", status=status, attempts=1, last_error="channel_not_found"))
    await db.dispose()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["outbox", "list", "-c", str(cfg)]) == 0  # pending, by default
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[5] for line in out[1:-2]] == ["pending"]
    assert out[-2:] == ["totals: dead 2, pending 1",
                        "2 dead deliveries were given up after repeated or permanent failures: "
                        "`chatops outbox list --status dead` lists them with the error that says why, and "
                        "`chatops outbox retry ID...` (or --dead: each it is safe to send again) sends them again "
                        "once the cause is fixed"]
    assert await asyncio.to_thread(main, ["outbox", "list", "--status", "dead", "--limit", "1", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()  # the newest one, and that there are more (it said nothing of them)
    assert [line.split()[0] for line in out[1:-3]] == ["2"]
    assert out[-3:-1] == ["the newest 1 of 2 dead deliveries; --limit 2 shows them all", "totals: dead 2, pending 1"]
    assert await asyncio.to_thread(main, ["outbox", "list", "--status", "all", "--limit", "2", "-c", str(cfg)]) == 0
    assert "the newest 2 of 3 deliveries; --limit 3 shows them all" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["outbox", "list", "--status", "dead", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("the newest") for line in out)
    assert out[-1] == ("dead deliveries were given up after repeated or permanent failures; LAST ERROR says why, and "
                       "`chatops outbox retry ID...` (or --dead: each it is safe to send again) sends them again once "
                       "the cause is fixed")


async def test_what_an_alert_says_cannot_drive_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Escape sequences in an alert (recolour, retitle the window, reorder text) are shown written out, not acted on."""
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "t", url)
    message = "\x1b[31mfull\x1b]0;owned\x07 \u202etxt.exe\u200f"
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "web-1", "signature": "Disk", "severity": "high",
                                      "message": message, "tool_source": "t"}))[0] == 200
    for command in (["incidents", "list"], ["incidents", "show", "1"]):
        assert await asyncio.to_thread(main, [*command, "-c", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
        assert "\\x1b[31mfull\\x1b]0;owned\\x07 \\u202etxt.exe\\u200f" in out, out


def run_py(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python3 /path/to/clone/run.py ARGS` typed in `cwd`, on the environment the tests run in (no venv to make)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
    base["CHATOPS_VENV"] = str(Path(sys.executable).parent.parent)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_run_py_reads_a_config_named_from_where_you_are(tmp_path: Path) -> None:
    """A config named on the command line or in CHATOPS_CONFIG is read from where it was named."""
    (tmp_path / "mine.yaml").write_text((ROOT / "app.yaml").read_text())
    for args, extra in ((["-c", "mine.yaml"], {}), (["--config=mine.yaml"], {}), ([], {"CHATOPS_CONFIG": "mine.yaml"})):
        done = run_py("check-config", *args, cwd=tmp_path, env=extra)
        assert done.returncode == 0, (args, extra, done.stderr)
        assert done.stdout.startswith("mine.yaml: valid"), done.stdout


def test_run_py_runs_chatops_where_you_are(tmp_path: Path) -> None:
    """`python3 run.py chatops ARGS` is `.venv/bin/chatops ARGS` typed in the same folder: ./app.yaml there, not the
    project's example, and a relative SQLite path from there."""
    (tmp_path / "app.yaml").write_text("storage: {url: 'sqlite+aiosqlite:///./here.db'}\n" + PEOPLE_AND_ROTATION)
    asyncio.run(make_store(f"sqlite+aiosqlite:///{tmp_path / 'here.db'}"))
    done = run_py("check-config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("app.yaml: valid: 2 people, 0 channels"), done.stdout  # the example has 3 people
    assert "example" not in done.stderr, done.stderr
    for args in (["chatops", "incidents", "list", "-c", "app.yaml"], ["chatops", "incidents", "list"],
                 ["incidents", "list"]):
        done = run_py(*args, cwd=tmp_path)
        assert (done.returncode, done.stdout.strip()) == (0, "no incidents"), (args, done.stderr)


def test_run_py_without_an_app_yaml_runs_on_the_example_one_and_says_so(tmp_path: Path) -> None:
    """As `chatops` does in a folder without app.yaml (the quick start's `python3 run.py serve` runs in the clone,
    whose ./app.yaml is the example)."""
    done = run_py("check-config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{ROOT / 'app.yaml'}: valid: 3 people"), done.stdout
    assert f"no ./app.yaml: using the example config shipped with the bot, {ROOT / 'app.yaml'}" in done.stderr, done.stderr


def test_run_py_test_runs_the_suite_in_the_project_wherever_it_is_typed(tmp_path: Path) -> None:
    done = run_py("test", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_layout.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tests/test_layout.py::" in done.stdout, done.stdout


@pytest.mark.parametrize(("public_url", "warning"), [
    ("http://127.0.0.1:8080", "warning: the manifest's request URLs are http://127.0.0.1:8080/slack/events: Slack "
                              "takes only public https:// URLs"),
    ("http://chatops.example.com", "warning: the manifest's request URLs are http://chatops.example.com/slack/events: "
                                   "Slack takes only public https:// URLs"),
    ("https://localhost:8443", "warning: the manifest's request URLs are https://localhost:8443/slack/events: Slack "
                               "cannot reach localhost"),
    ("https://10.0.0.7", "warning: the manifest's request URLs are https://10.0.0.7/slack/events: Slack cannot reach "
                         "10.0.0.7"),
    ("https://chatops.example.com", None),
])
def test_slack_manifest_warns_when_slack_would_refuse_its_request_urls(tmp_path: Path, public_url: str,
                                                                       warning: str | None,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"server: {{public_url: '{public_url}'}}\n")
    assert main(["slack-manifest", "-c", str(cfg)]) == 0  # printed all the same, to edit before pasting
    out, err = capsys.readouterr()
    manifest = json.loads(out)
    assert manifest["settings"]["interactivity"]["request_url"] == public_url + "/slack/events"
    said = [line for line in err.splitlines() if line.startswith("warning: the manifest")]
    if warning is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(warning), said
        assert said[0].endswith("set server.public_url in app.yaml to the bot's public HTTPS address (or edit the "
                                "URLs before pasting the manifest)")


def test_slack_manifest_without_a_public_url_names_the_port_the_bot_listens_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text("server: {host: 0.0.0.0, port: 9000}\n")
    assert main(["slack-manifest", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["settings"]["interactivity"]["request_url"] == "http://127.0.0.1:9000/slack/events"
    assert "the manifest's request URLs are http://127.0.0.1:9000/slack/events" in err, err


def test_tables_line_up_wide_characters_by_the_columns_a_terminal_gives_them() -> None:
    """A Japanese name takes two terminal columns a character: padding by len() pushed the rest of its row right."""
    from bot.tables import table, width

    lines = table(["on call", "until"], [["山田太郎", "Mon 09:00"], ["Alice", "Tue 09:00"], ["Zoë", "Wed"]]).splitlines()
    starts = [width(line[:line.index(end)]) for line, end in zip(lines, ["until", "Mon", "Tue", "Wed"])]
    assert starts == [10, 10, 10, 10], lines
    assert table(["name"], [["山" * 40]], max_width=11).splitlines()[1] == "山" * 5 + "…"  # cut to 11 columns


def test_a_postgresql_schema_without_the_store_is_refused_and_not_made(tmp_path: Path, pg_schema: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped storage.schema: `audit verify` said "intact: 0 events", `incidents list` "no incidents", and an
    empty store was left in the new schema."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.conftest import postgres_url

    url = postgres_url()
    path = tmp_path / "app.yaml"
    path.write_text(f"storage: {{url: '{url}', schema: {pg_schema}}}\n" + PEOPLE_AND_ROTATION, encoding="utf-8")
    for command in (["audit", "verify"], ["incidents", "list"], ["report"]):
        assert main([*command, "-c", str(path)]) == no_store_exit(command), command
        err = capsys.readouterr().err
        assert err.startswith(f"no chatops store in schema '{pg_schema}' at "), err

    async def schema_exists() -> bool:
        async_engine = create_async_engine(url)
        try:
            async with async_engine.connect() as conn:
                return (await conn.execute(text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"),
                                           {"s": pg_schema})).first() is not None
        finally:
            await async_engine.dispose()

    assert main(["oncall", "-c", str(path)]) == 0  # the rotations answer without a store, as without a SQLite file
    assert "overrides are not shown" in capsys.readouterr().err
    assert not asyncio.run(schema_exists())  # nothing was made


async def test_telegram_set_webhook_is_refused_for_a_bot_that_polls(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A polling bot drops the webhook only when it starts: one set later made every getUpdates fail with 409 until
    the bot restarted."""
    from tests.fake_telegram import FakeTelegram

    async with FakeTelegram() as tg:
        cfg = tmp_path / "app.yaml"
        for mode in ("polling", "webhook"):
            cfg.write_text("server: {public_url: 'https://bot.example.com'}\n"
                           f"adapters:\n  telegram: {{bot_token: '{tg.token}', webhook_secret: s3cret-s3cret, "
                           f"mode: {mode}, api_url: '{tg.api_url}'}}\n")
            code = await asyncio.to_thread(main, ["telegram", "set-webhook", "-c", str(cfg)])
            out, err = capsys.readouterr()
            if mode == "polling":
                assert code == 2 and out == "" and not tg.called("setWebhook")
                assert err.strip() == (
                    "adapters.telegram.mode is polling: the bot fetches its updates with getUpdates, which Telegram "
                    "refuses (409 Conflict) while a webhook is set, and it drops the webhook only when it starts; to "
                    "take updates by webhook, switch to mode: webhook (with a webhook_secret) in app.yaml first, then "
                    "run this and restart the bot")
            else:  # the same config, switched: set
                assert code == 0 and out.startswith("Telegram will post updates to https://bot.example.com/telegram/"
                                                    "webhook"), err
                assert [c.params["url"] for c in tg.called("setWebhook")] == [
                    "https://bot.example.com/telegram/webhook"]


async def test_audit_export_of_an_incident_that_is_not_there_says_so(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--incident 999` printed nothing and exited 0, as for an incident nothing happened to."""
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "web-1", "signature": "Down", "severity": "high",
                                      "message": "web-1 down", "tool_source": "t"}))[0] == 200
    for export in (["--format", "jsonl"], ["--format", "csv"]):
        assert await asyncio.to_thread(main, ["audit", "export", "--incident", "999", *export, "-c", str(cfg)]) == 1
        assert capsys.readouterr() == ("", "no incident #999; `chatops incidents list` shows the ones there are\n")
        assert await asyncio.to_thread(main, ["audit", "export", "--incident", "1", *export, "-c", str(cfg)]) == 0
        assert "incident.opened" in capsys.readouterr().out
        # An incident that is there, with no events since a time: an empty export (CSV: its header), exit 0.
        assert await asyncio.to_thread(main, ["audit", "export", "--incident", "1", "--since", "2999-01-01T00:00Z",
                                              *export, "-c", str(cfg)]) == 0
        assert capsys.readouterr() == ("seq,at,actor_person,actor_platform,actor_user_id,action,subject_type,"
                                       "subject_id,incident_id,details,prev_hash,hash,damaged\r\n" if "csv" in export
                                       else "", "")


def set_webhook_refused(tmp_path: Path, url: str) -> int:
    """`chatops telegram set-webhook --url URL` on a config whose Telegram is never asked (api_url leads nowhere)."""
    cfg = tmp_path / "app.yaml"
    cfg.write_text("adapters:\n  telegram: {bot_token: '123456:ABC-token', webhook_secret: s3cret-s3cret, "
                   "api_url: 'http://127.0.0.1:1/bot'}\n")
    return main(["telegram", "set-webhook", "--url", url, "-c", str(cfg)])


@pytest.mark.parametrize("url", ["not a url", "https://", "https:///telegram/webhook", "http://bot.example.com/x",
                                 "https://[::1/telegram/webhook"])
def test_telegram_set_webhook_says_what_url_must_be(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     url: str) -> None:
    """A bad --url was answered "set server.public_url", though --url was given; `https://` (no host) was taken and
    failed at connect time."""
    assert set_webhook_refused(tmp_path, url) == 2
    assert capsys.readouterr().err.strip() == (
        f"--url {url!r}: Telegram only posts to https:// URLs with a host; give the bot's public address of its "
        "webhook, https://HOST/telegram/webhook")


@pytest.mark.parametrize(("url", "meant"), [
    ("https://bot.example.com", "https://bot.example.com/telegram/webhook"),
    ("https://bot.example.com/", "https://bot.example.com/telegram/webhook"),
    ("https://bot.example.com/wrong?a=1", "https://bot.example.com/wrong/telegram/webhook"),
    ("https://bot.example.com/telegram/webhook#x", "https://bot.example.com/telegram/webhook"),
])
def test_telegram_set_webhook_refuses_an_address_the_bot_does_not_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, meant: str) -> None:
    """`--url https://bot.example.com` (server.public_url's form) was set and said to work: the bot answers 404 there,
    and every update Telegram posted was lost, unsaid."""
    assert set_webhook_refused(tmp_path, url) == 2
    assert capsys.readouterr().err.strip() == (
        f"--url {url!r}: the bot takes Telegram's updates at /telegram/webhook, and answers 404 elsewhere; give the "
        f"whole address, such as {meant} (a proxy's prefix before it is fine), or leave --url out to use "
        "server.public_url")


def test_telegram_set_webhook_names_the_variable_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """With its token from a variable not set it said "configure adapters.telegram in app.yaml first"."""
    monkeypatch.delenv("TG_TOKEN_UNSET", raising=False)
    cfg = tmp_path / "app.yaml"
    cfg.write_text("adapters:\n  telegram: {bot_token: '${TG_TOKEN_UNSET}', webhook_secret: s3cret-s3cret}\n")
    assert main(["telegram", "set-webhook", "-c", str(cfg)]) == 2  # (a setup problem, as its others are)
    assert capsys.readouterr().err.strip() == (
        "telegram is off (TG_TOKEN_UNSET is not set): adapters.telegram in app.yaml reads it; set it in this "
        "command's environment, as for the bot, and run this again")


def test_a_config_that_is_not_there_is_said_as_where_it_was_named_not_as_invalid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`CHATOPS_CONFIG=/nope.yaml chatops incidents list` said to pass -c or set CHATOPS_CONFIG (it was set), then
    "the configuration is invalid; fix the lines above"."""
    monkeypatch.chdir(tmp_path)
    nope = str(tmp_path / "nope.yaml")
    monkeypatch.setenv("CHATOPS_CONFIG", nope)
    for command in (["incidents", "list"], ["check-config"]):  # (check-config says it where it says problems)
        assert main(command) == 2
        assert "".join(capsys.readouterr()) == (f"{nope}: file not found ($CHATOPS_CONFIG names it); set "
                                                "CHATOPS_CONFIG to the path of your app.yaml, or pass -c PATH\n")
    monkeypatch.setenv("CHATOPS_CONFIG", "nope.yaml")  # relative: from where this runs
    assert main(["audit", "verify"]) == 2
    assert capsys.readouterr().err == (f"nope.yaml: file not found ($CHATOPS_CONFIG names it, from {tmp_path}); set "
                                       "CHATOPS_CONFIG to the path of your app.yaml, or pass -c PATH\n")
    assert main(["audit", "verify", "-c", nope]) == 2  # -c wins over $CHATOPS_CONFIG, and is named
    assert capsys.readouterr().err == f"{nope}: file not found (named with -c); give -c the path of your app.yaml\n"
    monkeypatch.delenv("CHATOPS_CONFIG")
    (tmp_path / "app.yaml").symlink_to(tmp_path / "moved.yaml")
    assert main(["incidents", "list"]) == 2
    assert capsys.readouterr().err == (f"app.yaml in {tmp_path} is a link to a file that is not there; mend the "
                                       "link, or pass -c PATH or set CHATOPS_CONFIG\n")


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables fit COLUMNS when it is set; the tests' output is not a terminal, and sets it where they mean it."""
    monkeypatch.delenv("COLUMNS", raising=False)


def _older_store(url: str, schema: str | None = None) -> int:
    """A store as an older version of the bot left it: one schema version back, without that version's index."""
    from sqlalchemy import text

    from storage.db import SCHEMA_VERSION, Database

    async def made() -> None:
        db = Database(url, schema=schema)
        await db.start()
        async with db.engine.begin() as conn:
            await conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION - 1})
            await conn.execute(text("DROP INDEX IF EXISTS ix_alerts_incident"))
        await db.dispose()

    asyncio.run(made())
    return SCHEMA_VERSION - 1


def _schema_version(url: str, schema: str | None = None) -> int:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def read() -> int:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                table = f'"{schema}".schema_version' if schema else "schema_version"
                return (await conn.execute(text(f"SELECT version FROM {table}"))).scalar_one()
        finally:
            await engine.dispose()

    return asyncio.run(read())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_command_but_serve_upgrades_an_older_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       pg_schema: str, backend: str) -> None:
    """During a rollout, the new version's `chatops incidents list` upgraded the store under the older bot still
    running, which then refused to restart on it (no rollback), and a plain read needed the rights to alter tables."""
    from storage.db import SCHEMA_VERSION
    from tests.conftest import drop_schema, postgres_url

    schema = None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    else:
        url, schema = postgres_url(), pg_schema
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"storage: {{url: '{url}'{f', schema: {schema}' if schema else ''}}}\n"
                   "audit: {hmac_key: 0123456789abcdef0123456789abcdef}\n" + PEOPLE_AND_ROTATION, encoding="utf-8")
    try:
        older = _older_store(url, schema)
        said = (f"this store is at schema version {older}; this chatops needs {SCHEMA_VERSION}: start the new bot "
                "(chatops serve) to upgrade it, or use the chatops of the running version")
        for command in (["incidents", "list"], ["incidents", "show", "1"], ["audit", "verify"], ["audit", "export"],
                        ["outbox", "list"], ["report"], ["oncall"],
                        # the writing ones too: what they write, beside the running bot or not, needs no upgrade
                        ["outbox", "retry", "--dead"], ["audit", "rekey", "--from-no-key"]):
            assert main([*command, "-c", str(cfg)]) == 2, command
            assert capsys.readouterr() == ("", said + "\n"), command
        assert _schema_version(url, schema) == older  # left as it was
        asyncio.run(_started(url, schema))  # the bot, started (chatops serve), upgrades it as before
        assert _schema_version(url, schema) == SCHEMA_VERSION
        assert main(["incidents", "list", "-c", str(cfg)]) == 0
        assert capsys.readouterr().out.strip() == "no incidents"
    finally:
        if schema:
            asyncio.run(drop_schema(url, schema))


def test_a_store_whose_first_start_stopped_before_numbering_it_is_left_to_the_bot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    db = tmp_path / "bot.db"
    cfg = config(tmp_path / "c", f"sqlite+aiosqlite:///{db}")
    asyncio.run(make_store(f"sqlite+aiosqlite:///{db}"))
    with sqlite3.connect(db) as conn:  # the tables made, not yet their version (the first start stopped there)
        conn.execute("DELETE FROM schema_version")
    conn.close()
    assert main(["incidents", "list", "-c", str(cfg)]) == 2
    assert capsys.readouterr().err == ("this store has no schema version: the bot's first start on it stopped before "
                                       "the end; start the bot (chatops serve) to finish it\n")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (0,)  # left to the bot
    conn.close()


async def _started(url: str, schema: str | None) -> None:
    from storage.db import Database

    db = Database(url, schema=schema)
    await db.start()
    await db.dispose()


def test_a_store_this_user_cannot_write_is_said_so(tmp_path: Path) -> None:
    """SQLite writes beside the store even to read it (WAL's -shm): run by a user who cannot write there, every
    command said "attempt to write a readonly database; check storage.url in app.yaml (and, for PostgreSQL, that
    the server is running)"."""
    import pwd
    import shutil
    import tempfile

    other: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp())  # (the tests' own folders may be closed to another user)
    try:
        folder.chmod(0o755)
        store = folder / "store"
        store.mkdir()
        db = store / "chatops.db"
        asyncio.run(make_store(f"sqlite+aiosqlite:///{db}"))
        cfg = config(folder, f"sqlite+aiosqlite:///{db}")
        if os.geteuid() == 0:  # root writes anywhere: the command runs as another user
            other = {"user": 65534, "group": 65534, "extra_groups": []}
        else:
            db.chmod(0o444)
            store.chmod(0o555)
        whom = pwd.getpwuid(other.get("user", os.geteuid()))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}, "PYTHONPATH": str(ROOT)}

        def chatops(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "bot.cli", *args, "-c", str(cfg)], env=env, cwd=folder,
                                  capture_output=True, text=True, timeout=60, **other)

        probe = chatops("check-config")
        if probe.returncode != 0:
            pytest.skip(f"the code cannot be run as uid {whom.pw_uid}: {probe.stderr.strip()[-200:]}")
        owner = pwd.getpwuid(db.stat().st_uid).pw_name
        said = (f"cannot open the database at sqlite+aiosqlite:///{db}: the SQLite file {db} and its folder {store} "
                f"are not writable by this user ({whom.pw_name}, uid {whom.pw_uid}), and SQLite writes beside the "
                f"file even to read it: run this as the bot's user ({owner}, who owns the file)")
        for command in (["incidents", "list"], ["audit", "verify"]):
            done = chatops(*command)
            assert (done.returncode, done.stdout, done.stderr.strip()) == (no_store_exit(command), "", said), command
        done = chatops("oncall")  # the rotations answer without the store
        assert done.returncode == 0 and "dba" in done.stdout
        assert done.stderr.strip() == said + "; overrides are not shown"
    finally:
        for path in (folder / "store", folder / "store" / "chatops.db"):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(folder)


def test_an_emoji_drawn_of_several_takes_the_columns_of_one() -> None:
    """A family joined with ZWJ was counted 11 columns, a thumbs-up with a skin tone 4: terminals draw 2, and the rest
    of the row was pulled left of its column."""
    from bot.tables import table, width

    family, thumbs, heart, coder = "👨\u200d👩\u200d👧\u200d👦", "👍🏽", "❤\ufe0f", "👩🏽\u200d💻"
    assert [width(e) for e in (family, thumbs, heart, coder, "🇩🇪", "☝🏽", "e\u0301")] == [2, 2, 2, 2, 2, 1, 1]
    lines = table(["who", "until"], [[f"{family} Kim", "Mon"], [f"Al {thumbs}", "Tue"], ["Bo", "Wed"]]).splitlines()
    assert [width(line[:line.index(end)]) for line, end in zip(lines, ["until", "Mon", "Tue", "Wed"])] == [8] * 4
    assert table(["x"], [[family * 5]], max_width=5).splitlines()[1] == family * 2 + "…"  # cut between, not inside


def test_a_zero_width_character_takes_no_column() -> None:
    """An alert holding a zero-width space (or a word joiner, a BOM) pushed its row's next column one to the left of
    its header: counted 1, drawn as nothing. A soft hyphen is still counted (terminals draw it)."""
    from bot.tables import table, width

    assert [width(t) for t in ("x\u200by", "a\u2060b", "\ufeffab", "a\u00adb")] == [2, 2, 2, 3]
    lines = table(["name", "at"], [["x\u200by", "Mon"], ["xy", "Tue"]]).splitlines()
    assert [width(line[:line.index(end)]) for line, end in zip(lines, ["at", "Mon", "Tue"])] == [6] * 3


def test_a_table_fits_the_terminal_by_cutting_its_free_text_the_widest_first() -> None:
    from bot.tables import table, width

    title = "Disk /var 95% full on db-02.example.com " * 3
    error = "slack chat.postMessage: " + "x" * 60 + " not_in_channel"
    rows = [["#1", "triggered", title, "am,grafana,nagios,generic"], ["#22", "acknowledged", "short", "am"]]
    lines = table(["ID", "STATUS", "TITLE", "SOURCES"], rows, max_width=None, fit=60,
                  shrink=("TITLE", "SOURCES")).splitlines()
    assert max(width(line) for line in lines) == 60
    assert lines[1].split()[:2] == ["#1", "triggered"] and lines[2].split()[:2] == ["#22", "acknowledged"]
    # the title cut to the width of the next widest, the sources, and then the two by turns
    assert lines[1] == "#1   triggered     Disk /var 95% full…  am,grafana,nagios,g…"
    assert table(["ID", "STATUS", "TITLE"], [r[:3] for r in rows], max_width=None).splitlines()[1].endswith(
        title.strip())  # not fitted: whole
    # an error keeps its end, where the cause is; if it cannot fit beside the rest, it gets a line of its own
    lines = table(["ID", "EVENT", "LAST ERROR"], [["7", "incident.opened", error]], max_width=None, fit=50,
                  shrink=("LAST ERROR",), keep_end=("LAST ERROR",), below="LAST ERROR").splitlines()
    assert lines == ["ID  EVENT            LAST ERROR", "7   incident.opened  slack cha…xxxx not_in_channel"]
    lines = table(["ID", "EVENT", "LAST ERROR"], [["7", "incident.opened", error], ["8", "incident.updated", ""]],
                  max_width=None, fit=30, shrink=("LAST ERROR",), keep_end=("LAST ERROR",), below="LAST ERROR")
    # on a line of its own, an error is whole, over as many lines as it takes (cut in the middle, it lost what
    # was off and why)
    assert lines.splitlines() == ["ID  EVENT", "  LAST ERROR", "7   incident.opened", "  slack chat.postMessage:",
                                  "  " + "x" * 28, "  " + "x" * 28, "  xxxx not_in_channel", "8   incident.updated"]


async def test_listings_fit_the_terminal_and_print_whole_values_when_asked_or_piped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`incidents list` was 130 to 170 columns wide with real titles, `outbox list --status dead` 177 with the error
    cut at 60 characters (its cause, at the end, lost), the timeline of `incidents show` about 106."""
    from datetime import UTC, datetime

    from bot.tables import width
    from storage.db import Database
    from storage.models import OutboxItem
    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "w", url)
    title = "Disk /var on db-02.prod.example.com is 95% full and will fill within 4 hours at this rate"
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "db-02.prod.example.com", "signature": "DiskFull",
                                      "severity": "critical", "message": title, "tool_source": "t",
                                      "dedup_key": "disk-" * 60}))[0] == 200  # (the sender's: a long fingerprint)
    error = ("slack conversations.open: ClientConnectorError: Cannot connect to host slack.com:443 ssl:default "
             "[Connect call failed: the bot's network has no route to slack.com]")
    db = Database(url)
    async with db.transaction() as session:
        session.add(OutboxItem(created_at=datetime.now(UTC), due_at=datetime.now(UTC), channel="@alice", kind="page",
                               event="escalation.page", status="dead", attempts=2, incident_id=1, last_error=error))
    await db.dispose()
    monkeypatch.setenv("COLUMNS", "80")
    for command in (["incidents", "list"], ["outbox", "list", "--status", "dead"], ["incidents", "show", "1"]):
        assert await asyncio.to_thread(main, [*command, "-c", str(cfg)]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()[command[1] == "show":]  # (the title above the incident's facts is whole, to read)
        assert max(width(line) for line in lines if not line.startswith(("dead", "totals"))) <= 80, out
        if command[1] == "list" and command[0] == "incidents":  # a title cut to a few columns: a line of its own
            assert [line.split()[:2] for line in lines[:3]] == [["ID", "STATUS"], ["TITLE"], ["#1", "triggered"]]
            assert lines[3] == "  " + title[:77] + "…"
        if command[0] == "outbox":  # the error on a line of its own, its cause kept
            assert out.splitlines()[:2] == [
                "ID  INCIDENT  CHANNEL  KIND  EVENT            STATUS  ATTEMPTS  QUEUED", "  LAST ERROR"], out
            shown = [line for line in out.splitlines()[3:] if line.startswith("  ")]
            assert " ".join(line.strip() for line in shown) == error, out  # whole, over lines of its own
            assert all(width(line) <= 80 for line in shown), out
    for wide in (["--wide"], []):  # asked, or written to a file or a pipe (COLUMNS not set): whole
        if not wide:
            monkeypatch.delenv("COLUMNS")
        assert await asyncio.to_thread(main, ["incidents", "list", *wide, "-c", str(cfg)]) == 0
        assert title in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["outbox", "list", "--status", "dead", *wide, "-c", str(cfg)]) == 0
        assert capsys.readouterr().out.splitlines()[1].endswith(error)

@pytest.mark.parametrize(("url", "problem"), [
    ("postgresql+asyncpg://bot:s3cretpw@db.internal:5432/x?sslmode=require",
     "TypeError: connect() got an unexpected keyword argument 'sslmode'"),
    ("postgresql+asyncpg://bot:s3cretpw@db:notaport/x", "ValueError: invalid literal for int() with base 10: 'notaport'"),
    ("postgresql+asyncpg://bot:s3cretpw@[::1/x", "ValueError: invalid literal for int() with base 10: ':1'"),
    ("sqlite+aiosqlite:///{tmp}/bot.db?timeout=soon", "ValueError: could not convert string to float: 'soon'"),
])
def test_a_store_url_the_driver_refuses_is_one_line_not_a_traceback(tmp_path: Path, url: str, problem: str,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """check-config refuses these URLs; should one get past it (a driver's new rule), opening the store still says
    so on one line, exit 2, rather than a traceback from every command."""
    import bot.cli
    from bot.config import load_config as checked

    url = url.format(tmp=tmp_path)
    asyncio.run(make_store(f"sqlite+aiosqlite:///{tmp_path}/bot.db"))
    cfg = config(tmp_path / "a", f"sqlite+aiosqlite:///{tmp_path}/bot.db")

    def unchecked(path: str, **kwargs: object) -> object:  # the URL as a validator that missed it would let it by
        loaded = checked(path, **kwargs)
        loaded.config = loaded.config.model_copy(update={
            "storage": loaded.config.storage.model_copy(update={"url": url})})
        return loaded

    monkeypatch.setattr(bot.cli, "load_config", unchecked)
    for command in (["incidents", "list"], ["audit", "verify"], ["oncall"], ["report"]):
        assert main([*command, "-c", str(cfg)]) == 2, command
        err = capsys.readouterr().err
        assert err == (f"storage.url: the database cannot be opened with this URL ({problem}): check storage.url in "
                       "app.yaml, its port and its query options\n"), err
        assert "s3cretpw" not in err


def test_an_empty_app_yaml_is_refused_by_check_config_and_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.yaml").write_text("# to do\n")
    assert main(["check-config"]) == 2
    assert capsys.readouterr().out == ("app.yaml is empty: give it at least sources, channels and routes (the example "
                                       "app.yaml shipped with the bot shows each)\n")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("app.yaml is empty: ")
    (tmp_path / "app.yaml").write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path}/bot.db'}}\n")
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    assert ("warning: sources: none, so no alert can arrive (POST /alerts/{source} knows no source); add one under "
            "sources\n") in err and out.startswith("app.yaml: valid: ")


def test_check_config_warns_of_what_an_earlier_version_took_and_passes(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(DOUBTFUL.format(db=tmp_path / "bot.db", port=8080, token="xoxp-user-token",
                                   api_url="https://slack.com/api/"))
    assert main(["check-config", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{cfg}: valid: 1 person"), out
    said = [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]
    assert sorted(said) == sorted(DOUBTS), said
    assert "xoxp-user-token" not in out + err and "k3y" not in out + err


@pytest.mark.parametrize("typed", ["#7", "7"])
def test_an_incident_id_may_be_typed_as_incidents_list_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                typed: str) -> None:
    """`incidents list` prints ids as #7 (and `/incident show #7` takes that in chat): `incidents show #7` said "not a
    whole number: '#7'"."""
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    asyncio.run(make_store(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"))
    assert main(["incidents", "show", typed, "-c", str(cfg)]) == 1
    assert capsys.readouterr().err.startswith("no incident #7; `chatops incidents list` shows the ones there are")
    assert main(["audit", "export", "--incident", typed, "-c", str(cfg)]) in (0, 1)
    assert "not a whole number" not in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_missing_one_of_the_bots_tables_is_said_in_one_line(tmp_path: Path, backend: str, pg_schema: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The audit table dropped: `audit verify` printed SQLAlchemy's statement over several lines, exit 1 (the status of
    a broken chain), ending with the advice to run `chatops audit verify`."""
    from sqlalchemy import text

    from storage.db import Database
    from tests.conftest import drop_schema, postgres_url

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}" if backend == "sqlite" else postgres_url()
    schema = pg_schema if backend == "postgres" else None

    async def damaged() -> str:
        db = Database(url, schema=schema)
        await db.start()
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TABLE audit_events"))
        await db.dispose()
        return db.safe_url

    safe_url = asyncio.run(damaged())
    try:
        path = tmp_path / "app.yaml"
        path.write_text(f"storage: {{url: '{url}'" + (f", schema: {schema}" if schema else "") + "}\n"
                        + PEOPLE_AND_ROTATION, encoding="utf-8")
        for command in (["audit", "verify"], ["audit", "export"], ["incidents", "show", "1"]):
            assert main([*command, "-c", str(path)]) == no_store_exit(command), command
            out, err = capsys.readouterr()
            said = [line for line in err.splitlines() if not line.startswith("warning: ")]  # (the config's)
            assert out == "" and said == [
                f"the store at {safe_url} lacks the bot's table audit_events: it was damaged (a table dropped), or "
                "it is not the bot's store: check storage.url in app.yaml, or restore the store from a backup"], err
    finally:
        if schema:
            asyncio.run(drop_schema(url, schema))


async def test_an_incident_of_a_severity_the_bot_does_not_know_is_listed_and_shown_marked_damaged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged row's severity (only SQLite lets one in): `incidents list` and `incidents show` died with a KeyError
    traceback, where a damaged audit event is shown as far as it can be read, named on stderr, exit 1."""
    import sqlite3

    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        for asset in ("web-1", "web-2"):
            assert (await h.post("open", {"asset_name": asset, "signature": "Down", "severity": "low",
                                          "message": f"{asset} down", "tool_source": "t"}))[0] == 200
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        conn.execute("UPDATE incidents SET severity = 'weird' WHERE title = 'web-1 down'")
    conn.close()
    said = ("incident #1 is damaged: its severity 'weird' is not one the bot knows (critical, high, medium, low, "
            "info), so it has no priority; its row was changed outside the bot, or the store was damaged")
    assert await asyncio.to_thread(main, ["incidents", "list", "-c", str(cfg)]) == 1
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[0][:5] == ["#1", "triggered", "weird", "(damaged)", "?"] and rows[1][:3] == ["#2", "triggered", "low"]
    assert err.splitlines() == [said]
    assert await asyncio.to_thread(main, ["incidents", "list", "--format", "json", "-c", str(cfg)]) == 1
    listed = {i["id"]: i for i in json.loads(capsys.readouterr().out)}
    assert (listed[1]["severity"], listed[1]["priority"], listed[1]["damaged"]) == ("weird", None, said)
    assert "damaged" not in listed[2]
    assert await asyncio.to_thread(main, ["incidents", "show", "#1", "-c", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert "  severity:     weird (damaged)" in out.splitlines() and "  priority:     unknown" in out.splitlines()
    assert err.splitlines() == [said]


def test_oncall_at_another_year_shows_the_year_of_its_dates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`oncall --at` a day of another year showed its dates without a year: the year was left out when it was the
    --at time's, not this year's."""
    from datetime import UTC, datetime

    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    year = datetime.now(UTC).year + 2
    assert main(["oncall", "--at", f"{year}-06-02", "-c", str(cfg)]) == 0
    [row] = capsys.readouterr().out.splitlines()[1:]
    since, until = [part.strip() for part in row.split("  ") if part.strip()][2:4]
    assert since.endswith(f" {year} 09:00 CEST") and until.endswith(f" {year} 09:00 CEST"), row
    assert main(["oncall", "dba", "--at", "2300-01-01", "-c", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[1:11] == ["Mon", "25", "Dec", "2299", "09:00", "CET", "Mon", "1", "Jan", "2300"], lines


def test_audit_rekey_on_a_file_that_is_no_database_says_so_and_makes_no_lock_file_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("some other program's data\n", encoding="utf-8")
    cfg = config(tmp_path / "c", f"sqlite+aiosqlite:///{notes}")
    cfg.write_text(cfg.read_text(encoding="utf-8") + "audit: {hmac_key: a-new-key-of-16-chars}\n", encoding="utf-8")
    assert main(["audit", "rekey", "--from-no-key", "-c", str(cfg)]) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert said == [f"cannot open the database at {notes}: the file is there and is not a SQLite database (another "
                    "program's file?): fix storage.url in app.yaml; nothing was written beside it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "notes.txt"]


async def test_incidents_show_prints_a_line_break_in_the_title_as_a_space_as_the_tables_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An Alertmanager summary of two lines: the header printed `line1\\x0aline2`, every table `line1 line2`."""
    import sqlite3

    from tests.botkit import running_bot

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    async with running_bot(url) as h:
        assert (await h.post("open", {"asset_name": "web-1", "signature": "Down", "severity": "high",
                                      "message": "web-1 down", "tool_source": "t"}))[0] == 200
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        conn.execute("UPDATE incidents SET title = 'line1\nline2\x1b[31m'")
    conn.close()
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "#1 line1 line2\\x1b[31m"  # (a terminal's ESC still written out)
    assert await asyncio.to_thread(main, ["incidents", "list", "-c", str(cfg)]) == 0
    assert "  line1 line2\\x1b[31m  " in capsys.readouterr().out


def test_a_deferred_steps_time_in_a_timeline_reads_as_the_timelines_own() -> None:
    """`incidents show` wrote "step 1 until 2026-12-07T08:00:00+00:00" among times written "2026-12-07 02:49:33 CET"."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from bot.cli import _event_detail

    def at(moment: datetime) -> str:
        return f"{moment.astimezone(ZoneInfo('Europe/Berlin')):%Y-%m-%d %H:%M:%S %Z}"

    details = {"step": 1, "until": "2026-12-07T08:00:00+00:00", "severity": "medium"}
    assert _event_detail("escalation.deferred", "1", details, {}, at) == "step 1 until 2026-12-07 09:00:00 CET"
    assert _event_detail("escalation.deferred", "1", {**details, "until": "soon"}, {}, at) == "step 1 until soon"


WEB_DOWN = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "web-1 down", "tool_source": "t"}


def keyed_store(tmp_path: Path) -> tuple[str, Path]:
    """A SQLite store's URL and an app.yaml for it with an audit key, as the command line's incident actions need."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    cfg = config(tmp_path / "c", url)
    cfg.write_text(cfg.read_text(encoding="utf-8") + "audit: {hmac_key: test-key-0123456789ab}\n", encoding="utf-8")
    return url, cfg


async def test_incidents_ack_and_resolve_act_as_the_chats_buttons_do_beside_the_running_bot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A first try without a chat platform left no way to acknowledge or resolve: `incidents ack|resolve ID` does it
    beside the running bot, as a button does (audited, the cards' redraw and the thread's line queued), as the person
    `--as` names or as cli:<user>; a second ack, an unknown incident and an unknown person are refused, saying why."""
    import getpass

    from storage.models import AuditEvent, OutboxItem
    from tests.botkit import running_bot

    url, cfg = keyed_store(tmp_path)
    async with running_bot(url) as h:
        assert (await h.post("open", WEB_DOWN))[0] == 200
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["incidents", "ack", "1", "--as", "alice", "-c", str(cfg)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "Acknowledged #1."
        assert await asyncio.to_thread(main, ["incidents", "ack", "1", "-c", str(cfg)]) == 1
        assert capsys.readouterr().err.strip() == "#1 is already acknowledged by Alice."
        assert await asyncio.to_thread(main, ["incidents", "ack", "7", "-c", str(cfg)]) == 1
        assert await asyncio.to_thread(main, ["incidents", "ack", "1", "--as", "zed", "-c", str(cfg)]) == 2
        assert "--as 'zed': no such person under people: in app.yaml" in capsys.readouterr().err
        assert await asyncio.to_thread(main, ["incidents", "resolve", "1", "--note", "restarted", "-c", str(cfg)]) == 0
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by, incident.resolved_by) == (
            "resolved", "alice", f"person:cli:{getpass.getuser()}")
        async with h.bot.db.sessions() as session:
            from sqlalchemy import select

            acts = (await session.execute(select(AuditEvent).where(AuditEvent.action.in_(
                ("incident.acknowledged", "incident.resolved"))).order_by(AuditEvent.seq))).scalars().all()
            queued = (await session.execute(select(OutboxItem.event).where(OutboxItem.incident_id == 1))).scalars().all()
        assert [(e.action, e.actor_platform, e.actor_person) for e in acts] == [
            ("incident.acknowledged", "cli", "alice"), ("incident.resolved", "cli", None)]
        assert acts[1].details["note"] == "restarted"
        assert "incident.acknowledged" in queued and "incident.resolved" in queued  # the thread's lines, for the bot
    assert await asyncio.to_thread(main, ["audit", "verify", "-c", str(cfg)]) == 0  # one chain, both writers


async def test_incidents_act_and_outbox_retry_say_when_no_bot_is_running_to_carry_them_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no chatops serve on the store, `incidents reopen` said "the running bot redraws its cards ... within
    seconds": nothing is redrawn, posted or paged until one starts, and it now says so. With one holding the store
    (its `<file>.lock`), the running bot's words stay."""
    import sqlite3

    from bot.server import hold_store
    from tests.botkit import running_bot

    url, cfg = keyed_store(tmp_path)
    async with running_bot(url) as h:
        assert (await h.post("open", WEB_DOWN))[0] == 200
    capsys.readouterr()
    # Without any chat platform in app.yaml, there is no card to redraw nor thread to tell: it said there were
    assert await asyncio.to_thread(main, ["incidents", "ack", "1", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Acknowledged #1.", "no chat platform is on in app.yaml (adapters:), so no card or thread says so; `chatops "
                            "incidents show 1` shows it"]
    cfg.write_text(cfg.read_text(encoding="utf-8") + "adapters:\n  telegram: {bot_token: '123456:ABC-token', "
                   "webhook_secret: s3cret-s3cret, api_url: 'http://127.0.0.1:1/bot'}\n", encoding="utf-8")
    assert await asyncio.to_thread(main, ["incidents", "resolve", "1", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Resolved #1.", "no chatops serve is running on this store: its cards are redrawn, the thread told and anyone "
                        "paged once it starts"]
    held = hold_store(url)  # as `chatops serve` holds it
    assert held is not None
    try:
        assert await asyncio.to_thread(main, ["incidents", "reopen", "1", "-c", str(cfg)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "Reopened #1." and out[1].startswith("the running bot redraws its cards")
    finally:
        held.close()
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        conn.execute("UPDATE outbox SET status = 'dead'")
        dead = conn.execute("SELECT id FROM outbox ORDER BY id LIMIT 1").fetchone()[0]
    conn.close()
    assert await asyncio.to_thread(main, ["outbox", "retry", str(dead), "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == (f"1 delivery queued again: {dead}; no chatops serve is running on "
                                               "this store: they are sent once it starts")


def test_a_delayed_pages_event_says_whom_and_why_in_a_timeline() -> None:
    """`incidents show` printed an empty DETAIL for `incident.page_delayed` (Telegram's flood control holding a page)."""
    from bot.cli import _event_detail

    details = {"person": "alice", "step": 1, "problem": "telegram: Flood control exceeded. Retry in 900 seconds",
               "retry_after": 900.0}
    assert _event_detail("incident.page_delayed", "3", details, {"alice": "Alice"}, None) == (
        "Alice (step 1): telegram: Flood control exceeded. Retry in 900 seconds")


def test_an_acknowledged_incident_a_maintenance_window_mutes_lists_as_both() -> None:
    """It listed as "silenced", under `--status acknowledged` too, with no sign that someone was on it."""
    from storage.models import Incident
    from storage.queries import list_status

    assert list_status(Incident(status="acknowledged", silenced=True)) == "acknowledged, silenced"
    assert list_status(Incident(status="triggered", silenced=True)) == "silenced"
    assert list_status(Incident(status="resolved", silenced=True)) == "resolved"
    assert list_status(Incident(status="acknowledged", silenced=False)) == "acknowledged"


def test_whether_a_bot_holds_the_store_cannot_be_told_from_a_lock_file_not_ours_to_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock file the command line may not open (a bot running as another user) said "no chatops serve is running"."""
    import builtins

    from bot.server import store_held

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    assert store_held(url) is False  # no lock file: no bot ever ran on it
    lock = tmp_path / "bot.db.lock"
    lock.write_text("123\n")
    assert store_held(url) is False  # nobody holds it
    real_open = builtins.open

    def refusing(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(lock):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    assert store_held(url) is None  # cannot tell: the running bot's words stay
    monkeypatch.undo()
    assert store_held("postgresql+asyncpg://u@h/db") is None


def test_check_config_notes_a_sqlite_folder_that_does_not_exist(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The config is valid (it may be checked on another machine than the bot's), but `serve` here would not start:
    check-config passed it without a word."""
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'nowhere' / 'bot.db'}")
    assert main(["check-config", "-c", str(cfg)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: storage.url")]
    assert notes == [f"note: storage.url: the folder {tmp_path / 'nowhere'} does not exist here, so `chatops serve` "
                     "started here would not start: create it, or give storage.url a file in a folder that exists"]
    (tmp_path / "nowhere").mkdir()
    assert main(["check-config", "-c", str(cfg)]) == 0
    assert "note: storage.url" not in capsys.readouterr().err


@pytest.mark.parametrize("answer", ["html", "no-result"])
async def test_telegram_set_webhook_on_an_address_that_is_no_bot_api_says_so_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: str) -> None:
    """An api_url that answers a 502 page (a proxy's), or JSON without `result`: the library's own traceback and the
    whole page were printed, or "cannot reach Telegram at ...: 'result'" (a KeyError's words)."""
    from aiohttp import web

    async def anything(_request: web.Request) -> web.Response:
        if answer == "html":
            return web.Response(status=502, text="<!DOCTYPE HTML>\n<html><body>" + "Bad gateway " * 200 + "</body></html>",
                                content_type="text/html")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        cfg = tmp_path / "app.yaml"
        cfg.write_text("server: {public_url: 'https://bot.example.com'}\n"
                       "adapters:\n  telegram: {bot_token: '123456:ABC-token', webhook_secret: s3cret-s3cret, "
                       f"mode: webhook, api_url: 'http://127.0.0.1:{port}/bot'}}\n")
        code = await asyncio.to_thread(main, ["telegram", "set-webhook", "-c", str(cfg)])
    finally:
        await runner.cleanup()
    out, err = capsys.readouterr()
    assert code == 1 and out == "", err
    assert "Traceback" not in err and "ABC-token" not in err and len(err.strip().splitlines()) == 1, err
    assert "adapters.telegram.api_url" in err and len(err) < 600, err
