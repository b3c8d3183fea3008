"""What a message says, decided once for every platform.

`incident_context` turns an incident and its alerts into the plain values a
template prints (the state and its marker, the first line, the facts, what
happens next, the links); `buttons_for` picks the buttons that match the state;
`thread_line` writes the one short line a thread event gets. Pure functions of
their inputs: time is passed in as `now`, nothing here reads the clock or
knows a platform.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from bot.actions import Action, stamp
from bot.chat import Button, Outbound
from bot.incidents import ACKNOWLEDGED, RESOLVED, TRIGGERED

# state -> (marker, colour, label)
STATES = {
    "firing": ("\U0001f534", "#E01E5A", "Firing"),  # red circle
    "acknowledged": ("\U0001f7e0", "#ECB22E", "Acknowledged"),  # orange (amber) circle
    "resolved": ("\U0001f7e2", "#2EB67D", "Resolved"),  # green circle
    "silenced": ("\u26aa", "#9E9E9E", "Silenced"),  # white (grey) circle
}
# (kind in Incident.links / AlertRecord.links, annotation that may carry it, label shown)
LINK_KINDS = (
    ("generator", "generator_url", "Graph"),
    ("runbook", "runbook_url", "Runbook"),
    ("dashboard", "dashboard_url", "Dashboard"),
    ("panel", "panel_url", "Panel"),
    ("silence", "silence_url", "Silence"),
)
TITLE_MAX, SUMMARY_MAX, DETAIL_MAX, NAME_MAX = 300, 500, 1000, 80
VALUES_MAX = 200  # "B=15234.5, C=1": a few numbers; a long valueString is cut
_URL_UNSAFE = {c: f"%{ord(c):02X}" for c in ' "<>|\\^`{}'}
LABEL_MAX = 40  # a Run button's title (Slack cuts a button's text at 75 characters)
CONFIRM_MAX = 300  # a button's confirmation dialog (Slack's limit)
def runbooks_for(incident: Any, runbooks: Sequence[Any]) -> list[Any]:
    """The runbooks that apply to an incident: those its route lists (`incident.runbooks`, kept when it opened) whose
    `match` holds for its labels (the routes' matchers), in app.yaml's order."""
    from bot.routing import matches  # (here: bot.routing imports bot.config, which imports this module)

    listed = set(incident.runbooks or ())
    return [rb for rb in runbooks if rb.id in listed and matches(rb.match, incident.labels or {})]


COMMAND_WHOLE = 3000  # characters of a command an approval shows (a Telegram message holds 4,096)


def command_line(argv: Sequence[str], limit: int = COMMAND_WHOLE) -> str:
    """A step's argv as a person reads it (quoted where a word holds spaces or quotes), on one line, cut to `limit`
    characters (with an ellipsis)."""
    return one_line(shlex.join(argv), limit)


def code(text: str) -> str:
    """`text` as a code span of the bot's markup (Slack's; bot.render makes Telegram's <code> of it) that shows every
    character of it: a text holding a backtick, which would end a `span` early, goes in ``` fences instead, where
    Slack and bot.render.telegram_code keep single backticks; a run of three is broken by zero-width spaces."""
    if "`" not in text:
        return f"`{text}`"
    return "```" + text.replace("```", "`\u200b`\u200b`") + "```"


def plain(text: str) -> str:
    """Text from an alert (a title) put beside the bot's own code spans: its backticks, which would make code of what
    follows, become typographic quotes."""
    return text.replace("`", "\u2018")


def incident_context(
    incident: Any,
    alerts: Sequence[Any],
    *,
    now: datetime,
    tz: str = "UTC",
    acknowledged_name: str | None = None,
    resolved_name: str | None = None,
    next_step: str | None = None,
) -> dict[str, Any]:
    """Everything an incident template prints, already worded. See templates/README.md for the keys."""
    zone = ZoneInfo(tz)
    now = _utc(now)
    state = incident_state(incident)
    marker, colour, state_label = STATES[state]
    ref = f"#{incident.id}"
    title = one_line(incident.title, TITLE_MAX) or f"Incident {ref}"
    severity = str(incident.severity or "").lower()
    ack_name = person_name(acknowledged_name or incident.acknowledged_by or "") or "someone"
    resolved_after = None
    if state == "resolved" and incident.resolved_at is not None:
        resolved_after = f"resolved after {span(_utc(incident.resolved_at) - _utc(incident.opened_at))}"
    return {
        "id": incident.id,
        "ref": ref,
        "title": title,
        "state": state,
        "state_label": state_label,
        "marker": marker,
        "colour": colour,
        "severity": severity,
        "severity_label": severity.capitalize(),
        "headline": f"{marker} {state_label} \u00b7 {severity.capitalize()} \u00b7 {ref} {title}",
        "facts": _facts(incident, state, now, zone, ack_name, resolved_name),
        "next_step": next_step or _default_next_step(state, ack_name, resolved_after, incident.id,
                                                     escalates=bool(getattr(incident, "escalation", None))),
        "resolved_after": resolved_after,
        "links": incident_links(incident, alerts),
        "latest": _latest(alerts, max(int(incident.alert_count or 0), len(alerts)), int(incident.firing_count or 0),
                          open_=state != "resolved"),
        "alert_count": int(incident.alert_count or 0),
        "firing_count": int(incident.firing_count or 0),
        "sources": list(incident.sources or []),
    }


def incident_state(incident: Any) -> str:
    """firing, acknowledged, resolved, or silenced (an open incident no one is told about)."""
    if incident.status == RESOLVED:
        return "resolved"
    if incident.silenced:
        return "silenced"
    return "acknowledged" if incident.status == ACKNOWLEDGED else "firing"


ESCALATION_DONE = "done"  # the escalation_mark of an escalation whose every step ran: the card offers no Escalate


def buttons_for(incident: Any, escalation_mark: str = "", runbooks: Sequence[Any] = ()) -> list[Button]:
    """The buttons that match the incident's state, labelled with verbs; Resolve asks first, and so does each
    "Run: <title>" of the runbooks that apply to an open incident (`runbooks_for` of `runbooks`, app.yaml's: a
    channel's card and `incident show` offer them, a page to a person does not).

    `escalation_mark`: where its escalation stood (bot.escalation.escalation_mark), carried by Escalate, so that a press
    escalates only if nothing escalated since the message was drawn (two presses escalate once)."""
    iid = incident.id
    # Each carries the incident's tag: after a move to a new store, whose #1 is another incident, an old card's
    # button is refused rather than acting on that one (handlers/incident_actions.py checks it).
    tag = stamp(incident.opened_at, incident.group_key or "") if incident.opened_at is not None else ""
    if incident.status == RESOLVED:
        return [Button(Action.REOPEN.value, iid, label="Reopen", tag=tag)]
    firing = int(incident.firing_count or 0)
    confirm = f"Resolve #{iid}?"
    if firing:
        they = "they keep" if firing != 1 else "it keeps"
        confirm = (f"Resolve #{iid} while {firing} alert{'s are' if firing != 1 else ' is'} still firing? "
                   f"If {they} firing, a new incident opens.")
    resolve = Button(Action.RESOLVE.value, iid, label="Resolve", style="danger", confirm=confirm, tag=tag)
    # Silenced (a maintenance window muted it): no Escalate, which would page nobody and was always refused; it is
    # back once an alert no silence covers arrives. Acknowledge and Resolve still say who is on it and end it. Nor on
    # an incident whose route names no escalation policy: there is nothing to escalate to, and a press only ever
    # answered so (`/incident page ID PERSON` pages someone; `/incident escalate ID` still answers that).
    # Nor once every step of the escalation ran (ESCALATION_DONE): a press only answered so; the card says to page.
    escalate = [] if incident.silenced or not incident.escalation or escalation_mark == ESCALATION_DONE else [
        Button(Action.ESCALATE.value, iid, arg=escalation_mark, label="Escalate", tag=tag)]
    run = [_run_button(rb, iid, tag) for rb in runbooks_for(incident, runbooks)]
    if incident.status == ACKNOWLEDGED:
        return [*escalate, resolve, *run]
    if incident.status == TRIGGERED:
        acknowledge = Button(Action.ACKNOWLEDGE.value, iid, label="Acknowledge", style="primary", tag=tag)
        return [acknowledge, *escalate, resolve, *run]
    return []


def _run_button(runbook: Any, iid: int, tag: str) -> Button:
    """Run: <title>, asking first what it runs and whether an approver must approve it (medium and high risk)."""
    after = "" if runbook.risk == "low" else f" It is {runbook.risk} risk: it runs once an approver approves it."
    what = "; then ".join(code(command_line(step.run)) for step in runbook.steps)
    ask = f"Run {runbook.title} on #{iid}? It runs {what}.{after}"
    if len(ask) > CONFIRM_MAX:  # (Slack's dialog holds 300 characters)
        ask = f"Run {runbook.title} on #{iid}? Its commands are too long for this dialog: `/incident runbook {iid}` " \
              f"shows them whole.{after}"
    return Button(Action.RUN_RUNBOOK.value, iid, arg=runbook.id, label=f"Run: {one_line(runbook.title, LABEL_MAX)}",
                  style="danger" if runbook.risk == "high" else "default", confirm=one_line(ask, CONFIRM_MAX), tag=tag)


def thread_line(event: str, details: Mapping[str, Any], *, actor_name: str | None) -> str:
    """One short line for the incident's thread. Names are plain text: nobody is mentioned."""
    who = person_name(actor_name or "")
    by = f" by {who}" if who else ""
    if event == "incident.acknowledged":
        return f"Acknowledged{by}"
    if event == "incident.escalated":
        to = person_name(str(details.get("to") or ""))
        step = details.get("step")
        return f"Escalated{by}" + (f" to {to}" if to else "") + (f" (step {step})" if step else "")
    if event == "alerts.grouped":
        n = _count(details)
        return f"{n} new alert{'s' if n != 1 else ''}"
    if event == "alerts.resolved":
        n = _count(details)
        source = one_line(str(details.get("source") or ""), NAME_MAX) or "the source"
        return f"{n} alert{'s' if n != 1 else ''} resolved by {source}"
    if event == "incident.resolved":
        if details.get("by") == "source":
            source = one_line(str(details.get("source") or ""), NAME_MAX) or "the source"
            return f"Resolved by {source}: every alert stopped firing"
        return f"Resolved{by}"
    if event == "incident.reopened":
        return f"Reopened{by}"
    # worded where it happened (an escalation's, a page's, a maintenance window's end: handlers/escalation.py,
    # paging.py, silences.py)
    if details.get("line"):
        return one_line(str(details["line"]), 300)
    words = event.rsplit(".", 1)[-1].replace("_", " ").strip() or "updated"
    return f"{words.capitalize()}{by}"


def incident_links(incident: Any, alerts: Sequence[Any]) -> list[tuple[str, str]]:
    """(label, url) for the graph, runbook, dashboard, panel and silence; each URL once, http(s) only."""
    pools = [incident.links or {}]
    for alert in reversed(list(alerts)):  # the newest alert's links first
        pools.append(alert.links or {})
        pools.append({kind: (alert.annotations or {}).get(note) for kind, note, _ in LINK_KINDS})
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for kind, _, label in LINK_KINDS:
        url = next((u for u in (safe_url(p.get(kind)) for p in pools) if u), None)
        if url and url not in seen:
            seen.add(url)
            out.append((label, url))
    return out


def safe_url(value: Any) -> str | None:
    """An http(s) URL with the characters that break chat link syntax percent-encoded; None otherwise."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    if not url.lower().startswith(("http://", "https://")) or len(url) > 2000:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return None
    return "".join(_URL_UNSAFE.get(c, c) for c in url)


def span(delta: timedelta) -> str:
    """A duration as people say it: 40 s, 12 min, 1 h 5 min, 2 d 3 h."""
    s = max(0, int(delta.total_seconds()))
    if s < 60:
        return f"{s} s"
    m = s // 60
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def clock(when: datetime, now: datetime, zone: ZoneInfo) -> str:
    """`3 Mar 14:03 CET`, with the year when it is not `now`'s. Always the day: a card is read long after it is drawn
    (the next morning, "14:03" alone would be yesterday's), and it says when, never how long ago, for the same
    reason."""
    local = _utc(when).astimezone(zone)
    year = f" {local.year}" if local.year != _utc(now).astimezone(zone).year else ""
    return f"{local.day} {local:%b}{year} {local:%H:%M %Z}"


def one_line(value: Any, limit: int) -> str:
    """The text on one line (runs of whitespace become one space), cut to `limit` characters."""
    text = " ".join(str(value or "").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def person_name(value: str) -> str:
    """A display name that cannot mention anyone: one line, no leading @."""
    return one_line(value, NAME_MAX).lstrip("@").strip()


def _facts(incident: Any, state: str, now: datetime, zone: ZoneInfo, ack_name: str,
           resolved_name: str | None) -> list[dict[str, Any]]:
    facts: list[dict[str, Any]] = []

    def add(key: str, label: str, value: str, text: str, at: datetime | None = None) -> None:
        """`at`: the moment the fact ends with, as `when` (its words, which end `value` and `text` too) and `at`
        (Unix seconds), so that a platform that can write a time for each reader (Slack) does."""
        fact: dict[str, Any] = {"key": key, "label": label, "value": value, "text": text}
        if at is not None:
            fact.update(at=int(_utc(at).timestamp()), when=clock(at, now, zone))
        facts.append(fact)

    labels = incident.labels or {}
    service = next((labels[k] for k in ("service", "app", "job") if labels.get(k)), "")
    instance = next((labels[k] for k in ("instance", "host", "asset") if labels.get(k)), "")
    if service:
        add("service", "Service", one_line(service, 100), f"service {one_line(service, 100)}")
    if instance:
        add("instance", "Instance", one_line(instance, 100), f"instance {one_line(instance, 100)}")
    started = clock(incident.opened_at, now, zone)
    add("started", "Started", started, f"started {started}", at=incident.opened_at)
    count = int(incident.alert_count or 0)
    reporters = list(incident.sources or [])
    shown = [one_line(s, 40) for s in reporters[:3]] + ([f"{len(reporters) - 3} more"] if len(reporters) > 3 else [])
    sources = and_list(shown)
    alerts = f"{count}" + (f" from {sources}" if sources else "")
    add("alerts", "Alerts", alerts, f"{count} alert{'s' if count != 1 else ''}" + (f" from {sources}" if sources else ""))
    firing = int(incident.firing_count or 0)
    if state != "resolved" and count > 1:
        add("firing", "Firing", f"{firing} of {count}", f"{firing} of {count} still firing")
    add("priority", "Priority", str(incident.priority), f"priority {incident.priority}")
    if incident.acknowledged_at is not None and incident.status != TRIGGERED:
        when = clock(incident.acknowledged_at, now, zone)
        add("acknowledged", "Acknowledged", f"by {ack_name}, {when}", f"acknowledged by {ack_name}, {when}",
            at=incident.acknowledged_at)
    if state == "resolved" and incident.resolved_at is not None:
        took = span(_utc(incident.resolved_at) - _utc(incident.opened_at))
        by = _resolver(incident.resolved_by, resolved_name)
        add("resolved", "Resolved", f"after {took}" + (f", by {by}" if by else ""),
            f"resolved after {took}" + (f" by {by}" if by else ""))
    return facts


def who_did(who: str | None, names: Mapping[str, str]) -> str:
    """Who did something, as stored (`alice`, `person:alice`, `source:am`), as people read it: Alice, or "its
    source, am"."""
    kind, _, rest = (who or "").partition(":")
    if kind == "source":
        return f"its source, {rest}"
    person = rest if kind == "person" else (who or "")
    return names.get(person, person or "someone")


def _resolver(resolved_by: str | None, name: str | None) -> str:
    if name:
        return person_name(name)
    raw = str(resolved_by or "")
    if raw.startswith("source:"):
        return one_line(raw.removeprefix("source:"), 40) or "the source"
    return person_name(raw)


def _default_next_step(state: str, ack_name: str, resolved_after: str | None, incident_id: Any, *,
                       escalates: bool = True) -> str:
    if state == "resolved":
        head = (resolved_after or "resolved").capitalize()
        return f"{head}. Nothing more to do; reopen it if the problem comes back."
    if state == "silenced":
        return "Silenced by a maintenance window: nobody is paged."
    if state == "acknowledged":
        who = "Someone" if ack_name == "someone" else ack_name
        if not escalates:  # (no policy: the card has no Escalate)
            return (f"{who} is on it. Resolve when fixed, or page someone for help with "
                    f"`/incident page {incident_id} PERSON`.")
        return f"{who} is on it. Resolve when fixed, or escalate for help."
    return "Waiting for someone to acknowledge."


def _latest(alerts: Sequence[Any], total: int, firing: int, *, open_: bool) -> dict[str, str] | None:
    """The most recently received alert, with "showing the last of N" when there are several. An open incident's card
    shows the newest alert still firing instead: after a partial resolve the newest received is the one that stopped
    (its resolve came last), and an on-call reading it as the news would chase a problem that is gone (the thread
    and the Firing fact say it resolved). One that resolved is shown only when none drawn fires, marked so."""
    if not alerts:
        return None
    floor = datetime.min.replace(tzinfo=UTC)

    def newest(pool: list[tuple[int, Any]]) -> Any:
        return max(pool, key=lambda p: (_utc(getattr(p[1], "last_received", None) or floor), p[0]))[1]

    alert = newest(list(enumerate(alerts)))
    showing = f"showing the last of {total}" if total > 1 else ""
    if open_ and alert.status == "resolved":  # (an alert's status: firing or resolved)
        live = [(i, a) for i, a in enumerate(alerts) if a.status != "resolved"]
        if live:
            alert = newest(live)
            showing = f"showing the last of {firing} still firing" if firing > 1 else "showing the one still firing"
        else:
            showing = "; ".join(w for w in ("resolved", showing) if w)
    notes = alert.annotations or {}
    summary = one_line(alert.summary, SUMMARY_MAX) or one_line((alert.labels or {}).get("alertname"), 200) or "alert"
    detail = str(notes.get("description") or "").strip()
    if len(detail) > DETAIL_MAX:
        detail = detail[: DETAIL_MAX - 1].rstrip() + "\u2026"
    return {
        "summary": summary,
        "status": str(alert.status),
        "detail": "" if one_line(detail, DETAIL_MAX) == summary else detail,
        "evaluated": alert_values(notes),
        "value_string": one_line(notes.get("value"), DETAIL_MAX),
        "showing": showing,
    }


def alert_values(annotations: Mapping[str, Any] | None) -> str:
    """What the alert's query evaluated to, on one short line: Grafana's `values` (`B=15234.5, C=1`, kept in the
    `values` annotation), else its `valueString` or a rule's own `value` annotation. For a Grafana rule without a
    summary this is the news: the title only names the rule. "" when the alert says none."""
    notes = annotations if isinstance(annotations, Mapping) else {}
    return one_line(notes.get("values") or notes.get("value"), VALUES_MAX)


def and_list(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c` (empty items left out)."""
    items = [i for i in items if i]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + (f" and {items[-1]}" if items else "")


def _count(details: Mapping[str, Any]) -> int:
    try:
        return max(0, int(details.get("count", 1)))
    except (TypeError, ValueError):
        return 1


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def incident_card(incident: Any, alerts: Sequence[Any], *, now: datetime, tz: str,
                  names: Mapping[str, str] | None = None, next_step: str = "",
                  escalation_mark: str = "", runbooks: Sequence[Any] = ()) -> Outbound:
    """The incident's message: its context, its buttons, and a plain-text fallback.

    `names` maps person ids (as stored in `acknowledged_by` / `resolved_by`) to display names; `escalation_mark`
    is what the Escalate button carries (see buttons_for).
    """
    names = names or {}
    resolver = (incident.resolved_by or "").removeprefix("person:")
    context = incident_context(incident, alerts, now=now, tz=tz,
                               acknowledged_name=names.get(incident.acknowledged_by or ""),
                               resolved_name=names.get(resolver),
                               next_step=next_step if incident_state(incident) in ("firing", "acknowledged") else None)
    return Outbound("incident", context, buttons_for(incident, escalation_mark, runbooks), text=context["headline"])
