"""Appends audit events from a separate process: `python -m tests.audit_writer URL SCHEMA NAME N`."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

from bot.model import Actor
from storage.audit import AuditLog, Entry
from storage.db import Database


async def run(url: str, schema: str, name: str, count: int) -> None:
    db = Database(url, schema=schema or None)
    await db.start()
    audit = AuditLog("shared-key")
    for i in range(count):
        async with db.transaction() as session:
            await audit.append(session, Entry("test.appended", Actor("cli", name), "writer", f"{name}-{i}", datetime.now(UTC)))
    await db.dispose()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
