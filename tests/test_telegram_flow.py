"""One incident in a Slack channel and a Telegram group: a click on either platform redraws both.

The real bot with both adapters (slack-bolt and python-telegram-bot) against the fake Slack Web API
and the fake Telegram Bot API on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.chat import FAILED
from storage.queries import incident_timeline
from tests.botkit import Harness, fixture, running_bot, untagged
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_slack_flow import Slack, button_values, slack_config

TG_SECRET = "tg-flow-webhook-secret"
GROUP = -100123
CALLBACK = json.loads((Path(__file__).parent / "fixtures" / "telegram" / "callback_query.json").read_text())
COMMAND = json.loads((Path(__file__).parent / "fixtures" / "telegram" / "command_private.json").read_text())
# Bob may be paged (he can acknowledge the page; his Slack DM takes it); Carol could not acknowledge one
PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [responder], slack: U02BOB}
  - {id: carol, name: Carol, telegram: 333333}
"""


@dataclass
class Both:
    h: Harness
    slack: Slack
    tg: FakeTelegram
    updates: int = 0

    async def tap(self, data: str, message_id: int, *, user: int = 111111, chat: int = GROUP,
                  status: int = 200) -> dict[str, Any]:
        """Someone taps an inline button under the bot's message in the group (or a private chat); the update, which
        Telegram answered `status`. `data` without its incident's tag (`?res:1`) is the button drawn with it."""
        markup = self.tg.messages.get((chat, message_id), {}).get("reply_markup") or {}
        data = next((k["callback_data"] for row in markup.get("inline_keyboard", []) for k in row
                     if untagged(k["callback_data"]) == data), data)
        self.updates += 1
        update = json.loads(json.dumps(CALLBACK))
        update["update_id"] = 5000 + self.updates
        query = update["callback_query"]
        query["id"], query["data"] = f"cb{self.updates}", data
        query["from"]["id"] = user
        kind = {"id": chat, "type": "supergroup", "title": "Ops"} if chat < 0 else {"id": chat, "type": "private"}
        query["message"] = {**self.tg.messages[(chat, message_id)], "chat": kind}
        assert await self.deliver(update) == status
        return update

    async def deliver(self, update: dict[str, Any]) -> int:
        """Telegram posts `update` to the webhook: the status of the bot's answer."""
        resp = await self.h.client.post("/telegram/webhook", data=json.dumps(update),
                                        headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET,
                                                 "Content-Type": "application/json"})
        return resp.status

    async def type(self, text: str, *, user: int = 111111, chat: int | None = None, reply_to: int | None = None) -> str:
        """Someone types `text` in their private chat with the bot (or in the group `chat`), as a reply to the message
        `reply_to` there if given; the bot's answer."""
        self.updates += 1
        update = json.loads(json.dumps(COMMAND))
        update["update_id"] = 5000 + self.updates
        message = update["message"]
        message["from"]["id"] = message["chat"]["id"] = user
        if chat is not None:
            message["chat"] = {"id": chat, "type": "supergroup", "title": "Ops"}
        message["text"], message["message_id"] = text, 700 + self.updates
        if reply_to is not None:
            message["reply_to_message"] = self.tg.messages[(chat or user, reply_to)]
        message["entities"] = ([{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
                               if text.startswith("/") else [])
        assert await self.deliver(update) == 200

        def answer() -> str | None:
            for call in self.tg.called("sendMessage"):
                reply = call.params.get("reply_parameters") or {}
                if call.params["chat_id"] == (chat or user) and reply.get("message_id") == message["message_id"]:
                    return str(call.params["text"])
            return None
        await self.tg.wait_for(answer, timeout=5)
        return answer() or ""

    def tg_keyboard(self, message_id: int, chat: int = GROUP, *, tagged: bool = False) -> list[str]:
        """The callback data of a message's keyboard, without their incident's tag unless `tagged`."""
        markup = self.tg.messages[(chat, message_id)].get("reply_markup") or {}
        keys = [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]
        return keys if tagged else [untagged(k) for k in keys]

    def answer_to(self, text: str, chat: int) -> int:
        """The id of the bot's message in `chat` that answered the latest command reading `text`."""
        asked = max(c.params["reply_parameters"]["message_id"] for c in self.tg.called("sendMessage")
                    if c.params["chat_id"] == chat and c.params.get("reply_parameters"))
        return next(key for (where, key), m in self.tg.messages.items()
                    if where == chat and (m.get("reply_to_message") or {}).get("message_id") == asked)


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE) as h:
            yield Both(h, Slack(h, slack), tg)


async def posted_on_both(b: Both) -> tuple[str, int]:
    status, _, _ = await b.h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))  # team=dba: both
    assert status == 200
    # (15 s: a round that missed its nudge polls again within the outbox's 5 s idle poll)
    await b.slack.fake.wait_for(lambda: b.slack.posts() and b.tg.called("sendMessage"), timeout=15)
    [tg_post] = b.tg.called("sendMessage")
    assert tg_post.params["chat_id"] == GROUP and tg_post.params["parse_mode"] == "HTML"
    assert "#1" in tg_post.params["text"]
    for _ in range(100):
        try:
            return await b.h.message_of(1, "ops-slack"), int(await b.h.message_of(1, "ops-telegram"))
        except Exception:
            await asyncio.sleep(0.02)
    raise AssertionError("the incident's messages were not recorded")


async def test_a_tap_in_telegram_redraws_slack_too_and_a_click_in_slack_redraws_telegram(both: Both) -> None:
    b = both
    ts, message_id = await posted_on_both(b)
    assert b.tg_keyboard(message_id) == ["ack:1", "?res:1"]  # Resolve asks before it acts

    await b.tap("ack:1", message_id)
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    assert b.tg.called("answerCallbackQuery")[0].params.get("text") == "Acknowledged #1."
    await b.slack.fake.wait_for(lambda: b.slack.updates(ts) and b.tg_keyboard(message_id) == ["?res:1"], timeout=5)
    assert button_values(b.slack.updates(ts)[-1]) == ["res:1"]
    await b.slack.fake.wait_for(lambda: b.slack.posts(thread=ts) and _tg_replies(b, message_id), timeout=5)
    assert "Acknowledged by Alice" in b.slack.posts(thread=ts)[0]["text"]
    assert "Acknowledged by Alice" in _tg_replies(b, message_id)[0]
    [incident] = await b.h.incidents()
    assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")

    await b.slack.click("res:1", ts)
    await b.tg.wait_for(lambda: b.tg_keyboard(message_id) == ["reo:1"], timeout=5)
    assert "Resolved" in b.tg.messages[(GROUP, message_id)]["text"]
    actions = await b.h.actions(1)
    assert actions.count("incident.acknowledged") == 1 and actions.count("incident.resolved") == 1


async def test_telegram_gets_its_200_once_the_tap_has_acted(both: Both) -> None:
    """The webhook answered 200 as the update arrived and handled it after: Telegram, told the update was done with,
    never posted it again, and a bot that died meanwhile lost the tap. The 200 comes once it acted: the
    acknowledgement and its audit row are in the store, and the toast was sent."""
    b = both
    _, message_id = await posted_on_both(b)
    await b.tap("ack:1", message_id)
    assert [c.params.get("text") for c in b.tg.called("answerCallbackQuery")] == ["Acknowledged #1."]
    assert (await b.h.actions(1)).count("incident.acknowledged") == 1
    [incident] = await b.h.incidents()
    assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")


async def test_a_tap_whose_handling_failed_is_a_503_and_telegrams_retry_acknowledges_once(both: Both) -> None:
    """The store failed Alice's acknowledgement before it committed: she is told something went wrong, and Telegram
    gets a 503, not the 200 that made it drop the update. Its retry of the same update acknowledges the incident,
    once (one audit row); a copy after that changes nothing."""
    b = both
    _, message_id = await posted_on_both(b)
    spec, failed = b.h.bot.dispatcher.actions["ack"], []

    async def failing_once(event: Any, person: Any) -> Any:
        if not failed:
            failed.append(event)
            raise ConnectionResetError("the database went away")
        return await spec.handler(event, person)
    b.h.bot.dispatcher.actions["ack"] = replace(spec, handler=failing_once)
    update = await b.tap("ack:1", message_id, status=503)
    assert [c.params.get("text") for c in b.tg.called("answerCallbackQuery")] == [FAILED]
    assert (await b.h.incidents())[0].status == "triggered" and "incident.acknowledged" not in await b.h.actions(1)
    assert await b.deliver(update) == 200  # Telegram's retry
    assert await b.deliver(update) == 200  # and a copy of it
    assert [c.params.get("text") for c in b.tg.called("answerCallbackQuery")] == [FAILED, "Acknowledged #1."]
    assert (await b.h.actions(1)).count("incident.acknowledged") == 1
    [incident] = await b.h.incidents()
    assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")


async def test_the_telegram_card_says_when_in_the_bots_time_zone_not_how_long_ago(both: Both) -> None:
    """"started just now" stayed on the card until something redrew it. Telegram cannot write a time for each reader:
    the card says when, in app.yaml's zone, named, with the day (it is read the next day too)."""
    b = both
    _, message_id = await posted_on_both(b)
    card = b.tg.messages[(GROUP, message_id)]["text"]
    assert " · started 24 Nov 05:00 CET · " in card, card
    assert "ago" not in card and "just now" not in card
    b.h.clock.advance(timedelta(minutes=7))
    await b.tap("ack:1", message_id)
    await b.tg.wait_for(lambda: "Acknowledged ·" in b.tg.messages[(GROUP, message_id)]["text"], timeout=5)
    card = b.tg.messages[(GROUP, message_id)]["text"]
    assert " · acknowledged by Alice, 24 Nov 05:07 CET" in card and "started 24 Nov 05:00 CET" in card, card
    assert "ago" not in card


async def test_an_alert_storm_does_not_hold_back_the_thread_lines_of_a_telegram_group(both: Both) -> None:
    """In a Telegram group an edit spends the group's own budget. While alerts keep redrawing the card, a line that
    is due ("Acknowledged by Alice") goes before the next routine redraw, not after the storm."""
    from handlers.outbox import BUDGETS, Budget, _Buckets

    b = both
    b.h.bot.outbox.buckets = _Buckets({**BUDGETS, "telegram": Budget(chat=(60, 3), group_chat=(60, 1), edits=None,
                                                                     platform=(1800, 30))})  # 1 a second
    _, message_id = await posted_on_both(b)
    payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    storming = True

    async def storm() -> None:
        n = 0
        while storming:
            n += 1
            alert = {**payload["alerts"][0], "fingerprint": f"storm{n}",
                     "labels": {**payload["alerts"][0]["labels"], "device": f"sd{n}"}}
            assert (await b.h.post("am", {**payload, "alerts": [alert]}))[0] == 200
            await asyncio.sleep(0.15)

    task = asyncio.create_task(storm())
    try:
        await asyncio.sleep(1.5)
        await b.tap("ack:1", message_id)
        await b.tg.wait_for(lambda: any("Acknowledged by Alice" in t for t in _tg_replies(b, message_id)), timeout=4)
    finally:
        storming = False
        await task


async def test_a_title_holding_backticks_stays_inside_the_list_table_on_telegram(both: Both) -> None:
    b = both
    payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    payload["commonAnnotations"] = {}
    for alert in payload["alerts"]:
        alert["annotations"]["summary"] = "Disk ```full``` <b>@db</b>"
    assert (await b.h.post("am", payload))[0] == 200
    listing = await b.type("/incident list")
    assert listing.count("<pre>") == 1 and listing.count("</pre>") == 1 and listing.endswith("</pre>"), listing
    assert "Disk \u02cb\u02cb\u02cbfull\u02cb\u02cb\u02cb &lt;b&gt;@\u2060db&lt;/b&gt;" in listing


async def test_start_says_where_pages_go_and_in_a_group_that_they_need_a_private_chat(both: Both) -> None:
    """/start said "Pages and incident buttons will reach you here", in the group too, where no page ever goes (and
    Telegram refuses a bot's message to someone who never started a private chat with it); and to someone paged
    only on Slack. Now it says where pages go, and in the group what to do for them to reach Telegram."""
    private = await both.type("/start")
    assert private == ("Hello Alice! Your Telegram id 111111 is linked to <code>alice</code> (roles: responder). "
                       "Escalation pages reach you on Slack, then Telegram in business hours; after them, and pages "
                       "sent by hand, on Telegram, then Slack.")
    group = await both.type("/start", chat=GROUP)
    assert group.startswith(private + " Telegram lets a bot write to you only in a private chat you started: open "
                                      "one with me and send /start there, or no page reaches you on Telegram."), group
    carol = await both.type("/start", user=333333)  # no Slack id: Telegram at any hour
    assert carol.endswith("(roles: none). Pages reach you on Telegram."), carol
    assert "here" not in private + carol
    # someone not linked yet, in the group: told to open a private chat too (they need it as much)
    stranger = await both.type("/start", user=999999, chat=GROUP)
    assert stranger.startswith("Hello! Your Telegram id is 999999. It is not linked to anyone yet") and stranger.endswith(
        "Telegram lets a bot write to you only in a private chat you started: open one with me and send /start "
        "there, or no page reaches you on Telegram."), stranger
    del both.h.bot.adapters["telegram"]  # a bot whose Telegram is off pages Alice on Slack, at any hour
    assert (await both.slack.answer(await both.slack.command("/chatops", "start", user="U01ALICE"))
            )["text"].endswith("(roles: responder). Pages reach you on Slack.")


async def test_help_shows_each_command_as_it_is_typed_on_each_platform(both: Both) -> None:
    """One dispatcher, two platforms: a Telegram bot takes any /word, Slack only the app's slash commands (no /start)."""
    telegram = await both.type("/help")
    assert "/start</code>: who the bot thinks you are" in telegram and "/chatops start" not in telegram, telegram
    slack = (await both.slack.answer(await both.slack.command("/chatops", "help")))["text"]
    assert "`/chatops start`: who the bot thinks you are" in slack and "`/start`" not in slack, slack


async def test_a_stranger_tapping_in_telegram_is_told_what_to_add(both: Both) -> None:
    b = both
    _, message_id = await posted_on_both(b)
    await b.tap("ack:1", message_id, user=999999)
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    toast = b.tg.called("answerCallbackQuery")[0].params.get("text", "")
    assert "I don't know you yet" in toast and "telegram: 999999" in toast
    assert (await b.h.incidents())[0].status == "triggered"
    # Longer than a toast holds for reading (TOAST_SHORT): an alert, read until dismissed (it flashed by); so is a
    # refusal for a role (Carol has none)
    await b.tap("ack:1", message_id, user=333333)
    await b.tg.wait_for(lambda: len(b.tg.called("answerCallbackQuery")) == 2, timeout=5)
    for answer in (c.params for c in b.tg.called("answerCallbackQuery")):
        assert len(answer["text"]) > 80 and answer.get("show_alert") in ("true", True), answer


def _tg_replies(b: Both, message_id: int) -> list[str]:
    out: list[Any] = []
    for call in b.tg.called("sendMessage"):
        reply = call.params.get("reply_parameters") or {}
        if call.params.get("reply_to_message_id") == message_id or reply.get("message_id") == message_id:
            out.append(call.params["text"])
    return out


async def test_a_page_reaches_a_linked_person_with_buttons_and_every_outcome_is_audited(both: Both) -> None:
    b = both
    _, group_message = await posted_on_both(b)

    async def told(line: str) -> None:
        """The incident's thread in the group says `line` (and so holds back no failure set up next). A line the fake
        turned away (429) waits for its Retry-After on the bot's clock: the clock moves a second at a time meanwhile."""
        for _ in range(50):
            if line in _tg_replies(b, group_message):
                return
            b.h.clock.advance(timedelta(seconds=1))
            b.h.bot.outbox.nudge()
            await asyncio.sleep(0.2)
        raise AssertionError(f"the thread never said {line!r}: {_tg_replies(b, group_message)}")

    # Telegram's flood control for her chat says to wait a second: the page waits that second (someone is asking
    # for her now), rather than failing or going to her second platform
    b.tg.fail("sendMessage", "Too Many Requests: retry after 1", 429, parameters={"retry_after": 1})
    answer = await b.slack.answer(await b.slack.command("/incident", "page 1 alice"))
    assert answer["text"] == "Paged Alice on Telegram."
    [page] = [c for c in b.tg.called("sendMessage") if c.params["chat_id"] == 111111]
    assert [untagged(k["callback_data"]) for row in page.params["reply_markup"]["inline_keyboard"] for k in row] == [
        "ack:1", "?res:1"]
    assert "Alice asks for your help" in page.params["text"]

    message_id = next(mid for (chat, mid) in b.tg.messages if chat == 111111)
    await b.tap("ack:1", message_id, chat=111111)  # acknowledged from the page itself
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    assert (await b.h.incidents())[0].status == "acknowledged"

    on_slack = await b.slack.answer(await b.slack.command("/incident", "page 1 <@U02BOB|bob>"))  # as Slack sends a mention
    assert on_slack["text"] == "Paged Bob on Slack."  # Bob has no Telegram id: his Slack DM gets the page
    assert [c.params["users"] for c in b.slack.fake.called("conversations.open")] == ["U02BOB"]
    await told("Alice paged Bob on Slack.")
    b.h.clock.advance(timedelta(minutes=1))  # (paged a moment ago, she would not be paged again yet)
    b.tg.fail("sendMessage", "Forbidden: bot can't initiate conversation with a user", 403)
    refused = await b.slack.answer(await b.slack.command("/incident", "page 1 alice"))
    assert refused["text"] == (  # Telegram refused; her next platform took it, and the answer says why
        "Paged Alice on Slack (Telegram failed: Telegram user 111111 has not started a chat with the bot; ask them to "
        "open it and press Start).")
    unknown = await b.slack.answer(await b.slack.command("/incident", "page 1 zed"))
    assert unknown["text"] == "I don't know 'zed' (people in app.yaml: alice, bob, carol)."
    actions = await b.h.actions(1)
    assert actions.count("incident.paged") == 3 and actions.count("incident.page_failed") == 0
    async with b.h.bot.db.sessions() as session:
        [*_, last] = [e for e in await incident_timeline(session, 1) if e.action == "incident.paged"]
    assert last.details["platform"] == "slack"
    assert last.details["tried"] == ["telegram: Telegram user 111111 has not started a chat with the bot; "
                                     "ask them to open it and press Start"]
    await told("Alice paged Alice on Slack (Telegram failed: Telegram user 111111 has not started a chat with the bot; "
               "ask them to open it and press Start).")
    b.h.clock.advance(timedelta(minutes=1))
    b.tg.fail("sendMessage", "Forbidden: bot can't initiate conversation with a user", 403)
    b.slack.fake.fail("conversations.open", "user_not_found")
    failed = await b.slack.answer(await b.slack.command("/incident", "page 1 alice"))
    assert failed["text"].startswith("Could not page Alice: telegram: Telegram user 111111 has not started a chat")
    assert "slack" in failed["text"] and "telegram: telegram" not in failed["text"]
    assert (await b.h.actions(1)).count("incident.page_failed") == 1
    await told(failed["text"].replace("Could not page Alice:", "Alice tried to page Alice:").replace("`", ""))
    await b.slack.answer(await b.slack.command("/incident", "resolve 1"))
    opened = len(b.slack.fake.called("conversations.open"))  # Bob is paged in his Slack DM
    resolved = await b.slack.answer(await b.slack.command("/incident", "page 1 bob"))
    assert resolved["text"] == ("#1 is resolved, so nobody was paged; if it needs someone after all, "
                                "`/incident reopen 1` first.")
    assert len(b.slack.fake.called("conversations.open")) == opened
    assert (await b.h.actions(1)).count("incident.paged") == 3


async def test_paging_someone_who_could_not_acknowledge_is_refused_from_telegram_and_slack_alike(both: Both) -> None:
    b = both
    await posted_on_both(b)
    sent = len(b.tg.called("sendMessage"))
    refused = await b.type("/incident page 1 carol")
    assert refused == ("Carol was not paged: they have no <code>responder</code> role, so they could not acknowledge "
                       "the page. Add <code>responder</code> to their <code>roles</code> under <code>people:</code> "
                       "in app.yaml and restart the bot, or page someone who has it.")
    on_slack = await b.slack.answer(await b.slack.command("/incident", "page 1 carol"))
    assert on_slack["text"].startswith("Carol was not paged: they have no `responder` role")
    assert [c for c in b.tg.called("sendMessage")[sent:] if c.params["chat_id"] == 333333] == []
    actions = await b.h.actions(1)
    assert "incident.paged" not in actions and "incident.page_failed" not in actions


async def test_a_group_gets_no_more_than_20_messages_in_any_minute_and_20_a_minute_steadily(tmp_path: Path) -> None:
    """Telegram takes about 20 messages a minute in one group. A burst of 50 new incidents for the group, on a clock
    the test moves a second at a time (the outbox's budget runs on it): no 60 seconds, the first ones included, see
    more than 20 of their cards, and while the burst lasts the group still gets 20 a minute."""
    async with FakeTelegram(per_second=1000.0, burst=1000, group_per_minute=1000) as tg:  # the bot's budget decides
        extra = (f"adapters:\n  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                 f"api_url: '{tg.api_url}'}}\n")

        def manual(bot: Any) -> None:  # the outbox delivers when the test says, on the test's clock
            bot.outbox.start = lambda: None
            bot.outbox._monotonic = lambda: bot.clock.now().timestamp()

        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, prepare=manual) as h:
            payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
            for n in range(50):
                alert = {**payload["alerts"][0], "fingerprint": f"burst{n}",
                         "labels": {**payload["alerts"][0]["labels"], "alertname": f"Burst{n}"}}
                assert (await h.post("am-plain", {**payload, "alerts": [alert]}))[0] == 200
            assert len(await h.incidents()) == 50
            sent_at: list[int] = []  # the second (on the test's clock) each card went to the group
            for second in range(181):
                while await h.bot.outbox.run_once():
                    pass
                cards = [c for c in tg.called("sendMessage") if c.params["chat_id"] == GROUP]
                sent_at += [second] * (len(cards) - len(sent_at))
                h.clock.advance(timedelta(seconds=1))
            assert len(sent_at) == 50
            busiest = max(sum(start <= t <= start + 60 for t in sent_at) for start in range(181))
            per_minute = [sum(60 * m <= t < 60 * (m + 1) for t in sent_at) for m in range(3)]
            assert (busiest, per_minute) == (20, [20, 20, 10]), sent_at


async def test_resolve_in_telegram_asks_what_slacks_dialog_asks(both: Both) -> None:
    """Slack's Resolve asks "Resolve #1 while 2 alerts are still firing? If they keep firing, a new incident
    opens."; the first tap on Telegram's Resolve only said to tap ✔ Resolve. It says the same warning now."""
    b = both
    ts, message_id = await posted_on_both(b)
    [slack_card] = b.slack.posts()
    blocks = slack_card["blocks"] if isinstance(slack_card["blocks"], list) else json.loads(slack_card["blocks"])
    [dialog] = [e["confirm"]["text"]["text"] for block in blocks if block["type"] == "actions"
                for e in block["elements"] if "confirm" in e]
    assert "still firing" in dialog
    await b.tap("?res:1", message_id)
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    [answer] = b.tg.called("answerCallbackQuery")
    assert answer.params["text"] == f"{dialog} Tap \u201c\u2714 Resolve\u201d to confirm, or \u201c\u2716 No\u201d."


async def test_after_one_of_two_alerts_resolves_both_cards_show_the_one_still_firing(both: Both) -> None:
    """db-01's alert resolves, db-02's still fires. Before, both cards showed db-01's (its resolve came last) as
    Latest, unmarked, and Resolve asked "while 1 alert is still firing? If they keep firing, ...". Now Latest is the
    alert still firing, and Resolve's question agrees with its number, in Slack's dialog and Telegram's answer."""
    b = both
    ts, message_id = await posted_on_both(b)
    b.h.clock.advance(timedelta(minutes=1))
    body = json.loads(fixture("alertmanager/02-diskfull-1-resolved-1-firing.json"))
    body["alerts"] = [a for a in body["alerts"] if a["status"] == "resolved"]  # db-01's resolve, on its own
    status, _, _ = await b.h.post("am", body)
    assert status == 200
    latest = "Disk /var 95% full on db-02"
    question = "Resolve #1 while 1 alert is still firing? If it keeps firing, a new incident opens."

    def slack_card() -> dict[str, Any] | None:
        drawn = [c.params for c in b.slack.fake.called("chat.update") if c.params.get("ts") == ts]
        return drawn[-1] if drawn and "1 of 2 still firing" in json.dumps(drawn[-1]["blocks"]) else None
    await b.slack.fake.wait_for(slack_card, timeout=10)
    card = slack_card()
    assert card is not None
    blocks = card["blocks"] if isinstance(card["blocks"], list) else json.loads(card["blocks"])
    assert f"*Latest:* {latest} _(showing the one still firing)_" in json.dumps(blocks, ensure_ascii=False)
    [dialog] = [e["confirm"]["text"]["text"] for block in blocks if block["type"] == "actions"
                for e in block["elements"] if "confirm" in e]
    assert dialog == question

    def tg_card() -> str:
        edits = [c.params["text"] for c in b.tg.called("editMessageText") if c.params["chat_id"] == GROUP]
        return edits[-1] if edits and "1 of 2 still firing" in edits[-1] else ""
    await b.tg.wait_for(tg_card, timeout=10)
    assert f"<b>Latest:</b> {latest} <i>(showing the one still firing)</i>" in tg_card()
    await b.tap("?res:1", message_id)
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    [answer] = b.tg.called("answerCallbackQuery")
    assert answer.params["text"] == f"{question} Tap \u201c\u2714 Resolve\u201d to confirm, or \u201c\u2716 No\u201d."


async def test_a_thread_line_that_finds_the_group_became_a_supergroup_follows_the_card_there(both: Both) -> None:
    """Telegram turned the group into a supergroup, and the Acknowledged line is the first call to learn it: the card
    is posted afresh in the supergroup, and the line follows it into its thread. Before: the line was folded into
    the new card, its row recorded sent, and it was never posted."""
    b = both
    _, message_id = await posted_on_both(b)
    supergroup = -1009876543210
    b.tg.fail("sendMessage", "Bad Request: group chat was upgraded to a supergroup chat",
              parameters={"migrate_to_chat_id": supergroup})
    await b.slack.answer(await b.slack.command("/incident", "ack 1"))

    def in_supergroup() -> list[dict[str, Any]]:
        return [m for (chat, _), m in sorted(b.tg.messages.items()) if chat == supergroup]

    await b.tg.wait_for(lambda: len(in_supergroup()) == 2, timeout=10)
    card, line = in_supergroup()
    assert "#1" in card["text"] and "Acknowledged" in card["text"]
    assert "Acknowledged by Alice" in line["text"]
    [reply] = [c.params for c in b.tg.called("sendMessage") if c.params["chat_id"] == supergroup
               and (c.params.get("reply_parameters") or {}).get("message_id") == card["message_id"]]
    assert reply["text"] == line["text"]  # in the new card's thread
    assert await b.h.message_of(1, "ops-telegram") == str(card["message_id"])



@pytest.mark.parametrize("chat", [GROUP, 111111], ids=["group", "private"])
async def test_a_card_incident_show_drew_is_redrawn_by_a_tap_on_it(both: Both, chat: int) -> None:
    """The card `/incident show` posts is no channel's card, which the outbox redraws: resolved from its own ✔ Resolve,
    it still said Acknowledged, with an armed ✔ Resolve that, after a reopen, resolved at once without asking. A tap on
    it redraws it as the incident then is, as Slack redraws its private card."""
    b = both
    ts, channel_card = await posted_on_both(b)
    await b.tap("ack:1", channel_card)
    await b.tg.wait_for(lambda: b.tg_keyboard(channel_card) == ["?res:1"], timeout=15)
    await b.type("/incident show 1", chat=chat if chat < 0 else None)
    shown = b.answer_to("/incident show 1", chat)
    assert b.tg_keyboard(shown, chat) == ["?res:1"] and "Acknowledged" in b.tg.messages[(chat, shown)]["text"]

    await b.tap("?res:1", shown, chat=chat)
    await b.tg.wait_for(lambda: b.tg_keyboard(shown, chat) == ["res:1", "!res:1"], timeout=15)
    await b.tap("res:1", shown, chat=chat)
    await b.tg.wait_for(lambda: b.tg_keyboard(shown, chat) == ["reo:1"], timeout=15)
    assert "Resolved" in b.tg.messages[(chat, shown)]["text"]
    assert "Acknowledged" not in b.tg.messages[(chat, shown)]["text"].split("\n")[0]
    [incident] = await b.h.incidents()
    assert incident.status == "resolved"

    # (the channel's card redrawn as resolved first: else "not Reopen" below held before the reopen was drawn)
    await b.tg.wait_for(lambda: b.tg_keyboard(channel_card) == ["reo:1"], timeout=15)
    await b.slack.click("reo:1", ts)  # reopened elsewhere: the card it drew still offers Reopen, and a tap on it...
    await b.tg.wait_for(lambda: b.tg_keyboard(channel_card) != ["reo:1"], timeout=15)
    await b.tap("reo:1", shown, chat=chat)  # ...is told it is open, and redraws it: Resolve asks again
    await b.tg.wait_for(lambda: b.tg_keyboard(shown, chat) == b.tg_keyboard(channel_card), timeout=15)
    assert "?res:1" in b.tg_keyboard(shown, chat) and "res:1" not in b.tg_keyboard(shown, chat)
    assert (await b.h.actions(1)).count("incident.resolved") == 1


async def test_plain_words_in_a_private_chat_get_the_help_not_an_unknown_slash_command(both: Both) -> None:
    answer = await both.type("hello there")
    assert answer.startswith("<code>hello</code> is not one of my commands.\nCommands:")
    assert "/hello" not in answer
    assert "There is no incident #42." in await both.type("ack 42")  # a command in plain words is still one


async def test_an_id_too_big_for_the_store_is_no_such_incident_on_telegram_and_slack_alike(both: Both) -> None:
    """`/ack 99999999999999999999` answered how to type an id: it is one no incident has."""
    big = "9" * 20
    assert "There is no incident #" + big + "." in await both.type(f"/ack {big}")
    assert "There is no incident #" + big + "." in await both.type(f"/incident show #{big}")
    assert "There is no swap #" + big + "." in await both.type(f"/swap cancel {big}")
    for command, text in (("/ack", big), ("/incident", f"resolve {big}"), ("/swap", f"cancel {big}")):
        answer = (await both.slack.answer(await both.slack.command(command, text)))["text"]
        assert answer.startswith("There is no ") and answer.endswith(f" #{big}."), (command, answer)


async def test_an_incident_command_with_words_too_many_gets_its_usage_on_telegram_and_slack_alike(
        both: Both) -> None:
    """`/incident ack 1 2` acknowledged #1 alone (and said so), `/ack 1 extra` and `/incident list open extra` were
    taken as if the extra words were not there: a typo acted. Each answers with its usage, as `/oncall X extra` does,
    and acts on nothing."""
    await posted_on_both(both)
    usages = {
        ("/ack", "1 2"): "Usage: `/ack ID`, for example `/ack 42`.",
        ("/ack", "1 extra"): "Usage: `/ack ID`, for example `/ack 42`.",
        ("/incident", "ack 1 2"): "Usage: `/incident ack ID`, for example `/incident ack 42`.",
        ("/incident", "resolve 1 now"): "Usage: `/incident resolve ID`, for example `/incident resolve 42`.",
        ("/incident", "show 1 2"): "Usage: `/incident show ID`, for example `/incident show 42`.",
        # (words after the person are the page's message: a word too few gets the usage)
        ("/incident", "page 1"): "Usage: `/incident page ID PERSON [MESSAGE]`, for example `/incident page 42 alice` "
                                 "or `/incident page 42 alice please look at the db`.",
        ("/incident", "page x bob"): "Usage: `/incident page ID PERSON [MESSAGE]`, for example "
                                     "`/incident page 42 alice` or `/incident page 42 alice please look at the db`.",
        ("/incident", "list open extra"): "Usage: `/incident list [open|firing|triggered|acknowledged|silenced|resolved|all]`",
        ("/chatops", "resolve 1 2"): "Usage: `/incident resolve ID`, for example `/incident resolve 42`.",
    }
    for (command, text), usage in usages.items():
        on_slack = (await both.slack.answer(await both.slack.command(command, text)))["text"]
        assert on_slack == usage, (command, text, on_slack)
        on_telegram = await both.type(f"{command} {text}")
        assert html.unescape(re.sub(r"</?code>", "`", on_telegram)) == usage, (command, text, on_telegram)
    [incident] = await both.h.incidents()
    assert incident.status == "triggered"  # nobody acknowledged or resolved it
    assert not {"incident.acknowledged", "incident.resolved", "incident.paged"} & set(await both.h.actions(1))


async def test_incident_list_all_says_how_many_incidents_not_how_many_all_incidents(both: Both) -> None:
    """`/incident list all` answered "1 all incident(s)" (now "1 incident")."""
    await posted_on_both(both)
    listing = (await both.slack.answer(await both.slack.command("/incident", "list all")))["text"]
    assert listing.startswith("1 incident, newest first:\n"), listing
    assert (await both.type("/incident list all")).startswith("1 incident, newest first:\n")
    await both.slack.answer(await both.slack.command("/incident", "resolve 1"))
    assert (await both.slack.answer(await both.slack.command("/incident", "list open")))["text"] == \
        "No open incidents."
    assert (await both.slack.answer(await both.slack.command("/incident", "list resolved")))["text"].startswith(
        "1 resolved incident, newest first:\n")


async def test_a_tap_on_a_card_of_another_incident_of_that_number_is_refused_and_every_key_fits_64_bytes(
        both: Both) -> None:
    """The tag an incident's buttons carry is checked on Telegram too: a tap whose tag is not that of the incident of
    its number (a card from an earlier store) does nothing. Telegram refuses callback_data over 64 bytes, and
    python-telegram-bot does not check it."""
    _, tg_id = await posted_on_both(both)
    keys = both.tg_keyboard(tg_id, tagged=True)
    assert [k.split(".")[0] for k in keys] == ["ack:1", "?res:1"] and all(len(k.encode()) <= 64 for k in keys)
    tag = keys[0].split(".")[1]
    other = "zzzzzz" if tag != "zzzzzz" else "000000"
    await both.tap(f"ack:1.{other}", tg_id)
    await both.tg.wait_for(lambda: both.tg.called("answerCallbackQuery"), timeout=5)
    [toast] = [c.params.get("text") for c in both.tg.called("answerCallbackQuery")]
    assert toast.startswith("This card belongs to an incident that no longer exists in this bot's store")
    assert (await both.h.incidents())[0].status == "triggered"
    await both.tap(keys[0], tg_id)
    await both.tg.wait_for(lambda: len(both.tg.called("answerCallbackQuery")) == 2, timeout=5)
    assert both.tg.called("answerCallbackQuery")[1].params.get("text") == "Acknowledged #1."


async def test_a_page_that_went_out_but_could_not_be_recorded_says_so(both: Both, monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """`/incident page` sends the page, then records it. When the store failed at the record (busy, or down), the
    person was told that nothing was changed, or that something went wrong, while the page had reached Alice."""
    import handlers.paging
    from sqlalchemy.exc import OperationalError

    b = both
    await posted_on_both(b)

    async def store_down(*_args: Any, **_kwargs: Any) -> None:
        raise OperationalError("INSERT INTO audit_events ...", {}, TimeoutError())

    monkeypatch.setattr(handlers.paging, "_record", store_down)
    answer = await b.slack.answer(await b.slack.command("/incident", "page 1 alice"))
    assert answer["text"] == (
        "Paged Alice on Telegram, but recording it failed (OperationalError: (builtins.TimeoutError) ), so the "
        "incident's thread and audit log do not show it: it is not sent again, and a page now would reach Alice a "
        "second time.")
    assert len([c for c in b.tg.called("sendMessage") if c.params["chat_id"] == 111111]) == 1  # it did reach her
    assert "incident.paged" not in await b.h.actions(1)
    assert any(r.getMessage().startswith("paging: Alice paged alice about #1 on telegram, but recording it failed")
               for r in caplog.records)


async def test_ack_typed_as_a_reply_to_the_page_acknowledges_its_incident(both: Both) -> None:
    """At 3 a.m. the on-call answers the page itself: "ack" got "Usage: /ack ID". A reply to the bot's message about
    an incident now acts on that incident, as a reply to Opsgenie's or PagerDuty's page does; without one it still
    asks which."""
    b = both
    await posted_on_both(b)
    assert (await b.slack.answer(await b.slack.command("/incident", "page 1 alice")))["text"] == "Paged Alice on Telegram."
    page = max(mid for (chat, mid) in b.tg.messages if chat == 111111)
    assert await b.type("/ack") == "Usage: <code>/ack ID</code>, for example <code>/ack 42</code>."  # which one?
    assert (await b.h.incidents())[0].status == "triggered"
    said = await b.type("ack", reply_to=page)
    assert (await b.h.incidents())[0].status == "acknowledged", said
    assert (await b.h.actions(1)).count("incident.acknowledged") == 1
    assert (await b.type("show", reply_to=page)).startswith("🟠 Acknowledged · Critical · <b>#1 Disk /var 97% full")


async def test_a_taps_answer_that_meets_flood_control_waits_it_out_once(both: Both) -> None:
    """answerCallbackQuery answered 429 with retry_after 1: the log said "Flood control exceeded" and the tapper never
    saw whether the tap did anything (the button kept spinning). A short wait is now waited out, once."""
    b = both
    _, group_message = await posted_on_both(b)
    b.tg.fail("answerCallbackQuery", "Too Many Requests: retry after 1", 429, parameters={"retry_after": 1})
    await b.tap("ack:1", group_message)
    await b.tg.wait_for(lambda: b.tg.called("answerCallbackQuery"), timeout=5)
    first, again = [c for c in b.tg.calls if c.method == "answerCallbackQuery"]
    assert (first.status, again.status) == (429, 200)
    assert first.params["callback_query_id"] == again.params["callback_query_id"]
    assert "Acknowledged" in str(again.params.get("text"))
    assert (await b.h.incidents())[0].status == "acknowledged"


async def test_a_group_card_whose_answer_was_lost_is_posted_again_and_the_log_says_it_may_show_twice(
        both: Both, caplog: pytest.LogCaptureFixture) -> None:
    """Telegram lets no bot look in a chat: a card whose answer was lost is posted again (a missing card is worse than
    two), and the group may show it twice. Nothing said so: the row ended `sent`, its first try forgotten."""
    import logging

    caplog.set_level(logging.WARNING, logger="chatops.outbox")
    b = both
    b.tg.lose_answer("sendMessage")
    status, _, _ = await b.h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))  # team=dba: both
    assert status == 200
    for _ in range(100):  # its retry, on the bot's clock
        if len([c for c in b.tg.called("sendMessage") if c.params["chat_id"] == GROUP]) >= 2:
            break
        b.h.clock.advance(timedelta(seconds=2))
        b.h.bot.outbox.nudge()
        await asyncio.sleep(0.05)
    assert len([c for c in b.tg.called("sendMessage") if c.params["chat_id"] == GROUP]) == 2
    [said] = [r.getMessage() for r in caplog.records if "may show twice" in r.getMessage()]
    assert said.startswith(f"outbox: the answer to a send in {GROUP} was lost (telegram sendMessage: ") and said.endswith(
        "and the platform cannot be asked whether it has it, so it is posted again and may show twice")


async def test_readyz_says_telegram_is_not_reachable_until_it_answers(tmp_path: Path) -> None:
    """Telegram's Bot API answers 502 at start: the bot starts, retrying in the background, and /readyz says so
    until getMe works (it said "on" all along, while the log said "still not connected")."""
    async with FakeSlack() as slack, FakeTelegram() as tg:
        tg.fail("getMe", "Bad Gateway", error_code=502, times=1000)  # until the test has looked
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n")

        def quick(bot: Any) -> None:
            bot.adapters["telegram"].connect_retry = 0.2

        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE,
                               prepare=quick) as h:
            ready = await (await h.client.get("/readyz")).json()
            assert ready["status"] == "ok"
            assert ready["adapters"]["telegram"] == ("on, not reachable (telegram getMe: Bad Gateway); messages "
                                                     "wait and are retried"), ready
            assert 'chatops_adapter_up{adapter="telegram"} 0.0' in await (await h.client.get("/metrics")).text()
            tg._failures["getMe"].clear()  # Telegram answers again
            await tg.wait_for(lambda: tg.called("setMyCommands"), timeout=10)
            for _ in range(50):
                ready = await (await h.client.get("/readyz")).json()
                if ready["adapters"]["telegram"] == "on":
                    break
                await asyncio.sleep(0.1)
            assert ready["adapters"]["telegram"] == "on"
            assert 'chatops_adapter_up{adapter="telegram"} 1.0' in await (await h.client.get("/metrics")).text()
