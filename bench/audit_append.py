"""Audit appends per second: one event per transaction, and batched.

    python bench/audit_append.py [--events N] [--batch B]

Runs on SQLite (a temporary file) and, when CHATOPS_TEST_POSTGRES_URL is set,
on PostgreSQL (a temporary schema, dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text  # noqa: E402

from bot.model import Actor  # noqa: E402
from storage.audit import AuditLog, Entry  # noqa: E402
from storage.db import Database  # noqa: E402


def entry(i: int) -> Entry:
    return Entry("alert.received", Actor.source("bench"), "alert", str(i), datetime.now(UTC), {"i": i, "labels": {"alertname": "Bench"}})


async def measure(db: Database, events: int, batch: int, concurrency: int) -> dict[str, float]:
    audit = AuditLog("bench-key")
    results: dict[str, float] = {}

    started = time.perf_counter()
    for i in range(events):
        async with db.transaction() as session:
            await audit.append(session, entry(i))
    results["1 per transaction, sequential"] = events / (time.perf_counter() - started)

    counter = iter(range(events))

    async def worker() -> None:
        for i in counter:
            async with db.transaction() as session:
                await audit.append(session, entry(i))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    results[f"1 per transaction, {concurrency} concurrent"] = events / (time.perf_counter() - started)

    started = time.perf_counter()
    for start in range(0, events * 5, batch):
        async with db.transaction() as session:
            await audit.append_many(session, [entry(i) for i in range(start, start + batch)])
    results[f"batched, {batch} per transaction"] = events * 5 / (time.perf_counter() - started)

    async with db.sessions() as session:
        verdict = await audit.verify(session)
    assert verdict.ok, verdict.problem
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    targets = []
    tmp = tempfile.TemporaryDirectory()
    targets.append(("SQLite (WAL)", Database(f"sqlite+aiosqlite:///{tmp.name}/bench.db"), None))
    pg = os.environ.get("CHATOPS_TEST_POSTGRES_URL")
    if pg:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        targets.append(("PostgreSQL", Database(pg, schema=schema), schema))
    else:
        print("PostgreSQL: skipped (set CHATOPS_TEST_POSTGRES_URL to include it)")
    print(f"{'store':<14} {'mode':<34} {'appends/s':>10}")
    for name, db, schema in targets:
        await db.start()
        for mode, rate in (await measure(db, args.events, args.batch, args.concurrency)).items():
            print(f"{name:<14} {mode:<34} {rate:>10,.0f}", flush=True)
        if schema:
            async with db.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await db.dispose()
    tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
