"""Incident buttons and commands, the same for every platform: registered on the dispatcher at start."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from bot.actions import MAX_ID, Action, typed_id
from bot.chat import ActionEvent, Adapter, CommandEvent, Reply, echoed
from bot.clock import Clock
from bot.config import RESPONDER, Config, Person, find_person, unknown_person
from bot.dispatch import Dispatcher
from bot.metrics import Metrics
from bot.model import Actor
from bot.tables import ago, counted, table
from bot.view import incident_card
from handlers.escalation import Escalations, drawn_with
from handlers.incident_actions import observe, perform
from handlers.paging import page, page_order
from handlers.runbooks import RunbookHandlers
from storage.audit import AuditLog
from storage.db import Database
from storage.models import Escalation
from storage.queries import LIST_FILTERS, count_incidents, get_incident, list_incidents, list_status, recent_alerts

BUTTON_ACTIONS = {Action.ACKNOWLEDGE: "acknowledge", Action.ESCALATE: "escalate", Action.RESOLVE: "resolve",
                  Action.REOPEN: "reopen"}
LABELS = {"acknowledge": "Acknowledge", "escalate": "Escalate", "resolve": "Resolve", "reopen": "Reopen"}
VERB_ACTIONS = {verb: button for button, verb in BUTTON_ACTIONS.items()}
SUBCOMMANDS = {"ack": "acknowledge", "acknowledge": "acknowledge", "resolve": "resolve", "escalate": "escalate",
               "reopen": "reopen"}
INCIDENT_USAGE = ("/incident list | show ID | ack ID | escalate ID | resolve ID | reopen ID | page ID PERSON | "
                  "runbook ID [RUNBOOK]")
LIST_MAX = 20  # incidents in a /incident list answer (chatops incidents list shows them all)


@dataclass
class ChatHandlers:
    db: Database
    audit: AuditLog
    config: Config
    clock: Clock
    metrics: Metrics
    delivered: Callable[[], None]  # wakes the outbox worker after a change
    adapters: Mapping[str, Adapter] = field(default_factory=dict)  # for direct pages
    adapters_off: Mapping[str, str] = field(default_factory=dict)  # why a platform is off, for a page that failed
    escalations: Escalations | None = None  # stopped by acknowledge/resolve, restarted by reopen, pushed by escalate
    runbooks: RunbookHandlers | None = None  # /incident runbook
    dispatcher: Dispatcher | None = field(default=None, init=False, repr=False)  # set by register: for its refusals
    # (incident id, person id) -> who is paging them by hand now: a second command meanwhile sends nothing (_page)
    _paging: dict[tuple[int, str], Person] = field(default_factory=dict, init=False, repr=False)

    def register(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        for button, verb in BUTTON_ACTIONS.items():
            dispatcher.action(button, role=RESPONDER, label=LABELS[verb])(self._button(verb))
        # Its subcommands are words of their own to the umbrella too: `@chatops resolve 42`, as `@chatops ack 42` is.
        dispatcher.command("incident", usage=INCIDENT_USAGE, help="list, show and act on incidents",
                           words=("list", "show", "page", "runbook", *SUBCOMMANDS))(self.incident)
        dispatcher.command("ack", usage="/ack ID", help="acknowledge an incident")(self.ack)
        dispatcher.command("start", usage="/start", help="who the bot thinks you are", anyone=True)(self.start)

    def _button(self, verb: str):  # type: ignore[no-untyped-def]
        async def handle(event: ActionEvent, person: Person) -> Reply:
            return await self._act(verb, event.incident_id, event.actor, person, seen=event.arg, tag=event.tag)
        handle.__name__ = verb
        return handle

    async def _act(self, verb: str, incident_id: int, actor: Actor, person: Person, seen: str = "",
                   tag: str = "") -> Reply:
        """`seen`: what the pressed button carried (Escalate: where the escalation stood when it was drawn); `tag`:
        what it said of its incident (bot.actions.stamp), checked against the incident of that number."""
        if incident_id > MAX_ID:
            return Reply(_no_incident(incident_id))
        actor = Actor(actor.platform, actor.user_id, person.name, person.id)
        result = await perform(db=self.db, audit=self.audit, incident_id=incident_id, action=verb, actor=actor,
                               now=self.clock.now(), escalations=self.escalations,
                               names={p.id: p.name for p in self.config.people},
                               seen=seen if verb == "escalate" else "", tag=tag)
        observe(self.metrics, verb, result)
        if result.changed:
            self.delivered()
        return Reply(result.message)

    async def start(self, event: CommandEvent, person: Person | None) -> Reply:
        platform, user = event.actor.platform, event.actor.user_id
        # Teams shows nobody a channel's conversation id, which app.yaml's channels[].chat needs: said where asked
        chat_id = (f" This channel's id for app.yaml's channels[].chat is {event.chat.chat_id}."
                   if platform == "teams" and not event.direct and event.chat is not None else "")
        # (in a group, "pages will reach you here" is never so; a person not linked yet needs it as much)
        private = (" Telegram lets a bot write to you only in a private chat you started: open one with me and send "
                   "/start there, or no page reaches you on Telegram." if platform == "telegram" and not event.direct
                   else "")
        if person is None:
            return Reply(f"Hello! Your {platform.capitalize()} id is {user}. It is not linked to anyone yet: add "
                         f"`{platform}: {user}` to your entry under `people:` in app.yaml and restart the bot."
                         + private + chat_id)
        roles = ", ".join(person.roles) or "none"
        text = (f"Hello {person.name}! Your {platform.capitalize()} id {user} is linked to `{person.id}` "
                f"(roles: {roles}). {_where_pages_go(person, self.adapters)}")
        return Reply(text + private + chat_id)

    async def ack(self, event: CommandEvent, person: Person) -> Reply:
        incident_id = _incident_id(event.args, words=1)
        if incident_id is None:
            return Reply("Usage: `/ack ID`, for example `/ack 42`.")
        refused = await self._refusal("/ack", Action.ACKNOWLEDGE, event.actor, incident_id)
        if refused is not None:
            return refused
        return await self._act("acknowledge", incident_id, event.actor, person)

    async def incident(self, event: CommandEvent, person: Person) -> Reply:
        args = [a.lower() for a in event.args]
        if not args or args[0] in ("help", "-h", "--help"):
            return Reply(f"Usage: `{INCIDENT_USAGE}`")
        sub = args[0]
        if sub == "list":
            return await self._list(event.args[1:])
        if sub == "show":
            incident_id = _incident_id(event.args[1:], words=1)
            if incident_id is None:
                return Reply("Usage: `/incident show ID`, for example `/incident show 42`.")
            return await self._show(incident_id)
        if sub == "page":
            # the id, the person, then any words: the page's message
            incident_id = _incident_id(event.args[1:2], words=1) if len(event.args) >= 3 else None
            if incident_id is None:
                return Reply("Usage: `/incident page ID PERSON [MESSAGE]`, for example `/incident page 42 alice` or "
                             "`/incident page 42 alice please look at the db`.")
            # Paging someone by hand asks for more help, as Escalate does: its role, and its refusal.
            refused = await self._refusal("/incident page", Action.ESCALATE, event.actor, incident_id)
            if refused is not None:
                return refused
            # The words after the person are the page's message ("Alice asks for your help with #42: ...").
            return await self._page(incident_id, event.args[2], event.actor, person, " ".join(event.args[3:]))
        if sub == "runbook" and self.runbooks is not None:
            # the id, then the runbook to run; without it, the ones that apply
            incident_id = _incident_id(event.args[1:2], words=1) if len(event.args) in (2, 3) else None
            if incident_id is None:
                return Reply("Usage: `/incident runbook ID [RUNBOOK]`, for example `/incident runbook 42` (the ones "
                             "that apply) or `/incident runbook 42 restart-nginx`.")
            refused = await self._refusal("/incident runbook", Action.RUN_RUNBOOK, event.actor, incident_id)
            if refused is not None:
                return refused
            if len(event.args) == 2:
                return await self.runbooks.listing(incident_id)
            if incident_id > MAX_ID:
                return Reply(_no_incident(incident_id))
            return await self.runbooks.request(incident_id, event.args[2], event.actor, person)
        if sub in SUBCOMMANDS:
            incident_id = _incident_id(event.args[1:], words=1)
            if incident_id is None:
                return Reply(f"Usage: `/incident {sub} ID`, for example `/incident {sub} 42`.")
            refused = await self._refusal(f"/incident {sub}", VERB_ACTIONS[SUBCOMMANDS[sub]], event.actor,
                                          incident_id)
            if refused is not None:
                return refused
            return await self._act(SUBCOMMANDS[sub], incident_id, event.actor, person)
        return Reply(f"I don't know `/incident {echoed(sub)}`. Usage: `{INCIDENT_USAGE}`")

    async def _refusal(self, command: str, button: Action, actor: Actor, incident_id: int | None = None
                       ) -> Reply | None:
        """Why `actor` may not type `command`, which does what `button` does: the dispatcher's refusal of the button (its
        role, the roles they have, and what to do about it), said of the command they typed (and audited, as a
        click is); None when they may."""
        assert self.dispatcher is not None, "register() first"
        known = incident_id if incident_id and 0 < incident_id <= MAX_ID else None
        refused = await self.dispatcher.audited_refusal(button, actor, known, command)
        label = self.dispatcher.actions[button].label
        if refused is None or not refused.text.startswith(label):
            return refused
        return Reply(f"`{command}`{refused.text.removeprefix(label)}")

    async def _page(self, incident_id: int, who: str, actor: Actor, person: Person, note: str = "") -> Reply:
        if incident_id > MAX_ID:
            return Reply(_no_incident(incident_id))
        target = find_person(self.config.people, who)
        if target is None:
            return Reply(unknown_person(self.config.people, who))
        if RESPONDER not in target.roles:
            # Their Acknowledge on the page would be refused, and the incident would stay triggered while its
            # escalation goes on (as /override refuses to put them on a paged rotation).
            return Reply(f"{target.name} was not paged: they have no `{RESPONDER}` role, so they could not acknowledge "
                         f"the page. Add `{RESPONDER}` to their `roles` under `people:` in app.yaml and restart the "
                         "bot, or page someone who has it.")
        # A page of them about it already on its way (the command sent twice, or by two people at once) is the page:
        # this replica sends one (paging.page refuses one a moment after it, from the audit log, on every replica).
        key = (incident_id, target.id)
        paging = self._paging.get(key)
        if paging is not None:
            self.metrics.actions.labels("page", "refused").inc()
            by = "you" if paging.id == person.id else paging.name
            return Reply(f"{target.name} is being paged about #{incident_id} right now, by {by}: nothing more was "
                         "sent.")
        self._paging[key] = person
        actor = Actor(actor.platform, actor.user_id, person.name, person.id)
        try:
            result = await page(db=self.db, audit=self.audit, config=self.config, clock=self.clock,
                                adapters=self.adapters, metrics=self.metrics, incident_id=incident_id, person=target,
                                actor=actor, note=note, off=self.adapters_off)
        finally:
            del self._paging[key]
        self.metrics.actions.labels("page", "changed" if result.ok else "refused").inc()
        if result.recorded:
            self.delivered()  # its line in the incident's thread
        return Reply(result.message)

    async def _list(self, args: list[str] | tuple[str, ...]) -> Reply:
        status = args[0].lower() if args else "open"
        if status not in LIST_FILTERS or len(args) > 1:
            return Reply(f"Usage: `/incident list [{'|'.join(LIST_FILTERS)}]`")
        async with self.db.sessions() as session:
            incidents = await list_incidents(session, status=status, limit=LIST_MAX)
            total = await count_incidents(session, status=status) if len(incidents) == LIST_MAX else len(incidents)
        which = "" if status == "all" else f"{status} "  # "1 incident", not "1 all incident"
        if not incidents:
            return Reply(f"No {which}incidents.")
        now = self.clock.now()
        text = table(["#", "status", "severity", "alerts", "opened", "title"],
                     [(i.id, list_status(i), i.severity, i.alert_count, ago(now - i.opened_at), i.title[:60])
                      for i in incidents])
        # The table is one code block: ``` in an alert's title would close it early (Slack) or split it (Telegram),
        # so every backtick in it is shown as a look-alike (U+02CB) that ends nothing.
        text = text.replace("`", "\u02cb")
        if total > len(incidents):
            return Reply(f"The newest {len(incidents)} of {total} {which}incidents (`chatops incidents list` shows "
                         f"them all):\n```\n{text}\n```")
        return Reply(f"{counted(len(incidents), which + 'incident')}, newest first:\n```\n{text}\n```")

    async def _show(self, incident_id: int) -> Reply:
        if incident_id > MAX_ID:
            return Reply(_no_incident(incident_id))
        async with self.db.sessions() as session:
            incident = await get_incident(session, incident_id)
            alerts = await recent_alerts(session, incident_id) if incident else []
            escalation = await session.get(Escalation, incident_id) if incident else None
        if incident is None:
            return Reply(_no_incident(incident_id))
        note, mark = drawn_with(escalation)  # as the channel's card draws it: what comes next, where Escalate stood
        card = incident_card(incident, alerts, now=self.clock.now(), tz=self.config.timezone,
                             names={p.id: p.name for p in self.config.people}, next_step=note, escalation_mark=mark,
                             runbooks=self.config.runbooks)
        return Reply(f"#{incident.id} {incident.title} ({incident.status})", message=card)


def _where_pages_go(person: Person, on: Collection[str]) -> str:
    """Where this person's pages go, in the order they are tried (handlers.paging.page_order: an escalation's by the
    hour, one sent by hand as after hours), on the platforms that are on (`on`) and app.yaml has an id of theirs for."""
    ids = {"slack": person.slack, "telegram": person.telegram, "teams": person.teams}

    def said(order: Sequence[str]) -> str:
        return ", then ".join(p.capitalize() for p in order if ids.get(p) and p in on)

    business, after = said(page_order(person, business_hours=True)), said(page_order(person))
    if not after:
        if any(ids.values()):
            return ("No page can reach you: none of the platforms app.yaml has an id of yours for is on in this bot"
                    + (" (nor in your page_via)." if person.page_via else "."))
        return "No page can reach you yet: add your Slack or Telegram id to your entry under `people:` in app.yaml."
    if business == after:
        return f"Pages reach you on {after}" + (" (your page_via)." if person.page_via else ".")
    return (f"Escalation pages reach you on {business} in business hours; after them, and pages sent by hand, on "
            f"{after}.")


def _incident_id(args: list[str] | tuple[str, ...] | object, *, words: int) -> int | None:
    """The id `args` start with (`42` or `#42`), or None (`bot.actions.typed_id`), also when they are not `words` words
    long: `/ack 1 2` is a typo to ask about, not an acknowledgement of #1. A number past MAX_ID is returned all the
    same: it is an id no incident has, answered as such by `_no_incident` before the store is asked."""
    values = list(args) if isinstance(args, (list, tuple)) else []
    return typed_id(str(values[0])) if len(values) == words else None


def _no_incident(incident_id: int) -> str:
    return f"There is no incident #{echoed(str(incident_id))}."
