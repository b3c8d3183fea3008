"""The dispatcher: every click and command, from any platform, takes the same path.

identity (platform user -> person in `people`) -> permission (role) -> drop a
duplicate delivery of the same click -> per-incident lock -> handler. A handler the
store turned away for being busy (a lock another replica, or a stuck transaction,
held too long) is answered here, the same for every platform: nothing was changed,
try again (BUSY).
Handlers register with decorators:

    @dispatcher.action(Action.ACKNOWLEDGE, role="responder")
    async def acknowledge(event: ActionEvent, person: Person) -> Reply: ...

    @dispatcher.command("ack", usage="/ack ID", help="acknowledge an incident")
    async def ack(event: CommandEvent, person: Person) -> Reply: ...
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from bot.chat import ActionEvent, CommandEvent, Reply, echoed
from bot.config import Config, Person
from bot.model import Actor

log = logging.getLogger("chatops.dispatch")

ActionHandler = Callable[[ActionEvent, Person], Awaitable[Reply | None]]
CommandHandler = Callable[[CommandEvent, Person], Awaitable[Reply]]
OpenCommandHandler = Callable[[CommandEvent, Person | None], Awaitable[Reply]]
DUPLICATE_WINDOW = 600.0  # seconds a click's event id is remembered
REFUSED_WAIT = 3.0  # seconds a refusal waits for its audit event to be written (a busy store), at most
BUSY = ("The incident store is busy (another bot replica, or a long transaction, holds what this needs), so nothing "
        "was changed. Try again in a moment.")

_ID_KEYS = {"slack": "slack", "telegram": "telegram", "teams": "teams"}
_ID_EXAMPLES = {"slack": "slack: {id}", "telegram": "telegram: {id}", "teams": 'teams: "{id}"'}


@dataclass(frozen=True)
class CommandSpec:
    name: str
    handler: CommandHandler
    usage: str
    help: str
    role: str | None
    anyone: bool = False  # strangers too (the handler gets person None): /start


@dataclass(frozen=True)
class ActionSpec:
    name: str
    handler: ActionHandler
    role: str | None
    label: str


class Dispatcher:
    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic,
                 busy: Callable[[BaseException], str | None] = lambda exc: None):
        """`busy(exc)`: why the store turned a handler's work away for being busy, for the log (the composition root
        passes storage.db.busy_store); None for any other failure, which the adapter answers as a failure."""
        self.config = config
        self._monotonic = monotonic
        self._busy = busy
        # Audits a known person's click or command refused for a role they lack (the composition root sets it):
        # (who, the person, what they tried, the incident or None, the role it needs)
        self.on_refused: Callable[[Actor, Person, str, int | None, str], Awaitable[None]] | None = None
        self.actions: dict[str, ActionSpec] = {}
        self.commands: dict[str, CommandSpec] = {}
        self._seen: dict[str, float] = {}
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._people: dict[tuple[str, str], Person] = {}
        # platform -> the commands typed there by their own name, and how the others are typed (see typed_on)
        self._typed: dict[str, tuple[frozenset[str], str]] = {}
        self._words: dict[str, str] = {}  # a subcommand the umbrella takes on its own -> its command (see command)
        for person in config.people:
            for platform, key in _ID_KEYS.items():
                value = getattr(person, key)
                if value is not None:
                    self._people[(platform, str(value))] = person

    # -- registration -------------------------------------------------------------------------

    def action(self, name: str, *, role: str | None = "responder", label: str = "") -> Callable[[ActionHandler], ActionHandler]:
        def register(fn: ActionHandler) -> ActionHandler:
            self.actions[str(name)] = ActionSpec(str(name), fn, role, label or str(name))
            return fn
        return register

    def command(self, name: str, *, usage: str, help: str, role: str | None = None, anyone: bool = False,
                words: Iterable[str] = ()) -> Callable[[CommandHandler], CommandHandler]:
        """`words`: subcommands of this command that the umbrella takes as its first word when no command has that
        name: `/chatops resolve 42` (and `@chatops resolve 42`) is `/incident resolve 42`."""
        def register(fn: CommandHandler) -> CommandHandler:
            self.commands[name] = CommandSpec(name, fn, usage, help, role, anyone)
            for word in words:
                self._words[word] = name
            return fn
        return register

    def typed_on(self, platform: str, names: Iterable[str], umbrella: str = "/chatops") -> None:
        """On `platform` only `names` can be typed as commands of their own (Slack: the slash commands its app
        registers; a Telegram bot takes any `/word`). Help there shows the others the way they can be typed, under
        the `umbrella`: `/chatops start`, not a `/start` the platform would refuse; on Teams, which has no slash
        commands, every one is a message to the bot (`@chatops ack 42`)."""
        self._typed[platform] = (frozenset(names), umbrella)

    # -- the path -------------------------------------------------------------------------------

    def identify(self, actor: Actor) -> Person | None:
        return self._people.get((actor.platform, actor.user_id))

    def refusal(self, action: str, actor: Actor) -> Reply | None:
        """Why `actor` may not press `action`'s button (unknown action, unknown person, missing role), or None."""
        spec = self.actions.get(action)
        if spec is None:
            return Reply("This button is not something I know how to do (any more).", refused=True)
        person = self.identify(actor)
        if person is None:
            return self._stranger(actor)
        if spec.role and spec.role not in person.roles:
            return Reply(f"{spec.label} needs the `{spec.role}` role, and {person.name} has "
                         f"{_roles(person)}. Ask whoever maintains app.yaml to add it to your `roles`.", refused=True)
        return None

    async def audited_refusal(self, action: str, actor: Actor, incident_id: int | None, what: str | None = None,
                              event_id: str = "") -> Reply | None:
        """`refusal`, and a refusal for a role the person lacks in the audit log (`what` they tried: the button's
        label, or the command they typed that does what it does), once for a click delivered twice (`event_id`)."""
        refused = self.refusal(action, actor)
        spec, person = self.actions.get(action), self.identify(actor)
        if refused is not None and spec is not None and person is not None and spec.role and not (
                event_id and self._duplicate(f"{actor.platform}:{event_id}")):
            await self._refused(actor, person, what or spec.label, incident_id, spec.role)
        return refused

    async def handle_action(self, event: ActionEvent) -> Reply | None:
        """The reply for the clicker, or None for a duplicate delivery of a click already handled."""
        refused = await self.audited_refusal(event.action, event.actor, event.incident_id, event_id=event.event_id)
        if refused is not None:
            return refused
        spec, person = self.actions[event.action], self.identify(event.actor)
        assert person is not None
        key = f"{event.actor.platform}:{event.event_id}"
        if event.event_id and self._duplicate(key):
            log.info("dropped a repeated delivery of click %s", event.event_id)
            return None
        lock = self._locks.get(event.incident_id)
        if lock is None:
            lock = self._locks[event.incident_id] = asyncio.Lock()
        async with lock:
            try:
                return await spec.handler(event, person)
            except Exception as exc:
                busy = self._busy_reply(exc, event.actor, person, f"{spec.label} ({event.action}:{event.incident_id})")
                if busy is not None:  # answered: a repeated delivery of the click is dropped, as after any answer
                    return busy
                self._seen.pop(key, None)  # it failed: a repeated delivery of the click is handled, not dropped
                raise

    async def handle_command(self, event: CommandEvent) -> Reply:
        name, platform = event.name.lstrip("/").lower(), event.actor.platform
        if name == "chatops":  # the umbrella: `/chatops ack 42` (or `@chatops ack 42`) is `/ack 42`
            # (`/chatops /incident ack 42` too, as Teams takes `@chatops /incident ack 42`; nothing but quotes: help)
            word = event.args[0].lower().lstrip("/") if event.args else ""
            if not word or word == "help":
                return Reply(self.help_text(platform))
            # its first word is a word, not a slash command: `/chatops hello` is answered as words are
            event = CommandEvent(word, list(event.args[1:]), event.actor, event.chat, event.direct, plain=True)
            name = event.name
            if name not in self.commands and name in self._words:  # a subcommand: `resolve 42` is `incident resolve 42`
                event = CommandEvent(self._words[name], [name, *event.args], event.actor, event.chat, event.direct,
                                     plain=True)
                name = event.name
        if name == "help":
            return Reply(self.help_text(platform))
        spec = self.commands.get(name)
        if spec is None:
            if event.plain:  # words, no command: what the bot understands, without naming a `/hello` nobody typed
                return Reply(f"`{echoed(name)}` is not one of my commands.\n{self.help_text(platform)}")
            return Reply(f"I don't know `/{echoed(name)}`.\n{self.help_text(platform)}")
        person = self.identify(event.actor)
        if person is None and not spec.anyone:
            return self._stranger(event.actor)
        if person is not None and spec.role and spec.role not in person.roles:
            await self._refused(event.actor, person, f"/{name}", None, spec.role)
            return Reply(f"`/{name}` needs the `{spec.role}` role, and {person.name} has {_roles(person)}.")
        try:
            return await spec.handler(event, person)  # type: ignore[arg-type]  # (person None: spec.anyone)
        except Exception as exc:
            busy = self._busy_reply(exc, event.actor, person, echoed(" ".join([f"/{name}", *event.args])))
            if busy is None:
                raise
            return busy

    async def _refused(self, actor: Actor, person: Person, what: str, incident_id: int | None, role: str) -> None:
        """A refusal for a missing role, to the audit log (on_refused); one it cannot write is logged, and the
        person still gets their answer."""
        if self.on_refused is None:
            return
        try:  # (a busy store does not hold the answer: REFUSED_WAIT at most, and the refusal is logged)
            await asyncio.wait_for(self.on_refused(actor, person, what, incident_id, role), REFUSED_WAIT)
        except Exception:
            log.exception("%s: could not audit that %s was refused %s", actor.platform, person.id, what)

    def _busy_reply(self, exc: Exception, actor: Actor, person: Person | None, what: str) -> Reply | None:
        """BUSY if the store turned `what` (a click or command) away for being busy, else None (the failure is the
        adapter's to answer). The person is told that nothing was changed and to try again, rather than that something
        went wrong; the platform gets its usual answer, so it does not send the click or command again (a copy acting
        later, behind the person's back, could undo what they did meanwhile); the log says what held it up."""
        why = self._busy(exc)
        if why is None:
            return None
        log.warning("%s: %s by %s not done, the store is busy (%s); they were told to try again", actor.platform, what,
                    person.id if person is not None else f"{actor.platform} user {actor.user_id}", why)
        return Reply(BUSY)

    def as_typed(self, platform: str, text: str) -> str:
        """`text` with each command its code spans name (`/incident page 1 PERSON`, as the bot's own words write a
        command) as it is typed on `platform` (see `typed_on`): on Teams `@chatops incident page 1 PERSON`. Only in
        code spans, and only a command that begins one (or an alternative in a usage, after `| `): the rest may be an
        alert's, a person's or a runbook's words (a path, a URL; a step `/usr/sbin/swapoff /swap.img`)."""
        if platform not in self._typed or "`/" not in text:
            return text
        return _CODE_SPAN.sub(lambda m: f"`{self._typed_words(platform, m.group(1))}`", text)

    def _typed_words(self, platform: str, text: str) -> str:
        typed, umbrella = self._typed.get(platform, (None, "/chatops"))
        if typed is None:
            return text
        for name in self.commands:
            if name not in typed:  # a command begins the span, or an alternative of a usage (`/swap list | /swap undo`)
                text = re.sub(rf"(^|\| )/{re.escape(name)}(?=\s|$)", rf"\g<1>{umbrella} {name}", text)
        return text

    def help_text(self, platform: str | None = None) -> str:
        """Every command with its usage, as it is typed on `platform` (see `typed_on`)."""
        lines = ["Commands:"]
        _, umbrella = self._typed.get(platform or "", (None, "/chatops"))
        for spec in sorted(self.commands.values(), key=lambda s: s.name):
            lines.append(f"`{self._typed_words(platform or '', spec.usage)}`: {spec.help}")
        lines.append(f"`{umbrella} COMMAND ...` runs any of them; `{umbrella} help` shows this.")
        return "\n".join(lines)

    def _stranger(self, actor: Actor) -> Reply:
        example = _ID_EXAMPLES.get(actor.platform, "{id}").format(id=actor.user_id)
        return Reply(f"I don't know you yet. Add `{example}` to your entry under `people:` in app.yaml "
                     "and restart the bot.", refused=True)

    def _duplicate(self, key: str) -> bool:
        now = self._monotonic()
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        if self._seen.get(key, 0.0) > now:
            return True
        self._seen[key] = now + DUPLICATE_WINDOW
        return False


_CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")  # an inline code span (not a fence's backticks)


def _roles(person: Person) -> str:
    return "the roles " + ", ".join(f"`{r}`" for r in person.roles) if person.roles else "no roles"
