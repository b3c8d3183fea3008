"""An alert becomes a live Slack incident message whose buttons and commands work, end to end.

The real bot (intake, outbox worker, dispatcher, slack-bolt, slack_sdk) against the fake
Slack Web API on 127.0.0.1; requests signed the way Slack signs them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlmodel import select

from adapters.slack import escape, manifest
from bot.auth import sign
from handlers.outbox import Budget, _Buckets
from storage.models import AuditEvent, Incident, IncidentMessage
from tests.botkit import Harness, bot_on, fixture, running_bot, untagged
from tests.fake_slack import FakeSlack, signed

SIGNING = "slack-signing-secret-for-tests"
CLICK = json.loads((Path(__file__).parent / "fixtures" / "slack" / "block_actions.json").read_text())


def slack_config(slack: FakeSlack) -> str:
    return (f"adapters:\n  slack: {{bot_token: {slack.token}, signing_secret: {SIGNING}, "
            f"api_url: '{slack.api_url}'}}\n")


class Slack:
    """The test's hands: Slack's side of the conversation with the running bot."""

    def __init__(self, h: Harness, fake: FakeSlack):
        self.h, self.fake = h, fake
        self.clicks = 0

    async def event(self, body: str) -> tuple[int, float]:
        started = time.monotonic()
        resp = await self.h.client.post("/slack/events", data=body, headers=signed(body, secret=SIGNING))
        return resp.status, time.monotonic() - started

    async def click(self, value: str, ts: str, *, user: str = "U01ALICE", action_ts: str | None = None,
                    private: bool = False) -> tuple[int, float, str]:
        """`private`: a button of a card only the clicker sees (`/incident show`), which Slack sends as an ephemeral
        container without the message."""
        self.clicks += 1
        key = f"click{self.clicks}"
        payload: dict[str, Any] = json.loads(json.dumps(CLICK))
        payload["user"] = {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"}
        payload["container"]["message_ts"] = payload["message"]["ts"] = ts
        if private:
            payload["container"]["is_ephemeral"] = True
            del payload["message"]
        payload["response_url"] = self.fake.response_url(key)
        action = payload["actions"][0]
        action["value"], action["action_id"] = value, f"chatops:{value.split(':')[0]}"
        action["action_ts"] = action_ts or f"1700000{self.clicks:03d}.000001"
        status, elapsed = await self.event(urlencode({"payload": json.dumps(payload)}))
        return status, elapsed, key

    async def command(self, command: str, text: str, *, user: str = "U01ALICE") -> str:
        self.clicks += 1
        key = f"cmd{self.clicks}"
        form = {"token": "x", "team_id": "T0FAKE", "channel_id": "C0OPS", "channel_name": "ops", "user_id": user,
                "user_name": user.lower(), "command": command, "text": text, "response_url": self.fake.response_url(key),
                "trigger_id": "1.2.3"}
        status, _ = await self.event(urlencode(form))
        assert status == 200
        return key

    async def answer(self, key: str) -> dict[str, Any]:
        await self.fake.wait_for(lambda: self.fake.responses.get(key), timeout=15)  # (5 s ran out once under load)
        return self.fake.responses[key][-1]

    async def answers(self, key: str, count: int) -> list[dict[str, Any]]:
        """The first `count` posts to a response_url (a click on a private card: the answer, the card redrawn)."""
        await self.fake.wait_for(lambda: len(self.fake.responses.get(key, [])) >= count, timeout=15)
        return self.fake.responses[key][:count]

    def posts(self, channel: str = "C0OPS", thread: str | None = None) -> list[dict[str, Any]]:
        return [c.params for c in self.fake.called("chat.postMessage")
                if c.params.get("channel") == channel and c.params.get("thread_ts") == thread]

    def updates(self, ts: str) -> list[dict[str, Any]]:
        return [c.params for c in self.fake.called("chat.update") if c.params.get("ts") == ts]


def button_values(params: dict[str, Any], *, tagged: bool = False) -> list[str]:
    """The values of a message's buttons, without their incident's tag unless `tagged` (see botkit.untagged)."""
    blocks = params["blocks"] if isinstance(params["blocks"], list) else json.loads(params["blocks"])
    values = [e["value"] for b in blocks if b["type"] == "actions" for e in b["elements"]]
    return values if tagged else [untagged(v) for v in values]


def text_of(params: dict[str, Any]) -> str:
    return params.get("text", "") + json.dumps(params.get("blocks", ""), ensure_ascii=False)


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake)) as h:
        yield Slack(h, fake)


async def incident_posted(s: Slack) -> str:
    status, _, _ = await s.h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
    assert status == 200
    await s.fake.wait_for(lambda: s.posts(), timeout=5)
    for _ in range(100):  # the message row commits just after Slack's answer
        try:
            return await s.h.message_of(1)
        except Exception:
            await asyncio.sleep(0.02)
    return await s.h.message_of(1)


async def test_an_alert_posts_one_message_and_a_click_acknowledges_it(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    [post] = s.posts()
    assert button_values(post) == ["ack:1", "res:1"]  # (its route names no escalation policy: no Escalate)
    assert "#1" in text_of(post) and "Firing" in text_of(post)
    async with s.h.bot.db.sessions() as session:
        [message] = (await session.execute(select(IncidentMessage))).scalars().all()
    assert (message.incident_id, message.channel, message.chat_id, message.message_id) == (1, "ops-slack", "C0OPS", ts)

    status, elapsed, key = await s.click("ack:1", ts)
    assert status == 200 and elapsed < 1.0  # acknowledged at once, well inside Slack's 3 s
    assert "Acknowledged #1." in (await s.answer(key))["text"]
    await s.fake.wait_for(lambda: s.updates(ts) and s.posts(thread=ts), timeout=5)
    [update] = s.updates(ts)
    assert button_values(update) == ["res:1"] and "Acknowledged" in text_of(update)
    [line] = s.posts(thread=ts)
    assert "Acknowledged by Alice" in text_of(line)
    [incident] = await s.h.incidents()
    assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")
    async with s.h.bot.db.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(AuditEvent.action == "incident.acknowledged"))).scalar_one()
    assert (event.actor_person, event.actor_platform, event.actor_user_id, event.incident_id) == ("alice", "slack", "U01ALICE", 1)
    assert len(s.posts()) == 1  # one parent message, ever


def facts_line(params: dict[str, Any]) -> str:
    """The card's facts, as Slack gets them: the first context block's text."""
    blocks = params["blocks"] if isinstance(params["blocks"], list) else json.loads(params["blocks"])
    return next(b["elements"][0]["text"] for b in blocks if b["type"] == "context")


async def test_the_card_says_how_long_ago_in_a_time_slack_keeps_current_for_each_reader(slack: Slack) -> None:
    """The card said "started just now" until something redrew it, hours later at times. Now Slack writes how long
    ago and when (`<!date^...>`), in each reader's own time zone, and keeps it current; its fallback is the time in
    app.yaml's zone, named. The bot itself writes no "ago" that would go stale."""
    s = slack
    ts = await incident_posted(s)
    [incident] = await s.h.incidents()
    opened = int(incident.opened_at.timestamp())
    facts = facts_line(s.posts()[0])
    assert f" \u00b7 started <!date^{opened}^{{ago}} ({{date_short_pretty}} {{time}})|24 Nov 05:00 CET> \u00b7 " in facts, facts
    stale = facts.replace("{ago}", "")
    assert "ago" not in stale and "just now" not in stale
    s.h.clock.advance(timedelta(minutes=7))
    await s.click("ack:1", ts)
    await s.fake.wait_for(lambda: s.updates(ts), timeout=15)  # (5 s ran out once in CI, on PostgreSQL, under load)
    acked = facts_line(s.updates(ts)[-1])
    assert acked.endswith(f" \u00b7 acknowledged by Alice, <!date^{opened + 420}^{{ago}} ({{date_short_pretty}} {{time}})"
                          "|24 Nov 05:07 CET>"), acked
    assert f"started <!date^{opened}^" in acked and "ago" not in acked.replace("{ago}", "")


async def test_resolve_then_reopen_redraws_the_buttons(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    await s.click("res:1", ts)
    await s.fake.wait_for(lambda: s.updates(ts), timeout=5)
    assert button_values(s.updates(ts)[-1]) == ["reo:1"]
    await s.click("reo:1", ts)
    await s.fake.wait_for(lambda: len(s.updates(ts)) == 2 and len(s.posts(thread=ts)) == 2, timeout=5)
    assert button_values(s.updates(ts)[-1]) == ["ack:1", "res:1"]
    lines = [text_of(p) for p in s.posts(thread=ts)]
    assert "Resolved by Alice" in lines[0] and "Reopened by Alice" in lines[1]
    assert await s.h.actions(1) == ["incident.opened", "alert.received", "incident.resolved", "incident.reopened"]
    # chatops_audit_events_total counts what people did too, not only what intake and the outbox recorded
    metric = s.h.bot.metrics.registry.get_sample_value("chatops_audit_events_total")
    assert metric == await s.h.count(AuditEvent) == 4


async def test_strangers_and_people_without_the_role_are_told_why_and_nothing_changes(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    _, _, key = await s.click("ack:1", ts, user="U09NOBODY")
    answer = await s.answer(key)
    assert answer["response_type"] == "ephemeral"
    assert "I don't know you yet. Add `slack: U09NOBODY` to your entry under `people:` in app.yaml" in answer["text"]
    _, _, key = await s.click("ack:1", ts, user="U02BOB")
    assert "Acknowledge needs the `responder` role, and Bob has no roles" in (await s.answer(key))["text"]
    [incident] = await s.h.incidents()
    assert incident.status == "triggered" and "incident.acknowledged" not in await s.h.actions()
    assert s.updates(ts) == []
    # Bob's refusal is audited (who tried what, and the role it needs); the stranger's is not (anyone may write)
    async with s.h.bot.db.sessions() as session:
        refused = (await session.execute(select(AuditEvent).where(AuditEvent.action == "access.refused"))
                   ).scalars().all()
    assert [(e.actor_person, e.actor_user_id, e.incident_id, e.details) for e in refused] == [
        ("bob", "U02BOB", 1, {"what": "Acknowledge", "needs": "responder", "roles": []})]


async def test_a_typed_command_without_the_role_is_refused_as_its_button_is_with_what_to_do(slack: Slack) -> None:
    """Bob has no roles: typing what a button does gets the button's answer (whose role, what to do about it), said
    of the command he typed, not a bare "needs the role"."""
    s = slack
    ts = await incident_posted(s)
    _, _, key = await s.click("res:1", ts, user="U02BOB")
    clicked = (await s.answer(key))["text"]
    assert clicked == ("Resolve needs the `responder` role, and Bob has no roles. Ask whoever maintains app.yaml to "
                       "add it to your `roles`.")
    for command, text, said in (("/ack", "1", "/ack"), ("/incident", "resolve 1", "/incident resolve"),
                                ("/incident", "ack 1", "/incident ack"), ("/chatops", "incident reopen 1",
                                                                          "/incident reopen"),
                                ("/incident", "page 1 alice", "/incident page")):
        answer = await s.answer(await s.command(command, text, user="U02BOB"))
        assert answer["text"] == f"`{said}`" + clicked.removeprefix("Resolve"), (command, text)
    [incident] = await s.h.incidents()
    assert incident.status == "triggered" and await s.h.actions() == ["incident.opened", "alert.received",
                                                                      *["access.refused"] * 6]
    async with s.h.bot.db.sessions() as session:
        tried = (await session.execute(select(AuditEvent.details).where(AuditEvent.action == "access.refused")
                                       .order_by(AuditEvent.seq))).scalars().all()
    assert [t["what"] for t in tried] == ["Resolve", "/ack", "/incident resolve", "/incident ack", "/incident reopen",
                                          "/incident page"]
    # A number no incident has yet is what was tried, not an incident: its timeline would show it once it opens
    await s.answer(await s.command("/ack", "7", user="U02BOB"))
    async with s.h.bot.db.sessions() as session:
        [seven] = (await session.execute(select(AuditEvent).where(AuditEvent.action == "access.refused",
                                                                  AuditEvent.subject_id == "7"))).scalars().all()
    assert (seven.subject_type, seven.incident_id) == ("incident", None)
    from bot.cli import _event_detail
    assert _event_detail("access.refused", "1", seven.details, {}) == "/ack: needs responder"  # (incidents show)


async def test_paging_someone_who_could_not_acknowledge_the_page_is_refused_and_sends_nothing(slack: Slack) -> None:
    """Bob has no `responder` role: his Acknowledge on a page would be refused while the incident stays triggered."""
    s = slack
    await incident_posted(s)
    answer = await s.answer(await s.command("/incident", "page 1 bob"))
    assert answer["text"] == ("Bob was not paged: they have no `responder` role, so they could not acknowledge the "
                              "page. Add `responder` to their `roles` under `people:` in app.yaml and restart the "
                              "bot, or page someone who has it.")
    assert s.fake.called("conversations.open") == [] and s.posts(channel="D02BOB") == []
    actions = await s.h.actions(1)
    assert "incident.paged" not in actions and "incident.page_failed" not in actions
    assert (await s.h.incidents())[0].status == "triggered"


async def test_two_quick_clicks_acknowledge_once_and_a_redelivered_click_is_dropped(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    (_, _, first), (_, _, second) = [await s.click("ack:1", ts) for _ in range(2)]
    texts = sorted([(await s.answer(first))["text"], (await s.answer(second))["text"]])
    assert texts == ["#1 is already acknowledged by Alice.", "Acknowledged #1."]
    await s.click("ack:1", ts, action_ts="1700000001.000001")  # Slack retrying the first delivery
    await s.fake.wait_for(lambda: s.posts(thread=ts), timeout=5)
    assert (await s.h.actions(1)).count("incident.acknowledged") == 1
    assert (await s.answer(await s.command("/incident", "resolve 1")))["text"] == "Resolved #1."
    again = await s.answer(await s.command("/incident", "ack 1"))
    assert again["text"] == "#1 is already resolved by Alice."  # a name, not an id or a storage prefix
    assert len(s.posts(thread=ts)) == 1


async def test_forged_and_stale_requests_are_refused(slack: Slack) -> None:
    s = slack
    body = urlencode({"payload": json.dumps(CLICK)})
    forged = await s.h.client.post("/slack/events", data=body, headers=signed(body, secret="not-the-secret"))
    stale = await s.h.client.post("/slack/events", data=body,
                                  headers=signed(body, secret=SIGNING, ts=int(time.time()) - 600))
    assert (forged.status, stale.status) == (401, 401)


async def test_slash_commands_list_show_and_act(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    listing = await s.answer(await s.command("/incident", "list"))
    assert "1 open incident" in listing["text"] and "CPU" in listing["text"]
    acked = await s.answer(await s.command("/ack", "1"))
    assert acked["text"] == "Acknowledged #1."
    await s.fake.wait_for(lambda: s.updates(ts), timeout=5)
    shown = await s.answer(await s.command("/incident", "show 1"))
    assert button_values(shown) == ["res:1"]
    resolved = await s.answer(await s.command("/chatops", "incident resolve 1"))
    assert resolved["text"] == "Resolved #1."
    # a slash typed after the umbrella (as Teams takes it) is no part of the word; empty quotes are no command
    reopened = await s.answer(await s.command("/chatops", "/incident reopen 1"))
    assert reopened["text"] == "Reopened #1."
    assert (await s.answer(await s.command("/chatops", '""')))["text"].startswith("Commands:")
    assert (await s.answer(await s.command("/chatops", "/incident resolve 1")))["text"] == "Resolved #1."
    usage = await s.answer(await s.command("/incident", "frobnicate 1"))
    assert "I don't know `/incident frobnicate`" in usage["text"] and "/incident list" in usage["text"]
    missing = await s.answer(await s.command("/ack", "nope"))
    assert missing["text"] == "Usage: `/ack ID`, for example `/ack 42`."
    for digits in ("\u00b2", "\u0661"):  # a superscript 2 was a traceback; an Arabic-Indic 1 acknowledged #1
        odd = await s.answer(await s.command("/ack", digits))
        assert odd["text"] == "Usage: `/ack ID`, for example `/ack 42`.", digits
    helped = await s.answer(await s.command("/chatops", "help"))
    assert "`/ack ID`: acknowledge an incident" in helped["text"]
    # Slack has no /start (no such slash command in the app): on Slack it is typed under the umbrella
    assert "`/chatops start`: who the bot thinks you are" in helped["text"] and "`/start`" not in helped["text"]
    denied = await s.answer(await s.command("/ack", "1", user="U02BOB"))
    assert "needs the `responder` role" in denied["text"]


async def test_a_command_typed_with_unicode_spaces_is_understood(slack: Slack) -> None:
    """Option+Space on a Mac types a no-break space; other keyboards and pasted text bring thin, figure or zero-width
    spaces. They look like a space, so they separate words as one does, and a zero-width one is no part of a word."""
    s = slack
    await incident_posted(s)
    for text in ("show\u00a01", "show\u20071", "show\u202f1", "show\u200b 1", "\u200bshow\u30001\u200b"):
        shown = await s.answer(await s.command("/incident", text))
        assert button_values(shown) == ["ack:1", "res:1"], (text, shown["text"])
    acked = await s.answer(await s.command("/chatops", "ack\u00a01"))
    assert acked["text"] == "Acknowledged #1."


async def test_a_click_on_the_private_card_redraws_it_and_tells_the_clicker(slack: Slack) -> None:
    """`/incident show` answers with a card only its asker sees; no API call edits it, only the click's response_url.
    Acknowledge on it acknowledged, and the card kept Firing and its Acknowledge button."""
    s = slack
    ts = await incident_posted(s)
    shown = await s.answer(await s.command("/incident", "show 1"))
    assert button_values(shown) == ["ack:1", "res:1"]
    _, _, key = await s.click("ack:1", "1700000099.000100", private=True)
    told, redrawn = await s.answers(key, 2)
    assert told == {"text": "Acknowledged #1.", "response_type": "ephemeral", "replace_original": False}
    assert redrawn["replace_original"] is True and redrawn["response_type"] == "ephemeral"
    assert button_values(redrawn) == ["res:1"] and "Acknowledged" in text_of(redrawn)
    assert (await s.h.incidents())[0].status == "acknowledged"
    await s.fake.wait_for(lambda: s.updates(ts), timeout=5)  # and the channel's card, as for any click
    _, _, key = await s.click("res:1", "1700000099.000100", private=True)
    told, redrawn = await s.answers(key, 2)
    assert told["text"] == "Resolved #1." and button_values(redrawn) == ["reo:1"]
    _, _, key = await s.click("ack:1", "1700000099.000100", private=True, user="U09NOBODY")
    await s.answer(key)
    await asyncio.sleep(0.2)  # a stranger changes nothing: told why, and the card stays as it is
    [refused] = s.fake.responses[key]
    assert "I don't know you yet" in refused["text"] and refused["replace_original"] is False


async def test_an_id_past_what_the_store_holds_is_an_unknown_incident_not_an_error(slack: Slack) -> None:
    """On PostgreSQL the id columns hold 32 bits: 2147483648 is an id no incident can have, said so like any other."""
    s = slack
    ts = await incident_posted(s)
    for command, text in [("/ack", "2147483647"), ("/ack", "2147483648"), ("/incident", "show 2147483648"),
                          ("/incident", "escalate #2147483648"), ("/incident", "resolve 999999999999999999"),
                          ("/incident", "page 2147483648 alice")]:
        answer = await s.answer(await s.command(command, text))
        number = text.split()[-1] if command == "/ack" else text.split()[1].lstrip("#")
        assert answer["text"] == f"There is no incident #{number}.", (command, text)
    huge = await s.answer(await s.command("/ack", "9" * 5000))  # more digits than int() takes
    assert huge["text"] == "Usage: `/ack ID`, for example `/ack 42`."
    _, _, key = await s.click("ack:2147483648", ts)  # no button the bot draws carries it
    assert (await s.answer(key))["text"].startswith("This button is not valid")
    assert (await s.h.incidents())[0].status == "triggered"
    assert await s.h.actions(1) == ["incident.opened", "alert.received"]


async def test_a_title_holding_backticks_or_mentions_stays_inside_the_list_table(slack: Slack) -> None:
    s = slack
    payload = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
    payload["alerts"][0]["annotations"]["summary"] = "CPU ```high``` on\nhost *x* <!channel>\n````"
    assert (await s.h.post("am", payload))[0] == 200
    listing = (await s.answer(await s.command("/incident", "list")))["text"]
    head, table, tail = listing.split("```")  # one code block, whatever the title holds
    assert head == "1 open incident, newest first:\n" and tail == ""
    assert "CPU \u02cb\u02cb\u02cbhigh\u02cb\u02cb\u02cb on host *x* &lt;!channel&gt; \u02cb\u02cb\u02cb\u02cb" in table
    assert "<!channel>" not in listing


async def test_a_long_argument_is_echoed_cut_short_not_whole(slack: Slack) -> None:
    s, long = slack, "x" * 12_000
    unknown = (await s.answer(await s.command("/incident", long)))["text"]
    assert unknown == f"I don't know `/incident {'x' * 79}\u2026`. Usage: `/incident list | show ID | ack ID | " \
                      "escalate ID | resolve ID | reopen ID | page ID PERSON | runbook ID [RUNBOOK]`"
    nobody = (await s.answer(await s.command("/incident", f"page 1 {long}")))["text"]
    assert nobody == f"I don't know '{'x' * 79}\u2026' (people in app.yaml: alice, bob)."
    command = (await s.answer(await s.command("/chatops", long)))["text"]
    assert command.startswith(f"`{'x' * 79}\u2026` is not one of my commands.\nCommands:") and "x" * 80 not in command


async def test_a_mention_with_words_that_are_no_command_gets_the_help_not_an_unknown_slash_command(
        slack: Slack) -> None:
    """`@chatops hello` answered "I don't know `/hello`", a slash nobody typed."""
    s = slack
    event = {"type": "event_callback", "event_id": "Ev0HELLO", "event_time": 1700000003,
             "event": {"type": "app_mention", "user": "U01ALICE", "text": "<@U0BOT> hello there",
                       "ts": "1700000003.000200", "channel": "C0OPS"}}
    status, _ = await s.event(json.dumps(event))
    assert status == 200
    await s.fake.wait_for(lambda: s.fake.called("chat.postEphemeral"), timeout=5)
    [answer] = [c.params for c in s.fake.called("chat.postEphemeral")]
    assert answer["user"] == "U01ALICE"
    assert answer["text"].startswith("`hello` is not one of my commands.\nCommands:") and "/hello" not in answer["text"]


async def mention(s: Slack, text: str, ts: str, *, thread: str | None = None) -> dict[str, Any]:
    """`@chatops TEXT` by Alice in #ops (in `thread`, when given): the ephemeral answer Slack shows, or not."""
    s.fake.said("C0OPS", ts, thread, text=text)  # Slack holds the person's message before it sends the event
    event: dict[str, Any] = {"type": "app_mention", "user": "U01ALICE", "text": text, "ts": ts, "channel": "C0OPS"}
    if thread:
        event["thread_ts"] = thread
    before = len(s.fake.ephemerals)
    status, _ = await s.event(json.dumps({"type": "event_callback", "event_id": f"Ev{ts}", "event_time": 1700000003,
                                          "event": event}))
    assert status == 200
    await s.fake.wait_for(lambda: len(s.fake.ephemerals) > before, timeout=5)
    return s.fake.ephemerals[before]


async def test_the_answer_to_a_mention_outside_a_thread_is_shown_in_the_channel(slack: Slack) -> None:
    """A top-level `@chatops ack 1` was answered in the thread of the mention itself, a thread that does not exist:
    Slack shows an ephemeral message in a thread only once the thread exists, so Alice never saw the answer."""
    s = slack
    await incident_posted(s)
    answer = await mention(s, "<@U0BOT> ack 1", "1700000003.000200")
    assert answer["text"] == "Acknowledged #1." and answer["user"] == "U01ALICE"
    assert "thread_ts" not in answer and answer["shown"]


async def test_a_mention_understands_the_incident_commands_and_answers_in_its_thread(slack: Slack) -> None:
    """`@chatops resolve 1` was "`resolve` is not one of my commands" while `@chatops ack 1` worked: a mention takes
    the `/incident` subcommands as the slash commands do."""
    s = slack
    ts = await incident_posted(s)
    answer = await mention(s, "<@U0BOT> resolve 1", "1700000004.000200", thread=ts)  # in the incident's thread
    assert answer["text"] == "Resolved #1." and answer["thread_ts"] == ts and answer["shown"]
    assert (await s.h.incidents())[0].status == "resolved"
    shown = await mention(s, "<@U0BOT> show #1", "1700000005.000200")
    assert "Resolved · Medium · #1 CPU above 90%" in shown["text"] and shown["shown"]
    listed = await mention(s, "<@U0BOT> list all", "1700000006.000200")
    assert "CPU above 90%" in listed["text"]
    reopened = await mention(s, "<@U0BOT> reopen 1", "1700000007.000200")
    assert reopened["text"] == "Reopened #1."
    usage = await mention(s, "<@U0BOT> escalate", "1700000008.000200")
    assert usage["text"] == "Usage: `/incident escalate ID`, for example `/incident escalate 42`."
    unknown = await mention(s, "<@U0BOT> hello", "1700000009.000200")
    assert unknown["text"].startswith("`hello` is not one of my commands.")


async def test_a_button_of_an_earlier_store_does_not_act_on_the_new_incident_of_its_number(tmp_path: Path) -> None:
    """After a move to a new store, incident numbers start again at #1: Resolve on an old card "#1 staging disk full"
    resolved the new, unrelated #1. A button carries its incident's tag, which the server checks; a button drawn
    before tags (none) still acts."""
    async with FakeSlack(rate_limit=False) as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}", slack_config(fake)) as h:
            s = Slack(h, fake)
            old_ts = await incident_posted(s)
            [old_card] = s.posts()
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}", slack_config(fake)) as h:
            s = Slack(h, fake)
            payload = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
            payload["alerts"][0]["labels"].update(alertname="DBDown", instance="prod-db")
            payload["alerts"][0]["fingerprint"] = "0000000000newdb"
            payload["alerts"][0]["annotations"]["summary"] = "Production database down"
            payload["groupKey"], payload["commonAnnotations"] = '{}:{alertname="DBDown"}', {}
            assert (await s.h.post("am", payload))[0] == 200
            await s.fake.wait_for(lambda: len(s.posts()) == 2, timeout=5)
            new_card = s.posts()[1]
            assert button_values(new_card, tagged=True) != button_values(old_card, tagged=True)  # both #1, each tagged
            resolve = next(v for v in button_values(old_card, tagged=True) if v.startswith("res:1."))
            _, _, key = await s.click(resolve, old_ts)
            assert (await s.answer(key)) == {
                "text": "This card belongs to an incident that no longer exists in this bot's store, so nothing was "
                        "done. Use the buttons on the incident's latest message, or `/incident list` to find it.",
                "response_type": "ephemeral", "replace_original": False}
            [incident] = await s.h.incidents()
            assert incident.status == "triggered" and "incident.resolved" not in await s.h.actions(1)
            new_ts = await s.h.message_of(1)
            _, _, key = await s.click(next(v for v in button_values(new_card, tagged=True) if v.startswith("ack:1.")),
                                      new_ts)
            assert (await s.answer(key))["text"] == "Acknowledged #1."
            _, _, key = await s.click("res:1", new_ts)  # a card drawn before buttons had tags
            assert (await s.answer(key))["text"] == "Resolved #1."


async def test_incident_list_finds_the_open_ones_behind_many_resolved(slack: Slack) -> None:
    s = slack
    await incident_posted(s)  # #1, still firing
    payload = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
    blip = payload["alerts"][0]
    payload["alerts"] = [{**blip, "labels": {**blip["labels"], "instance": f"blip-{i}"}, "fingerprint": f"b{i:04d}"}
                         for i in range(210)]
    assert (await s.h.post("am-plain", payload))[0] == 200
    for alert in payload["alerts"]:
        alert["status"] = "resolved"
    assert (await s.h.post("am-plain", payload))[0] == 200  # 210 newer incidents, all resolved by their source
    listing = await s.answer(await s.command("/incident", "list"))
    assert "1 open incident" in listing["text"] and "CPU" in listing["text"], listing["text"]
    many = await s.answer(await s.command("/incident", "list resolved"))
    assert many["text"].startswith("The newest 20 of 210 resolved incidents"), many["text"][:200]


async def test_a_storm_costs_calls_per_incident_not_per_alert(tmp_path: Path) -> None:
    async with FakeSlack(per_second=20, burst=5) as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            # Faster budgets than Slack's real ones keep the test short; the shape is the same.
            h.bot.outbox.buckets = _Buckets({"slack": Budget(chat=(1200, 5), group_chat=None, edits=(600, 5),
                                                             platform=(6000, 50))})
            s = Slack(h, fake)
            for batch in range(20):  # 2,000 alerts, 20 incidents, 100 alerts each
                body = [{"asset_name": f"app-{i % 20}", "signature": "HighLatency", "severity": "high",
                         "message": f"p99 above 2s ({batch}/{i})", "tool_source": f"probe-{batch}-{i}"}
                        for i in range(100)]
                raw = json.dumps(body)
                ts = str(int(h.clock.now().timestamp()))
                headers = {"X-Timestamp": ts, "X-Signature": "sha256=" + sign("generic-secret", raw.encode(), ts)}
                assert (await h.post("generic", raw, headers))[0] == 200
            h.clock.advance(timedelta(seconds=31))  # the "N new alerts" lines fall due
            h.bot.outbox.nudge()

            async def settled() -> bool:
                return (await h.count_pending()) == 0
            deadline = time.monotonic() + 20
            while not await settled():
                assert time.monotonic() < deadline, f"outbox not drained: {await h.pending()}"
                h.clock.advance(timedelta(seconds=0.5))  # retries after a 429 fall due on the bot's clock
                h.bot.outbox.nudge()
                await asyncio.sleep(0.1)
            parents = s.posts()
            assert len(parents) == 20
            thread_posts = [c for c in fake.called("chat.postMessage") if c.params.get("thread_ts")]
            assert len(thread_posts) <= 20  # at most one "N new alerts" line per incident here
            incidents = await h.incidents()
            assert [i.alert_count for i in incidents] == [100] * 20
            for incident in incidents:
                message = await h.message_of(incident.id)
                final = fake.messages[("C0OPS", message)]
                assert "100 alerts from generic" in json.dumps(final, ensure_ascii=False)
            assert len(fake.calls) < 200  # calls in proportion to incidents, not to 2,000 alerts


async def test_the_manifest_hints_every_subcommand_the_bot_takes(tmp_path: Path) -> None:
    """Slack shows a command's usage hint as the user types it: `/incident` hinted no reopen or page, `/oncall` no
    schedule or take. Every subcommand of every command's usage (what help shows) is in its hint, and a command
    Slack has no slash command for is one `/chatops` runs."""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
        commands = dict(h.bot.dispatcher.commands)
    hints = {c["command"].lstrip("/"): c["usage_hint"]
             for c in manifest(public_url="https://bot.example.com")["features"]["slash_commands"]}
    for name, spec in commands.items():
        if name not in hints:
            assert name == "start", f"/{name} has no slash command in the manifest"
            continue
        words = [form.split()[1] for form in spec.usage.split(" | ") if form.startswith(f"/{name} ")]
        words += [form.split()[0] for form in spec.usage.split(" | ") if not form.startswith("/")]
        subcommands = {w for w in words if w.isalpha() and w.islower()}
        assert subcommands <= set(re.findall(r"[a-z]+", hints[name])), (name, hints[name], spec.usage)
    assert set(re.findall(r"[a-z]+", hints["incident"])) >= {"list", "show", "ack", "escalate", "resolve", "reopen",
                                                              "page"}
    assert set(re.findall(r"[a-z]+", hints["oncall"])) >= {"schedule", "take"}


async def test_templates_in_the_override_dir_draw_the_message(tmp_path: Path) -> None:
    custom = tmp_path / "templates"
    custom.mkdir()
    (custom / "incident.slack.json.j2").write_text(
        '{"text": {{ ("[ours] " ~ ref ~ " " ~ title) | tojson }}, '
        '"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": {{ ("[ours] " ~ headline) | tojson }}}}]}')
    async with FakeSlack() as fake:
        extra = slack_config(fake) + f"templates: {{dir: '{custom}'}}\n"
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra) as h:
            s = Slack(h, fake)
            await incident_posted(s)
            [post] = s.posts()
            assert post["text"].startswith("[ours] #1 ") and button_values(post) == ["ack:1", "res:1"]


async def test_the_source_resolving_every_alert_resolves_the_message_and_says_so(slack: Slack) -> None:
    s = slack
    ts = await incident_posted(s)
    resolved = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
    resolved["status"] = "resolved"
    for alert in resolved["alerts"]:
        alert["status"], alert["endsAt"] = "resolved", "2026-11-24T04:05:00Z"
    assert (await s.h.post("am", json.dumps(resolved)))[0] == 200
    await s.fake.wait_for(lambda: s.updates(ts) and s.posts(thread=ts), timeout=5)
    assert button_values(s.updates(ts)[-1]) == ["reo:1"] and "Resolved" in text_of(s.updates(ts)[-1])
    assert "Resolved by am: every alert stopped firing" in text_of(s.posts(thread=ts)[0])  # the source, by name


async def test_start_tells_anyone_their_id_and_whether_it_is_linked(slack: Slack) -> None:
    s = slack
    stranger = await s.answer(await s.command("/chatops", "start", user="U09NEW"))
    assert ("Your Slack id is U09NEW. It is not linked to anyone yet: add `slack: U09NEW` to your entry under "
            "`people:` in app.yaml") in stranger["text"]
    known = await s.answer(await s.command("/chatops", "start"))
    assert "Hello Alice! Your Slack id U01ALICE is linked to `alice` (roles: responder)" in known["text"]


async def test_the_list_says_silenced_for_an_incident_a_window_muted(slack: Slack) -> None:
    """`/incident list silenced` said "triggered" in its status column while the card said Silenced."""
    s = slack
    await incident_posted(s)
    async with s.h.bot.db.transaction() as session:
        [incident] = (await session.execute(select(Incident))).scalars().all()
        incident.silenced = True
        session.add(incident)
    for which in ("silenced", "open"):
        listing = (await s.answer(await s.command("/incident", f"list {which}")))["text"]
        [row] = [line for line in listing.split("\n") if "CPU" in line]
        assert row.split()[:2] == ["1", "silenced"], listing


async def test_a_page_note_typed_with_mentions_reads_as_text_and_pings_nobody(slack: Slack) -> None:
    """Slack delivers a typed `@channel`, `@Bob` or link escaped (`<!channel>`, `<@U02BOB>`, `<url|label>`): the note
    of `/incident page` showed those raw in the thread and the page. It reads as text now, and mentions nobody."""
    s = slack
    ts = await incident_posted(s)
    typed = ("page 1 <@U01ALICE|alice> look <!channel> and <@U02BOB>, <@U07NEW|carol>, <!subteam^S01|@dbas>, "
             "<#C0OPS|ops>, <https://wiki.example/db?a=1&amp;b=2|the wiki> &lt;b&gt;")
    answer = await s.answer(await s.command("/incident", typed))
    assert "Paging Alice" in answer["text"] or "Paged Alice" in answer["text"], answer
    note = ("look @channel and @Bob, @carol, @dbas, #ops, the wiki (https://wiki.example/db?a=1&b=2) <b>")
    await s.fake.wait_for(lambda: s.posts(channel="D01ALICE") and s.posts(thread=ts), timeout=5)
    [page] = s.posts(channel="D01ALICE")
    [line] = [text_of(p) for p in s.posts(thread=ts)]
    shown = escape(note)  # (as Slack is sent any text: `<`, `>`, `&` as entities)
    for said in (text_of(page), line):
        assert shown in said, said
        for raw in ("<!channel>", "&lt;!", "&lt;@", "&lt;#", "&lt;http", "<@"):
            assert raw not in said, (raw, said)


async def test_escalate_on_the_private_card_of_an_acknowledged_incident_redraws_it_once_the_step_ran(
        tmp_path: Path) -> None:
    """Escalate on `/incident show`'s card of an acknowledged incident: the step runs in the timer beat, after the
    click's answer. The card was redrawn before it ran, still saying Alice is on it with the Escalate of step 2 it had
    (pressed again: "escalated since this message was drawn"); it is drawn once the step has run, asking Bob."""
    from tests.botkit import CONFIG

    base = CONFIG.replace("  - {match: {}, channels: [ops-slack]}",
                          "  - {match: {}, channels: [ops-slack], escalation: two}")
    extra = ("escalation_policies:\n  - {id: two, steps: [{notify: {people: [alice]}, wait: 5m}, "
             "{notify: {people: [bob]}, wait: 10m}]}\npaging: {after_hours_min_severity: low}\n")
    async with FakeSlack() as fake, bot_on("sqlite", tmp_path, "", slack_config(fake) + extra, base=base) as h:
        s = Slack(h, fake)
        await incident_posted(s)
        await s.fake.wait_for(lambda: any("Paged Alice" in c.params.get("text", "")
                                          for c in s.fake.called("chat.postMessage")), timeout=5)
        assert (await s.answer(await s.command("/ack", "1")))["text"] == "Acknowledged #1."
        shown = await s.answer(await s.command("/incident", "show 1"))
        [escalate] = [v for v in button_values(shown, tagged=True) if v.startswith("esc:")]
        _, _, key = await s.click(escalate, "1700000099.000100", private=True)
        told, redrawn = await s.answers(key, 2)
        assert told["text"] == "Escalating #1 to step 2 of 2 now."
        assert "Bob" in text_of(redrawn), text_of(redrawn)
        # Step 2 of 2 ran: a press of Escalate could only say so, so the card has none (while its wait runs, too)
        assert button_values(redrawn) == ["res:1"]


async def test_readyz_says_slack_is_not_reachable_until_it_answers_again(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Slack's auth.test fails at start (a 503, a DNS blip): /readyz and chatops_adapter_up say so, and the bot asks
    again until Slack answers, with no message to send meanwhile. It said "on" all along, and once set, the state
    would have stayed until some message went out."""
    monkeypatch.setattr("bot.server.RECHECK_FIRST", 0.5)  # (asked again 0.5 s, then 1 s later)
    async with FakeSlack() as slack:
        slack.fail("auth.test", "service_unavailable", status=503, times=2)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(slack)) as h:
            ready = await (await h.client.get("/readyz")).json()
            assert ready["status"] == "ok"
            assert ready["adapters"]["slack"].startswith("on, not reachable (slack auth.test: "), ready
            assert ready["adapters"]["slack"].endswith("); messages wait and are retried"), ready
            assert 'chatops_adapter_up{adapter="slack"} 0.0' in await (await h.client.get("/metrics")).text()
            for _ in range(50):
                ready = await (await h.client.get("/readyz")).json()
                if ready["adapters"]["slack"] == "on":
                    break
                await asyncio.sleep(0.1)
            assert ready["adapters"]["slack"] == "on"
            assert [c.status for c in slack.calls if c.method == "auth.test"] == [503, 503, 200]  # asked again
            assert 'chatops_adapter_up{adapter="slack"} 1.0' in await (await h.client.get("/metrics")).text()
