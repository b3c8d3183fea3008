"""A quiet bot stays quiet: an idle timer beat is one read, and the outbox with nothing pending polls rarely.

bench/timers.py measures what this costs (idle CPU, target under 1 %); this checks what the bot does then,
statement by statement, on SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event

from storage import timers as timer_store
from tests.botkit import Harness, running_bot


@contextmanager
def statements(h: Harness) -> Iterator[list[str]]:
    """Every SQL statement the bot's engines send while the block runs."""
    seen: list[str] = []
    engines = [h.bot.db.engine.sync_engine]
    if h.bot.db._read_engine is not None:
        engines.append(h.bot.db._read_engine.sync_engine)
    if h.bot.db._writer is not None:
        engines.append(h.bot.db._writer[0])
    if h.bot.db._reader is not None:  # Database.read_row's (the beat's peek and the outbox's look)
        engines.append(h.bot.db._reader[0])

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


async def test_an_idle_bot_peeks_and_neither_claims_nor_polls_the_outbox_twice_a_second(tmp_path: Path) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        async with h.bot.db.transaction() as session:  # a timer a day ahead: pending, not due
            await timer_store.schedule(session, "test.later", 1, h.clock.now() + timedelta(days=1), h.clock.now())
        await asyncio.sleep(1.0)  # what starting did (planning, first rounds) is over
        with statements(h) as seen:
            await asyncio.sleep(2.6)
        timer_peeks = [s for s in seen if "FROM timers" in s]
        outbox_reads = [s for s in seen if "FROM outbox" in s]
        # The beat runs every 0.5 s: about five peeks (a loaded machine may merge beats), each one read; no claim
        # (its SELECT of due timer ids, then a write), no overdue count, no write of any kind.
        assert 2 <= len(timer_peeks) <= 9, seen
        assert all(s.startswith("SELECT min(CASE") for s in timer_peeks), timer_peeks
        assert not [s for s in seen if s.startswith(("UPDATE", "INSERT", "DELETE", "BEGIN IMMEDIATE"))], seen
        # Nothing pending: the outbox's safety poll slowed to every 5 s (it was every 0.5 s).
        assert len(outbox_reads) <= 1, outbox_reads

        # A change that queues work nudges both: an alert is answered, its incident posted at once.
        with statements(h) as seen:
            status, _, _ = await h.post("open", {"asset_name": "web-1", "signature": "Down", "severity": "critical",
                                                 "message": "web-1 is down", "tool_source": "bench"})
            assert status == 200
            await asyncio.sleep(0.3)
        assert any(s.startswith("SELECT min(outbox.due_at)") for s in seen), seen  # the outbox looked at once
