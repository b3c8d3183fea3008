"""A shift swap run entirely from Telegram: the command in a private chat, Accept on an inline button,
the notice in the rotation's group. The same neutral handlers as on Slack, through python-telegram-bot
against the fake Telegram Bot API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from storage.models import Override, SwapRequest
from tests.botkit import Harness, running_bot
from tests.fake_telegram import FakeTelegram
from tests.recording import poll

SECRET = "tg-swap-secret"
ALICE, BOB, CAROL, GROUP = 111111, 222222, 333333, -100123
FIXTURES = Path(__file__).parent / "fixtures" / "telegram"
PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], telegram: 111111}
  - {id: bob, name: Bob, roles: [responder], telegram: 222222}
  - {id: carol, name: Carol, telegram: 333333}
"""
ROTATIONS = """
rotations:
  - {id: dba-primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02,
     timezone: Europe/Berlin, channel: ops-telegram, reminder: 0s}
"""


class Phone:
    """A Telegram user's side: commands typed in the private chat with the bot, taps on its buttons."""

    def __init__(self, h: Harness, tg: FakeTelegram):
        self.h, self.tg, self.n = h, tg, 0

    async def post(self, update: dict[str, Any]) -> None:
        self.n += 1
        update["update_id"] = 990000 + self.n
        resp = await self.h.client.post("/telegram/webhook", data=json.dumps(update),
                                        headers={"X-Telegram-Bot-Api-Secret-Token": SECRET,
                                                 "Content-Type": "application/json"})
        assert resp.status == 200

    async def type(self, user: int, text: str) -> None:
        update = json.loads((FIXTURES / "command_private.json").read_text())
        message = update["message"]
        message["from"]["id"] = message["chat"]["id"] = user
        message["text"], message["message_id"] = text, 100 + self.n
        message["entities"] = [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
        await self.post(update)

    def said_to(self, user: int) -> list[dict[str, Any]]:
        return [c.params for c in self.tg.called("sendMessage") if c.params["chat_id"] in (user, str(user))]

    async def tap(self, user: int, data: str) -> None:
        sent = [m for (chat, _), m in self.tg.messages.items() if chat == user and _keys(m) and data in _keys(m)]
        assert sent, f"no message in {user}'s chat has a {data} button"
        await self.forge(user, data, sent[-1], {"id": user, "type": "private"})

    async def forge(self, user: int, data: str, message: dict[str, Any], chat: dict[str, Any]) -> None:
        """A tap carrying `data` on `message`, whether or not the message has such a button."""
        update = json.loads((FIXTURES / "callback_query.json").read_text())
        query = update["callback_query"]
        query["id"], query["data"], query["from"]["id"] = f"tap{self.n}", data, user
        query["message"] = {**message, "chat": chat}
        await self.post(update)


def _keys(message: dict[str, Any]) -> list[str]:
    markup = message.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


@pytest.fixture
async def phone(tmp_path: Path) -> AsyncIterator[Phone]:
    async with FakeTelegram() as tg:
        extra = (f"adapters:\n  telegram: {{bot_token: '{tg.token}', webhook_secret: {SECRET}, "
                 f"api_url: '{tg.api_url}'}}\n") + ROTATIONS
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE) as h:
            yield Phone(h, tg)


async def test_a_swap_asked_accepted_and_announced_all_in_telegram(phone: Phone) -> None:
    p = phone
    await p.type(BOB, "/swap alice next")  # Bob holds this week; his next shift starts Mon 7 Dec
    await poll(lambda: any("swok:1" in _keys(m) for (chat, _), m in p.tg.messages.items() if chat == ALICE), 5,
               lambda: f"Alice's chat: {p.said_to(ALICE)}")
    ask = next(m for (chat, _), m in p.tg.messages.items() if chat == ALICE and "swok:1" in _keys(m))
    assert _keys(ask) == ["swok:1", "swno:1"]
    assert "Bob" in ask["text"] and "7 Dec" in ask["text"]
    await poll(lambda: any("Alice" in m["text"] for m in p.said_to(BOB)), 5,  # Bob's confirmation, his answer
               lambda: f"Bob's chat: {p.said_to(BOB)}")

    await p.tap(ALICE, "swok:1")
    await p.tg.wait_for(lambda: p.tg.called("answerCallbackQuery"), timeout=5)
    # The question in Alice's chat now says how it was answered, without its buttons.
    await poll(lambda: not _keys(ask) and ask["text"].startswith("Accepted: you are on call"), 5, lambda: f"{ask}")
    async with p.h.bot.db.sessions() as session:
        [swap] = (await session.execute(select(SwapRequest))).scalars().all()
        [override] = (await session.execute(select(Override))).scalars().all()
    assert swap.status == "accepted" and (override.person, override.rotation) == ("alice", "dba-primary")
    assert (override.starts_at.isoformat(), override.ends_at.isoformat()) == ("2026-12-07T08:00:00+00:00",
                                                                              "2026-12-14T08:00:00+00:00")
    await poll(lambda: any("Alice" in m["text"] and "Bob" in m["text"] for m in p.said_to(GROUP)), 5,
               lambda: f"group: {p.said_to(GROUP)}")

    await p.type(BOB, "/oncall dba-primary")
    await poll(lambda: any("Alice" in m["text"] and "7 Dec" in m["text"] and "override" in m["text"].lower()
                           for m in p.said_to(BOB)), 5, lambda: f"Bob's chat: {[m['text'] for m in p.said_to(BOB)]}")


async def test_a_forged_swap_tap_settles_nothing_but_a_partys_own_direct_message(phone: Phone) -> None:
    p = phone
    await p.type(BOB, "/swap alice next")
    await poll(lambda: any("swok:1" in _keys(m) for (chat, _), m in p.tg.messages.items() if chat == ALICE), 5,
               lambda: f"Alice's chat: {p.said_to(ALICE)}")
    await p.tap(ALICE, "swok:1")
    await poll(lambda: any("Alice" in m["text"] and "Bob" in m["text"] for m in p.said_to(GROUP)), 5,
               lambda: f"group: {p.said_to(GROUP)}")
    # (Bob's own "Cancel request" no longer does anything: that message is redrawn without it, first)
    await poll(lambda: not [m for (chat, _), m in p.tg.messages.items()
                            if chat == BOB and m["text"].startswith("You asked") and _keys(m)], 5,
               lambda: f"Bob's chat: {p.said_to(BOB)}")
    edits = len(p.tg.called("editMessageText"))
    notice = next(m for (chat, _), m in p.tg.messages.items() if chat == GROUP)
    before = dict(notice)
    # Bob is a party, but the message is the group's: a swap button's answer never rewrites it
    await p.forge(BOB, "swno:1", notice, {"id": GROUP, "type": "supergroup", "title": "Ops"})
    # Carol is no party to swap #1: her own chat's message stays as it is
    await p.type(CAROL, "/oncall dba-primary")
    await poll(lambda: p.said_to(CAROL), 5, lambda: "Carol gets an answer")
    mine = next(m for (chat, _), m in p.tg.messages.items() if chat == CAROL)
    await p.forge(CAROL, "swcx:1", mine, {"id": CAROL, "type": "private"})
    await poll(lambda: len(p.tg.called("answerCallbackQuery")) >= 3, 5, lambda: "both taps answered")
    assert len(p.tg.called("editMessageText")) == edits
    assert notice == before



async def test_a_swap_asked_in_the_private_chat_is_answered_once_by_the_message_with_its_button(phone: Phone) -> None:
    """The answer to the command ("Asked Alice...") and the requester's direct message ("You asked Alice...
    [Cancel request]") arrived in the same chat, one after the other: the direct message, which has the button and
    is sent again until it arrives, is the answer."""
    p = phone
    await p.type(BOB, "/swap alice next")  # (answered, if at all, before the webhook's 200)
    await poll(lambda: any("?swcx:1" in _keys(m) for (chat, _), m in p.tg.messages.items() if chat == BOB), 5,
               lambda: f"Bob's chat: {p.said_to(BOB)}")
    await p.type(BOB, "/swap list")  # the outbox is done with the request once this answer is there
    await poll(lambda: len(p.said_to(BOB)) >= 2, 5, lambda: f"Bob's chat: {p.said_to(BOB)}")
    asked, listing = p.said_to(BOB)
    assert asked["text"].startswith("You asked Alice to take your") and "reply_parameters" not in asked
    assert "#1" in listing["text"] and listing["reply_parameters"]["message_id"] == 100 + p.n - 1


async def test_the_requesters_cancel_goes_when_the_other_accepts_though_both_chats_number_it_alike(
        phone: Phone) -> None:
    """Telegram numbers each chat's messages on its own: Bob's "You asked Alice ..." and Alice's question were both
    message 1, and Alice's tap on hers left Bob's Cancel request in place (taken for the message she clicked)."""
    p = phone
    await p.type(BOB, "/swap alice next")

    def chat(user: int) -> list[dict[str, Any]]:
        return [m for (c, _), m in p.tg.messages.items() if c == user]
    await poll(lambda: [m for m in chat(ALICE) if "swok:1" in _keys(m)] and [m for m in chat(BOB) if _keys(m)], 5,
               lambda: f"{p.tg.messages}")
    [mine] = [m for m in chat(BOB) if m["text"].startswith("You asked Alice")]
    [theirs] = [m for m in chat(ALICE) if "swok:1" in _keys(m)]
    assert mine["message_id"] == theirs["message_id"]  # (each chat numbers its own)
    asked = mine["text"]
    await p.tap(ALICE, "swok:1")
    await poll(lambda: theirs["text"].startswith("Accepted: you are on call"), 5, lambda: f"{theirs}")
    await poll(lambda: not _keys(mine), 5, lambda: f"{mine}")
    assert mine["text"] == f"{asked}\n\nAccepted by Alice."
