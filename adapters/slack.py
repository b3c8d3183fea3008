"""Slack: Block Kit out, slack-bolt in. Translation only; every decision is the dispatcher's.

Outbound, `SlackAdapter` implements `bot.chat.Adapter` with slack_sdk's
`AsyncWebClient` (retries switched off: the outbox owns them) and maps Slack's
refusals to `DeliveryError`. Inbound, a slack-bolt `AsyncApp` verifies the
signature of every request to `POST /slack/events`, acknowledges at once
(Slack's 3 s deadline) and hands a neutral `ActionEvent` or `CommandEvent` to
the dispatcher in a background task; the `Reply` goes back to the request's
`response_url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient
from yarl import URL

from adapters.settings import SlackSettings
from bot import actions
from bot.alerts import BodyError
from bot.auth import ReplayGuard
from bot.bodies import content_coding, read_limited, refused
from bot.chat import (ActionEvent, Button, CommandEvent, DeliveryError, Handling, MessageRef, Outbound, Reply,
                      Unclaimed, dispatched, split_words)
from bot.config import find_person
from bot.model import Actor

log = logging.getLogger("chatops.slack")
PLATFORM = "slack"

PATH = "/slack/events"
ACTION_PREFIX = "chatops:"
TIMEOUT = 15  # seconds for one Web API call
INVALID_BUTTON = ("This button is not valid: it was not made by this bot, or it is too old. "
                  "Use the buttons on the latest incident message.")
# name -> (description, usage hint) for the app manifest; the dispatcher owns what they do. Slack shows the hint as
# the command is typed: it names every subcommand of the command's usage in the bot's help (a test holds them to it;
# the manifest is printed without a running bot's dispatcher to read them from). A command of the bot's missing here
# has no slash command on Slack: help shows it under /chatops (see Dispatcher.typed_on).
COMMANDS: dict[str, tuple[str, str]] = {
    "incident": ("Show or act on an incident",
                 "list [STATUS] | show ID | ack ID | escalate ID | resolve ID | reopen ID | page ID PERSON | "
                 "runbook ID [RUNBOOK]"),
    "ack": ("Acknowledge an incident", "ID"),
    "chatops": ("Help, or any command: /chatops ack 42", "[help | COMMAND ARGS...]"),
    "oncall": ("Who is on call, a rotation's schedule, or cover a shift yourself",
               "[ROTATION] | schedule ROTATION [--weeks N] | take [ROTATION] [FROM] [UNTIL] | cancel ID"),
    "swap": ("Ask someone to take your shift", "@person [ROTATION] DATE|next | list | cancel ID | undo ID"),
    "override": ("A manager puts someone on call for a stretch", "ROTATION @person FROM UNTIL | cancel ID"),
}
# Message metadata on every post the outbox makes: {"event_type": DELIVERY_EVENT, "event_payload": {"delivery": key}},
# so that a post whose answer was lost can be found in the channel before it is made again (`find`).
DELIVERY_EVENT = "chatops_delivery"
FIND_SKEW = 60  # seconds: how far Slack's clock and ours may disagree, and how late Slack may store a post it took
FIND_PAGE, FIND_PAGES = 200, 5  # messages a page, pages at most: one lookup is a call or two (Tier 3)
TRANSIENT_ERRORS = {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
TOKEN_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
HOOKS_HOST = "hooks.slack.com"  # where Slack's response_urls point
_MENTION = re.compile(r"^\s*(<@[UW][A-Z0-9]+(?:\|[^>]*)?>\s*)+")
_USER_ID = re.compile(r"^[UW][A-Z0-9]+$")  # a person, not a conversation (C..., G..., D...)


class Renderer(Protocol):
    def render_json(self, kind: str, platform: str, context: Mapping[str, Any]) -> dict[str, Any]: ...


class Dispatcher(Protocol):
    async def handle_action(self, event: ActionEvent) -> Reply | None: ...

    async def handle_command(self, event: CommandEvent) -> Reply: ...

    def typed_on(self, platform: str, names: Iterable[str]) -> None: ...


# -- outbound: neutral -> Block Kit ---------------------------------------------------------------

SIGNATURE_WINDOW = 300  # seconds: Slack's own limit on a request's X-Slack-Request-Timestamp
CLAIMED = "chatops_handling"  # the Bolt context key of a slash command's or click's Handling (see handle)
EVENT_RETRIES = timedelta(hours=1)  # Slack retries an unanswered event 3 times, the last about 5 minutes on
CARD_ACTIONS = actions.CARD_ACTIONS  # a click on one of these of a private card redraws it (see _redraw_private)


def _signed(secret: bytes, body: bytes, timestamp: str | None, signature: str | None, now: float) -> bool:
    """Slack's v0 signature: HMAC-SHA256 of `v0:{timestamp}:{body}` (the raw bytes), compared in constant time;
    False for anything missing or malformed, never an exception."""
    if not timestamp or not signature:
        return False
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > SIGNATURE_WINDOW:
        return False
    mac = hmac.new(secret, b"v0:" + timestamp.encode("utf-8", "replace") + b":" + body, hashlib.sha256)
    return hmac.compare_digest(b"v0=" + mac.hexdigest().encode(), signature.encode("utf-8", "replace"))


def _verbatim(node: Any) -> Any:
    """Every mrkdwn text object marked `verbatim` unless a template chose: Slack then turns no plain word of an
    alert into a mention (`@channel`, `@here`) or a channel link, while the links and `<@U...>` mentions the
    templates write themselves still work."""
    if isinstance(node, list):
        return [_verbatim(item) for item in node]
    if isinstance(node, dict):
        out = {key: _verbatim(value) for key, value in node.items()}
        if out.get("type") == "mrkdwn" and "text" in out:
            out.setdefault("verbatim", True)
        return out
    return node


def escape(text: str) -> str:
    """Plain text for a Slack text field: `&`, `<`, `>` as entities, so nothing becomes a mention or link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": text if len(text) <= limit else text[: limit - 1] + "\u2026", "emoji": True}


def button_element(button: Button, action_id: str) -> dict[str, Any]:
    """One Block Kit button; its value is `bot.actions.encode` of the button."""
    label = button.label or button.action
    element: dict[str, Any] = {
        "type": "button", "action_id": action_id, "text": _plain(label, 75),
        "value": actions.encode(button.action, button.incident_id, button.arg, button.tag),
    }
    if button.style in ("primary", "danger"):
        element["style"] = button.style
    if button.confirm:
        element["confirm"] = {"title": _plain("Are you sure?", 100), "text": _plain(button.confirm, 300),
                              "confirm": _plain(label, 30), "deny": _plain("Cancel", 30)}
        if button.style == "danger":
            element["confirm"]["style"] = "danger"
    return element


# A name a typed mention may become and still be one word of the command (bot.chat.split_words reads quotes and
# backslashes as a shell does: `O'Brien` paired its quote with the one of "won't" later in the note).
_PLAIN_WORD = re.compile(r"^[\w.-]+$")


def _shape_problem(body: Any) -> str | None:
    """What a signed body has in a shape Slack never sends (Bolt reads these fields without checking them)."""
    if not isinstance(body, dict):
        return "expected an object"
    for key in ("event", "user", "team", "channel", "container", "message"):
        if key in body and body[key] is not None and not isinstance(body[key], dict):
            return f"{key} must be an object"
    event = body.get("event")
    if isinstance(event, dict) and not all(isinstance(event.get(k), (str, type(None))) for k in ("type", "text")):
        return "event.type and event.text must be strings"
    user = body.get("user")
    if isinstance(user, dict) and not isinstance(user.get("id"), (str, type(None))):
        return "user.id must be a string"
    actions_ = body.get("actions")
    if actions_ is not None and not (isinstance(actions_, list) and all(
            isinstance(a, dict) and all(isinstance(a.get(k), (str, type(None))) for k in ("action_id", "value", "type"))
            for a in actions_)):
        return "actions must be a list of objects with string action_id and value"
    if not actions_ and body.get("type") == "block_actions":  # Bolt reads the first
        return "a block_actions payload needs at least one action"
    if body.get("type") == "block_actions" and not all(isinstance(a.get("action_id"), str) for a in actions_):
        return "each action of a block_actions payload needs its action_id"  # Bolt reads it (action["action_id"])
    view = body.get("view")
    if ("view" in body or body.get("type") == "view_submission") and not (
            isinstance(view, dict) and isinstance(view.get("type", ""), str)
            and isinstance(view.get("callback_id", ""), str)):
        return "view must be an object with a string type and callback_id"
    if isinstance(view, dict) and body.get("type") == "view_submission" and "type" not in view:
        return "a view_submission's view needs its type"  # Bolt reads it (view["type"])
    return None


def button_blocks(buttons: Sequence[Button]) -> list[dict[str, Any]]:
    """`actions` blocks of at most 25 buttons; action ids `chatops:{action}`, `chatops:{action}:{n}` when repeated."""
    elements, seen = [], set()
    for n, button in enumerate(buttons):
        action_id = f"{ACTION_PREFIX}{button.action}"
        action_id = f"{action_id}:{n}" if action_id in seen else action_id
        seen.add(action_id)
        elements.append(button_element(button, action_id))
    return [{"type": "actions", "elements": elements[i:i + 25]} for i in range(0, len(elements), 25)]


def delivery_error(method: str, exc: SlackApiError, *, chat: str | None = None,
                   bot: str | None = None) -> DeliveryError:
    """Slack's refusal as the outbox understands it: when to retry, or never. `chat`: the conversation the call was
    about, `bot`: the bot's user name, for a refusal someone fixes in Slack (what to do goes into the dead letter)."""
    response = exc.response
    status = getattr(response, "status_code", None) or getattr(response, "status", None) or 0
    data = getattr(response, "data", None)
    error = data.get("error") if isinstance(data, dict) else None
    what = f"slack {method}: {error or f'HTTP {status}'}{_what_to_do(error, chat, bot)}"
    if status == 429 or error == "ratelimited":
        try:
            retry_after: float | None = float(response.headers.get("Retry-After"))
        except (TypeError, ValueError):
            retry_after = None
        return DeliveryError(what, retry_after=retry_after)
    if status >= 500 or error in TRANSIENT_ERRORS:
        return DeliveryError(what)
    if error in TOKEN_ERRORS:
        return DeliveryError(what, permanent=True, token_refused=True)
    if error in ("message_not_found", "thread_not_found"):  # deleted in Slack (its thread with it)
        return DeliveryError(what, permanent=True, gone=True)
    return DeliveryError(what, permanent=True)  # channel_not_found, not_in_channel, invalid_auth, invalid_blocks...


def _what_to_do(error: str | None, chat: str | None, bot: str | None) -> str:
    """For a channel the bot cannot post in, how to let it in, short (`chatops outbox list` shows 100 characters).
    Slack answers channel_not_found for a private channel the bot is not in, as for an id that names no channel."""
    if error == "is_archived" and chat:
        return f": {chat} is archived: unarchive it, or give channels[].chat another channel in app.yaml"
    if error not in ("not_in_channel", "channel_not_found") or not chat or chat[:1] in ("D", "U", "W"):
        return ""  # (a direct conversation or a person: no one is invited there)
    invite = f"/invite @{bot}" if bot else "/invite @<the bot>"
    if error == "not_in_channel":
        return f": invite the bot: {invite} in {chat}"
    return f": {chat} is a wrong id, or private: {invite} in it"


# -- inbound: Slack payloads -> neutral events ----------------------------------------------------

def response_url_allowed(url: str, api_url: str) -> bool:
    """Whether a reply may be posted to `url`, a request's response_url: over HTTPS to Slack's hooks host (or the
    hooks host beside the api_url's, as hooks.slack-gov.com is beside slack-gov.com), or to the api_url's own scheme,
    host and port (Slack behind a proxy, a fake Slack). The request is signed, but the bot posts what it answers
    (incident cards) only where Slack takes answers, not wherever a payload says."""
    try:
        to, api = URL(url), URL(api_url)
    except ValueError:
        return False
    if not to.is_absolute() or to.user is not None or to.password is not None:
        return False
    if to.scheme == "https" and to.port == 443 and to.host in (HOOKS_HOST, f"hooks.{api.host}"):
        return True
    return (to.scheme, to.host, to.port) == (api.scheme, api.host, api.port)


def _origin(url: str) -> str:
    """Where a URL points, for the log, without its path (a response_url's path is what lets one answer)."""
    try:
        return repr(str(URL(url).origin()))
    except ValueError:
        return "not a URL"


_MARKUP = re.compile(r"<([^<>]*)>")  # what Slack makes of a typed mention, channel or link: `<@U123|bob>`, `<!here>`


def readable(text: str, name_of: Callable[[str, str], str] | None = None) -> str:
    """A command's text as Slack sends it (escaping on: `<@U02BOB|bob>`, `<!channel>`, `<#C01|ops>`,
    `<https://x|the wiki>`, and `&lt;` for a typed `<`) as neutral text: `@Bob`, `@channel`, `#ops`,
    `the wiki (https://x)`, `<`. What a note says then reads as it was typed, and pings nobody where it is shown
    (a plain `@channel` is no mention). `name_of(user_id, label)`: the word after `@` for a person (their name);
    without it, the label Slack sent, else the id."""
    def plain(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            user = target[1:]
            return "@" + (name_of(user, label) if name_of is not None else (label or user))
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            special = target[1:]
            if special.startswith("subteam^"):  # a user group: its handle is its label (`@dbas`)
                return "@" + (label.lstrip("@") or special.partition("^")[2])
            if special.startswith("date^"):
                return label or special
            return "@" + (label.lstrip("@") or special)  # channel, here, everyone
        if not label or label in (target, target.removeprefix("mailto:")):  # a link that shows itself
            return label or target
        return f"{label} ({target})"
    return _MARKUP.sub(plain, text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def split_args(text: str, name_of: Callable[[str, str], str] | None = None) -> list[str]:
    """Words of a command's text (Slack escapes <, > and & in it, and marks mentions and links up: `readable`), as
    bot.chat.split_words splits them."""
    return split_words(readable(text, name_of))


def click_source(body: Mapping[str, Any]) -> MessageRef | None:
    """The clicked message; None for an ephemeral one, which no API call can edit."""
    container = body.get("container") or {}
    message = body.get("message") or {}
    channel = (body.get("channel") or {}).get("id") or container.get("channel_id")
    ts = message.get("ts") or container.get("message_ts")
    if not channel or not ts or container.get("is_ephemeral"):
        return None
    thread = message.get("thread_ts") or container.get("thread_ts")
    return MessageRef("slack", channel, ts, thread if thread and thread != ts else None)


def action_event(body: Mapping[str, Any], action: Mapping[str, Any]) -> ActionEvent:
    """A `block_actions` click as an `ActionEvent`; `actions.CodecError` for a value we did not make."""
    decoded = actions.decode(action.get("value", ""))
    user = body.get("user") or {}
    actor = Actor("slack", user.get("id", ""), user.get("name") or user.get("username") or "", None)
    return ActionEvent(decoded.action.value, decoded.incident_id, decoded.arg, actor, click_source(body),
                       event_id=f"{actor.user_id}:{action.get('action_ts', '')}", tag=decoded.tag)


def command_event(body: Mapping[str, Any], name_of: Callable[[str, str], str] | None = None) -> CommandEvent:
    """A slash command's form body as a `CommandEvent`: `/incident ack 42` -> `incident`, `["ack", "42"]`."""
    channel = body.get("channel_id", "")
    return CommandEvent(
        name=body.get("command", "").lstrip("/"), args=split_args(body.get("text", ""), name_of),
        actor=Actor("slack", body.get("user_id", ""), body.get("user_name", ""), None),
        chat=MessageRef("slack", channel, "", None) if channel else None,
        direct=body.get("channel_name") == "directmessage" or channel.startswith("D"),
    )


def mention_event(event: Mapping[str, Any], name_of: Callable[[str, str], str] | None = None) -> CommandEvent:
    """`@chatops ack 42` as `/chatops ack 42` (the dispatcher's umbrella command)."""
    ts = event.get("ts", "")
    thread = event.get("thread_ts")
    return CommandEvent(
        name="chatops", args=split_args(_MENTION.sub("", event.get("text", "")), name_of),
        actor=Actor("slack", event.get("user", ""), "", None),
        chat=MessageRef("slack", event.get("channel", ""), ts, thread if thread != ts else None),
    )


class _QuietBolt(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN from the environment even when given a client, then warns that the token
    "will be unused" (it is: `authorize` supplies it). The warning alarms people reading the log; drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


def _authorizer(token: str) -> Callable[..., Awaitable[AuthorizeResult]]:
    """One workspace, one token: no `auth.test` round trip before the 3 s deadline.
    (A plain function: bolt reads its argument names, and would take a method's `self` for one.)"""
    async def authorize(enterprise_id: str | None, team_id: str | None, user_id: str | None) -> AuthorizeResult:
        return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, user_id=user_id, bot_token=token)
    return authorize


class SlackAdapter:
    """`bot.chat.Adapter` for Slack, plus `register(app)` for `POST /slack/events`."""

    platform = "slack"
    # What to mend when Slack refuses the token (the log at start says it). The value is most often a variable's
    # (`${SLACK_BOT_TOKEN}` in the example app.yaml), which the validated settings no longer tell apart.
    token_setting = "adapters.slack.bot_token (in app.yaml, or the variable it names)"

    def __init__(self, settings: SlackSettings, *, renderer: Renderer, dispatcher: Dispatcher):
        self.settings, self.renderer, self.dispatcher = settings, renderer, dispatcher
        dispatcher.typed_on(self.platform, COMMANDS)  # Slack takes only the app's slash commands: help says /chatops X
        self.client = AsyncWebClient(token=settings.bot_token, base_url=settings.api_url, timeout=TIMEOUT,
                                     retry_handlers=[])  # no retries behind the outbox's back
        self._session: aiohttp.ClientSession | None = None
        self.bot_id: str | None = None  # ours (auth.test): a lookup takes only our own messages (see find)
        self.unreachable: str | None = None  # why auth.test got no answer at start, until a call works (/readyz)
        self.bot_name: str | None = None  # the bot user's name (auth.test), for "/invite @name" in a refusal
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen_events: deque[str] = deque(maxlen=1000)
        self._refused_url_said = False  # a response_url not on Slack's hosts was logged (said once: see _answer)
        # Bolt's own client is never used for calls; tokenless so bolt does not warn that `authorize` wins.
        self._secret = settings.signing_secret.encode()
        self._replays = ReplayGuard()  # signatures of slash commands and clicks already taken (see handle)
        # Claims a request in the store (scope, key, window) -> its Handling, or None for a copy of one handled, so
        # that another replica, or this one after a restart, refuses a replay, and handles a retry of one whose
        # handling a crash cut off; set by the bot (storage/replays.py). None: memory is the only guard.
        self.claim: Callable[[str, str, timedelta], Awaitable[Handling | None]] | None = None
        # Waits until what a click made due now has run (the timers' beat: an Escalate's step); set by the bot.
        self.settled: Callable[[], Awaitable[None]] | None = None
        bolt_log = log.getChild("bolt")
        if not any(isinstance(f, _QuietBolt) for f in bolt_log.filters):
            bolt_log.addFilter(_QuietBolt())
        self.bolt = AsyncApp(
            name="chatops", logger=bolt_log, signing_secret=settings.signing_secret,
            client=AsyncWebClient(base_url=settings.api_url, retry_handlers=[]),
            authorize=_authorizer(settings.bot_token), process_before_response=True,
        )
        self.bolt.action(re.compile(f"^{re.escape(ACTION_PREFIX)}"))(self._on_click)
        self.bolt.action(re.compile(".*"))(self._on_other_click)  # link buttons drawn by templates
        self.bolt.command(re.compile("^/"))(self._on_command)
        self.bolt.event("app_mention")(self._on_mention)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Share one HTTP session (kept-alive connections) between Web API and response_url calls."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
            self.client.session = self._session

    async def check(self) -> DeliveryError | None:
        """`auth.test`, once at start: whether Slack takes the token (a refused one shows in /readyz and
        chatops_adapter_up at once, not at the first delivery); None when it does."""
        try:
            await self._auth_test()
        except DeliveryError as exc:
            if not exc.token_refused:
                self.unreachable = str(exc)
            return exc
        return None

    async def _auth_test(self) -> str | None:
        data = await self._call("auth.test", self.client.auth_test())
        self.bot_id, self.bot_name = data.get("bot_id"), data.get("user")
        return self.bot_id

    async def stop(self, timeout: float = 5.0) -> None:
        """Let clicks and commands in flight finish (up to `timeout`), then close the session."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = self.client.session = None

    def register(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        """The signature is checked first, on the raw body (401 if forged, missing, malformed or older than
        5 minutes), before anything parses the body; then Bolt (which checks it again) runs our listeners. The body is
        read as every endpoint reads one (bot.bodies: up to server.max_body_bytes, within a time); Slack does not
        compress it, and a Content-Encoding gets a 415."""
        try:
            content_coding(request)
            body = await read_limited(request, request.client_max_size)
        except BodyError as exc:
            return refused(exc)
        now, signature = time.time(), request.headers.get("X-Slack-Signature")
        if not _signed(self._secret, body, request.headers.get("X-Slack-Request-Timestamp"), signature, now):
            return web.json_response({"error": "invalid or missing Slack signature: X-Slack-Signature must sign "
                                               "this body with the app's signing secret, X-Slack-Request-Timestamp "
                                               "must be within 5 minutes"}, status=401)
        try:
            # what Bolt's to_bolt_request makes, from the body read above (it would read it again)
            bolt_request = AsyncBoltRequest(body=body.decode(request.charset or "utf-8"), query=request.query_string,
                                            headers=request.headers)  # type: ignore[arg-type]
        except (UnicodeDecodeError, LookupError):  # not UTF-8; a charset nobody knows
            return web.json_response({"error": "the body is not UTF-8"}, status=400)
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError):  # signed, yet not what Slack sends
            return web.json_response({"error": "not a Slack request body (JSON event or form payload)"}, status=400)
        problem = _shape_problem(bolt_request.body)
        if problem is not None:  # Bolt's middleware would fail on it with a 500
            return web.json_response({"error": f"not a Slack request body: {problem}"}, status=400)
        # As Bolt decides (slack_bolt.request.internals): the raw header up to ";", compared exactly, or a body
        # that starts with "{". aiohttp's content_type normalises case and spacing, which Bolt does not.
        raw_type = request.headers.get("Content-Type", "").split(";")[0]
        if raw_type == "application/json" or body.startswith(b"{"):
            return await to_aiohttp_response(await self.bolt.async_dispatch(bolt_request))
        # What Bolt reads as a form: a slash command or a click, which Slack never sends twice: the same signed
        # request again, within its 5 minutes, is a replay (events, in JSON, are retried by Slack and taken once by
        # their id). Decided as Bolt decides how to read the body, not by the Content-Type alone, which the signature
        # does not cover: a replay under another Content-Type is still a form to Bolt.
        assert signature is not None
        if self._replays.seen(signature, now):
            return web.json_response({"error": "replayed request: Slack already sent this one"}, status=401)
        self._replays.remember(signature, now + 2 * SIGNATURE_WINDOW, now=now)
        handling = (Unclaimed(signature) if self.claim is None
                    else await self.claim("slack", signature, timedelta(seconds=2 * SIGNATURE_WINDOW)))
        if handling is None:
            return web.json_response({"error": "replayed request: Slack already sent this one"}, status=401)
        bolt_request.context[CLAIMED] = handling  # the listener that hands its work to a task takes it along
        response = await to_aiohttp_response(await self.bolt.async_dispatch(bolt_request))
        if bolt_request.context.pop(CLAIMED, None) is not None:  # no listener took it (a link button): nothing to do
            await handling.settle()
        return response

    # -- Adapter ----------------------------------------------------------------------------------

    def to_message(self, message: Outbound) -> dict[str, Any]:
        """`{"text", "blocks"}`: the rendered template, then the buttons as `actions` blocks."""
        rendered = self.renderer.render_json(message.kind, "slack", message.context)
        try:
            blocks = list(rendered.get("blocks") or []) + button_blocks(message.buttons)
        except actions.CodecError as exc:
            raise DeliveryError(f"slack: cannot draw a button: {exc}", permanent=True) from exc
        payload: dict[str, Any] = {"text": rendered.get("text") or message.text}
        if blocks:
            payload["blocks"] = _verbatim(blocks)
        if message.key:
            payload["metadata"] = {"event_type": DELIVERY_EVENT, "event_payload": {"delivery": message.key}}
        return payload

    async def send(self, chat_id: str, message: Outbound) -> MessageRef:
        payload = self.to_message(message)
        data = await self._call("chat.postMessage", self.client.chat_postMessage(channel=chat_id, **payload),
                                chat=chat_id)
        return MessageRef("slack", data["channel"], data["ts"], None)

    async def update(self, ref: MessageRef, message: Outbound) -> None:
        payload = self.to_message(message)
        await self._call("chat.update", self.client.chat_update(channel=ref.chat_id, ts=ref.message_id, **payload),
                         chat=ref.chat_id)

    async def reply(self, ref: MessageRef, message: Outbound) -> MessageRef:
        thread = ref.thread_id or ref.message_id
        data = await self._call("chat.postMessage", self.client.chat_postMessage(
            channel=ref.chat_id, thread_ts=thread, **self.to_message(message)), chat=ref.chat_id)
        return MessageRef("slack", data["channel"], data["ts"], thread)

    async def find(self, chat_id: str, key: str, *, thread: str | None, sent_at: float) -> MessageRef | None:
        """Our message carrying `key` (see `to_message`) in the channel, or in `thread`: a post whose answer was lost,
        given up on at `sent_at` (Unix time). Only what Slack stored from TIMEOUT before that until a minute after is
        read (`conversations.history`, or `conversations.replies` for a thread: Tier 3; 1 a minute for an app
        distributed commercially outside the Marketplace), a page or two. Needs channels:history (groups:history
        for a private channel) and the bot in the channel; Slack's refusal otherwise raises, permanent. A person's
        user id (a page, which went to their direct conversation with the bot) is looked for in that conversation:
        Slack reads and edits no message by a user id, so conversations.open (im:write) gives the conversation, which
        needs im:history to read."""
        bot_id = self.bot_id or await self._auth_test()  # (Slack was not reachable at start)
        if _USER_ID.match(chat_id):
            opened = await self._call("conversations.open", self.client.conversations_open(users=chat_id))
            chat_id = opened["channel"]["id"]
        window = {"oldest": f"{sent_at - TIMEOUT - FIND_SKEW:.6f}", "latest": f"{sent_at + FIND_SKEW:.6f}",
                  "inclusive": True, "include_all_metadata": True, "limit": FIND_PAGE}
        cursor: str | None = None
        for page in range(FIND_PAGES):
            method = "conversations.replies" if thread else "conversations.history"
            call = (self.client.conversations_replies(channel=chat_id, ts=thread, cursor=cursor, **window) if thread
                    else self.client.conversations_history(channel=chat_id, cursor=cursor, **window))
            try:
                data = await self._call(method, call, chat=chat_id)
            except DeliveryError as exc:
                # Limited after the first page (1 call a minute, 15 messages a page, for some apps): the lookup
                # would start over after the wait and be limited at the same page again, for ever. Given up on.
                if page and exc.retry_after:
                    raise DeliveryError(f"{exc} (after {page} page(s) of the lookup)", permanent=True) from exc
                raise
            for found in data.get("messages") or []:
                metadata = found.get("metadata") or {}
                if (metadata.get("event_type") == DELIVERY_EVENT
                        and (metadata.get("event_payload") or {}).get("delivery") == key
                        and (bot_id is None or found.get("bot_id") == bot_id)):  # not another bot's, nor a person's
                    return MessageRef("slack", chat_id, found["ts"], thread)
            cursor = (data.get("response_metadata") or {}).get("next_cursor")
            if not (data.get("has_more") and cursor):
                break
        return None

    async def page(self, user_id: str, message: Outbound) -> MessageRef:
        """The message, with its buttons, in the person's direct conversation with the bot."""
        try:
            opened = await self._call("conversations.open", self.client.conversations_open(users=user_id))
        except DeliveryError as exc:
            exc.unknown = False  # only the conversation was being opened: nothing reached the person yet
            raise
        return await self.send(opened["channel"]["id"], message)

    async def notify(self, actor: Actor, chat: MessageRef | None, text: str) -> None:
        """Only `actor` sees it: ephemeral in `chat`, or a direct message when there is no chat."""
        if actor.platform != "slack":
            raise DeliveryError(f"slack: cannot notify a {actor.platform} user", permanent=True)
        if chat is not None:
            await self._call("chat.postEphemeral", self.client.chat_postEphemeral(
                channel=chat.chat_id, user=actor.user_id, text=escape(text), thread_ts=chat.thread_id),
                chat=chat.chat_id)
            return
        opened = await self._call("conversations.open", self.client.conversations_open(users=actor.user_id))
        await self._call("chat.postMessage",
                         self.client.chat_postMessage(channel=opened["channel"]["id"], text=escape(text)))

    async def _call(self, method: str, call: Coroutine[Any, Any, Any], *, chat: str | None = None) -> dict[str, Any]:
        """`chat`: the conversation the call is about, named in a refusal that says how to let the bot in."""
        try:
            response = await call
        except SlackApiError as exc:
            raise delivery_error(method, exc, chat=chat, bot=self.bot_name) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Not connected at all (refused, no such host, a connect timeout): nothing left, so a retry is safe. Any
            # other failure came once the request may have gone (no answer in time, the connection closed or reset
            # before the answer, an answer cut short): Slack may have delivered it.
            unsent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL))
            raise DeliveryError(f"slack {method}: {type(exc).__name__}: {exc}", unknown=not unsent) from exc
        self.unreachable = None
        return response.data

    # -- inbound ----------------------------------------------------------------------------------

    async def _on_click(self, ack: Any, body: dict[str, Any], action: dict[str, Any], context: Any) -> None:
        await ack()
        self._spawn_claimed(context, lambda handling: self._click(body, action, handling), "click")

    async def _on_other_click(self, ack: Any) -> None:
        await ack()

    async def _on_command(self, ack: Any, body: dict[str, Any], context: Any) -> None:
        await ack()
        self._spawn_claimed(context, lambda handling: self._command(body, handling), "command")

    async def _on_mention(self, ack: Any, body: dict[str, Any], event: dict[str, Any]) -> None:
        await ack()
        event_id = body.get("event_id", "")
        if event_id and event_id in self._seen_events:  # Slack's retry of an event we already took
            return
        self._seen_events.append(event_id)
        self._spawn(self._mention_once(event_id, event), "mention")

    async def _mention_once(self, event_id: str, event: dict[str, Any]) -> None:
        """Slack retries an event it thinks was missed, maybe to another replica: the one that claims it answers."""
        handling = (Unclaimed(event_id) if not event_id or self.claim is None
                    else await self.claim("slack-event", event_id, EVENT_RETRIES))
        if handling is None or not await handling.ready():
            return
        async with handling:
            await self._mention(event, handling)
        # Failed before it acted: a retry of it is handled, here too.
        if handling.released and event_id in self._seen_events:
            self._seen_events.remove(event_id)

    def _spawn_claimed(self, context: Any, work: Callable[[Handling], Coroutine[Any, Any, None]], what: str) -> None:
        """A slash command or click, handled in the background under the Handling its request was claimed with."""
        handling = context.pop(CLAIMED, None) or Unclaimed("")
        self._spawn(self._claimed(handling, work), what)

    async def _claimed(self, handling: Handling, work: Callable[[Handling], Coroutine[Any, Any, None]]) -> None:
        if not await handling.ready():  # another replica was handling the same request, and did
            return
        async with handling:
            await work(handling)
        if handling.released:  # failed before it acted: the same request again is handled, here too
            self._replays.forget(handling.key)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(work, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await work
        except Exception:
            log.exception("slack: handling a %s failed", what)

    async def _click(self, body: dict[str, Any], action: dict[str, Any], handling: Handling) -> None:
        try:
            event = action_event(body, action)
        except actions.CodecError as exc:
            log.warning("slack: refused button value from user %s: %s", (body.get("user") or {}).get("id"), exc)
            await self._answer(body, Reply(INVALID_BUTTON))
            return
        reply = await dispatched(self.dispatcher.handle_action(event), handling, PLATFORM)
        if reply is None:
            return
        if not reply.ephemeral and event.source is not None:  # for everyone: in the incident's thread
            await self._post(event.source.chat_id, event.source.thread_id or event.source.message_id, reply)
        else:
            await self._answer(body, reply)
        if reply.settle is not None and event.source is not None and event.source.chat_id.startswith("D"):
            await self._settle(event.source, reply.settle)  # answered: no more buttons (direct messages only)
        if event.source is None and event.action in CARD_ACTIONS and not handling.released:
            await self._redraw_private(body, event)

    async def _redraw_private(self, body: Mapping[str, Any], event: ActionEvent) -> None:
        """A button of a card only the clicker sees (`/incident show`'s): the outbox redraws the channel's cards, and no
        API call edits an ephemeral message, so this one is drawn again, as the incident is now, by the command that
        drew it, and replaces itself through the click's response_url. Also after a click that changed nothing (the
        card then shows what did: someone else acknowledged); not for someone the command does not show it to."""
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        if self.settled is not None:  # an Escalate's step (a reopen's first) runs in the timers' beat, after the click
            await self.settled()
        command = CommandEvent("incident", ["show", str(event.incident_id)], event.actor,
                               MessageRef("slack", channel, "", None) if channel else None)
        try:
            shown = await self.dispatcher.handle_command(command)
        except Exception:  # the clicker has the answer; the card stays as it was
            log.exception("slack: cannot redraw the private card of #%s", event.incident_id)
            return
        if shown.message is not None:
            await self._answer(body, shown, replace=True)

    def _name_of(self, user_id: str, label: str) -> str:
        """A typed `<@U123|label>` as the word after `@` (see `readable`): a known person's name, else what Slack
        labelled them, else the id. So that it still names whom a command means (`/incident page 1 @Bob`,
        bot.config.find_person), a name others share, or with a space in it, is given as the person's app.yaml id,
        and a label naming someone else in app.yaml as the Slack id."""
        people = list(getattr(getattr(self.dispatcher, "config", None), "people", None) or [])
        person = next((p for p in people if p.slack == user_id), None)
        if person is not None:  # (the name only if it is one plain word that finds them: not another's id, say)
            plain = _PLAIN_WORD.match(person.name) is not None and find_person(people, person.name) is person
            return person.name if plain else person.id
        if label and _PLAIN_WORD.match(label) and find_person(people, label) is None:
            return label
        return user_id

    async def _settle(self, ref: MessageRef, text: str) -> None:
        try:
            await self.update(ref, Outbound("text", {"text": text}, text=text))
        except DeliveryError as exc:  # the answer still reaches the clicker; the buttons stay
            log.warning("slack: cannot settle the clicked message: %s", exc)

    async def _command(self, body: dict[str, Any], handling: Handling) -> None:
        reply = await dispatched(self.dispatcher.handle_command(command_event(body, self._name_of)), handling, PLATFORM)
        await self._answer(body, reply)

    async def _mention(self, event: dict[str, Any], handling: Handling) -> None:
        command = mention_event(event, self._name_of)
        reply = await dispatched(self.dispatcher.handle_command(command), handling, PLATFORM)
        channel = event.get("channel", "")
        thread = command.chat.thread_id if command.chat is not None else None  # the thread the mention was in
        if reply.ephemeral:
            # In that thread, or in the channel: Slack shows an ephemeral message in a thread only if the thread
            # exists, and the thread of a mention outside one does not (the answer would never be seen).
            await self._call("chat.postEphemeral", self.client.chat_postEphemeral(
                channel=channel, user=command.actor.user_id, thread_ts=thread, **self._reply_payload(reply)))
        else:  # for everyone: a post starts the mention's thread when it has none
            await self._post(channel, thread or event.get("ts"), reply)

    async def _post(self, channel: str, thread: str | None, reply: Reply) -> None:
        await self._call("chat.postMessage", self.client.chat_postMessage(
            channel=channel, thread_ts=thread, **self._reply_payload(reply)), chat=channel)

    def _reply_payload(self, reply: Reply) -> dict[str, Any]:
        if reply.message is not None:
            try:
                payload = self.to_message(reply.message)
                payload["text"] = payload["text"] or escape(reply.text)
                return payload
            except Exception:  # a broken template must not leave the user without an answer
                log.exception("slack: cannot render the %s reply; answering with its text", reply.message.kind)
        return {"text": escape(reply.text)}

    async def _answer(self, body: Mapping[str, Any], reply: Reply, *, replace: bool = False) -> None:
        """The reply to a click or command through its response_url (ephemeral unless it says otherwise); `replace`:
        instead of the clicked message. A response_url elsewhere than Slack (response_url_allowed) is not posted to:
        the reply goes through the Web API, as when there is none."""
        payload = self._reply_payload(reply)
        url = body.get("response_url")
        if url and not response_url_allowed(str(url), self.settings.api_url):
            if not self._refused_url_said:
                self._refused_url_said = True
                log.warning("slack: not answering through a response_url at %s, neither on %s nor on the host of "
                            "adapters.slack.api_url: answered through the Web API instead (said once)",
                            _origin(str(url)), HOOKS_HOST)
            url = None
        if url:
            hook = AsyncWebhookClient(url, timeout=TIMEOUT, session=self._session)
            response_type = "ephemeral" if reply.ephemeral else "in_channel"
            response = await hook.send_dict({**payload, "response_type": response_type, "replace_original": replace})
            if response.status_code != 200:
                log.warning("slack: response_url answered %s: %s", response.status_code, response.body[:200])
            return
        if replace:  # (every click has a response_url; without one, nothing can replace a private card)
            return
        user = (body.get("user") or {}).get("id") or body.get("user_id", "")
        channel = (body.get("channel") or {}).get("id") or body.get("channel_id", "")
        if not reply.ephemeral:  # for everyone, as its response_type would have said
            await self._call("chat.postMessage", self.client.chat_postMessage(channel=channel, **payload), chat=channel)
            return
        await self._call("chat.postEphemeral", self.client.chat_postEphemeral(channel=channel, user=user, **payload))


def manifest(*, public_url: str, bot_name: str = "chatops") -> dict[str, Any]:
    """A Slack app manifest (paste it at api.slack.com/apps -> Create New App -> From a manifest)."""
    url = public_url.rstrip("/") + PATH
    return {
        "_metadata": {"major_version": 1, "minor_version": 1},
        "display_information": {
            "name": bot_name[:35],
            "description": "Incident threads from alerts, with buttons to acknowledge, escalate and resolve",
            "background_color": "#1d1c1d",
        },
        "features": {
            "bot_user": {"display_name": bot_name[:80], "always_online": True},
            "slash_commands": [
                {"command": f"/{name}", "url": url, "description": description, "usage_hint": hint,
                 "should_escape": True}
                for name, (description, hint) in COMMANDS.items()
            ],
        },
        # channels:history and groups:history: to find a post whose answer was lost before posting it again;
        # im:history: to find a page (a direct message) whose answer was lost, so that it is redrawn as the incident
        # changes
        "oauth_config": {"scopes": {"bot": ["app_mentions:read", "channels:history", "chat:write", "chat:write.public",
                                            "commands", "groups:history", "im:history", "im:write"]}},
        "settings": {
            "event_subscriptions": {"request_url": url, "bot_events": ["app_mention"]},
            "interactivity": {"is_enabled": True, "request_url": url},
            "org_deploy_enabled": False,
            "socket_mode_enabled": False,
            "token_rotation_enabled": False,
        },
    }
