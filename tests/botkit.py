"""Run the real Bot in-process on a fake clock, behind aiohttp's test server."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from adapters import SETTINGS_MODELS
from bot.clock import FakeClock
from bot.config import parse_config
from bot.server import Bot, server_options
from tests.conftest import drop_schema, postgres_url
from storage.models import AlertRecord, AuditEvent, Incident, IncidentMessage, OutboxItem

_TAG = re.compile(r"^([?!]?[a-z-]+:[0-9]+)\.[0-9a-z]+")


def untagged(value: str) -> str:
    """A button's value without the tag of its incident (`ack:1.36c3pa` -> `ack:1`, `?res:1.36c3pa` -> `?res:1`):
    for tests about which buttons a message has; tests/test_actions.py and the flows' tag tests check the tags."""
    return _TAG.sub(r"\1", value)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T0 = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)

CONFIG = """
audit: {hmac_key: test-key-0123456789ab}
timezone: Europe/Berlin
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
  - {id: ops-telegram, platform: telegram, chat: "-100123"}
sources:
  - {id: am, kind: alertmanager, auth: {bearer: am-secret-token}, dedup_key: groupKey}
  - {id: am-plain, kind: alertmanager, auth: {bearer: am-secret-token}}
  - {id: grafana, kind: grafana, auth: {hmac_secret: grafana-secret, header: X-Grafana-Alerting-Signature, timestamp_header: null}}
  - {id: generic, kind: generic, auth: {hmac_secret: generic-secret}}
  - {id: limited, kind: generic, auth: none, rate_limit: {per_minute: 60, burst: 5}}
  - {id: open, kind: generic, auth: none, max_body_bytes: 2048}
critical_assets: [db-01:9100]
silences:
  - {id: web-maintenance, matchers: {instance: "=~web-9.*"}, starts: 2026-11-24T00:00:00Z, ends: 2026-11-25T00:00:00Z, comment: rack move}
routes:
  - {match: {team: dba}, channels: [ops-slack, ops-telegram]}
  - {match: {}, channels: [ops-slack]}
"""


PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, slack: U02BOB}
"""


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class Harness:
    def __init__(self, bot: Bot, client: TestClient, clock: FakeClock):
        self.bot, self.client, self.clock = bot, client, clock

    async def post(self, source: str, body: bytes | str | Any, headers: dict[str, str] | None = None):
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        hdrs = {"Authorization": "Bearer am-secret-token"} if source.startswith("am") else {}
        hdrs.update(headers or {})
        resp = await self.client.post(f"/alerts/{source}", data=body, headers=hdrs)
        return resp.status, await resp.json(), resp.headers

    async def incidents(self) -> list[Incident]:
        async with self.bot.db.sessions() as s:
            return list((await s.execute(select(Incident).order_by(Incident.id))).scalars().all())

    async def alerts(self, incident_id: int) -> list[AlertRecord]:
        async with self.bot.db.sessions() as s:
            q = select(AlertRecord).where(AlertRecord.incident_id == incident_id).order_by(AlertRecord.id)
            return list((await s.execute(q)).scalars().all())

    async def outbox(self) -> list[tuple[int | None, str, str, str, dict]]:
        async with self.bot.db.sessions() as s:
            rows = (await s.execute(select(OutboxItem).order_by(OutboxItem.id))).scalars().all()
        return [(o.incident_id, o.channel, o.kind, o.event, o.details) for o in rows]

    async def actions(self, incident_id: int | None = None) -> list[str]:
        async with self.bot.db.sessions() as s:
            q = select(AuditEvent).order_by(AuditEvent.seq)
            if incident_id is not None:
                q = q.where(AuditEvent.incident_id == incident_id)
            return [e.action for e in (await s.execute(q)).scalars().all()]

    async def count_pending(self) -> int:
        async with self.bot.db.sessions() as s:
            q = select(func.count()).select_from(OutboxItem).where(OutboxItem.status == "pending")
            return (await s.execute(q)).scalar_one()

    async def pending(self) -> list[tuple[int | None, str, str, str, str, str | None]]:
        """Deliveries not yet made: (incident, channel, kind, event, due, last error)."""
        async with self.bot.db.sessions() as s:
            rows = (await s.execute(select(OutboxItem).where(OutboxItem.status == "pending").order_by(OutboxItem.id))).scalars().all()
        return [(o.incident_id, o.channel, o.kind, o.event, o.due_at.isoformat(), o.last_error) for o in rows]

    async def message_of(self, incident_id: int, channel: str = "ops-slack") -> str:
        """The platform message id of the incident's parent message in `channel`."""
        async with self.bot.db.sessions() as s:
            q = select(IncidentMessage.message_id).where(IncidentMessage.incident_id == incident_id,
                                                         IncidentMessage.channel == channel)
            return (await s.execute(q)).scalar_one()

    async def count(self, model: type) -> int:
        async with self.bot.db.sessions() as s:
            return (await s.execute(select(func.count()).select_from(model))).scalar_one()


@asynccontextmanager
async def running_bot(storage_url: str, extra: str = "", *, schema: str | None = None,
                      clock: FakeClock | None = None, people: str = PEOPLE, base: str | None = None,
                      storage_options: str = "", prepare: Callable[[Bot], None] | None = None) -> AsyncIterator[Harness]:
    """The bot on `base` (default: the shared test config, CONFIG) + `people` + `extra`, in-process on a fake clock.

    `storage_options` are more keys of `storage:` (e.g. `writer: process`); `prepare(bot)` runs before it starts.
    """
    base = CONFIG if base is None else base  # read when called: tests may patch CONFIG
    storage = (f"storage: {{url: '{storage_url}'" + (f", schema: {schema}" if schema else "")
               + (f", {storage_options}" if storage_options else "") + "}\n")
    loaded = parse_config(storage + textwrap.dedent(base) + textwrap.dedent(people) + textwrap.dedent(extra),
                          adapter_models=SETTINGS_MODELS, env={})
    clock = clock or FakeClock(T0)
    bot = Bot(loaded, clock=clock)
    if prepare is not None:
        prepare(bot)
    await bot.start()
    server = TestServer(bot.web_app())
    await server.start_server(**server_options())  # as `chatops serve` runs it: bodies as they were sent
    client = TestClient(server)
    try:
        yield Harness(bot, client, clock)
    finally:
        await client.close()
        await bot.stop()


@asynccontextmanager
async def bot_on(database: str, tmp_path: Path, pg_schema: str, extra: str = "", **options: Any) -> AsyncIterator[Harness]:
    """The running bot on SQLite (a file in tmp_path) or on the test PostgreSQL (a schema of its own, dropped after)."""
    if database == "sqlite":
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, **options) as harness:
            yield harness
        return
    url = postgres_url()
    try:
        async with running_bot(url, extra, schema=pg_schema, **options) as harness:
            yield harness
    finally:
        await drop_schema(url, pg_schema)


async def raw_post(client: TestClient, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """A request written byte for byte (a client library would not send bytes that are not UTF-8 in a header)."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = [f"POST {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close", f"Content-Length: {len(body)}".encode(),
            b"Content-Type: application/json", *(k + b": " + v for k, v in headers)]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]
