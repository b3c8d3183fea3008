"""What a writer process logs itself (its WAL checkpointer's failures) looks like the bot's own log lines, in the
bot's format and level: they were bare lines on stderr, without time or level, even with `--log-format json`."""

from __future__ import annotations

import json
import logging

import pytest

from bot import logs
from storage.writer import WriterProcess


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_writer_process_logs_as_the_bot_does(fmt: str, capfd: pytest.CaptureFixture[str],
                                                     restore_logging: object) -> None:
    logs.setup(fmt, "INFO")
    writer = WriterProcess("tests.intake_writer_hooks:loud_writer", {})
    try:
        assert await writer.call(7) == 7
    finally:
        await writer.close()
    lines = [line for line in capfd.readouterr().err.splitlines() if "child line" in line]
    assert len(lines) == 1, lines
    if fmt == "json":
        record = json.loads(lines[0])
        assert (record["level"], record["logger"], record["message"]) == ("warning", "chatops.storage", "child line 7")
    else:
        assert lines[0].endswith(" WARNING chatops.storage: child line 7")
        assert lines[0][:4].isdigit()  # the time first


async def test_a_writer_process_keeps_the_bots_level(capfd: pytest.CaptureFixture[str],
                                                     restore_logging: object) -> None:
    logs.setup("text", "ERROR")
    writer = WriterProcess("tests.intake_writer_hooks:loud_writer", {})
    try:
        assert await writer.call(8) == 8
    finally:
        await writer.close()
    assert "child line" not in capfd.readouterr().err
