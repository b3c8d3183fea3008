"""For adapter tests: a stand-in dispatcher that records what an adapter hands over and answers what the test
says, the adapter served on a real aiohttp test server, and polling until something arrives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot.chat import ActionEvent, CommandEvent, Reply
from bot.server import server_options


class RecordingDispatcher:
    """Records every event; answers `reply` once `gate` is open."""

    def __init__(self) -> None:
        self.actions: list[ActionEvent] = []
        self.commands: list[CommandEvent] = []
        self.reply: Reply | None = Reply("Acknowledged #42.")
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None
        self.refused: Reply | None = None  # what `refusal` answers for every arming tap (None: allowed)
        self.audited: list[tuple[str, int | None, str]] = []  # the refusals audited: (action, incident, event id)
        self.typed: dict[str, frozenset[str]] = {}  # platform -> the commands an adapter said can be typed there

    def typed_on(self, platform: str, names: Any) -> None:
        self.typed[platform] = frozenset(names)

    def refusal(self, action: str, actor: Any) -> Reply | None:
        return self.refused

    async def audited_refusal(self, action: str, actor: Any, incident_id: int | None, what: str | None = None,
                              event_id: str = "") -> Reply | None:
        if self.refused is not None:
            self.audited.append((action, incident_id, event_id))
        return self.refused

    async def handle_action(self, event: ActionEvent) -> Reply | None:
        self.actions.append(event)
        await self.gate.wait()
        return self.reply

    async def handle_command(self, event: CommandEvent) -> Reply:
        self.commands.append(event)
        await self.gate.wait()
        if self.error:
            raise self.error
        assert self.reply is not None
        return self.reply


@asynccontextmanager
async def served(adapter: Any) -> AsyncIterator[TestClient]:
    """The adapter started and mounted on an aiohttp server on 127.0.0.1; a client for it."""
    await adapter.start()
    app = web.Application()
    adapter.register(app)
    server = TestServer(app)
    await server.start_server(**server_options())  # as `chatops serve` runs it: bodies as they were sent
    client = TestClient(server)
    try:
        yield client
    finally:
        await client.close()
        await adapter.stop()


async def poll(predicate: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> None:
    """Until `predicate()` holds; an AssertionError with `describe()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; {describe()}")
        await asyncio.sleep(0.01)
