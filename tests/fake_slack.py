"""A fake Slack Web API on 127.0.0.1: records every call and answers the way Slack does.

    async with FakeSlack() as slack:            # slack.api_url -> AsyncWebClient(base_url=...)
        ...
        slack.called("chat.postMessage")         # the successful calls, params parsed
        slack.fail("chat.update", "message_not_found")
        slack.lose_answer("chat.postMessage")    # carried out, but the connection goes before the answer
        slack.response_url("r1")                 # a response_url whose posts land in slack.responses["r1"]

`chat.postMessage` is limited per channel (a token bucket: `burst` at once, then
`per_second`); over it the answer is HTTP 429 with `Retry-After`, like Slack's.
A message's `ts` is the time it was posted (Unix seconds, to the microsecond, unique),
and its `metadata` is kept; `conversations.history` (the channel's messages outside
threads, newest first) and `conversations.replies` (a thread, its parent first) page
through them as Slack does (`oldest`, `latest`, `inclusive`, `limit`, `cursor`), with
the metadata only for `include_all_metadata`. As in Slack, a person's user id (`U...`,
`W...`) is no conversation to read or edit: `conversations.history` and `chat.update`
answer `channel_not_found` for one (`conversations.open` gives their direct conversation).
`chat.postEphemeral` answers ok whatever its `thread_ts`, but, as in Slack, the person sees it in a thread only if
the thread already exists: `slack.ephemerals` keeps each with `shown`. A person's message in a thread, which the
bot never posts, is told to the fake with `slack.said(channel, ts, thread_ts)`.
"""

from __future__ import annotations

import asyncio

import base64
import hashlib
import hmac
import json
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from tests.recording import poll

FORM = "application/x-www-form-urlencoded"


def signed(body: str, *, secret: str, ts: int | None = None, content_type: str = FORM) -> dict[str, str]:
    """The headers Slack sends with a request: HMAC-SHA256 of `v0:{ts}:{body}` with the signing secret."""
    ts = int(time.time()) if ts is None else ts
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": f"v0={digest}", "Content-Type": content_type}


def _is_user(channel: str) -> bool:
    """A person's id (U..., W...), not a conversation's (C..., G..., D...)."""
    return channel[:1] in ("U", "W")


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    status: int = 200
    ok: bool = True


@dataclass
class _Failure:
    error: str
    status: int
    disconnect: bool
    times: int
    retry_after: int | None = None
    after: int = 0
    when: Callable[[dict[str, Any]], bool] = lambda params: True


@dataclass
class _Loss:
    times: int
    reset: bool
    when: Callable[[dict[str, Any]], bool]


@dataclass
class FakeSlack:
    token: str = "xoxb-fake-token"
    rate_limit: bool = True
    per_second: float = 1.0
    burst: int = 3
    retry_after: int = 1
    calls: list[Call] = field(default_factory=list)
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    messages: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    ephemerals: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._failures: dict[str, list[_Failure]] = defaultdict(list)
        self._losses: dict[str, list[_Loss]] = defaultdict(list)
        self._held: dict[str, asyncio.Event] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_micros = 0
        self.url = ""

    # -- the test's side ------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def response_url(self, key: str) -> str:
        return f"{self.url}/response/{key}"

    def said(self, channel: str, ts: str, thread_ts: str | None = None, *, user: str = "U01ALICE",
             text: str = "") -> None:
        """A person's message, as Slack holds it (a mention of the bot, say): a reply makes its thread exist."""
        message = {"type": "message", "user": user, "text": text, "ts": ts}
        if thread_ts:
            message["thread_ts"] = thread_ts
        self.messages[(channel, ts)] = message

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.ok]

    def fail(self, method: str, error: str, *, status: int = 200, times: int = 1, disconnect: bool = False,
             retry_after: int | None = None, after: int = 0,
             when: Callable[[dict[str, Any]], bool] = lambda params: True) -> None:
        """The next `times` calls of `method` (once `after` more have been answered as usual; only those whose params
        satisfy `when`) answer `{"ok": false, "error": error}` (or drop the connection), with a `Retry-After` header
        when given."""
        self._failures[method].append(_Failure(error, status, disconnect, times, retry_after, after, when))

    def hold(self, method: str) -> asyncio.Event:
        """Calls of `method` are carried out, and their answers wait until the event returned is set: a slow
        Slack, for a bot to be stopped (or to crash) while it waits."""
        self._held[method] = asyncio.Event()
        return self._held[method]

    def lose_answer(self, method: str, *, times: int = 1, reset: bool = False,
                    when: Callable[[dict[str, Any]], bool] = lambda params: True) -> None:
        """The next `times` calls of `method` (whose params satisfy `when`) are carried out, then the connection goes
        before the answer: closed, or with `reset` reset (a TCP RST, as a proxy or a network in trouble does). A post
        Slack took whose answer never reached the bot."""
        self._losses[method].append(_Loss(times, reset, when))

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 3.0) -> None:
        await poll(predicate, timeout, lambda: f"calls so far: {[c.method for c in self.calls]}")

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
        app.router.add_post("/response/{key}", self._response)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    # -- Slack's side ---------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            params.update(await request.post())
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else params.pop("token", None)
        call = Call(method, params, token)
        self.calls.append(call)
        status, body, headers = self._answer(call)
        call.status, call.ok = status, bool(body.get("ok"))
        if method in self._held:
            await self._held[method].wait()
        loss = next((loss for loss in self._losses[method] if loss.when(params)), None)
        if loss is not None and call.ok:
            loss.times -= 1
            if loss.times <= 0:
                self._losses[method].remove(loss)
            status = 0
            if loss.reset:  # SO_LINGER 0: closing sends a RST instead of a FIN
                assert request.transport is not None
                request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                      struct.pack("ii", 1, 0))
        if status == 0:  # drop the connection without an answer
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.json_response(body, status=status, headers=headers)

    def _answer(self, call: Call) -> tuple[int, dict[str, Any], dict[str, str]]:
        if call.token is None:
            return 200, {"ok": False, "error": "not_authed"}, {}
        if call.token != self.token:
            return 200, {"ok": False, "error": "invalid_auth"}, {}
        failures = self._failures[call.method]
        first = next((i for i, f in enumerate(failures) if f.when(call.params)), None)  # (the first for this call)
        if first is not None and failures[first].after:
            failures[first].after -= 1
        elif first is not None:
            failure = failures[first]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(first)
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else {}
            return (0 if failure.disconnect else failure.status), {"ok": False, "error": failure.error}, headers
        p = call.params
        if call.method == "chat.postMessage" and not self._allow(p.get("channel", "")):
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(self.retry_after)}
        handler = getattr(self, "_" + call.method.replace(".", "_"), None)
        return (200, handler(p), {}) if handler else (200, {"ok": False, "error": "unknown_method"}, {})

    def _allow(self, channel: str) -> bool:
        if not self.rate_limit:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(channel, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        allowed = tokens >= 1
        self._buckets[channel] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def _next_ts(self) -> str:
        self._last_micros = max(int(time.time() * 1_000_000), self._last_micros + 1)
        return f"{self._last_micros // 1_000_000}.{self._last_micros % 1_000_000:06d}"

    def _auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "chatops",
                "team_id": "T0FAKE", "user_id": "U0BOT", "bot_id": "B0BOT"}

    def _chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        metadata = p.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        if metadata is not None and not (isinstance(metadata, dict) and isinstance(metadata.get("event_type"), str)
                                         and isinstance(metadata.get("event_payload"), dict)):
            return {"ok": False, "error": "invalid_metadata_format"}
        ts = self._next_ts()
        message = {"type": "message", "user": "U0BOT", "bot_id": "B0BOT", "text": p.get("text", ""), "ts": ts}
        for key in ("blocks", "thread_ts"):
            if key in p:
                message[key] = json.loads(p[key]) if key == "blocks" and isinstance(p[key], str) else p[key]
        if metadata is not None:
            message["metadata"] = metadata
        self.messages[(p["channel"], ts)] = message
        return {"ok": True, "channel": p["channel"], "ts": ts, "message": message}

    def _conversations_history(self, p: dict[str, Any]) -> dict[str, Any]:
        channel = p.get("channel", "")
        if not channel or _is_user(channel):
            return {"ok": False, "error": "channel_not_found"}
        top = [m for (c, ts), m in self.messages.items() if c == channel and m.get("thread_ts", ts) == ts]
        return self._page(sorted(top, key=lambda m: Decimal(m["ts"]), reverse=True), p)

    def _conversations_replies(self, p: dict[str, Any]) -> dict[str, Any]:
        channel, ts = p.get("channel", ""), p.get("ts", "")
        parent = self.messages.get((channel, ts))
        if parent is None:
            return {"ok": False, "error": "thread_not_found"}
        replies = [m for (c, t), m in self.messages.items() if c == channel and t != ts and m.get("thread_ts") == ts]
        return self._page([parent, *sorted(replies, key=lambda m: Decimal(m["ts"]))], p, keep_first=True)

    @staticmethod
    def _page(messages: list[dict[str, Any]], p: dict[str, Any], *, keep_first: bool = False) -> dict[str, Any]:
        """One page of `messages` between `oldest` and `latest` (and a thread's parent, `keep_first`, whatever its
        time); the metadata only when asked for."""
        inclusive = str(p.get("inclusive", "")).lower() in ("1", "true")
        oldest = Decimal(str(p.get("oldest") or 0))
        latest = Decimal(str(p["latest"])) if p.get("latest") else None

        def within(m: dict[str, Any]) -> bool:
            ts = Decimal(m["ts"])
            return ((ts >= oldest if inclusive else ts > oldest)
                    and (latest is None or (ts <= latest if inclusive else ts < latest)))

        start = int(base64.b64decode(p["cursor"]).decode().removeprefix("next:")) if p.get("cursor") else 0
        limit = min(int(p.get("limit") or 100), 999)
        found = [m for n, m in enumerate(messages) if (keep_first and n == 0) or within(m)]
        page, more = found[start:start + limit], start + limit < len(found)
        if str(p.get("include_all_metadata", "")).lower() not in ("1", "true"):
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
        cursor = base64.b64encode(f"next:{start + limit}".encode()).decode() if more else ""
        return {"ok": True, "messages": page, "has_more": more, "response_metadata": {"next_cursor": cursor}}

    def _chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        if _is_user(p.get("channel", "")):
            return {"ok": False, "error": "channel_not_found"}
        message = self.messages.get((p.get("channel", ""), p.get("ts", "")))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message.update({k: p[k] for k in ("text", "blocks") if k in p})
        return {"ok": True, "channel": p["channel"], "ts": p["ts"], "text": message["text"], "message": message}

    def _chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel") or not p.get("user"):
            return {"ok": False, "error": "channel_not_found" if not p.get("channel") else "user_not_found"}
        channel, thread = p["channel"], p.get("thread_ts")
        # Slack: "ephemeral messages in threads are only shown if there is already an active thread"
        shown = not thread or any(c == channel and t != thread and m.get("thread_ts") == thread
                                  for (c, t), m in self.messages.items())
        self.ephemerals.append({**p, "shown": shown})
        return {"ok": True, "message_ts": self._next_ts()}

    def _conversations_open(self, p: dict[str, Any]) -> dict[str, Any]:
        user = str(p.get("users", "")).split(",")[0]
        if not user:
            return {"ok": False, "error": "users_list_not_supplied"}
        return {"ok": True, "channel": {"id": "D" + user[1:]}}

    def _users_info(self, p: dict[str, Any]) -> dict[str, Any]:
        user = str(p.get("user", ""))
        return {"ok": True, "user": {"id": user, "name": user.lower(), "real_name": user,
                                     "profile": {"display_name": user.lower()}}}

    async def _response(self, request: web.Request) -> web.Response:
        self.responses[request.match_info["key"]].append(await request.json())
        return web.json_response({"ok": True})
