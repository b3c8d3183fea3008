"""Durable timers: firing lateness with many timers pending, the drain rate of a backlog, and the idle cost of the tick.

    python bench/timers.py [--timers 10000] [--spread 60] [--url sqlite|postgres|URL] [--schema S]
                           [--burst 5000] [--idle 30]

The real TimerService (handlers/timers.py: APScheduler beat every 0.5 s, leased claims,
one transaction per timer) on a store of its own: a temporary SQLite file by default,
`--url postgres` for $CHATOPS_TEST_POSTGRES_URL, or any storage URL (PostgreSQL in a
temporary schema, dropped afterwards, unless --schema names one to keep).

1. spread: N timers of a no-op kind, due uniformly at random over the next `spread`
   seconds, inserted in one transaction before the service starts. The handler records
   its lateness (wall clock when it runs minus due_at). p50/p99/max lateness, and
   whether each timer ran exactly once (every row done, every id seen once).
2. burst: `--burst` timers all due at once (as after a restart that found them overdue):
   how fast the tick drains them.
3. idle: nothing due (a few timers pending a day ahead), `--idle` seconds: the process's
   CPU time (time.process_time, every thread) over the wall time, and beats per second.

Targets (issue 7): p99 lateness <= 1 s, idle CPU under 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession  # noqa: E402

from bot.clock import SystemClock  # noqa: E402
from bot.metrics import Metrics  # noqa: E402
from handlers.timers import TimerService  # noqa: E402
from storage import timers as store  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Timer  # noqa: E402

KIND = "bench.noop"
PG_ENV = "CHATOPS_TEST_POSTGRES_URL"


class Recorder:
    """The handler: lateness per run, and which timer ids ran (a second run of one id is a failure)."""

    def __init__(self) -> None:
        self.lateness: list[float] = []
        self.seen: dict[int, int] = {}
        self.expect = 0
        self.all_fired = asyncio.Event()

    def reset(self, expect: int) -> None:
        self.lateness, self.expect = [], expect
        self.all_fired.clear()

    async def __call__(self, _session: AsyncSession, timer: Timer, _now: datetime) -> None:
        late = (datetime.now(UTC) - timer.due_at).total_seconds()
        assert timer.id is not None
        self.seen[timer.id] = self.seen.get(timer.id, 0) + 1
        self.lateness.append(late)
        if len(self.lateness) >= self.expect:
            self.all_fired.set()


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


async def insert(db: Database, dues: list[datetime], *, subject: str) -> float:
    """Insert timers due at `dues` in one transaction; seconds it took."""
    now = datetime.now(UTC)
    rows = [store.timer_row(KIND, f"{subject}-{i}", due, now) for i, due in enumerate(dues)]
    started = time.perf_counter()
    await db.run_transaction(lambda conn: conn.execute(store.TIMERS.insert(), rows))
    return time.perf_counter() - started


async def status_counts(db: Database) -> dict[str, int]:
    async with db.sessions() as session:
        rows = (await session.execute(select(Timer.status, func.count()).where(Timer.kind == KIND)
                                      .group_by(Timer.status))).all()
    return {s: n for s, n in rows}


async def run(args: argparse.Namespace, db: Database, where: str) -> int:
    n, spread = args.timers, args.spread
    recorder = Recorder()
    service = TimerService(db=db, clock=SystemClock(), metrics=Metrics())
    service.handler(KIND)(recorder)
    beats = 0
    tick = service.tick

    async def counted_tick() -> int:
        nonlocal beats
        beats += 1
        return await tick()

    service.tick = counted_tick  # type: ignore[method-assign]
    problems: list[str] = []
    print(f"durable timers on {where}", flush=True)

    # 1. N timers due over `spread` seconds, inserted before the service starts.
    rng = random.Random(7)
    base = datetime.now(UTC) + timedelta(seconds=args.lead)
    dues = sorted(base + timedelta(seconds=rng.uniform(0, spread)) for _ in range(n))
    took = await insert(db, dues, subject="spread")
    if datetime.now(UTC) > dues[0]:
        problems.append(f"inserting took {took:.1f}s, past the first due time: raise --lead")
    print(f"  inserted {n:,} timers due over {spread:g}s in {took:.2f}s; first due in "
          f"{(dues[0] - datetime.now(UTC)).total_seconds():.1f}s", flush=True)
    recorder.reset(n)
    await service.start()
    started = time.monotonic()
    limit = args.lead + spread + 120
    while not recorder.all_fired.is_set():
        try:
            await asyncio.wait_for(recorder.all_fired.wait(), 5)
        except asyncio.TimeoutError:
            print(f"  ... {len(recorder.lateness):,}/{n:,} fired", flush=True)
        if time.monotonic() - started > limit:
            problems.append(f"only {len(recorder.lateness):,} of {n:,} fired within {limit:.0f}s")
            break
    spread_wall = time.monotonic() - started
    spread_late = list(recorder.lateness)
    await asyncio.sleep(1.0)  # anything that would run twice, or is still finishing
    counts = await status_counts(db)
    twice = sum(1 for c in recorder.seen.values() if c > 1)
    if counts.get("done", 0) != n or twice or len(recorder.seen) != n:
        problems.append(f"not exactly once: rows {counts}, ids run {len(recorder.seen):,}, run twice {twice}")

    # 2. A backlog all due at once.
    burst_line = ("", "")
    if args.burst:
        recorder.reset(args.burst)
        due = datetime.now(UTC)
        took = await insert(db, [due] * args.burst, subject="burst")
        t0 = time.monotonic()
        service.nudge()
        try:
            await asyncio.wait_for(recorder.all_fired.wait(), 300)
        except asyncio.TimeoutError:
            problems.append(f"burst: only {len(recorder.lateness):,} of {args.burst:,} fired within 300s")
        drained = time.monotonic() - t0
        rate = len(recorder.lateness) / drained if drained else 0.0
        burst_line = (f"{args.burst:,} due at once: drained in {drained:.1f}s",
                      f"{rate:,.0f} timers/s; last one {max(recorder.lateness, default=0):.1f}s late")
        await asyncio.sleep(1.0)
        counts = await status_counts(db)
        if counts.get("done", 0) != n + args.burst or any(c > 1 for c in recorder.seen.values()):
            problems.append(f"burst: not exactly once: rows {counts}")

    # 3. Idle: nothing due (some pending a day ahead, like escalations waiting), the tick's own cost.
    await insert(db, [datetime.now(UTC) + timedelta(days=1)] * 100, subject="later")
    recorder.reset(10**9)
    await asyncio.sleep(1.0)  # settle
    beats_before, cpu0, wall0 = beats, time.process_time(), time.monotonic()
    await asyncio.sleep(args.idle)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    idle_beats = beats - beats_before
    if recorder.lateness:
        problems.append(f"idle: {len(recorder.lateness)} timer(s) fired while none was due")
    await service.stop()

    idle_pct = 100 * cpu / wall
    p99 = pct(spread_late, 0.99)
    rows: list[tuple[str, str, str]] = [
        ("fired", f"{len(spread_late):,} of {n:,}, each once" if not twice else f"{len(spread_late):,}; {twice} twice",
         "all, once"),
        ("lateness p50", f"{pct(spread_late, 0.50) * 1000:,.0f} ms", ""),
        ("lateness p99", f"{p99 * 1000:,.0f} ms", f"<= 1 s: {'met' if p99 <= 1 else 'NOT met'}"),
        ("lateness max", f"{max(spread_late, default=float('nan')) * 1000:,.0f} ms", ""),
        ("timers/s (over the spread)", f"{len(spread_late) / max(spread_wall - args.lead, 1e-9):,.0f}", ""),
    ]
    if args.burst:
        rows.append(("burst: " + burst_line[0], burst_line[1], ""))
    rows.append(("idle CPU", f"{idle_pct:.2f} % ({cpu:.2f}s CPU in {wall:.0f}s, {idle_beats / wall:.1f} beats/s)",
                 f"< 1 %: {'met' if idle_pct < 1 else 'NOT met'}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\n  {'measure':<{w0}}  {'value':<{w1}}  target")
    for name, value, target in rows:
        print(f"  {name:<{w0}}  {value:<{w1}}  {target}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timers", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=60.0, help="seconds over which the timers fall due")
    parser.add_argument("--url", default="sqlite",
                        help=f"sqlite (a temporary file), postgres (${PG_ENV}), or a storage URL")
    parser.add_argument("--schema", help="PostgreSQL schema to use and keep (default: a temporary one, dropped)")
    parser.add_argument("--burst", type=int, default=5_000, help="timers all due at once in the backlog phase (0: skip)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle measurement")
    parser.add_argument("--lead", type=float, default=3.0, help="seconds between the start and the first due time")
    args = parser.parse_args()

    url = args.url
    if url == "postgres":
        url = os.environ.get(PG_ENV, "")
        if not url:
            print(f"--url postgres needs {PG_ENV} (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)")
            return 2
    with tempfile.TemporaryDirectory(prefix="bench-timers-") as tmp:
        if url == "sqlite":
            url = f"sqlite+aiosqlite:///{Path(tmp) / 'timers.db'}"
        postgres = url.startswith("postgresql")
        schema = (args.schema or f"bench_timers_{uuid.uuid4().hex[:8]}") if postgres else None
        db = Database(url, schema=schema)
        await db.start()
        where = (f"PostgreSQL ({db.safe_url}, schema {schema})" if postgres else f"SQLite (WAL), {url.split('///')[-1]}")
        try:
            return await run(args, db, where)
        finally:
            await db.dispose()
            if postgres and not args.schema:
                cleanup = Database(url)
                async with cleanup.engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                await cleanup.dispose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
