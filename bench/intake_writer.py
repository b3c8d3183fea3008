"""The intake writer's CPU per alert, without HTTP: its handler (handlers/intake_child.py) called directly.

    python bench/intake_writer.py [--alerts N] [--groups K] [--batch B] [--rounds R] [--cold]

bench/ingest.py measures the whole path over HTTP, where a run's alerts/s moves with the machine's load and with
how the front, the writer process and the load generator share two cores. This times the writer's own work
alone, as the writer process does it: the same signed generic bodies as bench/ingest.py (K incidents), B of them a
transaction (two messages of B/2, as the front sends what queued together), read, grouped, written with their
audit events and outbox rows, and committed to a SQLite file. It prints the CPU milliseconds per alert of the
best of R rounds (the writer process's threads included: the WAL checkpointer runs beside it) and checks the
store afterwards. `--cold` makes the writer read every batch's incidents and alerts again instead of keeping them
between batches (handlers/intake.py, _Warm): the difference is what keeping them saves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapters import SETTINGS_MODELS  # noqa: E402
from bot.config import parse_config  # noqa: E402
from handlers.intake_child import writer_process_handler  # noqa: E402
from ingest import SECRET, bot_requests  # noqa: E402
from storage.db import Database  # noqa: E402


async def prepare(path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{path}")
    await database.start()
    await database.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=20000)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="alerts a transaction (default 8: 16 connections' worth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="read every batch's incidents and alerts again")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chatops-writer-"))
    try:
        path = tmp / "bot.db"
        asyncio.run(prepare(path))
        config = parse_config(json.dumps({
            "audit": {"hmac_key": "bench-audit-key-0001"},
            "channels": [{"id": "ops", "platform": "slack", "chat": "C0OPS"}],
            "sources": [{"id": "bench", "kind": "generic", "auth": {"hmac_secret": SECRET}}],
            "routes": [{"match": {}, "channels": ["ops"]}]}), adapter_models=SETTINGS_MODELS, env={}).config
        handler = writer_process_handler(url=f"sqlite:///{path}", config=config, on_open=None, max_batch=1000)
        if args.cold:
            warm = handler.intake._warm

            def never(_raw: Any) -> bool:
                warm.forget()
                return False
            warm.check = never  # type: ignore[method-assign]
        # (source, body, X-Delivery-ID, truncated, signature, digest), as the front sends a signed body
        items = [("bench", body, None, 0, headers["X-Timestamp"] + headers["X-Signature"], None)
                 for body, headers in bot_requests(args.alerts, args.groups, "writer")]
        half = max(1, args.batch // 2)
        calls = [items[i:i + args.batch] for i in range(0, len(items), args.batch)]
        for call in calls[:50]:  # the incidents opened, the code warm
            handler([(datetime.now(UTC), call[:half]), (datetime.now(UTC), call[half:])])
        timed = calls[50:]
        alerts = sum(len(call) for call in timed)
        best = float("inf")
        failed = 0
        for r in range(args.rounds):
            started = time.process_time()
            for call in timed:
                answers = handler([(datetime.now(UTC), call[:half]), (datetime.now(UTC), call[half:])])
                failed += sum(1 for answer in answers for status, *_ in answer[0] if status != 200)
            spent = time.process_time() - started
            best = min(best, spent)
            print(f"round {r + 1} of {args.rounds}: {spent * 1000 / alerts:.4f} ms of CPU an alert", flush=True)
        with sqlite3.connect(path) as conn:
            received = conn.execute("SELECT COALESCE(SUM(received_count), 0) FROM alerts").fetchone()[0]
            incidents = conn.execute("SELECT COUNT(*) FROM incidents").fetchone()[0]
        expected = 50 * args.batch + alerts * args.rounds if len(calls) > 50 else len(items)
        print(f"\nwriter{' (cold: reads every batch)' if args.cold else ''}: {best * 1000 / alerts:.4f} ms of CPU an "
              f"alert, best of {args.rounds} rounds of {alerts:,} alerts, {args.batch} a transaction")
        good = failed == 0 and received == expected and incidents == args.groups
        print(f"stored: {received:,} of {expected:,} alerts in {incidents} incidents; {failed} not answered 200"
              f"{'' if good else '  MISMATCH'}")
        return 0 if good else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
