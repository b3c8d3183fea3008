"""The SQLite store in trouble outside the bot. Its disk full: /readyz says so (a ping only reads, and said "ok" while
every alert got 503), and says it no longer once space is freed; `serve` says so (it ended in a traceback). Its write
lock held by another process at start: `serve` says what to do."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from adapters import SETTINGS_MODELS
from bot.config import Loaded, load_config
from bot.server import serve
from storage import db as db_module
from tests.botkit import bot_on, running_bot
from tests.conftest import free_port


def example_config(path: Path) -> Loaded:
    """The example app.yaml, its store at `path`, on a free port."""
    return load_config(Path(__file__).resolve().parent.parent / "app.yaml", adapter_models=SETTINGS_MODELS,
                       env={"CHATOPS_DATABASE_URL": f"sqlite+aiosqlite:///{path}", "CHATOPS_PORT": str(free_port())})


class Disk:
    """os.statvfs as the bot sees it, with the free blocks set by the test (the rest as the real disk has it)."""

    def __init__(self) -> None:
        self.free_blocks: int | None = None
        self.real = os.statvfs

    def __call__(self, path: Any) -> Any:
        fs = self.real(path)
        if self.free_blocks is None:
            return fs
        values = list(fs)
        values[3] = values[4] = self.free_blocks  # f_bfree, f_bavail
        return os.statvfs_result(values)


ALERT = {"asset_name": "db-01", "signature": "DiskFull", "severity": "high", "message": "disk full", "tool_source": "t"}


async def test_readyz_says_the_disk_is_full_once_a_write_failed_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Little free space alone is not a full store (SQLite writes on in its log's space, and intake took alerts while
    /readyz said it did not); a write that failed for want of space, while little is free, is."""
    disk = Disk()
    monkeypatch.setattr(db_module.os, "statvfs", disk)
    path = tmp_path / "bot.db"
    async with running_bot(f"sqlite+aiosqlite:///{path}") as h:
        ok = await h.client.get("/readyz")
        assert ok.status == 200 and (await ok.json())["database"] == "ok"
        disk.free_blocks = 3  # a few blocks (each f_frsize bytes): less than the next commit may need
        low = await h.client.get("/readyz")
        assert low.status == 200 and (await low.json())["database"] == "ok"  # intake still writes: ready
        assert (await h.post("open", ALERT))[0] == 200
        real = h.bot.intake._apply

        def full(*_args: Any) -> Any:  # as SQLite answers a commit that does not fit (SQLITE_FULL)
            raise OperationalError("INSERT INTO alerts ...", {}, sqlite3.OperationalError("database or disk is full"))
        h.bot.intake._apply = full  # type: ignore[method-assign]
        for _ in range(3):
            status, body, _ = await h.post("open", ALERT)
            assert (status, body) == (503, {"error": "the database is unavailable; nothing was stored, retry later"})
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("intake: the database is")]
        assert len(said) == 1 and "database or disk is full" in said[0]  # (once a minute, not once a request)
        refused = await h.client.get("/readyz")
        body = await refused.json()
        frsize = disk.real(str(tmp_path)).f_frsize
        assert refused.status == 503, body
        assert body["status"] == "unavailable"
        assert body["database"] == (f"the disk holding {path} is full ({3 * frsize:,} bytes free): alerts get 503 "
                                    "and nothing is recorded until space is freed there")
        assert "chatops_database_up 0.0" in await (await h.client.get("/metrics")).text()
        disk.free_blocks = None  # space freed: ready again, before any write
        again = await h.client.get("/readyz")
        assert again.status == 200 and (await again.json())["database"] == "ok"
        disk.free_blocks = 3
        h.bot.intake._apply = full  # type: ignore[method-assign]
        assert (await h.post("open", ALERT))[0] == 503
        assert (await h.client.get("/readyz")).status == 503
        h.bot.intake._apply = real  # type: ignore[method-assign]
        assert (await h.post("open", ALERT))[0] == 200  # a write that fits: ready, little space or not
        assert (await h.client.get("/readyz")).status == 200


async def test_a_postgresql_store_is_not_asked_about_a_local_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  pg_schema: str) -> None:
    disk = Disk()
    disk.free_blocks = 0  # the bot's own disk full says nothing of the database server's
    monkeypatch.setattr(db_module.os, "statvfs", disk)
    async with bot_on("postgres", tmp_path, pg_schema) as h:
        ok = await h.client.get("/readyz")
        assert ok.status == 200 and (await ok.json())["database"] == "ok"


async def test_serve_on_a_full_disk_says_so_and_does_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """It ended in a traceback (No space left on device) from the lock file's first write."""
    disk = Disk()
    disk.free_blocks = 0
    monkeypatch.setattr(db_module.os, "statvfs", disk)
    path = tmp_path / "bot.db"
    loaded = example_config(path)
    assert await asyncio.wait_for(serve(loaded), 30) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"cannot start: the disk holding {path} is full (0 bytes free); free space there, or give storage.url a file "
        "on another disk"]
    assert not path.exists() and not Path(f"{path}.lock").exists()  # nothing was made there


async def test_serve_while_another_process_holds_the_store_write_locked_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """It said only "OperationalError: database is locked"."""
    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 500)
    path = tmp_path / "bot.db"
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # a sqlite3 shell, say, in a write transaction
        assert await asyncio.wait_for(serve(example_config(path)), 30) == 1
    finally:
        other.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"cannot open the database at sqlite+aiosqlite:///{path}: OperationalError: the database stayed locked for "
        "0.5 s (another process's write transaction: a chatops command, or one stuck?); end that transaction (a "
        "sqlite3 shell, a backup, another program), then start the bot again"]
