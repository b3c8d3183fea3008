"""The intake writer keeps a second transaction queued behind the running one (SQLite writer thread).

What must not change with it: submissions are applied in arrival order, a submission that breaks its
batch is isolated (it gets a 500, the others land, still in order, before anything queued later), and
stop() answers everything that was queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from handlers.intake import Intake
from storage.models import AuditEvent
from tests.botkit import Harness, running_bot


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as harness:
        yield harness


def alert(i: int, status: str = "firing") -> dict[str, Any]:
    return {"asset_name": f"host-{i % 5}", "signature": "Latency", "severity": "medium", "message": f"m{i}",
            "tool_source": "bench", "status": status}


async def received_order(h: Harness) -> list[str]:
    """The messages of alert.received events, in audit (commit) order."""
    async with h.bot.db.sessions() as s:
        events = (await s.execute(select(AuditEvent).where(AuditEvent.action == "alert.received")
                                  .order_by(AuditEvent.seq))).scalars().all()
    return [e.details["summary"] for e in events]


async def post_in_order(h: Harness, bodies: list[Any]) -> list[tuple[int, Any, Any]]:
    """Start the posts one after the other (each request reaches intake before the next starts)."""
    tasks = []
    for body in bodies:
        tasks.append(asyncio.create_task(h.post("open", body)))
        for _ in range(20):  # let this one be read, parsed and queued first
            await asyncio.sleep(0)
    return list(await asyncio.gather(*tasks))


async def test_a_second_transaction_queues_behind_the_first_and_order_holds(h: Harness) -> None:
    assert getattr(h.bot.db, "_writer", None) is not None  # the path with two transactions in flight
    results = await post_in_order(h, [alert(i) for i in range(60)])
    assert [r[0] for r in results] == [200] * 60
    assert await received_order(h) == [f"m{i}" for i in range(60)]
    async with h.bot.db.sessions() as s:
        assert (await h.bot.audit.verify(s)).ok


async def test_a_broken_submission_is_isolated_and_later_ones_wait(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Intake._apply_alert

    def apply_alert(self: Intake, source: Any, a: Any, st: Any) -> Any:
        if a.summary == "m7":
            raise RuntimeError("boom")
        return real(self, source, a, st)

    monkeypatch.setattr(Intake, "_apply_alert", apply_alert)
    results = await post_in_order(h, [alert(i) for i in range(40)])
    assert [r[0] for r in results] == [200] * 7 + [500] + [200] * 32
    assert results[7][1] == {"error": "internal error; nothing was stored"}
    assert await received_order(h) == [f"m{i}" for i in range(40) if i != 7]


async def test_database_failure_before_the_batch_is_taken_answers_503(h: Harness, tmp_path: Path) -> None:
    from storage.db import Database

    good = h.bot.db
    broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    h.bot.intake.db = broken
    results = await post_in_order(h, [alert(i) for i in range(10)])
    assert [r[0] for r in results] == [503] * 10
    await broken.dispose()
    h.bot.intake.db = good
    assert (await h.post("open", alert(99)))[0] == 200
    assert await received_order(h) == ["m99"]


async def test_stop_answers_everything_queued(tmp_path: Path) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        intake = h.bot.intake
        source = next(s for s in h.bot.config.sources if s.id == "open")
        from bot.alerts import parse_generic

        pending = [asyncio.create_task(intake.submit(source, parse_generic(alert(i), "open"), None))
                   for i in range(50)]
        await asyncio.sleep(0)
        await intake.stop()
        assert all(t.done() for t in pending)
        assert [t.result().status for t in pending] == [200] * 50
        intake.start()  # running_bot stops the bot again on the way out
    assert True
