"""The bot's log as an operator reads it: one line a record, whatever a request put in it, and no terminal codes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot import logs
from tests.conftest import ROOT, free_port
from tests.test_serve import serving, wait_http

# A line as the bot writes one, with colours, after a newline: what a caller puts in what the log quotes.
FORGED = "\n1999-01-01 00:00:00 ERROR   chatops.server: \x1b[31mFORGED\x1b[0m"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_forged_line_in_an_alert_path_stays_in_the_line_that_quotes_it(tmp_path: Path, fmt: str) -> None:
    """`chatops serve` on the example app.yaml; anyone may POST to /alerts/SOURCE, and an unknown SOURCE is logged."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    path = "/alerts/x" + urllib.request.quote(FORGED + "\u202e", safe="")
    with serving(tmp_path, port, None, "--log-format", fmt) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}"), timeout=5)
        assert refused.value.code == 404
    log = proc.stdout.read()
    assert "\x1b" not in log and "\u202e" not in log
    assert not [line for line in log.splitlines() if line.startswith("1999")]
    [quoted] = [line for line in log.splitlines() if "FORGED" in line]
    said = f"POST {'/alerts/x' + FORGED + chr(0x202e)!r} from 127.0.0.1: no such alert source; the known ones are "
    if fmt == "json":
        record = json.loads(quoted)
        assert (record["level"], record["logger"]) == ("warning", "chatops.intake")
        assert record["message"].startswith(said), record
    else:
        assert " WARNING chatops.intake: " + said in quoted, quoted


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """logs.setup as `chatops` runs it, writing to the captured stderr; the logging of the tests after, as it was."""
    root = logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level
                                          for name in [None, *logging.root.manager.loggerDict]}
    try:
        yield capsys
    finally:
        root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_text_log_escapes_control_characters_in_a_message(logged: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    logging.getLogger("chatops.test").warning("from %s", "x" + FORGED + "\r\x00\x7f\x85\t\u2028\u202eexe.txt")
    [line] = logged.readouterr().err.splitlines()
    assert line.endswith(r" WARNING chatops.test: from x\n1999-01-01 00:00:00 ERROR   chatops.server: \x1b[31mFORGED"
                         r"\x1b[0m\r\x00\x7f\x85\t\u2028\u202eexe.txt")


def test_at_debug_the_chat_sdks_do_not_log_their_calls(logged: pytest.CaptureFixture[str]) -> None:
    """slack_sdk logs each call's body at DEBUG, a response_url among them (it posts into the conversation for 30
    minutes); msrest and urllib3 the Bot Framework's. --log-level DEBUG is the bot's own detail, not theirs."""
    logs.setup("text", "DEBUG")
    for name in ("slack_sdk.webhook.async_client", "slack_bolt.App", "msrest.http_logger", "urllib3.connectionpool",
                 "botbuilder.core", "msal.application"):
        logging.getLogger(name).debug("Sending a request - url: https://hooks.slack.com/actions/T0/1/SECRET")
    logging.getLogger("chatops.test").debug("the bot's own detail")
    [line] = logged.readouterr().err.splitlines()
    assert line.endswith("DEBUG   chatops.test: the bot's own detail")


def test_text_log_times_are_utc_and_say_so(logged: pytest.CaptureFixture[str]) -> None:
    """Whatever the machine's zone: the CLI and chat show the config's zone, so a time without its own is ambiguous."""
    zone = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        logs.setup("text")
        record = logging.LogRecord("chatops.test", logging.WARNING, __file__, 1, "late", (), None)
        record.created = datetime(2026, 11, 24, 5, 3, 7, 123000, tzinfo=UTC).timestamp()
        logging.getLogger("chatops.test").handle(record)
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
    assert logged.readouterr().err == "2026-11-24T05:03:07.123Z WARNING chatops.test: late\n"


def test_a_traceback_keeps_its_lines_but_an_exception_message_is_one(logged: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    try:
        try:
            raise KeyError("first")
        except KeyError as exc:
            raise ValueError("bad" + FORGED) from exc
    except ValueError:
        logging.getLogger("chatops.test").exception("failed on %s", "a\nb")
    lines = logged.readouterr().err.splitlines()
    assert lines[0].endswith(r" ERROR   chatops.test: failed on a\nb")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2].startswith('  File "')
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == r"ValueError: bad\n1999-01-01 00:00:00 ERROR   chatops.server: \x1b[31mFORGED\x1b[0m"
    assert not [line for line in lines if line.startswith("1999")]


def test_json_log_is_one_object_a_line_with_the_message_as_it_was(logged: pytest.CaptureFixture[str]) -> None:
    logs.setup("json")
    try:
        raise ValueError("bad" + FORGED)
    except ValueError:
        logging.getLogger("chatops.test").exception("from %s", "x" + FORGED + "\u202e")
    out = logged.readouterr().err
    assert "\x1b" not in out and "\u202e" not in out
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["message"] == "from x" + FORGED + "\u202e"
    assert record["exception"].endswith("ValueError: bad" + FORGED)
