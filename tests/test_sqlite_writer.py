"""The SQLite writer: its WAL is checkpointed by a thread of its own, not inside its commits; a BEGIN that
cannot get the database lock fails as "the database is unavailable" (intake answers 503), like any statement."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from handlers.intake import _is_db_unavailable
from storage.db import WAL_BACKSTOP_PAGES, Database


def _checkpoint_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "sqlite-checkpoint")


async def test_commits_wake_the_checkpointer_and_dispose_stops_it(tmp_path: Path) -> None:
    before = _checkpoint_threads()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await db.start()
    try:
        writer = db._writer[0]  # type: ignore[index]
        checkpointer = writer.checkpointer
        assert checkpointer.checkpoints == 0 and _checkpoint_threads() == before  # nothing committed yet

        def fill(conn: Connection) -> None:
            conn.execute(text("CREATE TABLE IF NOT EXISTS filler (t TEXT)"))
            conn.execute(text("INSERT INTO filler (t) VALUES (:t)"), {"t": "x" * 3000})

        for _ in range(40):  # about 120 KB of pages into the log
            await db.run_transaction(fill)
        # The writer's own connection checkpoints only as a backstop.
        autocheckpoint = await db.run_transaction(
            lambda conn: conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())
        assert autocheckpoint == WAL_BACKSTOP_PAGES
        for _ in range(100):
            if checkpointer.checkpoints:
                break
            await asyncio.sleep(0.05)
        assert checkpointer.checkpoints >= 1 and _checkpoint_threads() == before + 1
        with sqlite3.connect(tmp_path / "bot.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM filler").fetchone() == (40,)
    finally:
        await db.dispose()
    assert _checkpoint_threads() == before


async def test_a_begin_that_cannot_lock_the_database_is_an_unavailable_database(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await db.start()
    try:
        await db.run_transaction(lambda conn: conn.exec_driver_sql("PRAGMA busy_timeout=100"))  # wait 0.1 s, not 10
        other = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with pytest.raises(OperationalError) as failed:
                await db.run_transaction(lambda conn: conn.execute(text("SELECT 1")).scalar_one())
            assert "locked" in str(failed.value) and _is_db_unavailable(failed.value)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await db.run_transaction(lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1
    finally:
        await db.dispose()
