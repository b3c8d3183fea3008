"""Chat work that is not an incident's message: a direct message to a person, a notice in a channel.

Both are outbox rows with no incident (`incident_id` NULL), queued in the
caller's transaction and delivered by the outbox worker after the commit:
- `direct`: `channel` is `@person-id`; sent to the person's private chat on the
  first platform of `details.platforms` (default: their `page_via`, then
  Telegram, Slack, Teams) that is on and knows them. `details.buttons` become
  the platform's buttons (Accept / Decline of a swap).
- `notice`: `channel` is a `channels[].id`; a plain message posted there.

And, for an incident's own messages in every channel it is routed to, `queue_redraw` (redraw the
parent) and `queue_thread_line` (one line in its thread).

A runbook request's thread lines and its approvers' direct messages carry, in their details, the run they ask about
(ASKS) and their words as they read once it is decided (ASKED_WORDS); the outbox keeps where each went
(`message`, as a page's). When the request is decided, an `asked` row (asked_row) redraws each of them with how it
ended, without its buttons; one not sent yet by then goes without them (a thread line), or not at all (a direct
message).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot.chat import Button
from storage.models import Incident, OutboxItem


def button_spec(button: Button) -> dict[str, Any]:
    return {"action": str(button.action), "id": button.incident_id, "arg": button.arg, "label": button.label,
            "style": button.style, "confirm": button.confirm, "tag": button.tag}


def button_from(spec: dict[str, Any]) -> Button:
    return Button(spec["action"], int(spec["id"]), arg=spec.get("arg") or "", label=spec.get("label") or "",
                  style=spec.get("style") or "default", confirm=spec.get("confirm"), tag=spec.get("tag") or "")


def direct_row(person_id: str, text: str, now: datetime, *, event: str = "direct", buttons: Sequence[Button] = (),
               platforms: Sequence[str] = (), due_at: datetime | None = None,
               if_undeliverable: tuple[str, str] | None = None, swap: int | None = None,
               extra: Mapping[str, Any] | None = None) -> OutboxItem:
    """`if_undeliverable=(person_id, text)`: when this message cannot be delivered, that person is told `text`
    with the reason (e.g. the one who asked for something the recipient never saw); with `swap`, only while that
    swap still waits for an answer (else the message no longer matters). `extra`: more details (a runbook
    request's ASKS and ASKED_WORDS)."""
    details: dict[str, Any] = {**(extra or {}), "text": text, "buttons": [button_spec(b) for b in buttons]}
    if platforms:
        details["platforms"] = list(platforms)
    if if_undeliverable is not None:
        details["if_undeliverable"] = {"to": if_undeliverable[0], "text": if_undeliverable[1]}
        if swap is not None:
            details["if_undeliverable"]["swap"] = swap
    return OutboxItem(created_at=now, due_at=due_at or now, incident_id=None, channel=f"@{person_id}", kind="direct",
                      event=event, details=details)


def notice_row(channel: str, text: str, now: datetime, *, event: str = "notice",
               due_at: datetime | None = None, mention: str | None = None) -> OutboxItem:
    """`mention="here"` asks everyone in the channel (Slack's `<!here>`)."""
    details: dict[str, Any] = {"text": text}
    if mention:
        details["mention"] = mention
    return OutboxItem(created_at=now, due_at=due_at or now, incident_id=None, channel=channel, kind="notice",
                      event=event, details=details)


def queue_direct(session: AsyncSession, person_id: str, text: str, now: datetime, **kwargs: Any) -> None:
    """Send `text` (and buttons) to a person's private chat after the caller's transaction commits."""
    session.add(direct_row(person_id, text, now, **kwargs))


def queue_notice(session: AsyncSession, channel: str, text: str, now: datetime, **kwargs: Any) -> None:
    """Post `text` in a configured channel after the caller's transaction commits."""
    session.add(notice_row(channel, text, now, **kwargs))


PAGES = "@pages"  # the channel of a row that redraws the pages an incident's escalation sent (see page_redraw_row)


FIRED = "fired"  # in a page redraw row's details: the step (and run) whose firing queued it


def page_redraw_row(incident_id: int, now: datetime, *, fired: tuple[int, int] | None = None) -> dict[str, Any]:
    """A row that redraws, as the incident now is, the pages its escalation sent to people's private chats: someone
    acted elsewhere, and the page still said Firing, with an Acknowledge nobody needs any more. `fired`: (step,
    run): the escalation moved on to that step (1-based): only the pages of the step before are redrawn, to say so
    (once each: their words then hold whatever comes next; see PageLanes._page_drawn)."""
    return {"created_at": now, "due_at": now, "incident_id": incident_id, "channel": PAGES, "kind": "pages",
            "event": "incident.changed", "details": {FIRED: list(fired)} if fired is not None else {},
            "status": "pending", "attempts": 0, "last_error": None}


def queue_redraw(session: AsyncSession, incident: Incident, now: datetime) -> None:
    """Redraw the incident's message in every channel it is routed to."""
    for channel in incident.channels:
        session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=channel, kind="update",
                               event="incident.changed", details={}))


def queue_thread_line(session: AsyncSession, incident: Incident, now: datetime, event: str,
                      details: dict[str, Any], *, channels: Sequence[str] | None = None) -> None:
    """A line in the incident's thread (worded by `bot.view.thread_line`), in `channels` or every routed one."""
    for channel in incident.channels if channels is None else channels:
        session.add(OutboxItem(created_at=now, due_at=now, incident_id=incident.id, channel=channel, kind="reply",
                               event=event, details=details))


# In a thread line's details: it says nobody has acknowledged (an escalation's channel step): not sent once someone has.
UNACKNOWLEDGED = "unacknowledged"
ASKS = "asks"  # in a row's details: the runbook run (its id) the thread line or direct message asks to decide
ASKED_WORDS = "asked"  # in the same: what it says once decided, before how it ended ("Alice asked to run ...")
SETTLED = "settled"  # in the same: it went, or was redrawn, saying how the request ended (nothing more to redraw)
ASKED = "@asked"  # the channel of a row that redraws them once the request is decided (see asked_row)


def asked_row(incident_id: int | None, run_id: int, outcome: str, now: datetime) -> OutboxItem:
    """A row that redraws the messages asking to decide runbook run `run_id` (its thread lines, its approvers'
    direct messages) with `outcome` ("Rejected by Bob."), without their buttons: it was decided, and they went on
    asking, with buttons whose press only said it was too late."""
    return OutboxItem(created_at=now, due_at=now, incident_id=incident_id, channel=ASKED, kind="asked",
                      event="runbook.decided", details={ASKS: run_id, "outcome": outcome})


SWAP_ASKS = "swap_asks"  # in a direct message's details: the swap (its id) its buttons act on
LIVE_WHILE = "live_while"  # in the same: the swap's states in which those buttons still do something


def swap_changed_row(swap_id: int, status: str, outcome: str, now: datetime, *,
                     clicked: Mapping[str, Any] | None = None) -> OutboxItem:
    """A row that redraws swap `swap_id`'s direct messages whose buttons do nothing in its new `status`: their words,
    then `outcome` ("Cancelled by Alice."), without the buttons. The other side's Accept and Decline stayed after a
    cancel, as did a second approver's Approve after the first approved. `clicked`: the message whose button made the
    change (where it went, as a row keeps it), which the click's own answer redraws."""
    return OutboxItem(created_at=now, due_at=now, incident_id=None, channel=ASKED, kind="asked", event="swap.changed",
                      details={SWAP_ASKS: swap_id, "status": status, "outcome": outcome, "clicked": clicked})


def decided_words(details: Mapping[str, Any], outcome: str) -> str:
    """A request's message as it reads once decided: its words (ASKED_WORDS), then how it ended."""
    return f"{details.get(ASKED_WORDS) or ''} {outcome}".strip()
