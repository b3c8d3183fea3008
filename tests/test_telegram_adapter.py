"""The Telegram adapter with the real python-telegram-bot and the real templates, against a fake Bot API on 127.0.0.1.

Updates are posted the way Telegram posts them to a webhook (JSON, the secret token in
`X-Telegram-Bot-Api-Secret-Token`) and are shaped like Telegram's (tests/fixtures/telegram/).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import html
import io
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from adapters.settings import TelegramSettings
from adapters.telegram import COMMANDS, INVALID_BUTTON, SECRET_HEADER, STALE_BUTTON, TelegramAdapter, toast
from bot.actions import MAX_ID
from bot.chat import FAILED, ActionEvent, Button, CommandEvent, DeliveryError, MessageRef, Outbound, Reply, split_words
from bot.model import Actor
from bot.render import Renderer
from bot.view import incident_card, thread_line
from storage.models import AlertRecord, Incident
from tests.botkit import raw_post
from tests.fake_telegram import BOT, FakeTelegram
from tests.recording import RecordingDispatcher, served

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "telegram"
SECRET = "tg-webhook-secret_0123456789"
GROUP, ALICE = -1001234567890, 111111
NOW = datetime(2026, 3, 3, 14, 15, tzinfo=UTC)
# python-telegram-bot warns when it builds a RetryAfter (its int -> timedelta migration); the adapter reads both
pytestmark = pytest.mark.filterwarnings("ignore:.*retry_after.*:telegram.warnings.PTBDeprecationWarning")


def make_incident(**over: Any) -> Incident:
    fields: dict[str, Any] = dict(
        id=42, group_key="k", title="Disk full on db-1", status="triggered", severity="critical", priority=95,
        labels={"alertname": "DiskFull", "instance": "db-1:9100", "service": "postgres"},
        links={"generator": "http://prom:9090/graph?g0.expr=disk&g0.tab=1"},
        sources=["alertmanager"], channels=["ops-telegram"], alert_count=2, firing_count=2, notifications=1,
        escalation="dba", silenced=False, opened_at=NOW - timedelta(minutes=12), first_seen=NOW - timedelta(minutes=12),
        last_seen=NOW)
    fields.update(over)
    return Incident(**fields)


def make_alert(summary: str, **over: Any) -> AlertRecord:
    fields: dict[str, Any] = dict(
        incident_id=42, source="alertmanager", fingerprint=summary, status="firing", severity="critical",
        summary=summary, labels={"alertname": "DiskFull"}, annotations={"runbook_url": "https://wiki.example/disk"},
        links={}, first_received=NOW - timedelta(minutes=1), last_received=NOW - timedelta(minutes=1))
    fields.update(over)
    return AlertRecord(**fields)


def card(incident: Incident | None = None, alerts: list[AlertRecord] | None = None) -> Outbound:
    """The incident's card, its buttons without the incident's tag (`ack:42`: the adapter carries whatever value the
    codec makes, and the flows test the tags)."""
    drawn = incident_card(incident or make_incident(), alerts or [make_alert("Disk 97% full on /var")], now=NOW,
                          tz="UTC", names={"alice": "Alice"})
    return replace(drawn, buttons=[replace(b, tag="") for b in drawn.buttons])


def keyboard_of(call_or_message: Any) -> list[list[tuple[str, str]]]:
    params = getattr(call_or_message, "params", call_or_message)
    return [[(k["text"], k["callback_data"]) for k in row] for row in params["reply_markup"]["inline_keyboard"]]


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


_next_update = iter(range(1000, 10**6))


@dataclass
class Env:
    tg: FakeTelegram
    adapter: TelegramAdapter
    dispatcher: RecordingDispatcher
    client: TestClient

    async def post(self, body: Any, secret: str | None = SECRET) -> tuple[int, str]:
        headers = {"Content-Type": "application/json", **({SECRET_HEADER: secret} if secret is not None else {})}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = await self.client.post("/telegram/webhook", data=data, headers=headers)
        return resp.status, await resp.text()

    async def click(self, data: str, message: dict[str, Any] | None = None, *, status: int = 200) -> dict[str, Any]:
        """A tap on a button, posted as Telegram posts it; Telegram's answer must be `status`."""
        update = fixture("callback_query.json")
        update["update_id"] = next(_next_update)
        update["callback_query"]["data"] = data
        if message is not None:
            update["callback_query"]["message"] = message
        answer, text = await self.post(update)
        assert answer == status, text
        return update

    async def command(self, text: str, *, private: bool = False, status: int = 200) -> dict[str, Any]:
        update = fixture("command_private.json" if private else "command_group.json")
        update["update_id"] = next(_next_update)
        update["message"]["text"] = text
        answer, said = await self.post(update)
        assert answer == status, said
        return update

    async def answered(self, n: int = 1) -> list[dict[str, Any]]:
        await self.tg.wait_for(lambda: len(self.tg.called("answerCallbackQuery")) >= n)
        return [c.params for c in self.tg.called("answerCallbackQuery")]


def settings(tg: FakeTelegram, **over: Any) -> TelegramSettings:
    return TelegramSettings(**{"bot_token": tg.token, "webhook_secret": SECRET, "api_url": tg.api_url, **over})


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with FakeTelegram() as tg:
        dispatcher = RecordingDispatcher()
        adapter = TelegramAdapter(settings(tg), renderer=Renderer(), dispatcher=dispatcher)
        async with served(adapter) as client:
            yield Env(tg, adapter, dispatcher, client)


# -- start and webhook ------------------------------------------------------------------------------

async def test_start_checks_the_token_and_sets_the_command_menu(env: Env) -> None:
    assert [c.method for c in env.tg.calls] == ["getMe", "setMyCommands"]
    assert all(c.token == env.tg.token for c in env.tg.calls)  # base_url + token: {api_url}{token}/{method}
    commands = env.tg.called("setMyCommands")[0].params["commands"]
    assert [c["command"] for c in commands] == ["incident", "ack", "oncall", "swap", "help", "start"] == list(COMMANDS)
    assert all(0 < len(c["description"]) <= 256 for c in commands)
    assert env.adapter.bot.username == BOT["username"]


async def test_a_refused_token_fails_start_without_showing_it() -> None:
    async with FakeTelegram() as tg:
        adapter = TelegramAdapter(settings(tg, bot_token="123:revoked-secret"), renderer=Renderer(),
                                  dispatcher=RecordingDispatcher())
        with pytest.raises(DeliveryError) as caught:
            await adapter.start()
        await adapter.stop()
    assert caught.value.permanent and "bot_token" in str(caught.value) and "revoked-secret" not in str(caught.value)


async def test_a_telegram_outage_at_start_is_retried_in_the_background(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeTelegram() as tg:
        tg.fail("getMe", "Bad Gateway", error_code=502, times=2)
        adapter = TelegramAdapter(settings(tg, mode="polling"), renderer=Renderer(), dispatcher=RecordingDispatcher())
        adapter.connect_retry, adapter.poll_timeout = 0.05, 1
        with caplog.at_level(logging.WARNING, "chatops.telegram"):
            await adapter.start()  # does not raise: Slack and alert intake keep working meanwhile
            assert "trying again in the background" in caplog.text
            await tg.wait_for(lambda: tg.called("getUpdates"))
        await adapter.stop()
    assert [c.method for c in tg.calls[:5]] == ["getMe", "getMe", "getMe", "setMyCommands", "deleteWebhook"]


@pytest.mark.parametrize("secret", ["wrong-secret-0123456789", "", None, "tg-webhook-secret_012345678\u00e9"])
async def test_the_webhook_refuses_a_wrong_or_missing_secret(env: Env, secret: str | None) -> None:
    status, text = await env.post(fixture("command_group.json"), secret=secret)
    assert status == 401 and SECRET_HEADER in text
    await asyncio.sleep(0.05)
    assert not env.dispatcher.commands and not env.tg.called("sendMessage")


async def test_a_secret_sent_twice_is_a_401_whichever_comes_first(env: Env) -> None:
    """The first copy counted: the right secret then a wrong one was taken (alert intake and /metrics refuse a
    credential sent twice)."""
    for first, second in ((SECRET, "wrong-secret-0123456789"), ("wrong-secret-0123456789", SECRET)):
        status, answer = await raw_post(env.client, "/telegram/webhook",
                                        [(SECRET_HEADER.encode(), first.encode()), (SECRET_HEADER.encode(), second.encode())],
                                        json.dumps(fixture("command_group.json")).encode())
        assert status == 401 and SECRET_HEADER.encode() in answer
    await asyncio.sleep(0.05)
    assert not env.dispatcher.commands


async def test_a_secret_that_is_not_utf8_is_a_401_not_a_500(env: Env) -> None:
    status, answer = await raw_post(env.client, "/telegram/webhook", [(SECRET_HEADER.encode(), b"\xff\xfe")],
                                    json.dumps(fixture("command_group.json")).encode())
    assert status == 401 and SECRET_HEADER.encode() in answer


_PRIVATE = b'"chat": {"id": 111111, "type": "private"}, "from": {"id": 111111, "is_bot": false, "first_name": "A"}'


@pytest.mark.parametrize("body", [b'{"update_id": 1, "message": ', b"\xff\xfe", b"[1, 2]", b'{"message": {}}',
                                  b'{"update_id": 5, "message": "not a message"}',
                                  b'{"update_id": 6, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # was a 500
                                  b'{"update_id": 7, "message": {"message_id": 1, "date": 1, "text": 5, ' + _PRIVATE + b"}}",
                                  b'{"update_id": 8, "callback_query": {"id": "1", "chat_instance": "c", "data": 5, '
                                  b'"from": {"id": 111111, "is_bot": false, "first_name": "A"}}}',
                                  b'{"update_id": true}'])  # (a bool is an int to Python)
async def test_the_webhook_refuses_what_is_not_an_update(env: Env, body: bytes) -> None:
    status, _ = await env.post(body)
    assert status == 400


async def test_an_update_delivered_twice_is_handled_once(env: Env) -> None:
    update = fixture("command_group.json")
    for _ in range(2):  # Telegram retries a delivery it thinks was lost
        assert (await env.post(update))[0] == 200
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    await asyncio.sleep(0.05)
    assert len(env.dispatcher.commands) == 1


# -- clicks -----------------------------------------------------------------------------------------

async def test_a_click_reaches_the_dispatcher_and_telegram_gets_its_200_once_it_is_handled(env: Env) -> None:
    """Telegram's update was answered 200 as it arrived, before it was handled: a bot that died meanwhile lost the
    tap, for Telegram never posts an update answered 2xx again. The 200 now comes once the tap is handled, its
    toast sent."""
    env.dispatcher.gate.clear()  # the dispatcher is still busy
    posting = asyncio.create_task(env.click("ack:42"))
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    assert env.dispatcher.actions == [ActionEvent(
        action="ack", incident_id=42, arg="",
        actor=Actor("telegram", str(ALICE), "Alice Example", None),
        source=MessageRef("telegram", str(GROUP), "17", None),
        event_id="4382bfdwdsb323b2d9",
    )]
    await asyncio.sleep(0.1)
    assert not env.tg.called("answerCallbackQuery") and not posting.done()  # Telegram waits for its answer
    env.dispatcher.gate.set()
    await asyncio.wait_for(posting, 5)
    [answer] = [c.params for c in env.tg.called("answerCallbackQuery")]  # there when the 200 is, no waiting
    assert answer == {"callback_query_id": "4382bfdwdsb323b2d9", "text": "Acknowledged #42."}
    assert not env.tg.called("sendMessage")  # an ephemeral reply is only the toast


async def test_a_copy_posted_while_the_update_is_handled_is_answered_when_that_handling_ends(env: Env) -> None:
    """Telegram posts an update again when its first delivery's answer is late: the copy is not handled twice, nor
    answered 200 before the first's handling ended."""
    env.dispatcher.gate.clear()
    update = fixture("callback_query.json")
    update["update_id"] = next(_next_update)
    first = asyncio.create_task(env.post(update))
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    copy_ = asyncio.create_task(env.post(update))
    await asyncio.sleep(0.1)
    assert not first.done() and not copy_.done()
    env.dispatcher.gate.set()
    assert [status for status, _ in await asyncio.wait_for(asyncio.gather(first, copy_), 5)] == [200, 200]
    assert len(env.dispatcher.actions) == 1 and len(env.tg.called("answerCallbackQuery")) == 1


async def test_a_click_telegram_hangs_up_on_is_still_handled_to_the_end(env: Env) -> None:
    """The connection goes while the tap is handled (Telegram gave up waiting; aiohttp then cancels the request's
    handler, as it does to those still running when the server shuts down): the handling goes on to the end, and
    Telegram's next delivery of the update is answered 200 without acting again."""
    env.dispatcher.gate.clear()
    update = fixture("callback_query.json")
    update["update_id"] = next(_next_update)
    body = json.dumps(update).encode()
    reader, writer = await asyncio.open_connection(env.client.server.host, env.client.server.port)
    writer.write(b"POST /telegram/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"{SECRET_HEADER}: {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.2)  # the server sees the connection go
    assert not env.tg.called("answerCallbackQuery")
    env.dispatcher.gate.set()
    [answer] = await env.answered()
    assert answer["text"] == "Acknowledged #42."
    assert (await env.post(update))[0] == 200
    assert len(env.dispatcher.actions) == 1 and len(env.tg.called("answerCallbackQuery")) == 1


async def test_the_toast_is_plain_and_fits_200_characters_and_a_duplicate_gets_an_empty_answer(env: Env) -> None:
    env.dispatcher.reply = Reply("Acknowledging needs the `responder` role. " + "x" * 300)
    await env.click("ack:42")
    [answer] = await env.answered()
    assert len(answer["text"]) == 200 and answer["text"].startswith("Acknowledging needs the responder role.")
    env.dispatcher.reply = None  # the dispatcher drops a repeated delivery of the same click
    await env.click("ack:42")
    answers = await env.answered(2)
    assert answers[1] == {"callback_query_id": "4382bfdwdsb323b2d9"}


async def test_a_reply_for_everyone_is_posted_under_the_clicked_message(env: Env) -> None:
    env.dispatcher.reply = Reply("Runbook restart-nginx finished: <ok>", ephemeral=False)
    await env.click("rb:42:restart-nginx")
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [post] = env.tg.called("sendMessage")
    assert post.params["chat_id"] == GROUP and post.params["reply_parameters"]["message_id"] == 17
    assert post.params["text"] == "Runbook restart-nginx finished: &lt;ok&gt;"


async def test_callback_data_of_exactly_64_bytes_round_trips(env: Env) -> None:
    arg = "r" * 58
    button = Button("rb", 42, arg, label="Run a runbook with a long name")
    ref = await env.adapter.send(str(GROUP), Outbound("text", {"text": "Runbooks"}, buttons=[button]))
    [[(_, value)]] = keyboard_of(env.tg.called("sendMessage")[0])
    assert len(value.encode()) == 64
    await env.click(value, env.tg.messages[(GROUP, int(ref.message_id))])
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    assert (env.dispatcher.actions[0].action, env.dispatcher.actions[0].arg) == ("rb", arg)
    assert env.dispatcher.actions[0].source == ref


async def test_a_button_carries_its_incidents_tag_to_the_dispatcher_well_inside_64_bytes(env: Env) -> None:
    """The largest a card's button gets: the largest id, the longest tag, an Escalate mark after reopens, and asking
    first."""
    button = Button("esc", MAX_ID, "999.99", label="Escalate", tag="zzzzzz", confirm="Escalate?")
    ref = await env.adapter.send(str(GROUP), Outbound("text", {"text": "x"}, buttons=[button]))
    [[(_, value)]] = keyboard_of(env.tg.called("sendMessage")[0])
    assert value == f"?esc:{MAX_ID}.zzzzzz:999.99" and len(value.encode()) <= 64
    await env.click(value[1:], env.tg.messages[(GROUP, int(ref.message_id))])  # ✔ Escalate
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    event = env.dispatcher.actions[0]
    assert (event.action, event.incident_id, event.arg, event.tag) == ("esc", MAX_ID, "999.99", "zzzzzz")


@pytest.mark.parametrize("button", [Button("rb", 42, "r" * 59), Button("rb", 42, "r" * 58, confirm="Sure?")])
async def test_a_button_over_64_bytes_is_never_sent(env: Env, button: Button) -> None:
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send(str(GROUP), Outbound("text", {"text": "x"}, buttons=[button]))
    assert caught.value.permanent and "64" in str(caught.value)
    assert not env.tg.calls[2:]


@pytest.mark.parametrize("data", ["hack:42", "ack:42; rm -rf", "ack:0", "ack:42:<b>", "x" * 65, "?nope:1", "!",
                                  "", "ack:42:" + "a" * 58])
async def test_forged_or_unknown_callback_data_is_refused_with_a_toast(env: Env, data: str) -> None:
    await env.click(data)
    [answer] = await env.answered()
    assert answer["text"] == INVALID_BUTTON
    assert not env.dispatcher.actions


async def test_a_button_that_asks_first_turns_into_confirm_and_cancel(env: Env) -> None:
    ref = await env.adapter.send(str(GROUP), card())
    drawn = keyboard_of(env.tg.called("sendMessage")[0])
    assert drawn == [[("Acknowledge", "ack:42"), ("Escalate", "esc:42"), ("Resolve", "?res:42")]]
    message = env.tg.messages[(GROUP, int(ref.message_id))]

    await env.click("?res:42", copy.deepcopy(message))
    await env.answered()
    # At most three to a row (four were cut short on a phone), the armed pair on a row of its own; its other half
    # says No, which no one reads as the action (a "✖ Cancel" beside "✔ Cancel request" was)
    assert keyboard_of(message) == [[("Acknowledge", "ack:42"), ("Escalate", "esc:42")],
                                    [("\u2714 Resolve", "res:42"), ("\u2716 No", "!res:42")]]
    assert "\u2714 Resolve" in env.tg.called("answerCallbackQuery")[0].params["text"]
    assert not env.dispatcher.actions  # nothing resolved yet

    await env.click("!res:42", copy.deepcopy(message))
    await env.answered(2)
    assert keyboard_of(message) == drawn

    await env.click("?res:42", copy.deepcopy(message))
    await env.answered(3)
    await env.click("res:42", copy.deepcopy(message))
    await env.tg.wait_for(lambda: env.dispatcher.actions)
    assert (env.dispatcher.actions[0].action, env.dispatcher.actions[0].incident_id) == ("res", 42)


async def test_a_button_that_asks_first_asks_its_question_as_slacks_dialog_does(env: Env) -> None:
    """Slack's dialog asks "Resolve #42 while 2 alerts are still firing? If they keep firing, a new incident opens.";
    Telegram's first tap only said to tap ✔ Resolve. It asks the question too (a long one as an alert, which stays
    until read), and so do a swap's buttons that ask first."""
    ref = await env.adapter.send(str(GROUP), card())
    await env.click("?res:42", copy.deepcopy(env.tg.messages[(GROUP, int(ref.message_id))]))
    [answer] = await env.answered()
    assert answer["text"] == ("Resolve #42 while 2 alerts are still firing? If they keep firing, a new incident opens. "
                              "Tap \u201c\u2714 Resolve\u201d to confirm, or \u201c\u2716 No\u201d.")
    assert str(answer["show_alert"]).lower() == "true"  # an alert
    cancel = Button("swcx", 7, label="Cancel request", confirm="Cancel swap #7?")
    sent = await env.adapter.page(str(ALICE), Outbound("text", {"text": "Swap #7 waits for Bob."}, [cancel],
                                                       text="Swap #7 waits for Bob."))
    await env.click("?swcx:7", copy.deepcopy(env.tg.messages[(ALICE, int(sent.message_id))]))
    answer = (await env.answered(2))[1]
    assert answer["text"] == ("Cancel swap #7? Tap \u201c\u2714 Cancel request\u201d to confirm, or "
                              "\u201c\u2716 No\u201d.")
    assert "show_alert" not in answer  # short: a toast
    assert keyboard_of(env.tg.messages[(ALICE, int(sent.message_id))]) == [
        [("\u2714 Cancel request", "swcx:7"), ("\u2716 No", "!swcx:7")]]
    await env.click("!swcx:7", copy.deepcopy(env.tg.messages[(ALICE, int(sent.message_id))]))
    assert "text" not in (await env.answered(3))[2]  # Cancel turns it back without a word


async def test_an_answer_the_group_cannot_take_goes_to_the_private_chat(env: Env,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Group flood control longer than a person should wait: the answer is sent privately, with no traceback."""
    env.dispatcher.reply = Reply("3 open incidents")
    env.tg.fail("sendMessage", "Too Many Requests: retry after 60", 429, parameters={"retry_after": 60})
    with caplog.at_level(logging.WARNING):
        update = await env.command("/incident list")
        user = update["message"]["from"]["id"]
        await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [sent] = env.tg.called("sendMessage")
    assert sent.params["chat_id"] == user and "3 open incidents" in sent.params["text"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_arming_keeps_rows_to_three_and_turning_back_draws_the_keyboard_as_it_was() -> None:
    """A button in the middle of a keyboard: its armed pair goes on a row of its own, in its place, and the others keep
    their order, three to a row."""
    from adapters.telegram import confirm_keyboard, keyboard

    buttons = [Button("ack", 42, label="A"), Button("res", 42, label="B", confirm="Sure?"),
               Button("esc", 42, label="C"), Button("reo", 42, label="D")]
    drawn = keyboard(buttons)
    assert drawn is not None
    armed = confirm_keyboard(drawn, "?res:42")
    assert armed is not None
    assert keyboard_of({"reply_markup": armed.to_dict()}) == [
        [("A", "ack:42")], [("\u2714 B", "res:42"), ("\u2716 No", "!res:42")], [("C", "esc:42"), ("D", "reo:42")]]
    back = confirm_keyboard(armed, "!res:42")
    assert back is not None and back.to_dict() == drawn.to_dict()
    assert confirm_keyboard(back, "!res:42") is None  # nothing armed to turn back: the message changed


async def test_a_tap_on_a_card_that_answered_a_command_redraws_it_and_one_on_a_channels_card_does_not(
        env: Env) -> None:
    """The channel's card and pages are redrawn by the outbox; the card `/incident show` posted, a reply to the command,
    is redrawn by the tap itself, as the incident then is (the command that drew it, drawn again)."""
    env.dispatcher.reply = Reply("#42 Disk full on db-1 (triggered)", message=card())
    await env.command("/incident show 42")
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [answer] = env.tg.called("sendMessage")
    shown = env.tg.messages[(GROUP, 1)]
    assert answer.params["reply_parameters"]["message_id"] == 18 and shown["reply_to_message"]["message_id"] == 18
    channel = await env.adapter.send(str(GROUP), card())

    env.dispatcher.reply = Reply("Acknowledged #42.", message=card(make_incident(status="acknowledged",
                                                                                 acknowledged_by="alice")))
    await env.click("ack:42", copy.deepcopy(env.tg.messages[(GROUP, int(channel.message_id))]))
    await env.answered()
    assert not env.tg.called("editMessageText") and len(env.dispatcher.commands) == 1  # the outbox redraws that one

    await env.click("ack:42", copy.deepcopy(shown))
    await env.tg.wait_for(lambda: env.tg.called("editMessageText"))
    assert [(c.name, list(c.args)) for c in env.dispatcher.commands[1:]] == [("incident", ["show", "42"])]
    [edit] = env.tg.called("editMessageText")
    assert (edit.params["chat_id"], edit.params["message_id"]) == (GROUP, 1)
    assert keyboard_of(shown) == [[("Escalate", "esc:42"), ("Resolve", "?res:42")]]
    assert "Acknowledged" in shown["text"]


async def test_only_someone_who_may_press_a_button_arms_its_confirmation(env: Env) -> None:
    """The armed ✔ Resolve is there for the whole group: a stranger or someone without the role does not arm it."""
    ref = await env.adapter.send(str(GROUP), card())
    drawn = keyboard_of(env.tg.called("sendMessage")[0])
    message = env.tg.messages[(GROUP, int(ref.message_id))]
    env.dispatcher.refused = Reply("Resolve needs the `responder` role, and Erin has no roles.")
    await env.click("?res:42", copy.deepcopy(message))
    [answer] = await env.answered()
    assert answer["text"] == "Resolve needs the responder role, and Erin has no roles."  # a toast: no backticks
    assert keyboard_of(message) == drawn and not env.tg.called("editMessageReplyMarkup")
    env.dispatcher.refused = None
    await env.click("?res:42", copy.deepcopy(message))  # a responder arms it...
    await env.answered(2)
    armed = keyboard_of(message)
    env.dispatcher.refused = Reply("I don't know you yet.")
    await env.click("!res:42", copy.deepcopy(message))  # ...and a stranger cannot disarm it
    await env.answered(3)
    assert keyboard_of(message) == armed != drawn
    # each refusal went through the dispatcher's audited check, with the tap's id (once for a tap sent twice)
    assert [(action, incident) for action, incident, _ in env.dispatcher.audited] == [("res", 42), ("res", 42)]
    assert all(event_id for *_, event_id in env.dispatcher.audited)


async def test_asking_on_a_message_whose_keyboard_changed_says_so(env: Env) -> None:
    message = fixture("callback_query.json")["callback_query"]["message"]
    message["reply_markup"] = {"inline_keyboard": [[{"text": "Reopen", "callback_data": "reo:42"}]]}
    await env.click("?res:42", message)  # redrawn (resolved) since the tap
    await env.click("?res:42")  # still drawn, but the message is gone (deleted)
    answers = await env.answered(2)
    assert all(a["text"] == STALE_BUTTON for a in answers)
    assert [c.status for c in env.tg.calls if c.method == "editMessageReplyMarkup"] == [400]
    assert not env.dispatcher.actions


async def test_asking_while_the_group_is_flood_controlled_says_to_try_again(env: Env) -> None:
    ref = await env.adapter.send(str(GROUP), card())
    message = env.tg.messages[(GROUP, int(ref.message_id))]
    env.tg.fail("editMessageReplyMarkup", "Too Many Requests: retry after 7", 429, parameters={"retry_after": 7})
    await env.click("?res:42", copy.deepcopy(message))
    [answer] = await env.answered()
    assert answer["text"] == "Telegram is busy; try again in 7 s."  # not "this message has changed"
    assert not env.dispatcher.actions


async def test_a_command_from_an_anonymous_admin_is_answered_not_acted_on(env: Env) -> None:
    update = fixture("command_group.json")
    update["update_id"] = next(_next_update)
    update["message"]["from"] = {"id": 1087968824, "is_bot": True, "first_name": "Group",
                                 "username": "GroupAnonymousBot"}  # what Telegram sends for an anonymous admin
    update["message"]["sender_chat"] = update["message"]["chat"]
    assert (await env.post(update))[0] == 200
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [answer] = env.tg.called("sendMessage")
    assert answer.params["text"].startswith("You post anonymously, as the group, so I cannot tell who you are")
    assert not env.dispatcher.commands


async def test_a_command_from_someone_posting_as_a_channel_is_answered_not_acted_on(env: Env) -> None:
    """A member who picked a channel in Telegram's "send as" list: the message comes from @Channel_Bot with the channel
    as sender_chat. An anonymous admin was told why nothing happens; this one got no answer at all."""
    update = fixture("command_group.json")
    update["update_id"] = next(_next_update)
    update["message"]["from"] = {"id": 136817688, "is_bot": True, "first_name": "Channel",
                                 "username": "Channel_Bot"}  # what Telegram sends for a post as a channel
    update["message"]["sender_chat"] = {"id": -1005555, "type": "channel", "title": "Alice's channel"}
    assert (await env.post(update))[0] == 200
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [answer] = env.tg.called("sendMessage")
    assert answer.params["text"].startswith("You post as a channel, so I cannot tell who you are")
    assert answer.params["reply_parameters"]["message_id"] == update["message"]["message_id"]
    assert not env.dispatcher.commands


async def test_a_channel_post_forwarded_into_its_discussion_group_gets_no_answer(env: Env) -> None:
    """A channel's own post, forwarded by Telegram into the group linked to it (sender_chat the channel too), is no
    one's command: it is not answered."""
    update = fixture("command_group.json")
    update["update_id"] = next(_next_update)
    update["message"]["from"] = {"id": 777000, "is_bot": False, "first_name": "Telegram"}
    update["message"]["sender_chat"] = {"id": -1005555, "type": "channel", "title": "Ops news"}
    update["message"]["is_automatic_forward"] = True
    assert (await env.post(update))[0] == 200
    await asyncio.sleep(0.3)
    assert not env.tg.called("sendMessage") and not env.dispatcher.commands


async def test_a_person_picked_from_the_mention_list_is_their_telegram_id(env: Env) -> None:
    """Picking someone without a username in Telegram's list inserts their name, linked to their account (a
    text_mention): the command gets their id, which app.yaml knows them by. Offsets count UTF-16 units."""
    update = fixture("command_group.json")
    update["update_id"] = next(_next_update)
    update["message"]["text"] = "/swap@chatops_bot 😀 Röbert next"
    update["message"]["entities"] = [
        {"offset": 0, "length": 17, "type": "bot_command"},
        {"offset": 21, "length": 6, "type": "text_mention",
         "user": {"id": 222222, "is_bot": False, "first_name": "Röbert"}}]
    assert (await env.post(update))[0] == 200
    await env.tg.wait_for(lambda: env.dispatcher.commands)
    [command] = env.dispatcher.commands
    assert (command.name, list(command.args)) == ("swap", ["😀", "222222", "next"])


async def test_a_failing_dispatcher_still_answers_the_click(env: Env) -> None:
    async def broken(event: ActionEvent) -> Reply | None:
        raise RuntimeError("boom")
    env.dispatcher.handle_action = broken  # type: ignore[method-assign]
    await env.click("ack:42", status=503)  # not handled: Telegram posts it again
    [answer] = await env.answered()
    assert answer["text"] == FAILED


# -- commands ---------------------------------------------------------------------------------------

async def test_a_command_with_the_bot_name_in_a_group(env: Env) -> None:
    env.dispatcher.gate.clear()
    posting = asyncio.create_task(env.command("/ack@chatops_bot 42"))
    await env.tg.wait_for(lambda: env.dispatcher.commands)
    assert env.dispatcher.commands == [CommandEvent(
        name="ack", args=["42"], actor=Actor("telegram", str(ALICE), "Alice Example", None),
        chat=MessageRef("telegram", str(GROUP), "", None), direct=False)]
    env.dispatcher.gate.set()
    await asyncio.wait_for(posting, 5)
    [post] = env.tg.called("sendMessage")  # answered before Telegram's 200
    assert post.params["chat_id"] == GROUP and post.params["reply_parameters"]["message_id"] == 18
    assert post.params["parse_mode"] == "HTML" and post.params["text"] == "Acknowledged #42."
    assert post.params["link_preview_options"] == {"is_disabled": True}


async def test_a_command_typed_with_a_no_break_space_is_understood(env: Env) -> None:
    """Option+Space on a Mac types U+00A0 between the words: "/incident show 42" looked right and was one word."""
    await env.command("/incident show\u00a042")
    await env.tg.wait_for(lambda: env.dispatcher.commands)
    [command] = env.dispatcher.commands
    assert (command.name, list(command.args)) == ("incident", ["show", "42"])


async def test_commands_in_a_private_chat_are_direct(env: Env) -> None:
    env.dispatcher.reply = Reply("Hello! Your Telegram id is 111111. It is not linked to anyone yet: add "
                                 "`telegram: 111111` to your entry under `people:` in app.yaml and restart the bot.")
    await env.command("/start", private=True)
    await env.command("/oncall@ChatOps_Bot dba-primary \u201cnext week\u201d", private=True)
    await env.command("ack 42", private=True)  # plain words to the bot: the umbrella command
    await env.tg.wait_for(lambda: len(env.tg.called("sendMessage")) == 3)
    assert [(c.name, list(c.args), c.direct, c.plain) for c in env.dispatcher.commands] == [
        ("start", [], True, False), ("oncall", ["dba-primary", "next week"], True, False),
        ("chatops", ["ack", "42"], True, True)]
    assert all(c.chat == MessageRef("telegram", str(ALICE), "", None) for c in env.dispatcher.commands)
    post = env.tg.called("sendMessage")[0]
    assert post.params["chat_id"] == ALICE
    assert "add <code>telegram: 111111</code> to your entry under <code>people:</code>" in post.params["text"]


async def test_a_command_for_another_bot_and_group_chatter_are_ignored(env: Env) -> None:
    await env.command("/ack@other_bot 42")
    await env.command("the disk is full again")
    await env.command("/help@chatops_bot")
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    await asyncio.sleep(0.05)
    assert [c.name for c in env.dispatcher.commands] == ["help"]


def test_a_command_naming_a_bot_is_ignored_while_our_own_name_is_unknown() -> None:
    """Before getMe has answered (Telegram down at start), `/ack@otherbot 1` could be another bot's: not taken
    (it acknowledged the incident); a command naming no bot still is, and once the name is known, ours is too."""
    from telegram import Message

    from adapters.telegram import command_event

    raw = fixture("command_group.json")["message"]
    for text, unknown, known in (("/ack@other_bot 1", None, None), ("/ack@chatops_bot 1", None, "ack"),
                                 ("/ack 1", "ack", "ack")):
        message = Message.de_json({**raw, "text": text}, None)
        assert message is not None
        found = [command_event(message, name) for name in (None, "chatops_bot")]
        assert [e.name if e else None for e in found] == [unknown, known], text


async def test_a_rich_reply_is_the_incident_card_with_its_keyboard(env: Env) -> None:
    env.dispatcher.reply = Reply("#42 Disk full on db-1 (triggered)", message=card())
    await env.command("/incident show 42")
    await env.tg.wait_for(lambda: env.tg.called("sendMessage"))
    [post] = env.tg.called("sendMessage")
    assert post.params["text"].startswith("\U0001f534 Firing \u00b7 Critical \u00b7 <b>#42 Disk full on db-1</b>")
    assert keyboard_of(post) == [[("Acknowledge", "ack:42"), ("Escalate", "esc:42"), ("Resolve", "?res:42")]]


async def test_a_failing_dispatcher_still_answers_the_command(env: Env) -> None:
    env.dispatcher.error = RuntimeError("boom")
    await env.command("/ack 42", status=503)
    assert html.unescape(env.tg.called("sendMessage")[0].params["text"]) == FAILED


async def test_an_update_whose_handling_failed_is_answered_503_and_handled_when_telegram_sends_it_again(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The dispatcher failed before it acted (the person is told so). Telegram was answered 200 all the same, and
    never posted the update again: the command was lost. Now it gets a 503, and the same update posted again is
    handled, once, not dropped as one already taken; a copy after that is a copy."""
    env.dispatcher.error = RuntimeError("the database went away")
    with caplog.at_level(logging.WARNING, "chatops.telegram"):
        update = await env.command("/ack 42", status=503)
        status, said = await env.post(update)  # Telegram's retry, while the database is still away
    assert status == 503 and "failed before it acted" in json.loads(said)["error"], said
    said_in_log = f"telegram: update {update['update_id']} ('/ack' in chat {GROUP}) is not handled: its handling failed"
    lines = [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]
    assert len(lines) == 2 and all(line.startswith(said_in_log) for line in lines), lines
    env.dispatcher.error = None
    assert (await env.post(update))[0] == 200  # Telegram's retry
    assert (await env.post(update))[0] == 200  # and a copy of it
    # the second failure said nothing more: the person was told the first time
    assert [html.unescape(c.params["text"]) for c in env.tg.called("sendMessage")] == [FAILED, "Acknowledged #42."]
    assert len(env.dispatcher.commands) == 3


async def test_a_503_says_when_to_try_again(env: Env) -> None:
    env.dispatcher.error = RuntimeError("the database went away")
    update = fixture("command_group.json")
    resp = await env.client.post("/telegram/webhook", json=update, headers={SECRET_HEADER: SECRET})
    assert resp.status == 503 and resp.headers["Retry-After"] == "2"
    assert (await resp.json())["error"].startswith(f"update {update['update_id']} is not handled")


@pytest.mark.parametrize(("text", "args"), [
    ("ack 42", ["ack", "42"]), ("  ack   42  ", ["ack", "42"]), ("", []),
    ('override dba "until 18:00"', ["override", "dba", "until 18:00"]),
    ("swap \u201cnext week\u201d", ["swap", "next week"]), ("note don't page", ["note", "don't", "page"]),
    ("show\u00a042", ["show", "42"]),  # Option+Space on a Mac: one space, as on Slack
])
def test_command_text_is_split_like_a_shell_but_tolerant(text: str, args: list[str]) -> None:
    assert split_words(text) == args


def test_a_toast_has_no_markup_and_fits() -> None:
    assert toast("`/ack ID` needs\n`responder`") == "/ack ID needs\nresponder"
    assert len(toast("y" * 500)) == 200


# -- outbound ---------------------------------------------------------------------------------------

async def test_send_update_and_reply_draw_html_and_the_keyboard(env: Env) -> None:
    ref = await env.adapter.send(str(GROUP), card())
    assert ref == MessageRef("telegram", str(GROUP), "1", None)
    [post] = env.tg.called("sendMessage")
    text = post.params["text"]
    first, *rest = text.split("\n")
    assert first == "\U0001f534 Firing \u00b7 Critical \u00b7 <b>#42 Disk full on db-1</b>"
    assert "<i>Waiting for someone to acknowledge.</i>" in rest
    assert "<b>Latest:</b> Disk 97% full on /var" in text
    assert '<a href="http://prom:9090/graph?g0.expr=disk&amp;g0.tab=1">Graph</a>' in text
    assert '<a href="https://wiki.example/disk">Runbook</a>' in text
    assert (post.params["parse_mode"], post.params["link_preview_options"]) == ("HTML", {"is_disabled": True})
    assert keyboard_of(post) == [[("Acknowledge", "ack:42"), ("Escalate", "esc:42"), ("Resolve", "?res:42")]]
    assert "reply_parameters" not in post.params

    acked = make_incident(status="acknowledged", acknowledged_by="alice", acknowledged_at=NOW)
    await env.adapter.update(ref, card(acked))
    [edit] = env.tg.called("editMessageText")
    assert (edit.params["chat_id"], edit.params["message_id"]) == (GROUP, 1)
    assert edit.params["text"].startswith("\U0001f7e0 Acknowledged \u00b7 Critical \u00b7 <b>#42 ")
    assert "acknowledged by Alice" in edit.params["text"]
    assert keyboard_of(edit) == [[("Escalate", "esc:42"), ("Resolve", "?res:42")]]
    await env.adapter.update(ref, card(acked))  # the same again: Telegram says "not modified", which is fine
    assert [c.status for c in env.tg.calls if c.method == "editMessageText"] == [200, 400]

    line = await env.adapter.reply(ref, Outbound("thread", {"line": thread_line(
        "incident.acknowledged", {}, actor_name="Alice")}))
    assert line == MessageRef("telegram", str(GROUP), "2", "1")
    again = await env.adapter.reply(line, Outbound("thread", {"line": "Resolved by <Bob>"}))
    assert again.thread_id == "1"  # a reply to a reply stays under the incident message
    posts = env.tg.called("sendMessage")
    assert [p.params.get("reply_parameters") for p in posts[1:]] == [
        {"message_id": 1, "allow_sending_without_reply": True}] * 2
    assert [p.params["text"] for p in posts[1:]] == ["Acknowledged by Alice", "Resolved by &lt;Bob&gt;"]
    assert all("reply_markup" not in p.params for p in posts[1:])
    # The story is silent on the group's phones; the card was not, and a line that asks the whole chat is not.
    assert [p.params.get("disable_notification") for p in posts] == [None, "true", "true"]  # (form-encoded)
    await asyncio.sleep(1.05)  # the fake's flood control: three at once, then one a second
    await env.adapter.reply(ref, Outbound("thread", {"line": "Step 2 of 3: nobody has acknowledged yet.",
                                                     "mention": "here"}))
    assert env.tg.called("sendMessage")[-1].params.get("disable_notification") is None


async def test_hostile_alert_text_is_escaped(env: Env) -> None:
    hostile = '<script>alert("x")</script> & <b>"bold"</b>'
    incident = make_incident(title=hostile, labels={"service": "<svc>", "instance": "a&b"})
    alert = make_alert(hostile, annotations={"description": "</i><a href=x>click</a> &amp;",
                                             "runbook_url": 'https://wiki.example/"><b>x'})
    await env.adapter.send(str(GROUP), card(incident, [alert]))
    [post] = env.tg.called("sendMessage")  # the fake parses the HTML like Telegram: it would refuse a stray tag
    text = post.params["text"]
    assert "<script>" not in text and "</i><a href=x>" not in text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;&#34;bold&#34;&lt;/b&gt;" in text
    assert "&lt;/i&gt;&lt;a href=x&gt;click&lt;/a&gt; &amp;amp;" in text
    assert "service &lt;svc&gt; \u00b7 instance a&amp;b" in text
    assert '<a href="https://wiki.example/%22%3E%3Cb%3Ex">Runbook</a>' in text


async def test_an_at_name_in_alert_text_mentions_nobody(env: Env) -> None:
    # Telegram turns "@name" into a mention that notifies that user: alert text must not page people.
    incident = make_incident(title="disk full, ping @ceo_person", labels={"service": "@payments_oncall"})
    alert = make_alert("@everyone_here look @@twice", annotations={"description": "mail admin@example.com",
                                                          "runbook_url": "https://social.example/@ops"})
    await env.adapter.send(str(GROUP), card(incident, [alert]))
    await env.adapter.send(str(GROUP), Outbound("text", {"text": "Resolved; tell @cto_person"}))
    first, second = (p.params["text"] for p in env.tg.called("sendMessage"))
    for name in ("ceo_person", "payments_oncall", "everyone_here"):
        assert f"@{name}" not in first and f"@\u2060{name}" in first  # a word joiner: invisible, no mention
    assert "admin@example.com" in first  # not a mention: left alone
    assert "@@\u2060twice" in first  # Telegram reads @@twice as a mention of @twice
    assert '<a href="https://social.example/@ops">Runbook</a>' in first  # inside a tag: left alone
    assert second == "Resolved; tell @\u2060cto_person"


async def test_a_huge_incident_stays_under_telegrams_4096_characters(env: Env) -> None:
    incident = make_incident(title="T" * 5000, labels={"service": "s" * 500, "instance": "i" * 500})
    alert = make_alert("S" * 5000, annotations={"description": "<d>" * 3000})
    await env.adapter.send(str(GROUP), card(incident, [alert]))  # the fake refuses "message is too long"
    await env.adapter.send(str(GROUP), Outbound("text", {"text": "`x` " * 3000}))
    assert len(env.tg.called("sendMessage")) == 2


async def test_a_kind_with_only_generic_text_is_escaped_and_cut(env: Env, tmp_path: Path) -> None:
    (tmp_path / "notice.generic.txt.j2").write_text("{{ title }}")
    env.adapter.renderer = Renderer(override_dir=tmp_path)
    await env.adapter.send(str(GROUP), Outbound("notice", {"title": "<t> & " + "n" * 5000}))
    [post] = env.tg.called("sendMessage")
    assert post.params["text"].startswith("&lt;t&gt; &amp; nnn") and post.params["text"].endswith("n\u2026")


async def test_notify_goes_to_the_chat_or_the_private_chat(env: Env) -> None:
    alice = Actor("telegram", str(ALICE), "Alice")
    await env.adapter.notify(alice, MessageRef("telegram", str(GROUP), ""), "You need the `responder` role <now>")
    await env.adapter.notify(alice, None, "Your swap was approved")
    first, second = env.tg.called("sendMessage")
    assert first.params["chat_id"] == GROUP
    assert first.params["text"] == "You need the <code>responder</code> role &lt;now&gt;"
    assert (second.params["chat_id"], second.params["text"]) == (ALICE, "Your swap was approved")
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.notify(Actor("slack", "U01ALICE"), None, "hi")
    assert caught.value.permanent


async def test_a_page_is_a_private_message_with_the_buttons(env: Env) -> None:
    ref = await env.adapter.page(str(ALICE), card())
    assert ref == MessageRef("telegram", str(ALICE), "1", None)
    [post] = env.tg.called("sendMessage")
    assert post.params["chat_id"] == ALICE and keyboard_of(post)[0][0] == ("Acknowledge", "ack:42")


@pytest.mark.parametrize(("description", "code"), [
    ("Forbidden: bot can't initiate conversation with a user", 403), ("Bad Request: chat not found", 400)])
async def test_a_page_to_someone_who_never_started_the_bot_is_permanent_and_says_what_to_do(
        env: Env, caplog: pytest.LogCaptureFixture, description: str, code: int) -> None:
    env.tg.fail("sendMessage", description, error_code=code)
    with caplog.at_level(logging.WARNING, "chatops.telegram"), pytest.raises(DeliveryError) as caught:
        await env.adapter.page("222222", card())
    message = "Telegram user 222222 has not started a chat with the bot; ask them to open it and press Start"
    assert caught.value.permanent and str(caught.value) == message
    assert message in caplog.text
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.page("@alice", card())
    assert caught.value.permanent


# -- errors -----------------------------------------------------------------------------------------

async def test_a_429_becomes_retry_after_per_chat(env: Env) -> None:
    message = Outbound("text", {"text": "x"})
    for _ in range(env.tg.burst):
        await env.adapter.send(str(GROUP), message)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send(str(GROUP), message)
    assert caught.value.retry_after == 1.0 and not caught.value.permanent
    assert "retry" in str(caught.value).lower()
    assert [c.status for c in env.tg.calls[2:]] == [200, 200, 200, 429]  # and PTB did not retry by itself
    await env.adapter.send("-100999", message)  # the limit is per chat


async def test_a_group_gets_20_messages_a_minute(env: Env) -> None:
    env.tg.per_second, env.tg.burst = 1000.0, 1000
    message = Outbound("text", {"text": "x"})
    for _ in range(20):
        await env.adapter.send(str(GROUP), message)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send(str(GROUP), message)
    assert caught.value.retry_after is not None and 55 <= caught.value.retry_after <= 61
    for _ in range(21):  # a private chat has no per-minute cap
        await env.adapter.send(str(ALICE), message)


@pytest.mark.parametrize(("description", "code"), [
    ("Bad Request: chat not found", 400), ("Forbidden: bot was kicked from the supergroup chat", 403),
    ("Forbidden: bot can't initiate conversation with a user", 403)])
async def test_refusals_that_retrying_cannot_fix_are_permanent(env: Env, description: str, code: int) -> None:
    env.tg.fail("sendMessage", description, error_code=code)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send(str(GROUP), Outbound("text", {"text": "x"}))
    assert caught.value.permanent and caught.value.retry_after is None
    assert description.split(": ", 1)[1].lower() in str(caught.value).lower()


async def test_editing_a_message_that_is_gone_is_permanent(env: Env) -> None:
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.update(MessageRef("telegram", str(GROUP), "999"), card())
    assert caught.value.permanent and "message to edit not found" in str(caught.value).lower()


async def test_a_group_that_became_a_supergroup_is_followed_there(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Telegram upgrades a group on its own: messages for the old id go to the supergroup, and the log says to put
    its id in app.yaml. A card in the old group cannot be edited: that is a message gone (the outbox posts afresh)."""
    supergroup = -1009876543210
    old = await env.adapter.send("-4000", Outbound("text", {"text": "before"}))
    upgraded = "Bad Request: group chat was upgraded to a supergroup chat"
    env.tg.fail("sendMessage", upgraded, parameters={"migrate_to_chat_id": supergroup})
    with caplog.at_level(logging.WARNING):
        ref = await env.adapter.send("-4000", Outbound("text", {"text": "after"}))
    assert ref.chat_id == str(supergroup) and f"app.yaml should say {supergroup}" in caplog.text
    line = await env.adapter.reply(ref, Outbound("thread", {"line": "Acknowledged by Alice"}))  # there at once
    assert line.chat_id == str(supergroup)
    assert [c.params["chat_id"] for c in env.tg.called("sendMessage")] == [-4000, supergroup, supergroup]
    env.tg.fail("editMessageText", upgraded, parameters={"migrate_to_chat_id": supergroup})
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.update(old, Outbound("text", {"text": "redrawn"}))
    assert caught.value.gone and f"the group is now the supergroup {supergroup}" in str(caught.value)
    calls = len(env.tg.calls)
    with pytest.raises(DeliveryError) as caught:  # a line under a card of the old group: that card is gone too
        await env.adapter.reply(old, Outbound("thread", {"line": "Resolved by Bob"}))
    assert caught.value.gone and len(env.tg.calls) == calls  # known now: not even tried
    assert [m["text"] for (chat, _), m in env.tg.messages.items() if chat == supergroup] == [
        "after", "Acknowledged by Alice"]  # nothing of the old group's was drawn over a message of the new one


@pytest.mark.parametrize("code", [500, 502])
async def test_server_errors_are_retryable(env: Env, code: int) -> None:
    env.tg.fail("sendMessage", "Internal Server Error", error_code=code)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send(str(GROUP), Outbound("text", {"text": "x"}))
    assert not caught.value.permanent and caught.value.retry_after is None
    assert len(env.tg.called("sendMessage")) == 0 and len(env.tg.calls) == 3


async def test_an_unreachable_telegram_is_retryable(env: Env) -> None:
    async with FakeTelegram() as gone:
        url = gone.api_url
    adapter = TelegramAdapter(TelegramSettings(bot_token=env.tg.token, webhook_secret=SECRET, api_url=url),
                              renderer=Renderer(), dispatcher=env.dispatcher)
    try:
        with pytest.raises(DeliveryError) as caught:
            await adapter.send(str(GROUP), Outbound("text", {"text": "x"}))
        assert not caught.value.permanent
        assert not caught.value.unknown  # refused before anything was sent: sending it again (or elsewhere) is safe
    finally:
        await adapter.stop()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_message_telegram_took_whose_answer_was_lost_may_have_arrived(env: Env, reset: bool) -> None:
    """The connection goes after Telegram took the message, before its answer (python-telegram-bot: NetworkError
    from httpx's RemoteProtocolError or ReadError): the person has it, so it must not count as not delivered."""
    env.tg.lose_answer("sendMessage", reset=reset)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.page(str(ALICE), Outbound("text", {"text": "Page: #42"}))
    assert [m["text"] for (chat, _), m in env.tg.messages.items() if chat == ALICE] == ["Page: #42"]
    assert caught.value.unknown and not caught.value.permanent
    assert ("RemoteProtocolError" if not reset else "ReadError") in str(caught.value)


# -- setup and polling ------------------------------------------------------------------------------

async def test_set_webhook_gives_telegram_the_secret_and_the_update_types(env: Env) -> None:
    await env.adapter.set_webhook("https://bot.example.com/telegram/webhook")
    [call] = env.tg.called("setWebhook")
    assert call.params == {"url": "https://bot.example.com/telegram/webhook", "secret_token": SECRET,
                           "allowed_updates": ["message", "callback_query"]}


async def test_a_bot_that_polls_needs_no_webhook_secret_and_its_webhook_then_takes_nothing(tmp_path: Path) -> None:
    """mode: polling, for a bot nothing reaches over HTTP, still required a webhook_secret (check-config refused the
    config, and the example app.yaml switched Telegram off without TELEGRAM_WEBHOOK_SECRET). It runs without one, and
    /telegram/webhook then refuses every request, saying why, rather than take updates nobody can vouch for."""
    from bot.cli import main
    from tests.botkit import running_bot

    async with FakeTelegram() as tg:
        extra = f"adapters:\n  telegram: {{bot_token: '{tg.token}', api_url: '{tg.api_url}', mode: polling}}\n"
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra) as h:
            assert "telegram" in h.bot.adapters
            tg.push_update(fixture("command_group.json"))
            await tg.wait_for(lambda: tg.called("sendMessage"), timeout=5)  # polled, and answered
            for secret in (None, "", "tg-webhook-secret_0123456789"):
                resp = await h.client.post("/telegram/webhook", data=json.dumps(fixture("callback_query.json")),
                                           headers={"Content-Type": "application/json",
                                                    **({SECRET_HEADER: secret} if secret is not None else {})})
                assert resp.status == 401 and "polls Telegram for its updates" in await resp.text()
            await asyncio.sleep(0.1)
            assert not tg.called("answerCallbackQuery")  # the callback posted to the webhook was not taken
            with pytest.raises(DeliveryError) as caught:  # (`chatops telegram set-webhook`)
                await h.bot.adapters["telegram"].set_webhook("https://bot.example.com/telegram/webhook")
            assert "webhook_secret" in str(caught.value) and not tg.called("setWebhook")
        cfg = tmp_path / "polling.yaml"
        cfg.write_text(f"adapters:\n  telegram: {{bot_token: '{tg.token}', mode: polling, api_url: '{tg.api_url}'}}\n"
                       "server: {public_url: 'https://bot.example.com'}\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # said as what to set, not as Telegram's refusal
            assert await asyncio.to_thread(main, ["telegram", "set-webhook", "-c", str(cfg)]) == 2
        assert err.getvalue().startswith("adapters.telegram.mode is polling: ")
        assert not tg.called("setWebhook")


@pytest.mark.parametrize("mode, secret, valid", [
    ("polling", "", True), ("polling", "    webhook_secret: ${TELEGRAM_WEBHOOK_SECRET:-}\n", True),
    ("webhook", "", False), ("webhook", "    webhook_secret: ${TELEGRAM_WEBHOOK_SECRET:-}\n", False)])
def test_check_config_wants_a_webhook_secret_only_for_a_webhook(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: str, secret: str,
        valid: bool) -> None:
    from bot.cli import main

    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET", raising=False)
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'b.db'}'}}\n"
                   f"adapters:\n  telegram:\n    bot_token: '123456:ABC-token'\n{secret}    mode: {mode}\n")
    code = main(["check-config", "-c", str(cfg)])
    said = capsys.readouterr()
    if valid:
        assert code == 0 and "adapters on: telegram" in said.out, said
    else:
        assert code == 2 and "adapters.telegram.webhook_secret: required with mode: webhook" in said.out, said


def test_check_config_names_a_missing_webhook_secret_while_the_token_is_unset(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """In CI, where the token is not set, check-config said "valid" of a webhook bot without webhook_secret (the
    section is off, and only some kinds of problem were said of it); the day the token was set, serve refused."""
    from bot.cli import main

    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'b.db'}'}}\n"
                   "adapters:\n  telegram: {bot_token: '${TELEGRAM_BOT_TOKEN}'}\n")
    assert main(["check-config", "-c", str(cfg)]) == 2
    assert "adapters.telegram.webhook_secret: required with mode: webhook" in capsys.readouterr().out
    cfg.write_text(cfg.read_text().replace("{bot_token: '${TELEGRAM_BOT_TOKEN}'}",
                                           "{bot_token: '${TELEGRAM_BOT_TOKEN}', mode: polling}"))
    assert main(["check-config", "-c", str(cfg)]) == 0


async def test_polling_feeds_updates_into_the_same_path() -> None:
    async with FakeTelegram() as tg:
        tg.webhook = {"url": "https://old.example.com/telegram/webhook"}
        dispatcher = RecordingDispatcher()
        adapter = TelegramAdapter(settings(tg, mode="polling"), renderer=Renderer(), dispatcher=dispatcher)
        adapter.poll_timeout = 1
        await adapter.start()
        try:
            tg.push_update(fixture("callback_query.json"))
            tg.push_update(fixture("command_group.json"))
            await tg.wait_for(lambda: tg.called("sendMessage") and tg.called("answerCallbackQuery"))
            assert [c.name for c in dispatcher.commands] == ["ack"]
            assert [(a.action, a.incident_id) for a in dispatcher.actions] == [("ack", 42)]
            assert tg.webhook is None and tg.called("deleteWebhook")
            polls = tg.called("getUpdates")
            assert polls[0].params["allowed_updates"] == ["message", "callback_query"]
            await tg.wait_for(lambda: len(tg.called("getUpdates")) > len(polls))
            assert tg.called("getUpdates")[-1].params["offset"] == 900000003  # the updates are confirmed
        finally:
            await adapter.stop()
        assert len(dispatcher.commands) == 1



@contextlib.asynccontextmanager
async def polling(tg: FakeTelegram, dispatcher: RecordingDispatcher, **knobs: float) -> AsyncIterator[TelegramAdapter]:
    """An adapter in `mode: polling` (long polls of a second), started, with `knobs` set (retry_wait...); stopped
    after."""
    adapter = TelegramAdapter(settings(tg, mode="polling"), renderer=Renderer(), dispatcher=dispatcher)
    adapter.poll_timeout = 1
    for name, value in knobs.items():
        setattr(adapter, name, value)
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.stop()


def offsets(tg: FakeTelegram) -> list[int]:
    """The offsets getUpdates was called with: each confirms to Telegram every update below it."""
    return [c.params["offset"] for c in tg.called("getUpdates") if "offset" in c.params]


async def test_an_update_being_handled_is_not_confirmed_and_the_next_poller_handles_it() -> None:
    """The poller confirmed every update it fetched at its next getUpdates, while they were still being handled: a
    bot that died then lost them, for Telegram never gives a confirmed update again. Now the tap still being handled
    when the first poller dies is fetched by the next one and handled there, once; the command handled before it
    is confirmed, and not handled again."""
    async with FakeTelegram() as tg:
        command, tap = fixture("command_group.json"), fixture("callback_query.json")
        command["update_id"], tap["update_id"] = 500, 501
        first, entered = RecordingDispatcher(), asyncio.Event()

        async def hangs(event: ActionEvent) -> Reply | None:
            first.actions.append(event)
            entered.set()
            await asyncio.Event().wait()  # a slow store, a bot about to die
            return None
        first.handle_action = hangs  # type: ignore[method-assign]
        async with polling(tg, first, poll_pace=0.05) as adapter:
            tg.push_update(command)
            tg.push_update(tap)
            await asyncio.wait_for(entered.wait(), 5)
            await tg.wait_for(lambda: tg.called("sendMessage"))  # the command is answered
            polls = len(tg.called("getUpdates"))
            await tg.wait_for(lambda: len(tg.called("getUpdates")) > polls + 1, timeout=5)  # polling goes on meanwhile
            assert max(offsets(tg)) == 501  # the command is confirmed, the tap is not
            for task in [*adapter._loops, *adapter._tasks]:  # the bot dies where it is: nothing after it runs
                task.cancel()
            await asyncio.gather(*adapter._loops, *adapter._tasks, return_exceptions=True)
        second = RecordingDispatcher()
        async with polling(tg, second):
            await tg.wait_for(lambda: tg.called("answerCallbackQuery") and 502 in offsets(tg), timeout=5)
        assert [(a.action, a.incident_id) for a in second.actions] == [("ack", 42)] and second.commands == []
        assert [c.params["text"] for c in tg.called("answerCallbackQuery")] == ["Acknowledged #42."]
        assert len(first.commands) == 1 and len(tg.called("sendMessage")) == 1


async def test_a_polled_update_whose_handling_failed_is_fetched_and_handled_again() -> None:
    """The dispatcher failed before it acted (the database went away): the person is told, and the update, not
    confirmed, is fetched and handled again a moment later, once; the update after it is handled once."""
    async with FakeTelegram() as tg:
        dispatcher = RecordingDispatcher()
        dispatcher.error = RuntimeError("the database went away")
        async with polling(tg, dispatcher, retry_wait=0.3, poll_pace=0.05):
            tg.push_update(fixture("command_group.json"))
            await tg.wait_for(lambda: tg.called("sendMessage"))
            dispatcher.error = None  # the database is back
            tg.push_update(fixture("command_private.json"))
            await tg.wait_for(lambda: len(tg.called("sendMessage")) == 3 and 900000004 in offsets(tg), timeout=5)
            await asyncio.sleep(0.5)
        said = [(c.params["chat_id"], html.unescape(c.params["text"])) for c in tg.called("sendMessage")]
        assert [text for chat, text in said if chat == GROUP] == [FAILED, "Acknowledged #42."]
        assert [text for chat, text in said if chat == ALICE] == ["Acknowledged #42."]
        assert len(dispatcher.commands) == 3  # the group's command twice (failed, then handled), the private one once
        assert max(offsets(tg)) == 900000004  # both confirmed


async def test_a_polled_update_that_keeps_failing_is_given_up_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """It is tried again, with growing pauses, until it has failed for `give_up_after` seconds, then given up: the
    person was told once, the log says which update was lost, and it no longer holds back the updates after it."""
    async with FakeTelegram() as tg:
        dispatcher = RecordingDispatcher()
        dispatcher.error = RuntimeError("the database went away")
        async with polling(tg, dispatcher, retry_wait=0.1, give_up_after=1.0, poll_pace=0.05):
            tg.push_update(fixture("command_group.json"))
            await tg.wait_for(lambda: 900000003 in offsets(tg), timeout=5)
            dispatcher.error = None
            tg.push_update(fixture("command_private.json"))
            await tg.wait_for(lambda: len(tg.called("sendMessage")) == 2 and 900000004 in offsets(tg))
        tries = len(dispatcher.commands) - 1
        assert 3 <= tries <= 6, tries  # at 0, 0.1, 0.3, 0.7 s, ... until a second has passed
        assert [html.unescape(c.params["text"]) for c in tg.called("sendMessage")] == [FAILED, "Acknowledged #42."]
        [given_up] = [r for r in caplog.records if "giving up" in r.getMessage()]
        assert given_up.levelno == logging.ERROR
        assert given_up.getMessage().startswith(
            f"telegram: giving up on update 900000002 ('/ack@chatops_bot' in chat {GROUP}) after {tries} failed attempt(s)")


def test_a_message_deleted_in_telegram_is_told_apart_from_other_refusals() -> None:
    """The outbox posts a deleted incident card afresh; other bad requests stay refusals."""
    from telegram.error import BadRequest

    from adapters.telegram import delivery_error

    assert delivery_error("editMessageText", BadRequest("Message to edit not found")).gone
    other = delivery_error("editMessageText", BadRequest("Chat not found"))
    assert other.permanent and not other.gone


async def test_set_webhook_with_a_refused_token_names_the_token_setting_and_never_prints_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    async with FakeTelegram() as tg:
        wrong = "123456:SECRET-wrong-token-value"
        cfg = tmp_path / "app.yaml"
        cfg.write_text(f"server: {{public_url: 'https://bot.example.com'}}\n"
                       f"adapters:\n  telegram: {{bot_token: '{wrong}', webhook_secret: s3cret-s3cret, "
                       f"api_url: '{tg.api_url}'}}\n")
        assert await asyncio.to_thread(main, ["telegram", "set-webhook", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "SECRET" not in err and "123456" not in err, err
    assert "the bot token was refused; check adapters.telegram.bot_token" in err, err


async def test_set_webhook_with_telegram_unreachable_says_so_and_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "Telegram refused: ... All connection attempts failed", which reads as a refused token."""
    from bot.cli import main

    cfg = tmp_path / "app.yaml"
    cfg.write_text("server: {public_url: 'https://bot.example.com'}\n"
                   "adapters:\n  telegram: {bot_token: '123456:ABC-token', webhook_secret: s3cret-s3cret, "
                   "api_url: 'http://127.0.0.1:1/bot'}\n")
    assert await asyncio.to_thread(main, ["telegram", "set-webhook", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cannot reach Telegram at http://127.0.0.1:1/bot: ") and "refused" not in err.split(":")[0], err
    assert err.rstrip().endswith("check the network (or adapters.telegram.api_url) and run this again"), err
    assert "ABC-token" not in err


@pytest.mark.parametrize("body", [
    {"update_id": 17, "callback_query": {"id": "q", "chat_instance": "c", "data": "ack:42"}},  # no "from"
    {"update_id": 18, "message": {"message_id": 1, "date": 1, "text": "/ack 42",
                                  "from": {"id": 111111, "is_bot": False, "first_name": "Alice"}}},  # no "chat"
])
async def test_an_update_without_its_chat_or_its_sender_is_a_400(env: Env, body: dict[str, Any]) -> None:
    """Its handling broke off (no sender to act as, no chat to answer in), and its log line broke off again: a 500.
    Refused as the other shapes are; nothing is done."""
    status, text = await env.post(body)
    assert status == 400 and "without `chat`, or a callback_query without `from`" in text, (status, text)
    assert env.dispatcher.actions == [] and env.dispatcher.commands == []


async def test_a_taps_answer_waits_out_5_s_of_flood_control_at_most(env: Env) -> None:
    """The wait for a command's answer (10 s) was defined under the tap's name too, after it: a tap's spinner waited
    out 9 s, where Telegram takes a tap's answer for a few seconds only."""
    env.tg.fail("answerCallbackQuery", "Too Many Requests: retry after 9", 429, parameters={"retry_after": 9})
    started = asyncio.get_running_loop().time()
    await env.click("ack:42")
    assert [c.status for c in env.tg.calls if c.method == "answerCallbackQuery"] == [429]
    assert asyncio.get_running_loop().time() - started < 5
