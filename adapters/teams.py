"""Microsoft Teams: Adaptive Cards out, Bot Framework activities in. Translation only; every decision is the
dispatcher's.

Kept thin over botbuilder (Microsoft is retiring the Python Bot Framework SDK for the Microsoft 365 Agents SDK):
`CloudAdapter(ConfigurationBotFrameworkAuthentication(...))` checks the channel's JWT on every `POST /api/messages`
(a request it refuses, for any reason, is a 401) and runs the turn; the Bot Connector client it makes posts, replies
(in the card's thread) and edits (PUT). A message to the bot ("@chatops incident ack 3" in a channel, "oncall" in the
private chat) is a `CommandEvent`; a click on a card's `Action.Submit` arrives as a message whose `value` carries the
button's value (`{"chatops": "ack:1.36c3pa"}`) and is an `ActionEvent`. Teams has no ephemeral message: an answer
is a reply to the message it answers, in the channel's thread or in the private chat.

A post that answers nobody's message (an incident card, a page) goes to `adapters.teams.service_url`: Teams' global
Bot Connector unless set otherwise (see README, "Teams").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import html
import inspect
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import requests
from aiohttp import web
from botbuilder.core import TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity, ActivityTypes, Attachment, ChannelAccount, ConversationParameters, Mention
from botframework.connector.auth import MicrosoftAppCredentials, PasswordServiceClientCredentialFactory
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS
from msrest.exceptions import HttpOperationError

from adapters.settings import TeamsSettings
from bot import actions
from bot.alerts import BodyError
from bot.bodies import read_json, refused
from bot.chat import (ActionEvent, Button, CommandEvent, DeliveryError, Handling, MessageRef, Outbound, Reply,
                      Unclaimed, dispatched, split_words)
from bot.model import Actor
from bot.render import teams_text

log = logging.getLogger("chatops.teams")

PLATFORM = "teams"
PATH = "/api/messages"
CARD = "application/vnd.microsoft.card.adaptive"
DATA_KEY = "chatops"  # the key of an Action.Submit's data that holds the button's value
ACTIVITY_RETRIES = timedelta(hours=1)  # how long an activity id is claimed against a redelivery
SEEN_KEPT = 1000
AUTH_THREADS = 4  # tokens checked at once, at most (see TeamsAdapter._authenticate)
AUTH_WAIT = 10.0  # seconds a request's token may take to check (fetching the signing keys): a 503 after that
TIMEOUT = 15  # seconds for one Bot Connector call (msrest sets none: aiohttp's default is 5 minutes)
# The calls that post a message the outbox posts again when it got no answer (see _call); a page it never sends twice
POSTS = ("send", "reply")
PERSONAL = ("create", "page")  # the calls for a person, in their private chat with the bot (see delivery_error)
FOR_PERSON = ("the person must have the bot's app installed (people[].teams is their Teams id, 29:..., or their "
              "Entra object id)")
NO_TENANT_WAIT = 60.0  # seconds before a page that waits for a tenant (see _personal) is tried again
INVALID_BUTTON = "This button is not valid: it was not made by this bot, or it is too old."
STYLES = {"primary": "positive", "danger": "destructive"}
# A click on one of an incident card's buttons (bot.actions.CARD_ACTIONS) of a card `incident show` drew redraws that
# card (see _redraw_shown)
CARD_ACTIONS = actions.CARD_ACTIONS
# A message's texts that are the bot's own words, where commands are named as Teams types them: a text's, a thread
# line's (quoting someone in quotes, not code), a card's next step
BOTS_WORDS = ("text", "line", "next_step")
ANSWER_TRIES = 3  # a turn's answer, throttled (429), is tried this often within the turn's budget
DEADLINE = "chatops.deadline"  # a turn's state: when its answers must be done (the event loop's time; see _turn)
MUTED = "chatops.muted"  # a turn's state: the bot's token was refused, so nothing is sent back (see _answerable)
SHOWN_KEPT = 1000  # cards drawn as answers (`incident show`) whose clicks redraw them
# How a line that asks everyone (the outbox's mention "here": Slack's @here) names the channel it mentions: the bot
# knows a channel by its conversation id only, not by the name people see.
CHANNEL_MENTION = "channel"
_MENTION = re.compile(r"<at>[^<]*</at>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # the HTML Teams may wrap a message in (<p>, <div>, <br>)


class Renderer(Protocol):
    def render_json(self, kind: str, platform: str, context: Mapping[str, Any]) -> dict[str, Any]: ...


class Dispatcher(Protocol):
    async def handle_action(self, event: ActionEvent) -> Reply | None: ...

    async def handle_command(self, event: CommandEvent) -> Reply: ...

    def identify(self, actor: Actor) -> Any: ...

    def typed_on(self, platform: str, names: Sequence[str], umbrella: str = ...) -> None: ...

    def as_typed(self, platform: str, text: str) -> str: ...


# -- outbound: neutral -> Adaptive Card -----------------------------------------------------------

def card_action(button: Button) -> dict[str, Any]:
    """An `Action.Submit` whose data carries `bot.actions.encode` of the button. One that asks first (`confirm`) is
    an `Action.ShowCard`: the question, and the real button under it (Adaptive Cards have no confirmation dialog)."""
    label = (button.label or button.action)[:75]
    submit: dict[str, Any] = {"type": "Action.Submit", "title": label,
                              "data": {DATA_KEY: actions.encode(button.action, button.incident_id, button.arg,
                                                                button.tag)}}
    if button.style in STYLES:
        submit["style"] = STYLES[button.style]
    if not button.confirm:
        return submit
    return {"type": "Action.ShowCard", "title": label,
            "card": {"type": "AdaptiveCard", "body": [{"type": "TextBlock", "text": button.confirm, "wrap": True}],
                     "actions": [{**submit, "title": f"Yes, {label[:1].lower()}{label[1:]}"}]}}


def message_activity(rendered: Mapping[str, Any], buttons: Sequence[Button], fallback: str = "") -> Activity:
    """A rendered template (`{"text", "body"}`: an Adaptive Card's body; or only `{"text"}`) and the buttons as one
    message: a card when there is a body or a button, else markdown text.

    A text whose markdown Teams would read as a link with a label of its own or as bold (an alert's words, a person's
    note, a runbook's command: `m.run(**{})`) goes where nothing reads markdown, exactly as written: a plain-text
    message, or a card's RichTextBlock. Made inert with zero-width spaces instead, a command an approver read and
    copied held characters it does not run with."""
    raw = str(rendered.get("text") or fallback or "-")
    text = teams_text(raw)  # (the bot's own words have no link nor bold)
    body = list(rendered.get("body") or [])
    try:
        card_actions = [card_action(b) for b in buttons]
    except actions.CodecError as exc:
        raise DeliveryError(f"teams: cannot draw a button: {exc}", permanent=True) from exc
    if not body and not card_actions:
        # A message's markdown reads nothing inside code (a table, a runbook's output: Ansible's `*****`, Python's
        # `__main__`), so only what is outside it decides (a card's TextBlock has no code: all of it does, below)
        outside = _outside_code(raw)
        if outside != teams_text(outside):
            return Activity(type=ActivityTypes.message, text=raw, text_format="plain")
        return Activity(type=ActivityTypes.message, text=raw, text_format="markdown")
    if not body:
        body = ([{"type": "TextBlock", "text": text, "wrap": True}] if text == raw
                else [{"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": raw}]}])
    card = {"type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "version": "1.4", "body": body, "msteams": {"width": "Full"}}
    if card_actions:
        card["actions"] = card_actions
    return Activity(type=ActivityTypes.message, summary=text[:250],
                    attachments=[Attachment(content_type=CARD, content=card)])


_BACKTICKS = re.compile(r"`+")


def _outside_code(text: str) -> str:
    """The parts of `text` outside its ```fences``` and `code spans`, each on a line of its own (a pair split by a
    span is not joined). All of it unless its code reads plainly as markdown reads it: backtick runs of one (spans,
    in pairs, each within one line) or three (fences, each alone at a line's start, the opening one's line without
    another backtick, the closing one's with nothing else), and no backslash or `<` (an escaped backtick, an autolink
    or a tag around one). Else a stray backtick (`can`t connect`) made what followed it pass for code, and an alert's
    `**bold**` or `[label](url)` would go out as markdown."""
    if "\\" in text or "<" in text:
        return text
    parts: list[str] = []
    last, fenced, opened = 0, False, None  # where the text outside code resumed; in a fence; an open span's start
    for run in _BACKTICKS.finditer(text):
        a, b, size = run.start(), run.end(), len(run.group())
        if size not in (1, 3):
            return text
        line_start = a == 0 or text[a - 1] == "\n"
        rest = text[b:].split("\n", 1)[0]
        if fenced:
            if size == 3 and line_start and not rest.strip():
                fenced, last = False, b + len(rest)
            continue  # (a backtick inside a fence is code)
        if size == 3:
            if opened is not None or not line_start or "`" in rest:
                return text
            parts.append(text[last:a])
            fenced = True
        elif opened is None:
            parts.append(text[last:a])
            opened = a
        else:
            if "\n" in text[opened:a]:
                return text
            opened, last = None, b
    if fenced or opened is not None:
        return text
    parts.append(text[last:])
    return "\n".join(parts)


def mention_channel(activity: Activity, chat_id: str) -> None:
    """`activity` (a text message) made to mention the channel `chat_id` (its conversation id), which notifies
    everyone following it: Teams' counterpart of Slack's @here. A card is left as it is (a thread line is text)."""
    if activity.attachments:
        return
    if activity.text_format == "plain":  # (a mention is markup: the text made inert in markdown instead)
        activity.text, activity.text_format = teams_text(activity.text or ""), "markdown"
    tag = f"<at>{CHANNEL_MENTION}</at>"
    channel = chat_id.partition(";messageid=")[0]
    activity.text = f"{tag} {activity.text or ''}".rstrip()
    activity.entities = [*(activity.entities or []),
                         Mention(type="mention", text=tag, mentioned=ChannelAccount(id=channel, name=CHANNEL_MENTION))]


def delivery_error(what: str, exc: Exception) -> DeliveryError:
    """A Bot Connector refusal or failure as the outbox understands it: when to retry, or never, and what to do."""
    if isinstance(exc, HttpOperationError):
        response = exc.response
        status = getattr(response, "status_code", None) or getattr(response, "status", 0)
        said = _said(exc)
        if status == 429:
            after = _retry_after(getattr(response, "headers", None) or {})
            return DeliveryError(f"teams {what}: throttled (429){said}", retry_after=after)
        if status == 401:
            return DeliveryError(f"teams {what}: the Bot Connector refused the bot's token (401){said}; check "
                                 "adapters.teams.app_id and app_password (and tenant_id for a single-tenant app)",
                                 permanent=True, token_refused=True)
        if status == 403:
            hint = FOR_PERSON if what in PERSONAL else ("the bot is not in that conversation; add the app to the team "
                                                        "(or chat) of channels[].chat")
            return DeliveryError(f"teams {what}: forbidden (403){said}: {hint}", permanent=True)
        if status == 404:
            hint = FOR_PERSON if what in PERSONAL else ("the conversation or message is not there (deleted, or "
                                                        "channels[].chat is not a conversation id such as "
                                                        "19:...@thread.tacv2)")
            return DeliveryError(f"teams {what}: not found (404){said}: {hint}", permanent=True,
                                 gone=what == "update")
        if 400 <= status < 500:
            return DeliveryError(f"teams {what}: refused ({status}){said}", permanent=True)
        return DeliveryError(f"teams {what}: the Bot Connector failed ({status}){said}")
    if isinstance(exc, PermissionError):  # the bot's own token could not be had
        return DeliveryError(f"teams {what}: {exc}; check adapters.teams.app_id and app_password", permanent=True,
                             token_refused=True)
    inner = getattr(exc, "inner_exception", None) or exc
    # Not connected at all: nothing left, a retry is safe; any other failure came once the request may have gone.
    unsent = isinstance(inner, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL,
                                requests.ConnectionError))
    return DeliveryError(f"teams {what}: {failure(exc)}", unknown=not unsent)


def failure(exc: Exception) -> str:
    """A failure that is no answer of the Bot Connector's (a timeout, a dropped connection), as the log says it."""
    inner = getattr(exc, "inner_exception", None) or exc
    return f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__


def _said(exc: HttpOperationError) -> str:
    error = getattr(getattr(exc, "error", None), "error", None)
    message = getattr(error, "message", None)
    return f": {message}" if message else ""


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", "")))
    except ValueError:
        return 1.0


# -- inbound: activities -> neutral events --------------------------------------------------------

def is_personal(activity: Activity) -> bool:
    return getattr(activity.conversation, "conversation_type", None) == "personal"


def chat_of(activity: Activity) -> MessageRef:
    """Where an activity was posted: a channel's thread is `19:...@thread.tacv2;messageid=ROOT`."""
    conversation, _, root = activity.conversation.id.partition(";messageid=")
    return MessageRef(PLATFORM, conversation, activity.id or "", root or None)


def tenant_of(activity: Activity) -> str | None:
    """The tenant an activity came from: Teams sends it as `channelData.tenant.id` and `conversation.tenantId`
    (botbuilder's schema reads only a `tenantID`, which Teams does not send)."""
    channel_data = activity.channel_data if isinstance(activity.channel_data, Mapping) else {}
    tenant = channel_data.get("tenant")
    found = tenant.get("id") if isinstance(tenant, Mapping) else None
    found = found or getattr(activity.conversation, "tenant_id", None)
    return found if isinstance(found, str) and found else None


def mentions(activity: Activity) -> list[tuple[str, Mapping[str, Any]]]:
    """The activity's mentions: each one's text (`<at>Bob Builder</at>`) and whom it mentions (`id`, `name`,
    `aadObjectId`). (botbuilder reads an entity as a bare `Entity`, its fields left in `additional_properties`.)"""
    found = []
    for entity in activity.entities or ():
        fields = getattr(entity, "additional_properties", None) or {}
        mentioned = fields.get("mentioned")
        if getattr(entity, "type", None) == "mention" and isinstance(fields.get("text"), str) and isinstance(
                mentioned, Mapping):
            found.append((fields["text"], mentioned))
    return found


def command_words(activity: Activity, person: Callable[[Mapping[str, Any]], str] | None = None) -> list[str]:
    """The words of a message to the bot, without its @mention and the HTML Teams may send it in (`<p>`, `&nbsp;`),
    and without the `/` or `/chatops` that some type out of habit (Slack's and Telegram's commands), or an `@chatops`
    typed as plain text (help writes commands so): "@chatops incident ack 3", "/incident ack 3" and "/chatops incident
    ack 3" are all `incident ack 3`. Another person's
    mention is a word: `person(mentioned)` (their id, as app.yaml may know them), else their Teams id."""
    text = activity.text or ""
    bot = getattr(activity.recipient, "id", None)
    for tag, mentioned in mentions(activity):
        if mentioned.get("id") != bot:
            who = person(mentioned) if person is not None else str(mentioned.get("id") or "")
            text = text.replace(tag, f" {who} ", 1)
    words = split_words(html.unescape(_TAG.sub(" ", _MENTION.sub(" ", text))))
    # (`@chatops` typed out in a private chat, as help writes commands, is no mention there: plain text)
    if words and words[0].lower() in ("/chatops", "@chatops"):
        words = words[1:]
    return [words[0].removeprefix("/"), *words[1:]] if words else []


def _content_key(activity: Activity) -> str:
    """What tells an activity without an id from another: who sent it, when, and what it says or clicked (the same
    activity delivered again is the same)."""
    said = repr((getattr(activity.from_property, "id", None), str(activity.timestamp), activity.text,
                 repr(activity.value), activity.reply_to_id))
    return "h" + hashlib.sha256(said.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def button_value(activity: Activity) -> str | None:
    """The button value an Action.Submit click carries, or None for a message someone typed."""
    value = activity.value
    if isinstance(value, Mapping) and isinstance(value.get(DATA_KEY), str):
        return value[DATA_KEY]
    return None


def _shell(data: dict[str, Any]) -> dict[str, Any]:
    """What botbuilder's token check reads of an activity (its channel, its serviceUrl, whether it is a skill's), and
    nothing else: small, whatever the rest holds."""
    shell = {k: data[k] for k in ("type", "channelId", "serviceUrl") if isinstance(data.get(k), str)}
    recipient = data.get("recipient")
    if isinstance(recipient, dict):
        shell["recipient"] = {k: recipient[k] for k in ("id", "role") if isinstance(recipient.get(k), str)}
    if isinstance(data.get("relatesTo"), dict):
        shell["relatesTo"] = {}
    return shell


def refusal(header: str | None, exc: Exception) -> str:
    """Why the channel's token was refused, for the log: botbuilder fails on a missing header or an empty bearer token
    with an AttributeError or IndexError, which would read like a crash of the bot's."""
    words = (header or "").split()
    if not words:
        return "no Authorization header"
    if len(words) == 1 and words[0].lower() == "bearer":
        return "an empty bearer token"
    if isinstance(exc, IndexError):  # botbuilder's lookup of a key id the signing keys do not have
        return "signed with a key the Bot Framework's signing keys do not have"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# -- tokens ----------------------------------------------------------------------------------------

class _TokenEndpointCredentials(MicrosoftAppCredentials):
    """The bot's token from an OAuth2 token endpoint that is not Entra ID's (`login_url` not a Microsoft login host:
    a proxy, a test's fake), by the client-credentials grant, kept until a minute before it expires. (MSAL, which
    botbuilder uses for Microsoft's hosts, takes no other host.)"""

    def __init__(self, app_id: str, password: str, scope: str, login_url: str):
        super().__init__(app_id, password, oauth_scope=scope)
        self.token_url = login_url.rstrip("/") + "/oauth2/v2.0/token"
        self._token, self._expires = "", 0.0

    def get_access_token(self, force_refresh: bool = False) -> str:
        if self._token and not force_refresh and time.monotonic() < self._expires:
            return self._token
        scope = self.oauth_scope if self.oauth_scope.endswith("/.default") else self.oauth_scope + "/.default"
        answer = requests.post(self.token_url, timeout=15, data={
            "grant_type": "client_credentials", "client_id": self.microsoft_app_id,
            "client_secret": self.microsoft_app_password, "scope": scope})
        data = answer.json() if answer.headers.get("Content-Type", "").startswith("application/json") else {}
        if "access_token" not in data:
            raise PermissionError(f"Failed to get access token: {data.get('error') or answer.status_code}")
        self._token = data["access_token"]
        self._expires = time.monotonic() + float(data.get("expires_in", 3600)) - 60
        return self._token


class _Credentials(PasswordServiceClientCredentialFactory):
    """botbuilder's credentials, made once per app id, scope and login URL rather than for every connector client it
    creates (each would ask for a token of its own: one per message)."""

    def __init__(self, settings: TeamsSettings):
        super().__init__(settings.app_id, settings.app_password, settings.tenant_id)
        self._made: dict[tuple[str, str, str], Any] = {}

    async def create_credentials(self, app_id: str, oauth_scope: str, login_endpoint: str,
                                 validate_authority: bool) -> Any:
        key = (app_id, oauth_scope or "", login_endpoint or "")
        made = self._made.get(key)
        if made is not None:
            return made
        host = urlsplit(login_endpoint or "").hostname or ""
        if login_endpoint and host not in WELL_KNOWN_AUTHORITY_HOSTS and not await self.is_authentication_disabled():
            if not await self.is_valid_app_id(app_id):
                raise PermissionError(f"Invalid app_id {app_id}")
            made = _TokenEndpointCredentials(app_id, self.password, oauth_scope, login_endpoint)
        else:
            made = await super().create_credentials(app_id, oauth_scope, login_endpoint, validate_authority)
        return self._made.setdefault(key, made)


def bot_framework_config(settings: TeamsSettings) -> SimpleNamespace:
    """The configuration object ConfigurationBotFrameworkAuthentication reads. The endpoint overrides only when set
    (botbuilder's auth-disabled mode crashes on any of them; TeamsSettings refuses that)."""
    config = SimpleNamespace(APP_ID=settings.app_id, APP_PASSWORD=settings.app_password,
                             APP_TYPE="SingleTenant" if settings.tenant_id else "MultiTenant",
                             APP_TENANTID=settings.tenant_id)
    if settings.openid_metadata_url is not None:
        config.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL = settings.openid_metadata_url
        config.TO_BOT_FROM_CHANNEL_TOKEN_ISSUER = settings.token_issuer
        config.TO_CHANNEL_FROM_BOT_LOGIN_URL = settings.login_url
        config.TO_CHANNEL_FROM_BOT_OAUTH_SCOPE = settings.oauth_scope
    return config


class TeamsAdapter:
    """`bot.chat.Adapter` and `Pager` for Teams, plus `register(app)` for `POST /api/messages`."""

    platform = PLATFORM

    def __init__(self, settings: TeamsSettings, *, renderer: Renderer, dispatcher: Dispatcher):
        self.settings, self.renderer, self.dispatcher = settings, renderer, dispatcher
        dispatcher.typed_on(PLATFORM, (), umbrella="@chatops")  # no slash commands: help says @chatops X
        self.authentication = ConfigurationBotFrameworkAuthentication(
            bot_framework_config(settings), credentials_factory=_Credentials(settings))
        self.cloud = CloudAdapter(self.authentication)
        self._claims = self.cloud.create_claims_identity(settings.app_id)  # the bot's own, for what it starts
        self._seen: deque[str] = deque(maxlen=SEEN_KEPT)
        # Teams opens a private chat only in a tenant it is told: tenant_id, or (a multi-tenant app) the tenant of the
        # latest message someone in people: sent the bot.
        self._tenant: str | None = None
        # Microsoft Teams' channel; the Bot Framework Emulator's too when authentication is off (its only use)
        self._channels = frozenset(("msteams", "emulator") if not settings.app_id else ("msteams",))
        # The cards this process drew as answers (`incident show`): nothing else redraws them (the outbox redraws the
        # channels' cards and the pages). Not kept across a restart, nor shared with another replica.
        self._shown: deque[str] = deque(maxlen=SHOWN_KEPT)
        # Claims an activity in the store (scope, key, window) -> its Handling, or None for a copy of one handled
        # (Bot Framework redelivers an activity it got no answer to); set by the bot (storage/replays.py).
        self.claim: Callable[[str, str, timedelta], Awaitable[Handling | None]] | None = None
        self.auth_wait = AUTH_WAIT
        self._auth_slots: asyncio.Semaphore | None = None  # (made in the running loop: see _authenticate)

    async def _authenticate(self, shell: Activity, header: str | None) -> Any:
        """botbuilder's check of the token, in a thread of its own: it fetches the signing keys (at first, then daily,
        and for a key id it does not know) with a blocking call and no timeout. The thread is a daemon holding one
        of AUTH_THREADS slots until it ends, not until the request gives up (AUTH_WAIT): while Microsoft's key
        endpoint hangs, callers with made-up tokens hold at most that many threads, which never keep the process
        from exiting; the others wait for a slot within their AUTH_WAIT, then get 503."""
        loop = asyncio.get_running_loop()
        if self._auth_slots is None:
            self._auth_slots = asyncio.Semaphore(AUTH_THREADS)
        slots = self._auth_slots
        await slots.acquire()
        done: asyncio.Future[Any] = loop.create_future()
        work = self.authentication.authenticate_request(shell, header)

        def settle(outcome: Any, failed: BaseException | None) -> None:
            slots.release()
            if not done.done():
                done.set_exception(failed) if failed is not None else done.set_result(outcome)

        def run() -> None:
            try:
                outcome, failed = asyncio.run(work), None
            except BaseException as exc:  # (any refusal: the caller says why)
                outcome, failed = None, exc
            try:
                loop.call_soon_threadsafe(settle, outcome, failed)
            except RuntimeError:  # the bot's loop is closed: it stopped meanwhile
                pass

        try:
            threading.Thread(target=run, name="teams-auth", daemon=True).start()
        except BaseException:
            slots.release()
            work.close()
            raise
        return await done

    says_lost_answers = True  # (its _call logs a post whose answer was lost: the outbox need not say it again)

    def register(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    # -- inbound ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        """The Bot Framework's token (401 for any token it does not take: missing, junk, forged, expired, for
        another app); then the activity is handled, and answered 200 once it was."""
        header = request.headers.get("Authorization")
        if self.settings.app_id and len((header or "").split()) != 2:  # (no token at all: nothing more is read)
            log.info("teams: refused an activity: %s", refusal(header, ValueError("not a bearer token")))
            return web.json_response({"error": "unauthorized: a valid Bot Framework token (Authorization: Bearer) "
                                               "is required"}, status=401)
        try:
            data = await read_json(request)
        except BodyError as exc:
            return refused(exc)
        if not isinstance(data, dict) or not isinstance(data.get("type"), str) or not data["type"]:
            return web.json_response({"error": "not a Bot Framework activity (no type)"}, status=400)
        if not isinstance(data.get("serviceUrl"), str) or not data["serviceUrl"]:
            # (the token's serviceurl claim is compared with it only when there is one: without, it was taken)
            return web.json_response({"error": "not a Bot Framework activity (no serviceUrl)"}, status=400)
        try:
            # The token is checked against the few fields botbuilder looks at: the whole activity is read only once it
            # is taken (botbuilder's reading of a long list takes seconds of the event loop's time: anyone could).
            shell = Activity().deserialize(_shell(data))
        except Exception:  # a field of the wrong shape
            return web.json_response({"error": "not a Bot Framework activity (no type)"}, status=400)
        try:
            # In a thread of its own: botbuilder fetches the Bot Framework's signing keys (on the first request, then
            # daily) with a blocking call and no timeout, which would stop the event loop, or hang it for good.
            authenticated = await asyncio.wait_for(self._authenticate(shell, header), self.auth_wait)
        except (requests.RequestException, asyncio.TimeoutError) as exc:  # the signing keys could not be fetched
            log.warning("teams: cannot fetch the Bot Framework's signing keys: %s", type(exc).__name__ + f" {exc}")
            return web.json_response({"error": "cannot check the token now (the signing keys are not reachable)"},
                                     status=503, headers={"Retry-After": "10"})
        except Exception as exc:  # PermissionError, a token that is no JWT, a key not found...: all refusals
            log.info("teams: refused an activity: %s", refusal(header, exc))
            return web.json_response({"error": "unauthorized: a valid Bot Framework token (Authorization: Bearer) "
                                               "is required"}, status=401)
        claims = getattr(getattr(authenticated, "claims_identity", None), "claims", None) or {}
        if self.settings.app_id and not isinstance(claims.get("exp"), (int, float)):
            # (PyJWT checks an expiry only if the token has one: a token without one would be good for ever)
            log.info("teams: refused an activity: its token has no expiry (exp)")
            return web.json_response({"error": "unauthorized: a valid Bot Framework token (Authorization: Bearer) "
                                               "is required"}, status=401)
        try:
            activity = Activity().deserialize(data)  # (a sender Microsoft vouches for)
        except Exception:  # a field of the wrong shape
            return web.json_response({"error": "not a Bot Framework activity (a field of the wrong shape)"}, status=400)
        if activity.channel_id not in self._channels:
            # The Bot Framework's keys sign for its other channels too (Direct Line, Web Chat), whose sender picks
            # its own from.id: a Teams id there would let anyone with that channel's secret act as a person.
            log.info("teams: refused an activity from the %r channel (only Microsoft Teams' are taken)",
                     str(activity.channel_id)[:40])
            return web.json_response({"error": f"activities from the {str(activity.channel_id)[:40]!r} channel are not "
                                               "taken: this endpoint serves Microsoft Teams"}, status=403)
        if activity.type != ActivityTypes.message or activity.conversation is None or activity.from_property is None:
            return web.json_response({}, status=200)  # conversationUpdate, typing...: nothing to do
        if not isinstance(activity.conversation.id, str) or not activity.conversation.id:
            return web.json_response({"error": "not a Bot Framework activity (no conversation.id)"}, status=400)
        tenant = tenant_of(activity)
        if self.settings.tenant_id and (tenant or "").lower() != self.settings.tenant_id.lower():  # (GUIDs: any case)
            # A single-tenant bot takes its own tenant's people only (anyone can side-load an app with its id)
            log.info("teams: refused an activity from tenant %r (adapters.teams.tenant_id is %s)", str(tenant)[:60],
                     self.settings.tenant_id)
            return web.json_response({"error": "activities from another tenant than adapters.teams.tenant_id are not "
                                               "taken"}, status=403)
        if self.dispatcher.identify(self.actor_of(activity)) is not None:
            # (a person app.yaml knows: a stranger's message from another tenant would send the pages there)
            self._tenant = tenant_of(activity) or self._tenant
        if not await self._once(activity, authenticated):
            return web.json_response({"error": "its handling failed; send it again"}, status=503,
                                     headers={"Retry-After": "2"})
        return web.json_response({}, status=200)

    async def _once(self, activity: Activity, authenticated: Any) -> bool:
        """Handle an activity once, here and at every replica: False when its handling failed before it acted. One
        without an id (an emulator's, a test client's) is known by what it says: two such messages in a chat were
        one, and the second was dropped."""
        key = f"{activity.conversation.id}:{activity.id or _content_key(activity)}"
        if key in self._seen:
            return True
        self._seen.append(key)
        handling = Unclaimed(key) if self.claim is None else await self.claim(PLATFORM, key, ACTIVITY_RETRIES)
        if handling is None or not await handling.ready():
            return True
        try:
            async with handling:
                await self.cloud.process_activity(authenticated, activity, lambda turn: self._turn(turn, handling))
        except BaseException:
            self._seen.remove(key)
            raise
        if handling.released:
            self._seen.remove(key)
            return False
        return True

    async def _turn(self, turn: TurnContext, handling: Handling) -> None:
        activity = turn.activity
        value = button_value(activity)
        # The turn's answers (the reply, a settled or redrawn card) share TIMEOUT: the Bot Framework waits 15 s for
        # the activity's answer, and a slow Bot Connector held it for as long as its calls took (40 s seen).
        turn.turn_state[DEADLINE] = asyncio.get_running_loop().time() + TIMEOUT
        try:
            await self._answerable(turn)
            if value is not None:
                await self._click(turn, value, handling)
            elif isinstance(activity.text, str) and activity.text.strip():
                await self._command(turn, handling)
        finally:  # botbuilder leaves the turn's connector client, and its HTTP session, open
            connector = turn.turn_state.get(self.cloud.BOT_CONNECTOR_CLIENT_KEY)
            if connector is not None:
                await connector.__aexit__(None, None, None)

    async def _answerable(self, turn: TurnContext) -> None:
        """The bot's token for the turn's answers; refused (a wrong app_password), the activity is acted on all the
        same (an acknowledgement stops the paging) and answered 200, since a redelivery cannot help until someone
        fixes the password, but nothing is sent back (MUTED)."""
        try:
            await self._token(turn.turn_state.get(self.cloud.BOT_CONNECTOR_CLIENT_KEY))
        except Exception as exc:
            error = delivery_error("reply", exc)
            if not error.token_refused:
                raise
            log.warning("teams: no answer to %s in %s: the bot's token was refused (%s); check adapters.teams.app_id "
                        "and app_password", turn.activity.from_property.id, turn.activity.conversation.id, exc)
            turn.turn_state[MUTED] = True

    def actor_of(self, activity: Activity) -> Actor:
        """Who wrote it: their Teams id (29:...) when app.yaml knows them by it, else their Entra object id."""
        user = activity.from_property
        return Actor(PLATFORM, self._known_id(user.id, user.aad_object_id), user.name or "", None)

    def _known_id(self, teams_id: str, aad_object_id: str | None) -> str:
        """The id app.yaml's people[].teams knows a person by: their Teams id, else their Entra object id (either is
        taken there); their Teams id when it knows neither."""
        if aad_object_id and self.dispatcher.identify(Actor(PLATFORM, teams_id, "", None)) is None and \
                self.dispatcher.identify(Actor(PLATFORM, aad_object_id, "", None)) is not None:
            return aad_object_id
        return teams_id

    def _mentioned(self, mentioned: Mapping[str, Any]) -> str:
        """A person mentioned in a command, as a word the dispatcher finds them by (see `_known_id`)."""
        aad = mentioned.get("aadObjectId")
        return self._known_id(str(mentioned.get("id") or ""), aad if isinstance(aad, str) else None)

    async def _command(self, turn: TurnContext, handling: Handling) -> None:
        activity = turn.activity
        chat = chat_of(activity)
        event = CommandEvent("chatops", command_words(activity, self._mentioned), self.actor_of(activity), chat,
                             direct=is_personal(activity), plain=True)
        reply = await dispatched(self.dispatcher.handle_command(event), handling, PLATFORM)
        if reply is None or (reply.sent_direct and event.direct):
            return
        await self._answer(turn, reply)

    async def _click(self, turn: TurnContext, value: str, handling: Handling) -> None:
        activity = turn.activity
        chat = chat_of(activity)
        try:
            decoded = actions.decode(value)
        except actions.CodecError as exc:
            log.warning("teams: refused a button value from %s: %s", activity.from_property.id, exc)
            await self._answer(turn, Reply(INVALID_BUTTON))
            return
        source = MessageRef(PLATFORM, chat.chat_id, activity.reply_to_id or "", chat.thread_id)
        event = ActionEvent(decoded.action.value, decoded.incident_id, decoded.arg, self.actor_of(activity),
                            source if activity.reply_to_id else None,
                            # (an activity id is unique within its conversation only: Teams' are millisecond times)
                            event_id=f"{activity.conversation.id}:{activity.id}" if activity.id else "",
                            tag=decoded.tag)
        reply = await dispatched(self.dispatcher.handle_action(event), handling, PLATFORM)
        if reply is None or turn.turn_state.get(MUTED):
            return
        said = False  # the settled message says what the answer would (it was said twice, one under the other)
        if reply.settle is not None and activity.reply_to_id and is_personal(activity):
            # answered: no more buttons (a direct message's question)
            settled = message_activity({"text": self.dispatcher.as_typed(PLATFORM, reply.settle)}, ())
            settled.id = activity.reply_to_id
            try:
                await self._in_time(turn, turn.update_activity(settled))
                said = reply.settle == reply.text
            except Exception as exc:
                log.warning("teams: cannot settle the clicked message: %s", delivery_error("update", exc))
        if reply.text and not said and not (reply.refused and not is_personal(activity)
                                            and await self._privately(turn, reply)):
            await self._answer(turn, reply)
        if event.action in CARD_ACTIONS and activity.reply_to_id in self._shown and not handling.released:
            await self._redraw_shown(turn, event)

    async def _privately(self, turn: TurnContext, reply: Reply) -> bool:
        """A refused click in a channel answered in the clicker's private chat with the bot, for them alone (Teams
        has no ephemeral message; in the thread, everyone following the channel read "Acknowledge needs the
        `responder` role, and Carol has no roles"). False when that chat cannot be opened (no tenant known yet, the
        app not installed for them): the thread's reply then, as before."""
        if turn.turn_state.get(MUTED):
            return True
        clicker = turn.activity.from_property
        loop = asyncio.get_running_loop()
        # half of what is left of the turn's time at most: the thread's reply keeps the rest (a slow chat took it all)
        budget = max((turn.turn_state.get(DEADLINE, loop.time() + TIMEOUT) - loop.time()) / 2, 0.1)

        async def private() -> None:
            conversation = await self._personal(clicker.aad_object_id or clicker.id)
            answer = self._reply_activity(reply)
            await self._call("send", conversation, lambda c: c.conversations.send_to_conversation(conversation, answer))
        try:
            await asyncio.wait_for(private(), budget)
            return True
        except Exception as exc:
            error = exc if isinstance(exc, DeliveryError) else delivery_error("send", exc)
            log.info("teams: a refusal for %s goes to the channel's thread: their private chat cannot be had (%s)",
                     clicker.id, error)
            return False

    async def _redraw_shown(self, turn: TurnContext, event: ActionEvent) -> None:
        """A card that answered `incident show`, drawn again as the incident is now, by the command that drew it (it
        would otherwise say "Firing" of an incident acknowledged), as Slack and Telegram redraw theirs; also after a
        click that changed nothing (it then shows what did)."""
        activity = turn.activity
        command = CommandEvent("incident", ["show", str(event.incident_id)], event.actor, chat_of(activity),
                               direct=is_personal(activity))
        try:
            shown = await self.dispatcher.handle_command(command)
            if shown.message is None:
                return
            redrawn = self.to_activity(shown.message)
            redrawn.id = activity.reply_to_id
            await self._in_time(turn, turn.update_activity(redrawn))
        except Exception as exc:  # the clicker has the answer; the card stays as it was
            log.warning("teams: cannot redraw the card of #%s that incident show drew: %s", event.incident_id,
                        delivery_error("update", exc))

    @staticmethod
    async def _in_time(turn: TurnContext, call: Awaitable[Any]) -> Any:
        """A call that answers the turn, within what is left of its TIMEOUT (asyncio.TimeoutError past it)."""
        left = turn.turn_state.get(DEADLINE, asyncio.get_running_loop().time() + TIMEOUT) - \
            asyncio.get_running_loop().time()
        if left <= 0:
            if inspect.iscoroutine(call):
                call.close()
            raise asyncio.TimeoutError(f"no time left of the activity's {TIMEOUT} s")
        return await asyncio.wait_for(call, left)

    async def _answer(self, turn: TurnContext, reply: Reply) -> None:
        """A reply to the message answered: in the channel's thread, or in the private chat."""
        if turn.turn_state.get(MUTED):
            return
        answer = self._reply_activity(reply)
        for attempt in range(ANSWER_TRIES):
            try:
                sent = await self._in_time(turn, turn.send_activity(answer))
                if reply.message is not None and reply.message.kind == "incident" and sent is not None and sent.id:
                    self._shown.append(sent.id)
                return
            except Exception as exc:
                error = delivery_error("reply", exc)
                loop = asyncio.get_running_loop()
                left = turn.turn_state.get(DEADLINE, loop.time() + TIMEOUT) - loop.time()
                # Throttled (429): tried again once the Bot Connector says, if that is within the turn's budget;
                # else (or any other failure) the person gets no answer, and the log says so.
                if error.retry_after is None or attempt + 1 == ANSWER_TRIES or error.retry_after + 1 > left:
                    log.warning("teams: could not answer in %s: %s", turn.activity.conversation.id, error)
                    return
                await asyncio.sleep(error.retry_after)

    def _reply_activity(self, reply: Reply) -> Activity:
        if reply.message is not None:
            try:
                return self.to_activity(reply.message)
            except Exception:  # a broken template must not leave the person without an answer
                log.exception("teams: cannot render the %s reply; answering with its text", reply.message.kind)
        return self.text_activity(reply.text)

    # -- Adapter and Pager ------------------------------------------------------------------------

    def to_activity(self, message: Outbound) -> Activity:
        """The rendered `{kind}.teams.json.j2` (an Adaptive Card's body, or the text), and the buttons. The bot's own
        words (a text's, a thread line's) name commands as they are typed on Teams (`@chatops incident page`)."""
        typed = functools.partial(self.dispatcher.as_typed, PLATFORM)
        buttons = [replace(b, confirm=typed(b.confirm)) if b.confirm else b for b in message.buttons]
        # Only the bot's own words: an alert's title or summary (`/swap` is 95% full) is shown as it came
        context = {**message.context, **{k: typed(v) for k in BOTS_WORDS if isinstance(v := message.context.get(k), str)}}
        return message_activity(self.renderer.render_json(message.kind, PLATFORM, context), buttons, message.text)

    def text_activity(self, text: str) -> Activity:
        text = self.dispatcher.as_typed(PLATFORM, text)
        return message_activity(self.renderer.render_json("text", PLATFORM, {"text": text}), (), text)

    async def _connector(self, service_url: str | None = None) -> Any:
        factory = self.authentication.create_connector_factory(self._claims)
        return await factory.create(service_url or self.settings.service_url,
                                    self.authentication.get_originating_audience())

    async def _token(self, client: Any) -> None:
        """The bot's token for `client`'s calls, got (or renewed) in a thread: botbuilder asks for it synchronously
        inside each call (MSAL, requests), which would stop the event loop for the round trip to Entra ID; the call
        then takes it from the credentials' cache."""
        credentials = getattr(getattr(client, "config", None), "credentials", None)
        if self.settings.app_id and isinstance(credentials, MicrosoftAppCredentials):
            await asyncio.wait_for(asyncio.to_thread(credentials.get_access_token), TIMEOUT)

    async def _call(self, what: str, conversation: str, call: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        try:
            client = await self._connector()
            async with client:
                await self._token(client)
                return await asyncio.wait_for(call(client), TIMEOUT)
        except DeliveryError:
            raise
        except Exception as exc:
            error = delivery_error(what, exc)
            if error.unknown and what in POSTS:
                # Slack's posts carry a key the retry looks for first; Teams has no way to find a post by anything
                # the bot put in it, so the outbox posts it again (a page is not: README, "Escalation and paging").
                log.warning("teams: a %s in %s got no answer (%s): it may have been posted, and Teams cannot be asked "
                            "whether it was, so the retry may show it twice", what, conversation, failure(exc))
            raise error from exc

    async def send(self, chat_id: str, message: Outbound, what: str = "send") -> MessageRef:
        """`what`: "page" for a person's private chat (a refusal then says what to do about the person)."""
        activity = self.to_activity(message)
        sent = await self._call(what, chat_id, lambda c: c.conversations.send_to_conversation(chat_id, activity))
        return MessageRef(PLATFORM, chat_id, sent.id, None)

    async def update(self, ref: MessageRef, message: Outbound) -> None:
        """The message redrawn in place (PUT): an Adaptive Card is replaced whole."""
        activity = self.to_activity(message)
        activity.id = ref.message_id
        await self._call("update", ref.chat_id,
                         lambda c: c.conversations.update_activity(ref.chat_id, ref.message_id, activity))

    async def reply(self, ref: MessageRef, message: Outbound) -> MessageRef:
        """A reply in the thread of the card (Teams: a reply to the channel's root message)."""
        parent = ref.thread_id or ref.message_id
        activity = self.to_activity(message)
        if message.context.get("mention") == "here":  # a line that asks everyone there (a channel escalation step)
            mention_channel(activity, ref.chat_id)
        sent = await self._call("reply", ref.chat_id,
                                lambda c: c.conversations.reply_to_activity(ref.chat_id, parent, activity))
        return MessageRef(PLATFORM, ref.chat_id, sent.id, parent)

    async def notify(self, actor: Actor, chat: MessageRef | None, text: str) -> None:
        """In `chat` (Teams has no ephemeral messages), else in the actor's private chat with the bot."""
        if chat is None and actor.platform != PLATFORM:
            raise DeliveryError(f"teams: cannot notify a {actor.platform} user", permanent=True)
        activity = self.text_activity(text)
        if chat is None:
            conversation = await self._personal(actor.user_id)
            await self._call("send", conversation,
                             lambda c: c.conversations.send_to_conversation(conversation, activity))
            return
        parent = chat.thread_id or chat.message_id
        if parent:
            await self._call("reply", chat.chat_id,
                             lambda c: c.conversations.reply_to_activity(chat.chat_id, parent, activity))
        else:
            await self._call("send", chat.chat_id,
                             lambda c: c.conversations.send_to_conversation(chat.chat_id, activity))

    async def page(self, user_id: str, message: Outbound) -> MessageRef:
        """The message, with its buttons, in the person's private chat with the bot."""
        try:
            conversation = await self._personal(user_id)
        except DeliveryError as exc:
            exc.unknown = False  # only the chat was being opened: nothing reached the person yet
            if exc.permanent and not exc.token_refused:
                raise DeliveryError(f"teams: cannot open a chat with {user_id} ({exc})", permanent=True) from exc
            raise
        return await self.send(conversation, message, "page")

    async def _personal(self, user_id: str) -> str:
        """The id of the bot's 1:1 chat with a person (Teams gives the same one each time). Teams opens one only in
        a tenant it is told (a 400 without): with none known yet (a multi-tenant bot that has received no message
        from a person in people: since it started) the outbox tries again later, rather than giving the page up for
        good."""
        tenant = self.settings.tenant_id or self._tenant
        if not tenant:
            raise DeliveryError("teams: no Teams tenant known yet: set adapters.teams.tenant_id, or it is learnt from "
                                "the first message a person in people: sends the bot", retry_after=NO_TENANT_WAIT)
        parameters = ConversationParameters(
            is_group=False, bot=ChannelAccount(id=f"28:{self.settings.app_id}"),
            members=[ChannelAccount(id=user_id)], tenant_id=tenant, channel_data={"tenant": {"id": tenant}})
        made = await self._call("create", user_id, lambda c: c.conversations.create_conversation(parameters))
        return made.id
