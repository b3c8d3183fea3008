"""Telegram: HTML with an inline keyboard out, Bot API updates in. Translation only; every decision is the dispatcher's.

Outbound, `TelegramAdapter` implements `bot.chat.Adapter` and `Pager` with
python-telegram-bot's bot (no rate limiter, no retries: the outbox owns them)
and maps Telegram's refusals to `DeliveryError`. Inbound, `POST /telegram/webhook`
checks the secret token Telegram was given with `setWebhook`, hands a neutral
`ActionEvent` (a button) or `CommandEvent` (`/ack 42`, also `/ack@botname 42`) to
the dispatcher, and answers Telegram once that handling ended (a 503 when it
failed, so that Telegram sends the update again); a click is answered with a
toast, a command with a message replying to it. With `mode: polling` a
`getUpdates` loop feeds the same path.

Telegram buttons have no confirmation dialog, so a button with `confirm` is drawn
with callback data `?{value}`: its first tap turns it, in place, into
`✔ {label}` (the real value) and `✖ No` (`!{value}`, which turns it back), the
two on a row of their own, and answers with the button's question (Slack's dialog
text: "Resolve #1 while 1 alert is still firing? ..."), as an alert (a dialog)
when it is long.

A card that answers `/incident show` is a message nothing tracks (the outbox redraws
the channels' cards and the pages): a tap on one of its buttons redraws it, as the
incident then is, as Slack redraws its private card.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import httpx
from aiohttp import web
from telegram import (CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, LinkPreviewOptions, Message,
                      ReplyParameters, Update, User)
from telegram.constants import ChatType, ParseMode
from telegram.error import (BadRequest, ChatMigrated, EndPointNotFound, Forbidden, InvalidToken, NetworkError,
                            RetryAfter, TelegramError, TimedOut)
from telegram.ext import Application

from adapters.settings import TelegramSettings
from bot import actions
from bot.alerts import BodyError
from bot.auth import raw_bytes
from bot.bodies import read_json, refused
from bot.chat import (ActionEvent, Button, CommandEvent, DeliveryError, Handling, MessageRef, Outbound, Reply,
                      Unclaimed, dispatched, split_words)
from bot.model import Actor
from bot.render import TEXT_FORMATS

log = logging.getLogger("chatops.telegram")
T = TypeVar("T")

PLATFORM = "telegram"
PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ["message", "callback_query"]
TIMEOUT = 15  # seconds for one Bot API call
POLL_TIMEOUT = 25  # seconds getUpdates waits for something to arrive
UPDATE_RETRIES = timedelta(hours=1)  # how long an update id is claimed: Telegram retries a failed webhook delivery
# Polling: a fetched update whose handling failed is fetched and tried again after RETRY_FIRST seconds, then twice
# as long each time up to RETRY_MAX, and given up once it has failed for GIVE_UP seconds (about six tries). Telegram
# retries a failing webhook "a reasonable amount of attempts" and keeps an update 24 hours, but an update not
# confirmed holds back the confirmation of all after it (the next call gets it again with them, at most 100): two
# minutes ride out a database's failover or restart, and a storm of taps behind it is not starved.
RETRY_FIRST, RETRY_MAX, GIVE_UP = 2.0, 30.0, 120.0
POLL_PACE = 1.0  # seconds between getUpdates while an update fetched is not done (Telegram then answers at once)
FAILED_KEPT = 1000  # update ids whose webhook delivery failed after the person was told (see _webhook_update)
TOAST_MAX, TEXT_MAX, ROW_MAX = 200, 4000, 3
# A tap on one of an incident card's buttons (bot.actions.CARD_ACTIONS) of a card `/incident show` drew redraws that
# card (see _redraw_shown)
CARD_ACTIONS = actions.CARD_ACTIONS
TOAST_SHORT = 80  # characters: a longer callback answer is an alert (a dialog, read until dismissed), not a toast
QUESTIONS_KEPT = 5000  # confirmation questions of the buttons drawn last, by callback data (see _confirm_step)
ASK, CANCEL, YES = "?", "!", "\u2714 "
TAP_WAIT_MAX = 5.0  # seconds of flood control a tap's answer waits out (once) before it is given up
# The /incident words that act on one incident, which a reply to the bot's message about it may leave out
ACTS_ON_ONE = ("ack", "acknowledge", "show", "escalate", "resolve", "reopen")
# The armed button's neighbour, which only turns it back: a word no confirmable action could be read as ("✖ Cancel"
# beside "✔ Cancel request" was taken for the request's own Cancel), and that reads right beside each of them.
NO = "\u2716 No"
INVALID_BUTTON = "This button is not valid: it was not made by this bot, or it is too old."
STALE_BUTTON = "This message has changed since; use the buttons it has now."
# the command menu (setMyCommands); the dispatcher owns what they do, and takes any other command too
COMMANDS: dict[str, str] = {
    "incident": "Show or act on an incident: /incident ack 42",
    "ack": "Acknowledge an incident: /ack 42",
    "oncall": "Who is on call",
    "swap": "Ask someone to take your shift: /swap bob next",
    "help": "What I can do",
    "start": "Your Telegram id, and whether it is linked to you",
}
ANONYMOUS = ("You post anonymously, as the group, so I cannot tell who you are and act for nobody. Turn off "
             "\"Remain anonymous\" in your admin rights, or send me the command in a private chat.")
AS_CHANNEL = ("You post as a channel, so I cannot tell who you are and act for nobody. Send as yourself (pick "
              "yourself in the \"send as\" list, your picture beside the message field), or send me the command in a "
              "private chat.")
# seconds a command's answer may wait for Telegram's flood control before it is given up (a name of its own: it was
# the tap's too, defined twice, and a tap's spinner waited out 9 s, where Telegram takes its answer for a few only)
COMMAND_WAIT_MAX = 10
SEND_OPTIONS: dict[str, Any] = {"parse_mode": ParseMode.HTML,
                                "link_preview_options": LinkPreviewOptions(is_disabled=True)}
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?=\s|$)")
# "@name" where Telegram would see a mention (not inside a word, as in an e-mail address), in HTML text outside tags
_MENTION = re.compile(r"(<[^>]*>)|(?<!\w)@(?=\w)")  # @@name too: Telegram sees @name in it
# httpx errors raised before any of the request was sent: sending it again, or elsewhere, cannot deliver it twice
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError, httpx.UnsupportedProtocol,
          httpx.InvalidURL)


class Renderer(Protocol):
    def render_text(self, kind: str, platform: str, context: Mapping[str, Any]) -> str: ...

    def find(self, kind: str, platform: str, formats: tuple[str, ...], *, fallback: bool = True) -> str | None: ...


class Dispatcher(Protocol):
    async def handle_action(self, event: ActionEvent) -> Reply | None: ...

    def refusal(self, action: str, actor: Actor) -> Reply | None: ...

    async def handle_command(self, event: CommandEvent) -> Reply: ...


# -- outbound: neutral -> HTML and inline keyboards -----------------------------------------------

def callback_data(button: Button) -> str:
    """`bot.actions.encode` of the button, `?`-prefixed when it asks first; CodecError over 64 bytes."""
    value = actions.encode(button.action, button.incident_id, button.arg, button.tag)
    if button.confirm:
        value = ASK + value
        if len(value.encode()) > actions.MAX_BYTES:
            raise actions.CodecError(f"{value[:30]}... with its confirmation step is over {actions.MAX_BYTES} bytes")
    return value


def no_mentions(text: str) -> str:
    """Telegram HTML with every "@name" kept from being a mention: a word joiner (U+2060, invisible) after the @.
    The bot names people by name, never by @username, so an "@name" can only come from alert text or a
    template, and it must not notify whoever holds that username (Slack's counterpart: `verbatim`)."""
    if "@" not in text:
        return text
    return _MENTION.sub(lambda m: m.group(1) or "@\u2060", text)


def keyboard(buttons: Sequence[Button]) -> InlineKeyboardMarkup | None:
    """Rows of at most three buttons (a phone's width), in the order given; None without buttons."""
    keys = [InlineKeyboardButton((b.label or b.action)[:64], callback_data=callback_data(b)) for b in buttons]
    return InlineKeyboardMarkup([keys[i:i + ROW_MAX] for i in range(0, len(keys), ROW_MAX)]) if keys else None


def toast(text: str) -> str:
    """A reply as a callback answer: plain text (no backticks), at most 200 characters."""
    text = text.replace("`", "").strip()
    return text if len(text) <= TOAST_MAX else text[: TOAST_MAX - 1] + "\u2026"


def chat_param(chat_id: str) -> int | str:
    """A chat id as the Bot API takes it: a number, or `@channelname`."""
    try:
        return int(chat_id)
    except ValueError:
        if chat_id.startswith("@"):
            return chat_id
        raise DeliveryError(f"telegram: {chat_id!r} is not a chat id (a number, or @channelname)",
                            permanent=True) from None


def message_param(message_id: str) -> int:
    try:
        return int(message_id)
    except ValueError:
        raise DeliveryError(f"telegram: {message_id!r} is not a message id", permanent=True) from None


def delivery_error(method: str, exc: TelegramError, *, token: str = "") -> DeliveryError:
    """Telegram's refusal as the outbox understands it: when to retry, or never. `token` is never shown."""
    what = f"telegram {method}: {exc.message.replace(token, '<token>') if token else exc.message}"
    if isinstance(exc, RetryAfter):
        after = exc.retry_after  # an int today, a timedelta with PTB_TIMEDELTA=true
        return DeliveryError(what, retry_after=after.total_seconds() if isinstance(after, timedelta) else float(after))
    if isinstance(exc, ChatMigrated):
        return DeliveryError(f"telegram {method}: the group is now the supergroup {exc.new_chat_id}; "
                             "put that id in channels[].chat in app.yaml", permanent=True)
    if isinstance(exc, InvalidToken):
        return DeliveryError(f"telegram {method}: the bot token was refused; check adapters.telegram.bot_token",
                             permanent=True, token_refused=True)
    if isinstance(exc, BadRequest) and any(gone in exc.message.lower() for gone in (
            "message to edit not found", "message to be replied not found")):  # deleted in the chat
        return DeliveryError(what, permanent=True, gone=True)
    if isinstance(exc, (BadRequest, Forbidden, EndPointNotFound)):  # BadRequest first: it is a NetworkError
        return DeliveryError(what, permanent=True)  # chat not found, message to edit not found, blocked...
    if isinstance(exc, NetworkError) and exc.__cause__ is not None and not isinstance(exc.__cause__, TelegramError):
        # The HTTP call itself failed (PTB's HTTPXRequest raises TimedOut or NetworkError from httpx's error). Unless
        # it failed before the request left (no connection, none free in the pool), Telegram may have delivered it:
        # a read timeout, or the connection closed or reset before the answer (RemoteProtocolError, ReadError).
        return DeliveryError(what, unknown=not isinstance(exc.__cause__, UNSENT))
    if isinstance(exc, TimedOut):  # (one PTB raised without an HTTP error under it: no answer in time)
        return DeliveryError(what, unknown=True)
    return DeliveryError(what)  # Telegram answered a 5xx (a NetworkError too), or Conflict: worth another try


# -- inbound: updates -> neutral events ------------------------------------------------------------

def actor_of(user: User) -> Actor:
    return Actor(PLATFORM, str(user.id), user.full_name or user.username or "", None)


def click_event(query: CallbackQuery) -> ActionEvent:
    """A button tap as an `ActionEvent`; `actions.CodecError` for callback data we did not make."""
    decoded = actions.decode(query.data or "")
    message, source = query.message, None
    if message is not None:
        parent = getattr(message, "reply_to_message", None)
        source = MessageRef(PLATFORM, str(message.chat.id), str(message.message_id),
                            str(parent.message_id) if parent else None)
    return ActionEvent(decoded.action.value, decoded.incident_id, decoded.arg, actor_of(query.from_user), source,
                       event_id=str(query.id), tag=decoded.tag)


def answers_a_command(message: Any) -> bool:
    """The bot's message is its answer to someone's command (`/incident show 42`), which it posts as a reply to that
    command. The channel's card and a page are posts of their own, and a line of the incident's thread is a reply to
    the card, the bot's own message."""
    parent = getattr(message, "reply_to_message", None)
    sender = getattr(parent, "from_user", None)
    return sender is not None and not sender.is_bot


def command_event(message: Message, bot_username: str | None) -> CommandEvent | None:
    """`/ack 42` or `/ack@bot 42` as a `CommandEvent`; plain words in a private chat are `/chatops WORDS`.
    None for anything else: chatter in a group, a command for another bot, a bot's message, a message sent on behalf
    of a chat (see `anonymous_command`)."""
    text, user = _with_picked_people(message), message.from_user
    if user is None or user.is_bot or message.sender_chat is not None:
        return None
    direct = message.chat.type == ChatType.PRIVATE
    words = _command_words(text, direct, bot_username)
    if words is None:
        return None
    name, rest = words
    args = split_words(rest)
    # A reply to one of the bot's incident messages (a page, a card) that names no incident is about that one: "ack"
    # answered to the page at 3 a.m., as Opsgenie and PagerDuty take a reply to their page.
    if (incident_id := replied_incident(message)) is not None and (
            (name == "ack" and not args)
            or (name in ("chatops", "incident") and len(args) == 1 and args[0].lower() in ACTS_ON_ONE)):
        args = [*args, str(incident_id)]
    return CommandEvent(name, args, actor_of(user), MessageRef(PLATFORM, str(message.chat.id), "", None),
                        direct=direct, plain=_COMMAND.match(text) is None)


def replied_incident(message: Message) -> int | None:
    """The incident of the bot's message that `message` replies to (a page or a card: read from its buttons), or
    None."""
    parent = getattr(message, "reply_to_message", None)
    sender = getattr(parent, "from_user", None)
    markup = getattr(parent, "reply_markup", None)
    if sender is None or not sender.is_bot or markup is None:
        return None
    for row in markup.inline_keyboard:
        for key in row:
            data = (key.callback_data or "") if isinstance(key.callback_data, str) else ""
            try:
                return actions.decode(data.lstrip(ASK + CANCEL)).incident_id
            except actions.CodecError:
                continue
    return None


def _with_picked_people(message: Message) -> str:
    """The message's text, with each person picked from Telegram's mention list (a `text_mention`: their name, which
    links to their account) written as their Telegram id, which app.yaml knows them by (`/swap Robert next` is
    `/swap 222222 next`)."""
    text = message.text or ""
    picked = [e for e in message.entities or () if e.type == "text_mention" and e.user is not None]
    if not picked:
        return text
    units = text.encode("utf-16-le")  # entity offsets count UTF-16 code units
    for e in sorted(picked, key=lambda e: e.offset, reverse=True):
        units = units[:2 * e.offset] + str(e.user.id).encode("utf-16-le") + units[2 * (e.offset + e.length):]
    return units.decode("utf-16-le")


def _command_words(text: str, direct: bool, bot_username: str | None) -> tuple[str, str] | None:
    """(command, the rest) of a message for us; None if it is no command of ours."""
    match = _COMMAND.match(text)
    if match is None:
        return ("chatops", text) if direct and text.strip() else None
    addressee = match.group(2)
    # `/ack@otherbot` is not for us; nor is any `/cmd@name` while our own name is not known yet (getMe has not
    # answered): it could be another bot's, and a command that acts must not be taken on a guess.
    if addressee and (bot_username is None or addressee.lower() != bot_username.lower()):
        return None
    return match.group(1).lower(), text[match.end():]


def anonymous_command(message: Message, bot_username: str | None) -> str | None:
    """What to answer a command of ours sent on behalf of a chat, which tells nobody apart: by a group admin who
    posts anonymously, as the group, or by a member who posts as a channel (Telegram's "send as"); None for any
    other message. A channel's own post that Telegram forwards into the group linked to it is no one's command, and
    gets no answer."""
    sender = message.sender_chat
    if (sender is None or message.chat.type == ChatType.PRIVATE or message.is_automatic_forward
            or _command_words(message.text or "", False, bot_username) is None):
        return None
    return ANONYMOUS if sender.id == message.chat.id else AS_CHANNEL


def confirm_keyboard(markup: InlineKeyboardMarkup, data: str) -> InlineKeyboardMarkup | None:
    """The keyboard after a tap on `?value` (ask: `✔ label` + `✖ No`, on a row of their own) or `!value` (no: back
    to `?value`); None when the keyboard no longer has that button. The other buttons keep their order, in rows of
    at most ROW_MAX as `keyboard` draws them, so that turning a button back draws the keyboard as it was."""
    value, found = data[1:], False
    units: list[list[InlineKeyboardButton]] = []  # a button, or an armed pair (kept together, on a row of its own)
    for key in (key for row in markup.inline_keyboard for key in row):
        if units and len(units[-1]) == 1 and key.callback_data == CANCEL + str(units[-1][0].callback_data):
            units[-1].append(key)  # the ✖ of the ✔ before it
        else:
            units.append([key])
    for i, unit in enumerate(units):
        if data[0] == ASK and len(unit) == 1 and unit[0].callback_data == data:
            units[i] = [InlineKeyboardButton(YES + unit[0].text, callback_data=value),
                        InlineKeyboardButton(NO, callback_data=CANCEL + value)]
            found = True
        elif data[0] == CANCEL and unit[0].callback_data == value:
            units[i] = [InlineKeyboardButton(unit[0].text.removeprefix(YES), callback_data=ASK + value)]
            found = True
    if not found:
        return None
    rows: list[list[InlineKeyboardButton]] = []
    loose: list[InlineKeyboardButton] = []  # single buttons, not yet in a row
    for unit in units:
        if len(unit) == 1:
            loose.append(unit[0])
            continue
        rows += [loose[i:i + ROW_MAX] for i in range(0, len(loose), ROW_MAX)] + [unit]
        loose = []
    rows += [loose[i:i + ROW_MAX] for i in range(0, len(loose), ROW_MAX)]
    return InlineKeyboardMarkup(rows)


@dataclass
class _Fetched:
    """An update getUpdates gave this replica, not confirmed yet: being handled, handled, failed, or given up."""

    update: Update
    since: float  # when it was first fetched here (the event loop's clock)
    task: asyncio.Task[bool] | None = None  # its handling, until the poller has looked at how it ended
    attempts: int = 0
    retry_at: float = 0.0  # when a failed one is tried again
    done: bool = False  # nothing left to do for it (or given up): the next getUpdates may confirm it


class _FailedAgain(Exception):
    """Polling's retry of an update failed as its first try did (logged; the person was told the first time)."""


def _what(update: Update) -> str:
    """An update as the log names it: the button's data or the command's first word, and whose or where."""
    if update.callback_query is not None:
        return (f"a tap on {update.callback_query.data!r} by user "
                f"{getattr(update.callback_query.from_user, 'id', '?')}")
    if update.message is not None:
        word, where = (update.message.text or "").split(maxsplit=1)[:1], \
            f"in chat {getattr(update.message.chat, 'id', '?')}"
        return f"{word[0][:40]!r} {where}" if word else f"a message {where}"
    return "an update"


class TelegramAdapter:
    """`bot.chat.Adapter` and `Pager` for Telegram, plus `register(app)` for `POST /telegram/webhook`."""

    platform = PLATFORM

    def __init__(self, settings: TelegramSettings, *, renderer: Renderer, dispatcher: Dispatcher):
        self.settings, self.renderer, self.dispatcher = settings, renderer, dispatcher
        self.poll_timeout, self.connect_retry = POLL_TIMEOUT, 5.0  # seconds
        self.unreachable: str | None = None  # why the Bot API did not answer at start, until it does (/readyz)
        self._gave_up: str | None = None  # connecting stopped (getMe refused): said until a start connects
        # base_url + token makes the API root (https://api.telegram.org/bot<token>); no updater, job
        # queue or rate limiter: the webhook or our own getUpdates loop feeds updates, the outbox paces.
        self.application = (Application.builder().token(settings.bot_token).base_url(settings.api_url)
                            .updater(None).job_queue(None).connect_timeout(5).read_timeout(TIMEOUT)
                            .write_timeout(TIMEOUT).build())
        self._tasks: set[asyncio.Task[Any]] = set()  # updates being handled: finished at stop
        self._moved: dict[str, str] = {}  # chat id -> the supergroup it became (see _in_chat)
        self._loops: set[asyncio.Task[Any]] = set()  # the polling loop, a connect retry: cancelled at stop
        self._poller: asyncio.Task[None] | None = None
        self._seen_updates: deque[int] = deque(maxlen=1000)
        # Webhook: update id -> its handling, while a request waits for it (a copy posted meanwhile waits for the
        # same one); and the ids of the latest updates whose handling failed after the person was told (a retry of
        # one that fails again tells them nothing again, as polling's does).
        self._answering: dict[int, asyncio.Task[bool]] = {}
        self._failed_updates: deque[int] = deque(maxlen=FAILED_KEPT)
        # `?value` -> the question its button asks (Button.confirm), as last drawn: Telegram keeps no more than the
        # callback data on a button, so the first tap learns it here. (Not kept across a restart, nor shared with
        # another replica: a tap on a button drawn there gets the question once the message is drawn again here.)
        self._questions: OrderedDict[str, str] = OrderedDict()
        # Claims an update in the store (scope, key, window) -> its Handling, or None for a copy of one handled, so
        # that another replica, or this one after a restart, skips a retry of it, and handles a retry of one whose
        # handling a crash cut off; set by the bot (storage/replays.py). None: memory is the only guard.
        self.claim: Callable[[str, str, timedelta], Awaitable[Handling | None]] | None = None
        # `mode: polling` with several replicas: only the one for which this answers True polls.
        self.may_poll: Callable[[], Awaitable[bool]] | None = None
        self.follower_wait = 10.0  # seconds between a follower's attempts to take over
        self.retry_wait, self.give_up_after, self.poll_pace = RETRY_FIRST, GIVE_UP, POLL_PACE  # see _poll

    @property
    def bot(self) -> Any:
        return self.application.bot

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """getMe (checks the token, learns the bot's @name), the command menu, and polling if configured.
        A refused token raises; an unreachable Telegram is logged and retried in the background."""
        try:
            await self._connect()
        except DeliveryError as exc:
            if exc.permanent:
                raise
            log.warning("telegram: cannot reach the Bot API (%s); trying again in the background", exc)
            self.unreachable = str(exc)
            self._spawn(self._connect_later(), "connect", self._loops)

    async def initialize(self) -> None:
        """getMe: checks the token (a refused one raises DeliveryError, the token never in it) and learns the
        bot's @name."""
        await self._call("getMe", self.application.initialize())

    async def _connect(self) -> None:
        await self.initialize()
        await self._call("setMyCommands", self.bot.set_my_commands(list(COMMANDS.items())))
        log.info("telegram: connected as @%s (%s)", self.bot.username, self.settings.mode)
        if self.settings.mode == "polling":
            self.start_polling()

    async def _connect_later(self) -> None:
        delay = self.connect_retry
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                self.unreachable = None
                return
            except DeliveryError as exc:
                if exc.permanent:
                    log.error("telegram: giving up connecting: %s", exc)
                    self.unreachable = self._gave_up = f"gave up connecting: {exc}"
                    return
                log.warning("telegram: still not connected: %s", exc)
                self.unreachable = str(exc)
                delay = min(delay * 2, 300.0)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop polling, let clicks and commands in flight finish (up to `timeout`), close the connections."""
        for task in list(self._loops):
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.application.shutdown()
        await self.bot.shutdown()  # the HTTP clients, when initialize() stopped half-way

    def register(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    async def set_webhook(self, url: str) -> None:
        """Tell Telegram to post updates to `url` (`{public_url}/telegram/webhook`) with our secret token."""
        if self.settings.webhook_secret is None:  # (mode: polling): every update posted there would be refused
            raise DeliveryError("there is no adapters.telegram.webhook_secret (only mode: polling goes without), so "
                                "the bot would refuse every update posted to its webhook; set webhook_secret and "
                                "mode: webhook first", permanent=True)
        await self._call("setWebhook", self.bot.set_webhook(url, secret_token=self.settings.webhook_secret,
                                                            allowed_updates=ALLOWED_UPDATES))

    def start_polling(self) -> None:
        """`mode: polling`: drop the webhook, then long-poll getUpdates into the webhook's path."""
        if self._poller is None or self._poller.done():
            self._poller = self._spawn(self._poll(), "polling", self._loops)

    async def handle(self, request: web.Request) -> web.Response:
        """The secret token Telegram was given (401 otherwise); then the update is handled, and answered once its
        handling ended: 200 when it is handled (here, or before, or at another replica), 503 when that failed, so
        that Telegram sends it again (a 2xx tells Telegram the update is done with; one answered before its handling
        ended was lost when the bot died meanwhile). A bot that polls without a secret takes nothing here: no
        request could be told from a forged one."""
        secret = self.settings.webhook_secret
        if secret is None:
            return web.json_response({"error": "this bot polls Telegram for its updates (adapters.telegram.mode: "
                                               "polling, no webhook_secret) and takes none here"}, status=401)
        given = request.headers.get(SECRET_HEADER, "")
        once = len(request.headers.getall(SECRET_HEADER, [])) <= 1  # (sent twice: which one counts is ambiguous)
        if not (hmac.compare_digest(raw_bytes(given), secret.encode()) and once):
            return web.json_response({"error": f"wrong or missing {SECRET_HEADER}"}, status=401)
        try:  # as every endpoint reads a body (bot.bodies); Telegram does not compress it
            data = await read_json(request)
        except BodyError as exc:
            return refused(exc)
        given = data.get("update_id") if isinstance(data, dict) else None
        if not isinstance(given, int) or isinstance(given, bool):  # (true is an int to Python, and no update id)
            return web.json_response({"error": "not a Telegram update (no update_id)"}, status=400)
        try:
            update = Update.de_json(data, self.bot)
        except Exception as exc:  # a field of the wrong shape
            return web.json_response({"error": f"not a Telegram update: {type(exc).__name__}"}, status=400)
        message, query = update.message, update.callback_query
        if ((message is not None and not isinstance(message.text, (str, type(None))))
                or (query is not None and not isinstance(query.data, (str, type(None))))):  # de_json does not check
            return web.json_response({"error": "not a Telegram update: a message's text and a callback's data are "
                                               "strings"}, status=400)
        if (message is not None and message.chat is None) or (query is not None and query.from_user is None):
            # (handled, it broke off, and was answered 500: a message has its chat, a callback its sender)
            return web.json_response({"error": "not a Telegram update: a message without `chat`, or a callback_query "
                                               "without `from`"}, status=400)
        uid = update.update_id
        task = self._answering.get(uid)  # a copy posted while it is handled: answered as that handling ends
        if task is None:
            task = self._answering[uid] = self._spawn(self._webhook_update(update), "update")
            task.add_done_callback(lambda t: self._answering.pop(uid) if self._answering.get(uid) is t else None)
        # A task of its own, which stop() lets finish, and waited for without being cancelled with this request:
        # Telegram hanging up, or the server cancelling its handlers as it shuts down, does not cut the handling off.
        await asyncio.wait({task})
        if task.cancelled():
            why = "the bot stopped while handling it"
        elif task.exception() is not None:
            why = "its handling broke off"  # (logged as the task ended)
        elif task.result():
            return web.json_response({"ok": True})
        else:
            why = "its handling failed before it acted"
        log.warning("telegram: update %d (%s) is not handled: %s; answered 503, so that Telegram sends it again",
                    uid, _what(update), why)
        return web.json_response({"error": f"update {uid} is not handled: {why} (the bot's log says why); send it "
                                           "again"}, status=503, headers={"Retry-After": str(round(RETRY_FIRST))})

    async def _webhook_update(self, update: Update) -> bool:
        """`_process` for an update posted to the webhook. One whose handling failed is answered 503, and Telegram
        posts it again: when the person was told of that failure already (it failed here, among the latest
        FAILED_KEPT that did; a failure at another replica is not known here), failing again tells them nothing."""
        uid = update.update_id
        told = uid in self._failed_updates
        handled = await self._process(update, again=told)
        if handled and told:
            self._failed_updates.remove(uid)
        elif not handled and not told:
            self._failed_updates.append(uid)
        return handled

    # -- Adapter and Pager ------------------------------------------------------------------------

    def to_message(self, message: Outbound) -> dict[str, Any]:
        """`{"text", "reply_markup"}`: the rendered HTML template and the buttons as an inline keyboard."""
        try:
            markup = keyboard(message.buttons)
        except actions.CodecError as exc:
            raise DeliveryError(f"telegram: cannot draw a button: {exc}", permanent=True) from exc
        for button in message.buttons:
            if button.confirm:
                data = callback_data(button)
                self._questions[data] = button.confirm
                self._questions.move_to_end(data)
        while len(self._questions) > QUESTIONS_KEPT:
            self._questions.popitem(last=False)
        return {"text": self.html(message.kind, message.context) or no_mentions(html.escape(message.text or message.kind)),
                "reply_markup": markup}

    def html(self, kind: str, context: Mapping[str, Any]) -> str:
        """`{kind}.telegram.html.j2` (autoescaped); another format's text is escaped (and cut) here."""
        name = self.renderer.find(kind, PLATFORM, TEXT_FORMATS) or ""
        text = self.renderer.render_text(kind, PLATFORM, context)
        if name.endswith(".html.j2"):
            return no_mentions(text)
        return no_mentions(html.escape(text if len(text) <= TEXT_MAX else text[: TEXT_MAX - 1] + "\u2026"))

    async def send(self, chat_id: str, message: Outbound) -> MessageRef:
        payload = self.to_message(message)
        sent = await self._in_chat("sendMessage", chat_id,
                                   lambda chat: self.bot.send_message(chat, **payload, **SEND_OPTIONS))
        return MessageRef(PLATFORM, str(sent.chat.id), str(sent.message_id), None)

    async def update(self, ref: MessageRef, message: Outbound) -> None:
        """editMessageText with the keyboard (none when there are no buttons); an identical redraw is fine."""
        payload = self.to_message(message)
        try:
            message_id = message_param(ref.message_id)
            await self._in_chat("editMessageText", ref.chat_id, lambda chat: self.bot.edit_message_text(
                chat_id=chat, message_id=message_id, **payload, **SEND_OPTIONS), follow=False)
        except DeliveryError as exc:
            if "message is not modified" not in str(exc).lower():
                raise

    async def reply(self, ref: MessageRef, message: Outbound) -> MessageRef:
        """A reply to the thread's parent message (Telegram's thread); a reply to a reply keeps the parent. Silent
        (no push to the group's phones: the story of an incident asks nobody for anything), unless it mentions the
        chat (`mention: here`, an escalation step that asks everyone there)."""
        parent = ref.thread_id or ref.message_id
        sent = await self._post(ref.chat_id, parent, self.to_message(message),
                                silent=message.context.get("mention") != "here")
        return MessageRef(PLATFORM, str(sent.chat.id), str(sent.message_id), parent)

    async def notify(self, actor: Actor, chat: MessageRef | None, text: str) -> None:
        """In `chat` (Telegram has no ephemeral messages), else in the actor's private chat with the bot."""
        if chat is None and actor.platform != PLATFORM:
            raise DeliveryError(f"telegram: cannot notify a {actor.platform} user", permanent=True)
        target = chat.chat_id if chat is not None else actor.user_id
        await self._post(target, chat.message_id if chat is not None else None, {"text": self._text(text)})

    async def page(self, user_id: str, message: Outbound) -> MessageRef:
        """The message, with its buttons, in the person's private chat with the bot."""
        if not (user_id.isascii() and user_id.isdigit()):
            raise DeliveryError(f"telegram: {user_id!r} is not a Telegram user id (a number)", permanent=True)
        try:
            return await self.send(user_id, message)
        except DeliveryError as exc:
            reason = str(exc).lower()
            if "initiate conversation" in reason or "chat not found" in reason:
                problem = (f"Telegram user {user_id} has not started a chat with the bot; "
                           "ask them to open it and press Start")
            elif "blocked" in reason or "deactivated" in reason:
                problem = f"Telegram user {user_id} has blocked the bot (or left Telegram); ask them to unblock it"
            else:
                raise
            log.warning("telegram: cannot page: %s (%s)", problem, exc)
            raise DeliveryError(problem, permanent=True) from exc

    async def _post(self, chat_id: str, reply_to: str | None, payload: Mapping[str, Any], *,
                    silent: bool = False) -> Message:
        """sendMessage, as a reply to `reply_to` when given (sent anyway if that message is gone)."""
        quote = ReplyParameters(message_param(reply_to), allow_sending_without_reply=True) if reply_to else None
        return await self._in_chat("sendMessage", chat_id, lambda chat: self.bot.send_message(
            chat, **payload, reply_parameters=quote, disable_notification=silent or None, **SEND_OPTIONS),
            follow=quote is None)

    def _text(self, text: str) -> str:
        """Plain text (with `code` spans) as HTML through the text template; escaped as is if that fails."""
        try:
            return self.html("text", {"text": text}) or no_mentions(html.escape(text or "-"))
        except Exception:  # a broken override template must not leave the user without an answer
            log.exception("telegram: cannot render the text template; sending the text escaped")
            return no_mentions(html.escape(text[:TEXT_MAX] or "-"))

    async def _call(self, method: str, call: Coroutine[Any, Any, Any]) -> Any:
        try:
            result = await call
        except TelegramError as exc:
            raise delivery_error(method, exc, token=self.settings.bot_token) from exc
        self.unreachable = self._gave_up  # (a call that works after connecting stopped: no menu, no polling yet)
        return result

    @staticmethod
    def _left_behind(method: str, supergroup: str) -> DeliveryError:
        return DeliveryError(f"telegram {method}: the group is now the supergroup {supergroup}, where its messages "
                             "are not", permanent=True, gone=True)

    async def _in_chat(self, method: str, chat_id: str, make: Callable[[int | str], Coroutine[Any, Any, Any]], *,
                       follow: bool = True) -> Any:
        """`make(chat)` in `chat_id`, or in the supergroup it became. Telegram turns a group into a supergroup (a new
        id) on its own, when an admin changes some settings. A new message (`follow`) is sent there, and later calls
        go there at once (until a restart, after which the first call learns it again). A call about a message of
        the old group (an edit, a reply to it) is not made there, where that message id may be another message:
        it is a message gone, so the outbox posts the card afresh, in the supergroup."""
        moved = self._moved.get(chat_id)
        if moved is not None and not follow:
            raise self._left_behind(method, moved)
        try:
            return await make(chat_param(moved or chat_id))
        except ChatMigrated as exc:
            moved = self._moved[chat_id] = str(exc.new_chat_id)
            log.warning("telegram: chat %s is now the supergroup %s; messages go there, and channels[].chat in "
                        "app.yaml should say %s", chat_id, moved, moved)
            if not follow:
                raise self._left_behind(method, moved) from exc
            return await self._call(method, make(chat_param(moved)))
        except TelegramError as exc:
            raise delivery_error(method, exc, token=self.settings.bot_token) from exc

    # -- inbound ----------------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, T], what: str,
               into: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[T]:
        """A background task, referenced until it ends; its exception, if any, is logged."""
        tasks = self._tasks if into is None else into
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)

        def done(task: asyncio.Task[T]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("telegram: handling a %s failed", what, exc_info=task.exception())
        task.add_done_callback(done)
        return task

    async def _poll(self) -> None:
        """Long-poll getUpdates and handle each update in a task of its own. An update is confirmed to Telegram (a
        later call's offset passes it, after which Telegram never gives it again) only once its handling ended: one
        still being handled when this process dies, or whose handling failed, is fetched again, here or by the
        replica that polls next, and its claim keeps one already handled from being handled twice. One that keeps
        failing is fetched and tried again with growing pauses, and given up (loudly) after `give_up_after` seconds:
        until it is confirmed, every update after it comes back with it, and getUpdates gives at most 100 at a time."""
        offset, delay, webhook_deleted = None, 1.0, False
        fetched: dict[int, _Fetched] = {}  # update id -> an update fetched here and not confirmed yet
        while True:
            if self.may_poll is not None and not await self.may_poll():
                await asyncio.sleep(self.follower_wait)  # another replica polls; take over if it goes
                continue
            try:
                if not webhook_deleted:  # getUpdates is refused (409) while a webhook is set
                    await self.bot.delete_webhook()
                    webhook_deleted = True
                updates = await self.bot.get_updates(offset=offset, timeout=self.poll_timeout,
                                                     allowed_updates=ALLOWED_UPDATES)
            except TelegramError as exc:
                error = delivery_error("getUpdates", exc, token=self.settings.bot_token)
                wait = error.retry_after or delay
                log.warning("telegram: %s; polling again in %.0f s", error, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            self._take(updates, fetched)
            running = {entry.task for entry in fetched.values() if entry.task is not None}
            # Telegram answers at once while an update is not confirmed: wait a little for the work to end first
            if running:
                await asyncio.wait(running, timeout=self.poll_pace)
            elif any(not entry.done for entry in fetched.values()):  # only failed ones, waiting for their next try
                await asyncio.sleep(self.poll_pace)
            offset = self._reckon(fetched, offset)

    def _take(self, updates: Sequence[Update], fetched: dict[int, _Fetched]) -> None:
        """Start handling the updates fetched for the first time, and the failed ones whose next try is due."""
        first = updates[0].update_id if updates else None
        for uid in [uid for uid in fetched if first is None or uid < first]:  # confirmed (elsewhere too): forgotten
            del fetched[uid]
        now = asyncio.get_running_loop().time()
        for update in updates:
            entry = fetched.get(update.update_id)
            if entry is None:
                entry = fetched[update.update_id] = _Fetched(update, now)
            elif entry.done or entry.task is not None or now < entry.retry_at:
                continue  # handled (only fetched again with one before it), being handled, or its retry not due
            entry.attempts += 1
            entry.task = self._spawn(self._process(update, again=entry.attempts > 1), "update")

    def _reckon(self, fetched: dict[int, _Fetched], offset: int | None) -> int | None:
        """The offset for the next getUpdates: past every update fetched whose handling ended, up to the first one
        still being handled or to be tried again. A failed one is given a time for its next try, or given up."""
        now = asyncio.get_running_loop().time()
        for uid, entry in fetched.items():
            task = entry.task
            if entry.done or task is None:
                continue
            if not task.done():
                if now - entry.since >= self.give_up_after:  # hung: it must not hold back every update after it
                    log.error("telegram: update %d is still being handled after %.0f s; it is confirmed so that the "
                              "updates after it are fetched, and lost if the bot stops before it ends", uid,
                              now - entry.since)
                    entry.done = True
                continue
            entry.task = None
            if not task.cancelled() and task.exception() is None and task.result():
                entry.done = True
            elif now - entry.since >= self.give_up_after:
                log.error("telegram: giving up on update %d (%s) after %d failed attempt(s) in %.0f s; the person's "
                          "tap or command is lost, see the errors above", uid, _what(entry.update), entry.attempts,
                          now - entry.since)
                entry.done = True
            else:
                wait = min(self.retry_wait * 2 ** (entry.attempts - 1), RETRY_MAX)
                entry.retry_at = now + wait
                log.warning("telegram: handling update %d (%s) failed; it is fetched and tried again in %.0f s",
                            uid, _what(entry.update), wait)
        pending = [uid for uid, entry in fetched.items() if not entry.done]
        return min(pending) if pending else max(fetched) + 1 if fetched else offset

    async def _process(self, update: Update, *, again: bool = False) -> bool:
        """Handle an update once. True once nothing is left to do for it (handled here, or before, or at another
        replica); False if its handling failed before it acted, or broke off (it raised, or was cancelled), and
        then a copy of it is handled, here too (polling fetches it again, Telegram posts it again). `again`: a
        retry of one that failed here, whose failure the person was told of already: failing again, it tells them
        nothing."""
        if update.update_id in self._seen_updates:  # Telegram's retry of an update we already took
            return True
        self._seen_updates.append(update.update_id)
        try:
            # Its retry may reach another replica (webhook behind a load balancer): the one that claims it handles it.
            key = f"{self.settings.bot_token.partition(':')[0]}:{update.update_id}"
            handling = Unclaimed(key) if self.claim is None else await self.claim("telegram", key, UPDATE_RETRIES)
            if handling is None or not await handling.ready():
                return True
            async with handling:
                if update.callback_query is not None:
                    await self._click(update.callback_query, handling, quiet=again)
                elif update.message is not None:
                    await self._command(update.message, handling, quiet=again)
        except _FailedAgain:
            self._forget(update.update_id)
            return False
        except BaseException:  # (cancelled too) nobody knows how far it got: its claim lapses, and a copy is handled
            self._forget(update.update_id)
            raise
        if handling.released:  # failed before it acted: a retry of it is handled, here too
            self._forget(update.update_id)
            return False
        return True

    def _forget(self, update_id: int) -> None:
        if update_id in self._seen_updates:
            self._seen_updates.remove(update_id)

    async def _click(self, query: CallbackQuery, handling: Handling, *, quiet: bool = False) -> None:
        data = query.data or ""
        try:
            if data[:1] in (ASK, CANCEL):
                actions.decode(data[1:])
                await self._confirm_step(query, data)
                return
            event = click_event(query)
        except actions.CodecError as exc:
            log.warning("telegram: refused callback data from user %s: %s", query.from_user.id, exc)
            await self._answer(query, INVALID_BUTTON)
            return
        reply = await self._dispatch(self.dispatcher.handle_action(event), handling, quiet=quiet)
        said = toast(reply.text) if reply is not None else ""
        await self._answer(query, said, alert=len(said) > TOAST_SHORT)  # (a refusal's 120 characters flashed by)
        private = query.message is not None and getattr(query.message.chat, "type", None) == "private"
        if reply is not None and reply.settle is not None and event.source is not None and private:
            # answered: no more buttons (only on a direct message: those are the only ones settling applies to)
            try:
                await self.update(event.source, Outbound("text", {"text": reply.settle}, text=reply.settle))
            except DeliveryError as exc:  # the toast still told the clicker; the buttons stay
                log.warning("telegram: cannot settle the clicked message: %s", exc)
        if (reply is not None and event.action in CARD_ACTIONS and event.source is not None and not handling.released
                and answers_a_command(query.message)):
            await self._redraw_shown(event.source, event, private=private)
        if reply is not None and not reply.ephemeral and event.source is not None:  # for everyone: in the thread
            await self._post(event.source.chat_id, event.source.thread_id or event.source.message_id,
                             self._reply_payload(reply))

    async def _redraw_shown(self, source: MessageRef, event: ActionEvent, *, private: bool) -> None:
        """A card that answered `/incident show`: nothing tracks it (the outbox redraws the channels' cards and the
        pages), so this one is drawn again, as the incident is now, by the command that drew it, as Slack redraws its
        private card; it would otherwise say "Acknowledged" on an incident resolved, and keep an armed ✔ Resolve that
        a tap after a reopen resolves without asking. Also after a tap that changed nothing (the card then shows what
        did: someone else acknowledged); not for someone the command does not show it to."""
        command = CommandEvent("incident", ["show", str(event.incident_id)], event.actor,
                               MessageRef(PLATFORM, source.chat_id, "", None), direct=private)
        try:
            shown = await self.dispatcher.handle_command(command)
        except Exception:  # the clicker has the answer; the card stays as it was
            log.exception("telegram: cannot redraw the card of #%s that /incident show drew", event.incident_id)
            return
        if shown.message is None:
            return
        try:
            await self.update(MessageRef(PLATFORM, source.chat_id, source.message_id, None), shown.message)
        except DeliveryError as exc:
            log.warning("telegram: cannot redraw the card of #%s that /incident show drew: %s", event.incident_id, exc)

    async def _confirm_step(self, query: CallbackQuery, data: str) -> None:
        """A tap on a button that asks first, or on its ✖ No: redraw that button in place. Only someone who
        may press it arms it, or disarms it (the redrawn button is there for the whole group)."""
        decoded = actions.decode(data[1:])
        # (refused for a role it lacks: audited, as a click is, once for a tap Telegram delivers again)
        refused = await self.dispatcher.audited_refusal(decoded.action.value, actor_of(query.from_user),
                                                        decoded.incident_id or None, event_id=str(query.id or ""))
        if refused is not None:
            said = toast(refused.text)
            await self._answer(query, said, alert=len(said) > TOAST_SHORT)
            return
        message = query.message
        markup = getattr(message, "reply_markup", None)
        changed = confirm_keyboard(markup, data) if markup is not None else None
        if message is None or changed is None:
            await self._answer(query, STALE_BUTTON)
            return
        try:
            await self._call("editMessageReplyMarkup", self.bot.edit_message_reply_markup(
                chat_id=message.chat.id, message_id=message.message_id, reply_markup=changed))
        except DeliveryError as exc:
            log.warning("telegram: cannot redraw the button: %s", exc)
            # flood control in a busy group is no changed message: say to try again, and when
            await self._answer(query, f"Telegram is busy; try again in {max(1, round(exc.retry_after))} s."
                               if exc.retry_after else STALE_BUTTON)
            return
        if data[0] == CANCEL:
            await self._answer(query, "")
            return
        label = next((k.text for row in changed.inline_keyboard for k in row if k.callback_data == data[1:]), "")
        question = self._questions.get(data)  # what Slack's dialog asks ("Resolve #1 while 1 alert is still firing?")
        answer = toast(f"{question + ' ' if question else ''}Tap \u201c{label}\u201d to confirm, or \u201c{NO}\u201d.")
        await self._answer(query, answer, alert=len(answer) > TOAST_SHORT)

    async def _command(self, message: Message, handling: Handling, *, quiet: bool = False) -> None:
        try:
            username = self.bot.username
        except RuntimeError:  # not initialized (getMe has not answered): no /command@name is taken as ours
            username = None
        why = anonymous_command(message, username)
        if why is not None:
            await self._post(str(message.chat.id), str(message.message_id), {"text": self._text(why)})
            return
        event = command_event(message, username)
        if event is None:
            return
        reply = await self._dispatch(self.dispatcher.handle_command(event), handling, quiet=quiet)
        if reply.sent_direct and event.direct:  # the direct message, with its buttons, is the answer in this chat
            return
        payload = self._reply_payload(reply)
        try:
            await self._post(str(message.chat.id), str(message.message_id), payload)
            return
        except DeliveryError as exc:  # flood control: the person is waiting for this answer, so wait a little
            if exc.retry_after and exc.retry_after <= COMMAND_WAIT_MAX:
                await asyncio.sleep(exc.retry_after)
                try:
                    await self._post(str(message.chat.id), str(message.message_id), payload)
                    return
                except DeliveryError as again:
                    exc = again
            problem = exc
        user = message.from_user
        if user is None or message.chat.id == user.id:
            log.warning("telegram: could not answer %s in chat %s: %s", event.name, message.chat.id, problem)
            return
        try:  # the group is busy (or refuses the bot): the answer goes to the person's private chat instead
            await self._post(str(user.id), None, payload)
        except DeliveryError as exc:  # they never started a chat with the bot: nowhere left to answer
            log.warning("telegram: could not answer %s in chat %s (%s), nor privately (%s)", event.name,
                        message.chat.id, problem, exc)

    async def _dispatch(self, work: Coroutine[Any, Any, Reply | None], handling: Handling, *,
                        quiet: bool = False) -> Reply | None:
        """bot.chat.dispatched; a failure is not told to the person when `quiet` (then _FailedAgain; a retry of the
        update is handled)."""
        reply = await dispatched(work, handling, PLATFORM)
        if quiet and handling.released:
            raise _FailedAgain
        return reply

    def _reply_payload(self, reply: Reply) -> dict[str, Any]:
        if reply.message is not None:
            try:
                return self.to_message(reply.message)
            except Exception:  # a broken template must not leave the user without an answer
                log.exception("telegram: cannot render the %s reply; answering with its text", reply.message.kind)
        return {"text": self._text(reply.text)}

    async def _answer(self, query: CallbackQuery, text: str, *, alert: bool = False) -> None:
        """answerCallbackQuery (stops the button's spinner), a toast or with `alert` a dialog; a failure is logged,
        not raised. Flood control that asks for a short wait is waited out once: the answer is what the tapper reads
        (Telegram takes it for a few seconds only, so a longer wait would be in vain)."""
        for first in (True, False):
            try:
                await self._call("answerCallbackQuery", self.bot.answer_callback_query(
                    query.id, text=text or None, show_alert=alert or None))
                return
            except DeliveryError as exc:
                if first and exc.retry_after is not None and exc.retry_after <= TAP_WAIT_MAX:
                    await asyncio.sleep(exc.retry_after)
                    continue
                log.warning("telegram: %s", exc)
                return
