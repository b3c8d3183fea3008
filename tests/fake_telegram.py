"""A fake Telegram Bot API on 127.0.0.1 (`POST /bot{token}/{method}`, form or JSON), answering like Telegram.

`async with FakeTelegram() as tg:` then `TelegramSettings(api_url=tg.api_url)`, `tg.called("sendMessage")`,
`tg.fail(method, description, error_code)`, `tg.lose_answer(method)`, `tg.push_update(update)` (for getUpdates).
sendMessage is limited like Telegram's (about 1/s per chat, `burst` at once; 20/min per group: 429 with
`retry_after`); HTML is checked as Telegram parses it (known tags, balanced, 4096 characters once parsed)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import socket
import struct
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.recording import poll

BOT = {"id": 7000000001, "is_bot": True, "first_name": "ChatOps", "username": "chatops_bot"}
PERSON = {"id": 7000000002, "is_bot": False, "first_name": "Someone"}  # who wrote a message the bot replies to
TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "blockquote", "tg-spoiler"}
_TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)(?:\s[^<>]*)?>")
_DECODE = {"reply_markup", "reply_parameters", "link_preview_options", "commands", "allowed_updates", "chat_id",
           "message_id", "offset", "limit", "timeout"}  # JSON (objects, lists and numbers) in a form


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str
    status: int = 200


def html_problem(text: str) -> tuple[str, int]:
    """What Telegram's HTML parse mode would refuse in `text` ("" if nothing), and its visible length."""
    open_tags: list[str] = []
    for closing, tag in _TAG.findall(text.lower()):
        if tag not in TAGS:
            return f'Unsupported start tag "{tag}"', 0
        if not closing:
            open_tags.append(tag)
        elif not open_tags or open_tags.pop() != tag:
            return f'Unmatched end tag "{tag}"', 0
    rest = _TAG.sub("", text)
    if open_tags or "<" in rest or re.search(r"&(?!#?\w+;)", rest):
        return "unclosed tag, or a bare < or & (must be &lt; &amp;)", 0
    return "", len(html.unescape(rest))


def _error(code: int, description: str, parameters: dict[str, Any] | None = None) -> tuple[int, Any]:
    return code, {"ok": False, "error_code": code, "description": description,
                  **({"parameters": parameters} if parameters else {})}


@dataclass
class FakeTelegram:
    token: str = "7000000001:AAFakeTokenForTests_0123456789abcdef"
    per_second: float = 1.0
    burst: int = 3
    group_per_minute: int = 20
    calls: list[Call] = field(default_factory=list)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    webhook: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[tuple[int, str, Any]]] = defaultdict(deque)  # (code, description, parameters)
        self._slow: dict[str, deque[float]] = defaultdict(deque)
        self._held: dict[int, asyncio.Event] = {}  # chat -> its messages' answers wait for this
        self._lost: dict[str, deque[bool]] = defaultdict(deque)  # answers never sent: reset (RST) or closed
        self._buckets: dict[int, tuple[float, float]] = {}
        self._minute: dict[int, deque[float]] = defaultdict(deque)
        self._updates: list[dict[str, Any]] = []
        self._new_update = asyncio.Event()
        self.url = self.api_url = ""

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.status == 200]

    def fail(self, method: str, description: str, error_code: int = 400, times: int = 1,
             parameters: dict[str, Any] | None = None) -> None:
        """The next `times` calls of `method` answer `{"ok": false, "error_code", "description"[, "parameters"]}`."""
        self._failures[method].extend([(error_code, description, parameters)] * times)

    def slow(self, method: str, seconds: float, times: int = 1) -> None:
        """The next `times` calls of `method` are carried out at once but answered `seconds` late (a message
        Telegram delivered whose answer never reached the bot in time)."""
        self._slow[method].extend([seconds] * times)

    def hold(self, chat: int) -> asyncio.Event:
        """Messages to `chat` are delivered, and their answers wait until the event returned is set: a call that
        hangs (up to the bot's timeout) on one chat only."""
        self._held[chat] = asyncio.Event()
        return self._held[chat]

    def lose_answer(self, method: str, times: int = 1, *, reset: bool = False) -> None:
        """The next `times` calls of `method` are carried out, then the connection goes before the answer: closed
        (the client reads the end of the stream), or with `reset` reset (a TCP RST, as a proxy or a network in
        trouble does). A message Telegram delivered whose answer never reached the bot."""
        self._lost[method].extend([reset] * times)

    def push_update(self, update: dict[str, Any]) -> None:
        self._updates.append(update)
        self._new_update.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 3.0) -> None:
        await poll(predicate, timeout, lambda: f"calls so far: {[c.method for c in self.calls]}")

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = "http://{}:{}".format(*self._runner.addresses[0][:2])
        self.api_url = f"{self.url}/bot"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    async def _api(self, request: web.Request) -> web.Response:
        params: dict[str, Any] = dict(request.query)
        params.update(await request.json() if request.content_type == "application/json" else await request.post())
        for key, value in params.items():
            if key in _DECODE and isinstance(value, str) and re.match(r"[-\d\[{]", value):
                params[key] = json.loads(value)
        call = Call(request.match_info["method"], params, request.match_info["token"])
        self.calls.append(call)
        if call.method == "getUpdates" and self.webhook is None and not self._pending(params):
            self._new_update.clear()  # long polling: wait for an update (at most a second here)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_update.wait(), min(float(params.get("timeout") or 0), 1.0))
        call.status, body = self._answer(call)
        if self._slow[call.method]:
            await asyncio.sleep(self._slow[call.method].popleft())
        held = self._held.get(params.get("chat_id")) if call.method == "sendMessage" else None
        if held is not None:
            await held.wait()
        if self._lost[call.method]:
            assert request.transport is not None
            if self._lost[call.method].popleft():  # SO_LINGER 0: closing sends a RST instead of a FIN
                request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                      struct.pack("ii", 1, 0))
            request.transport.abort()
            return web.Response()
        return web.json_response({"ok": True, "result": body} if call.status == 200 else body, status=call.status)

    def _answer(self, call: Call) -> tuple[int, Any]:
        method, p = call.method, call.params
        if call.token != self.token:
            return _error(401, "Unauthorized")
        if self._failures[method]:
            return _error(*self._failures[method].popleft())
        if method in ("setWebhook", "deleteWebhook"):
            self.webhook = dict(p) if method == "setWebhook" else None
        if method == "getUpdates":
            return (200, self._pending(p)) if self.webhook is None else _error(
                409, "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook first")
        if method in ("getMe", "answerCallbackQuery", "setMyCommands", "setWebhook", "deleteWebhook"):
            return 200, BOT if method == "getMe" else True
        handler = {"sendMessage": self._send, "editMessageText": self._edit, "editMessageReplyMarkup": self._edit}
        return handler[method](p) if method in handler else _error(404, "Not Found")

    def _limited(self, chat: int) -> int:
        """Seconds before `chat` may get another message; 0 when it may now (and that message is counted)."""
        now, minute = time.monotonic(), self._minute[chat]
        while minute and now - minute[0] > 60:
            minute.popleft()
        if chat < 0 and len(minute) >= self.group_per_minute:
            return int(60 - (now - minute[0])) + 1
        tokens, last = self._buckets.get(chat, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        self._buckets[chat] = (tokens - 1 if tokens >= 1 else tokens, now)
        if tokens < 1:
            return int((1 - tokens) / self.per_second) + 1
        minute.append(now)
        return 0

    def _refused(self, p: dict[str, Any]) -> tuple[int, Any] | None:
        text = str(p.get("text") or "")
        problem, visible = html_problem(text) if p.get("parse_mode") == "HTML" else ("", len(text))
        keys = [k for row in (p.get("reply_markup") or {}).get("inline_keyboard", []) for k in row]
        problem = (f"can't parse entities: {problem}" if problem else "message text is empty" if not text.strip()
                   else "message is too long" if visible > 4096
                   else "BUTTON_DATA_INVALID" if any(len(k.get("callback_data", "").encode()) > 64 for k in keys)
                   else "")
        return _error(400, f"Bad Request: {problem}") if problem else None

    def _send(self, p: dict[str, Any]) -> tuple[int, Any]:
        chat = p.get("chat_id")
        if not isinstance(chat, int):
            return _error(400, "Bad Request: chat not found")
        refused = self._refused(p)
        wait = 0 if refused else self._limited(chat)
        if refused or wait:
            return refused or _error(429, f"Too Many Requests: retry after {wait}", {"retry_after": wait})
        kind = "private" if chat > 0 else "supergroup" if str(chat).startswith("-100") else "group"
        message = {"message_id": 1 + sum(c == chat for c, _ in self.messages), "date": int(time.time()),
                   "text": p["text"], "from": BOT, "chat": {"id": chat, "type": kind, "title": "Ops"}}
        if p.get("reply_markup"):
            message["reply_markup"] = p["reply_markup"]
        parent = (p.get("reply_parameters") or {}).get("message_id")
        if parent is not None:  # as Telegram gives it: the message replied to, without the one that one replies to
            replied = self.messages.get((chat, parent)) or {  # not the bot's: a person's (a command the fake never saw)
                "message_id": parent, "date": int(time.time()), "from": PERSON, "chat": message["chat"], "text": "/"}
            message["reply_to_message"] = {k: v for k, v in replied.items() if k != "reply_to_message"}
        self.messages[(chat, message["message_id"])] = message
        return 200, message

    def _edit(self, p: dict[str, Any]) -> tuple[int, Any]:
        """editMessageText (without a keyboard, the keyboard goes), or editMessageReplyMarkup (no text)."""
        message = self.messages.get((p.get("chat_id"), p.get("message_id")))  # type: ignore[arg-type]
        refused = self._refused(p) if "text" in p else None
        if message is None or refused:
            return refused or _error(400, "Bad Request: message to edit not found")
        new = {"text": p.get("text", message["text"]), "reply_markup": p.get("reply_markup")}
        if new == {"text": message["text"], "reply_markup": message.get("reply_markup")}:
            return _error(400, "Bad Request: message is not modified: specified new message content and reply "
                               "markup are exactly the same as a current content and reply markup of the message")
        message.update(new, edit_date=int(time.time()))
        return 200, message

    def _pending(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(p.get("offset") or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]  # older ones are confirmed
        return self._updates[: int(p.get("limit") or 100)]
