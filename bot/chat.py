"""The neutral chat model: what every adapter translates to and from.

Handlers speak only these types. An adapter turns a platform payload into an
`ActionEvent` or `CommandEvent`, hands it to the dispatcher, and turns the
`Reply` and the `Outbound` messages it gets back into the platform's own form.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bot.model import Actor

log = logging.getLogger("chatops.chat")
FAILED = "Something went wrong while handling that; the details are in the bot's log."

Platform = Literal["slack", "telegram", "teams"]
ButtonStyle = Literal["primary", "danger", "default"]
ECHO_MAX = 80  # characters of what someone typed that an answer repeats


# Typographic quotes (a phone's keyboard, or a Mac's smart quotes) as the ASCII ones shlex knows.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'"})
# What looks like a space and is not ASCII's (shlex splits on ASCII whitespace only): a no-break space (Option+Space
# on a Mac), figure, thin, narrow no-break and ideographic spaces... are one; zero-width spaces and joiners between
# words, invisible, are dropped (not ZWJ/ZWNJ, which belong inside emoji and words of some scripts).
_SPACES = str.maketrans({**{chr(c): " " for c in range(0x80, 0x3001) if chr(c).isspace()},
                         "\u200b": None, "\u2060": None, "\ufeff": None})


def split_words(text: str) -> list[str]:
    """Words of a command's text, shell-like (`"two words"` is one), tolerant of a stray quote; typographic quotes
    count as quotes, and any space a keyboard types separates words."""
    text = text.translate(_QUOTES).translate(_SPACES)
    try:
        return shlex.split(text)
    except ValueError:  # unbalanced quote: "don't", or a quote left open
        return text.split()


def echoed(text: str) -> str:
    """What someone typed, as an answer repeats it ("I don't know ..."): cut to ECHO_MAX characters with an
    ellipsis, so that a pasted wall of text is named, not sent back whole."""
    return text if len(text) <= ECHO_MAX else text[: ECHO_MAX - 1] + "\u2026"


@dataclass(frozen=True)
class MessageRef:
    """Where a message lives: `thread_id` is the parent's id for a reply (Slack `thread_ts`)."""

    platform: str
    chat_id: str
    message_id: str
    thread_id: str | None = None


@dataclass(frozen=True)
class Button:
    """A button as the core sees it; `bot.actions.encode` makes its platform value."""

    action: str
    incident_id: int
    arg: str = ""
    label: str = ""
    style: ButtonStyle = "default"
    confirm: str | None = None  # ask "are you sure?" with this text before sending the click
    tag: str = ""  # `bot.actions.stamp` of the incident it acts on: the server checks it is still that incident


@dataclass(frozen=True)
class ActionEvent:
    """A click. `event_id` is the platform's id of this click, to drop duplicate deliveries."""

    action: str
    incident_id: int
    arg: str
    actor: Actor
    source: MessageRef | None
    event_id: str = ""
    tag: str = ""  # what the button said of its incident (`bot.actions.stamp`), "" for a button drawn before tags


@dataclass(frozen=True)
class CommandEvent:
    """A slash or bot command: `/incident ack 42` is name `incident`, args `["ack", "42"]`."""

    name: str
    args: Sequence[str]
    actor: Actor
    chat: MessageRef | None = None
    direct: bool = False
    # Words written to the bot without a command (`ack 42` in a private chat on Telegram), taken as `/chatops WORDS`:
    # when the first word is no command, the answer is the help, not "I don't know `/hello`" for a slash never typed.
    plain: bool = False


@dataclass(frozen=True)
class Outbound:
    """A message to send: a template kind and its context; buttons are drawn by the adapter."""

    kind: str  # template kind: incident, thread, text, help, incident-list...
    context: Mapping[str, Any] = field(default_factory=dict)
    buttons: Sequence[Button] = ()
    text: str = ""  # plain-text fallback (notifications, screen readers)
    # The outbox's name for this post. A platform that can carry it on the message (Slack: message metadata) can find
    # the message by it when the post's answer was lost (`Finder`); the others ignore it.
    key: str = ""


@dataclass(frozen=True)
class Reply:
    """The immediate answer to a click or command; ephemeral means only the actor sees it."""

    text: str
    ephemeral: bool = True
    message: Outbound | None = None  # a richer answer (a table, an incident card) instead of text
    # For a click: the clicked message becomes this text, without its buttons (a question now answered).
    settle: str | None = None
    # This answer is also sent to the actor as a direct message with buttons (`/swap`'s "You asked Bob... [Cancel
    # request]"), on the platform the command came from first: a command typed in the private chat with the bot,
    # where that message arrives, is answered by it alone, not twice.
    sent_direct: bool = False
    # A refusal (a button the actor may not press, or an actor the bot does not know): for the actor alone, also where
    # a platform has no ephemeral message (Teams answers it in the private chat rather than in the channel's thread).
    refused: bool = False


class DeliveryError(Exception):
    """A platform refused or failed a call. `retry_after` (seconds) when it said when to come back."""

    def __init__(self, message: str, *, retry_after: float | None = None, permanent: bool = False,
                 token_refused: bool = False, gone: bool = False, unknown: bool = False):
        super().__init__(message)
        # The call went out and no answer came (a timeout): the platform may have delivered it. A page is then
        # not sent again, on that platform or another: better one page unconfirmed than two.
        self.unknown = unknown
        self.retry_after = retry_after
        self.permanent = permanent
        # The platform refused the bot itself (a revoked or wrong token): no call can work until someone fixes
        # it, but then every one can; queued messages wait for that rather than die.
        self.token_refused = token_refused
        self.gone = gone  # the message to edit is not there any more (someone deleted it)


class Adapter(Protocol):
    """What handlers and the outbox may ask of a platform. Implemented in `adapters/`."""

    platform: str

    async def send(self, chat_id: str, message: Outbound) -> MessageRef: ...

    async def update(self, ref: MessageRef, message: Outbound) -> None: ...

    async def reply(self, ref: MessageRef, message: Outbound) -> MessageRef: ...

    async def notify(self, actor: Actor, chat: MessageRef | None, text: str) -> None: ...


class Pager(Protocol):
    """An adapter that can reach one person directly (a private chat), for pages."""

    async def page(self, user_id: str, message: Outbound) -> MessageRef: ...


class Finder(Protocol):
    """An adapter that can find a post of its own by the `Outbound.key` it carried (Slack, by message metadata): a post
    whose answer was lost (`DeliveryError.unknown`) is looked for before it is made again."""

    async def find(self, chat_id: str, key: str, *, thread: str | None, sent_at: float) -> MessageRef | None: ...


class Handling(Protocol):
    """A click, command or event claimed so that no copy of it is acted on twice, at any replica or after a restart
    (storage.replays.Handling): `ready()` says whether to handle it (it may wait while another replica does);
    `async with` while handling it; `settle()` once what it stands for is done, `release()` if that failed before
    it acted (`released` then: a copy of it is handled, so the adapter forgets it too)."""

    key: str
    released: bool

    async def ready(self) -> bool: ...

    async def settle(self) -> None: ...

    async def release(self) -> None: ...

    async def __aenter__(self) -> Handling: ...

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None: ...


class Unclaimed:
    """The Handling of a request with no store to claim it in (an adapter on its own): the process's memory of the
    requests it took is the only guard, and it is forgotten when its handling is released."""

    def __init__(self, key: str):
        self.key, self.released = key, False

    async def ready(self) -> bool:
        return True

    async def settle(self) -> None:
        return None

    async def release(self) -> None:
        self.released = True

    async def __aenter__(self) -> Unclaimed:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        return None


async def dispatched(work: Coroutine[Any, Any, Reply | None], handling: Handling, platform: str) -> Reply | None:
    """The dispatcher's answer to a click or command, as every adapter takes it: its delivery is settled once it
    answered (a copy of it is a replay from then on), released if it failed (`handling.released`: a copy is handled),
    and then the person is told that it failed (FAILED) and the log has why."""
    try:
        reply = await work
    except Exception:
        log.exception("%s: the dispatcher failed", platform)
        await handling.release()
        return Reply(FAILED)
    await handling.settle()
    return reply
