"""A stand-in dispatcher for adapter tests: records what the adapter hands over, answers what the test says."""

from __future__ import annotations

import asyncio

from bot.chat import ActionEvent, CommandEvent, Reply


class RecordingDispatcher:
    """Records every event; answers `reply` once `gate` is open."""

    def __init__(self) -> None:
        self.actions: list[ActionEvent] = []
        self.commands: list[CommandEvent] = []
        self.reply: Reply | None = Reply("Acknowledged #42.")
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

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
