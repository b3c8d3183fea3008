"""The Slack adapter with the real slack-bolt and slack_sdk, against a fake Slack on 127.0.0.1.

Requests are signed the way Slack signs them (`v0:{ts}:{body}`, HMAC-SHA256) and
carry payloads shaped like Slack's (tests/fixtures/slack/).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import pytest
from aiohttp.test_utils import TestClient

from adapters.settings import SlackSettings
from adapters.slack import INVALID_BUTTON, SlackAdapter, manifest, response_url_allowed, split_args
from bot.chat import FAILED, ActionEvent, Button, CommandEvent, DeliveryError, MessageRef, Outbound, Reply
from bot.model import Actor
from tests.fake_slack import FORM, FakeSlack
from tests.recording import RecordingDispatcher, served
from tests.fake_slack import signed as slack_signed

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "slack"
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


class StubRenderer:
    """Stands in for bot.render.Renderer: one section block with the kind and the title."""

    def render_json(self, kind: str, platform: str, context: Mapping[str, Any]) -> dict[str, Any]:
        text = f"{kind}: {context.get('title', '')}"
        return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


@dataclass
class Env:
    slack: FakeSlack
    adapter: SlackAdapter
    dispatcher: RecordingDispatcher
    client: TestClient

    async def post(self, body: str, headers: dict[str, str]) -> tuple[int, str]:
        resp = await self.client.post("/slack/events", data=body.encode(), headers=headers)
        return resp.status, await resp.text()

    async def click(self, payload: dict[str, Any], key: str = "click", **sign: Any) -> tuple[int, str]:
        body = "payload=" + quote(json.dumps({**payload, "response_url": self.slack.response_url(key)}))
        return await self.post(body, signed(body, **sign))

    async def command(self, key: str = "cmd", **fields: str) -> tuple[int, str]:
        form = dict(parse_qsl((FIXTURES / "slash_command.txt").read_text()))
        form.update(fields, response_url=self.slack.response_url(key))
        body = urlencode(form)
        return await self.post(body, signed(body))


def signed(body: str, *, secret: str = SECRET, ts: int | None = None, content_type: str = FORM) -> dict[str, str]:
    return slack_signed(body, secret=secret, ts=ts, content_type=content_type)


def click_payload() -> dict[str, Any]:
    return json.loads((FIXTURES / "block_actions.json").read_text())


def settings(slack: FakeSlack, token: str | None = None) -> SlackSettings:
    return SlackSettings(bot_token=token or slack.token, signing_secret=SECRET, api_url=slack.api_url)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with FakeSlack() as slack:
        dispatcher = RecordingDispatcher()
        adapter = SlackAdapter(settings(slack), renderer=StubRenderer(), dispatcher=dispatcher)
        async with served(adapter) as client:
            yield Env(slack, adapter, dispatcher, client)


# -- clicks -----------------------------------------------------------------------------------------

async def test_a_click_is_acknowledged_at_once_and_reaches_the_dispatcher(env: Env) -> None:
    env.dispatcher.gate.clear()  # the dispatcher is still busy when Slack gets its answer
    started = time.perf_counter()
    status, _ = await env.click(click_payload())
    assert status == 200
    assert time.perf_counter() - started < 1.0
    await env.slack.wait_for(lambda: env.dispatcher.actions)
    assert env.dispatcher.actions == [ActionEvent(
        action="ack", incident_id=42, arg="",
        actor=Actor("slack", "U01ALICE", "alice", None),
        source=MessageRef("slack", "C0OPS", "1700000000.000100", None),
        event_id="U01ALICE:1700000001.512345",
    )]
    assert not env.slack.responses["click"]
    env.dispatcher.gate.set()
    await env.slack.wait_for(lambda: env.slack.responses["click"])
    assert env.slack.responses["click"] == [
        {"text": "Acknowledged #42.", "response_type": "ephemeral", "replace_original": False}]
    assert not env.slack.called("auth.test")  # authorize= answers without a round trip


async def test_a_click_in_a_thread_keeps_the_parent(env: Env) -> None:
    payload = click_payload()
    payload["message"].update(ts="1700000000.000300", thread_ts="1700000000.000100")
    payload["container"].update(message_ts="1700000000.000300", thread_ts="1700000000.000100")
    payload["actions"][0]["value"] = "rb:42:restart-nginx"
    await env.click(payload)
    await env.slack.wait_for(lambda: env.dispatcher.actions)
    event = env.dispatcher.actions[0]
    assert (event.action, event.incident_id, event.arg) == ("rb", 42, "restart-nginx")
    assert event.source == MessageRef("slack", "C0OPS", "1700000000.000300", "1700000000.000100")


async def test_a_reply_for_everyone_goes_to_the_incident_thread(env: Env) -> None:
    env.dispatcher.reply = Reply("Alice acknowledged <!channel> & more", ephemeral=False)
    await env.click(click_payload())
    await env.slack.wait_for(lambda: env.slack.called("chat.postMessage"))
    params = env.slack.called("chat.postMessage")[0].params
    assert params["channel"] == "C0OPS" and params["thread_ts"] == "1700000000.000100"
    assert params["text"] == "Alice acknowledged &lt;!channel&gt; &amp; more"  # no surprise @channel
    assert not env.slack.responses["click"]


async def test_a_duplicate_click_answer_none_sends_nothing(env: Env) -> None:
    env.dispatcher.reply = None
    await env.click(click_payload())
    await env.slack.wait_for(lambda: env.dispatcher.actions)
    await asyncio.sleep(0.1)
    assert not env.slack.responses["click"] and not env.slack.calls


@pytest.mark.parametrize("value", ["ack:42;rm -rf /", "evil", "", "ack:0", "zzz:42", "ack:42:" + "x" * 70])
async def test_a_button_value_we_did_not_make_is_refused(env: Env, value: str) -> None:
    payload = click_payload()
    payload["actions"][0]["value"] = value
    status, _ = await env.click(payload)
    assert status == 200
    await env.slack.wait_for(lambda: env.slack.responses["click"])
    assert env.slack.responses["click"] == [
        {"text": INVALID_BUTTON, "response_type": "ephemeral", "replace_original": False}]
    assert env.dispatcher.actions == []


async def test_a_forged_signature_is_refused(env: Env) -> None:
    status, _ = await env.click(click_payload(), secret="not-the-signing-secret")
    assert status == 401
    body = "payload=" + quote(json.dumps(click_payload()))
    assert (await env.post(body, {"Content-Type": FORM}))[0] == 401  # no signature at all
    headers = signed(body)
    assert (await env.post(body.replace("ack%3A42", "res%3A42"), headers))[0] == 401  # body changed after signing
    await asyncio.sleep(0.05)
    assert env.dispatcher.actions == [] and env.slack.calls == []


@pytest.mark.parametrize(("body", "content_type", "headers"), [
    ('{"type":', "application/json", {}),  # broken JSON, unsigned
    ("[1,2]", "application/json", {}),
    ('"str"', "application/json", {}),
    ("payload=%7Bx", FORM, {}),
    ("payload=%7Bx", FORM, {"X-Slack-Request-Timestamp": "abc", "X-Slack-Signature": "v0=00"}),
    ("payload=%7Bx", FORM, {"X-Slack-Request-Timestamp": "now", "X-Slack-Signature": "v0=\u00e9"}),
])
async def test_unsigned_or_malformed_requests_are_refused_before_their_body_is_read(
        env: Env, body: str, content_type: str, headers: dict[str, str]) -> None:
    headers = {k: (str(int(time.time())) if v == "now" else v.encode().decode("unicode_escape"))
               for k, v in headers.items()}
    status, answer = await env.post(body, {"Content-Type": content_type, **headers})
    assert status == 401, answer
    assert "invalid or missing Slack signature" in str(answer)
    assert env.dispatcher.actions == [] and env.slack.calls == []


async def test_a_slash_command_or_click_sent_again_is_a_replay(env: Env) -> None:
    form = dict(parse_qsl((FIXTURES / "slash_command.txt").read_text()))
    form.update(response_url=env.slack.response_url("cmd"))
    body = urlencode(form)
    headers = signed(body)
    assert (await env.post(body, headers))[0] == 200
    status, answer = await env.post(body, headers)  # captured and sent again within Slack's 5 minutes
    assert (status, json.loads(answer)) == (401, {"error": "replayed request: Slack already sent this one"})
    click = "payload=" + quote(json.dumps({**click_payload(), "response_url": env.slack.response_url("click")}))
    click_headers = signed(click)
    assert (await env.post(click, click_headers))[0] == 200
    assert (await env.post(click, click_headers))[0] == 401
    # The Content-Type is not signed, and Bolt reads any body not starting with { as a form: a replay under
    # another Content-Type, or none, is still a replay (they ran the command again).
    for content_type in ("text/plain", "multipart/form-data", None, "Application/JSON", "application/json ; x=y"):
        other = {k: v for k, v in headers.items() if k != "Content-Type"}
        if content_type is not None:
            other["Content-Type"] = content_type
        assert (await env.post(body, other))[0] == 401, content_type
    await env.slack.wait_for(lambda: env.dispatcher.commands and env.dispatcher.actions)
    await asyncio.sleep(0.05)
    assert len(env.dispatcher.commands) == 1 and len(env.dispatcher.actions) == 1


@pytest.mark.parametrize("body", [
    '{"type":"event_callback","event":"x"}', '{"type":"event_callback","event":[1]}',
    '{"type":"event_callback","event":{"type":"app_mention","text":5}}',
    "payload=" + quote('{"type":"block_actions","actions":"x"}'),
    "payload=" + quote('{"type":"block_actions","actions":[1]}'),
    "payload=" + quote('{"type":"block_actions","actions":[{"action_id":5}]}'),
    # (Bolt reads a block action's action_id: without one, its middleware raised KeyError, a 500)
    "payload=" + quote('{"type":"block_actions","user":{"id":"U01ALICE"},"actions":[{"value":"ack:2","type":"button"}]}'),
    "payload=" + quote('{"type":"block_actions","user":"x","actions":[]}'),
    "payload=" + quote('{"type":"block_actions","user":{"id":"U01ALICE"},"actions":[]}'),  # Bolt reads actions[0]
    "payload=" + quote('{"type":"view_submission","user":{"id":"U01ALICE"},"view":{"id":"V1","callback_id":"x"}}'),
    "payload=" + quote('{"type":"view_submission","view":"x"}'),
    "payload=" + quote('{"type":"block_actions","user":{"id":"U01ALICE"},"actions":null}'),
    "payload=" + quote('{"type":"view_submission","user":{"id":"U01ALICE"},"view":null}'),
    '{"type":"event_callback","x":' + "[" * 100_000 + "]" * 100_000 + "}",
])
async def test_a_signed_body_of_a_shape_slack_never_sends_is_a_400_not_a_500(env: Env, body: str) -> None:
    status, answer = await env.post(body, signed(body, content_type="application/json" if body[0] == "{" else FORM))
    assert status == 400 and "not a Slack request body" in answer, (status, answer)


async def test_a_stale_timestamp_is_refused(env: Env) -> None:
    status, _ = await env.click(click_payload(), ts=int(time.time()) - 6 * 60)
    assert status == 401
    status, _ = await env.click(click_payload(), ts=int(time.time()) + 6 * 60)
    assert status == 401
    await asyncio.sleep(0.05)
    assert env.dispatcher.actions == []


async def test_link_buttons_of_templates_are_acknowledged_and_ignored(env: Env) -> None:
    payload = click_payload()
    payload["actions"][0].update(action_id="open-dashboard", value="", url="https://grafana.example/d/1")
    status, _ = await env.click(payload)
    assert status == 200
    await asyncio.sleep(0.05)
    assert env.dispatcher.actions == [] and not env.slack.responses["click"]


# -- slash commands and mentions --------------------------------------------------------------------

async def test_a_slash_command_becomes_a_command_event_and_the_reply_goes_to_response_url(env: Env) -> None:
    env.dispatcher.gate.clear()
    status, body = await env.command()
    assert (status, body) == (200, "")  # an empty ack: Slack shows nothing until the reply
    await env.slack.wait_for(lambda: env.dispatcher.commands)
    assert env.dispatcher.commands == [CommandEvent(
        name="incident", args=["ack", "42"], actor=Actor("slack", "U01ALICE", "alice", None),
        chat=MessageRef("slack", "C0OPS", "", None), direct=False,
    )]
    env.dispatcher.gate.set()
    await env.slack.wait_for(lambda: env.slack.responses["cmd"])
    assert env.slack.responses["cmd"] == [
        {"text": "Acknowledged #42.", "response_type": "ephemeral", "replace_original": False}]


async def test_any_command_name_is_taken_and_direct_messages_are_marked(env: Env) -> None:
    await env.command(command="/oncall", text='dba-primary "next week"', channel_id="D0ALICE",
                      channel_name="directmessage")
    await env.slack.wait_for(lambda: env.dispatcher.commands)
    event = env.dispatcher.commands[0]
    assert (event.name, list(event.args), event.direct) == ("oncall", ["dba-primary", "next week"], True)


async def test_a_rich_reply_for_the_channel_is_rendered(env: Env) -> None:
    env.dispatcher.reply = Reply("3 open incidents", ephemeral=False,
                                 message=Outbound("incident-list", {"title": "Open incidents"},
                                                  buttons=[Button("ack", 7, label="Acknowledge #7")]))
    await env.command(text="list")
    await env.slack.wait_for(lambda: env.slack.responses["cmd"])
    [answer] = env.slack.responses["cmd"]
    assert answer["response_type"] == "in_channel" and answer["text"] == "incident-list: Open incidents"
    assert answer["blocks"][0]["text"]["text"] == "incident-list: Open incidents"
    assert answer["blocks"][1]["elements"][0]["value"] == "ack:7"


async def test_a_response_url_elsewhere_than_slack_gets_nothing_and_the_reply_goes_through_the_api(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A signed payload naming another host as its response_url: the bot does not post the answer (an incident card,
    say) there; the person gets it through the Web API, the log says so once."""
    caplog.set_level(logging.WARNING, logger="chatops.slack")
    async with FakeSlack() as elsewhere:  # 127.0.0.1 as well, another port
        form = dict(parse_qsl((FIXTURES / "slash_command.txt").read_text()))
        for text, ephemeral in (("show 7", True), ("list", False)):
            env.dispatcher.reply = Reply(f"answer to {text}", ephemeral=ephemeral)
            body = urlencode({**form, "text": text, "response_url": elsewhere.response_url("cmd")})
            assert (await env.post(body, signed(body)))[0] == 200
            method = "chat.postEphemeral" if ephemeral else "chat.postMessage"
            await env.slack.wait_for(lambda m=method: env.slack.called(m))  # type: ignore[misc]
        assert not elsewhere.calls and not elsewhere.responses
    [private] = env.slack.called("chat.postEphemeral")
    assert (private.params["channel"], private.params["user"], private.params["text"]) == (
        "C0OPS", "U01ALICE", "answer to show 7")
    [public] = env.slack.called("chat.postMessage")
    assert (public.params["channel"], public.params["text"]) == ("C0OPS", "answer to list")
    said = [r.getMessage() for r in caplog.records if r.name == "chatops.slack"]
    assert said == [f"slack: not answering through a response_url at {elsewhere.url!r}, neither on hooks.slack.com "
                    "nor on the host of adapters.slack.api_url: answered through the Web API instead (said once)"]


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.slack.com/commands/T0FAKE/1700000002000/ZyXw", True),
    ("https://hooks.slack.com:443/actions/T0FAKE/1/x", True),
    ("https://hooks.slack-gov.com/commands/T0/1/x", True),  # beside the api_url's host (GovSlack's)
    ("http://127.0.0.1:8123/response/r1", True),  # the api_url's scheme, host and port
    ("http://hooks.slack.com/commands/T0FAKE/1/x", False),  # not HTTPS
    ("https://hooks.slack.com:8443/commands/T0FAKE/1/x", False),
    ("https://hooks.slack.com.evil.example/commands/x", False),
    ("https://hooks.slack.com@evil.example/commands/x", False),
    ("https://evil.example/?u=https://hooks.slack.com/", False),
    ("http://slack-gov.com/api/", False),  # the api_url's host, not its scheme
    ("http://127.0.0.1:18103/anywhere", False),  # the api_url's host, another port
    ("http://localhost:8123/response/r1", False),
    ("/response/r1", False),
    ("https://hooks.slack.com\\@evil.example/", False),
    ("https://hooks.slack.com:99999/x", False),
])
def test_only_slack_response_urls_are_posted_to(url: str, allowed: bool) -> None:
    api_url = "https://slack-gov.com/api/" if "gov" in url else "http://127.0.0.1:8123/api/"
    assert response_url_allowed(url, api_url) is allowed


async def test_a_failing_dispatcher_still_answers_the_user(env: Env) -> None:
    env.dispatcher.error = RuntimeError("boom")
    await env.command()
    await env.slack.wait_for(lambda: env.slack.responses["cmd"])
    assert env.slack.responses["cmd"][0]["text"] == FAILED


async def test_a_command_whose_handling_failed_is_handled_when_it_comes_again(env: Env) -> None:
    """The dispatcher failed before it acted (the person is told so): the same request again is handled, not
    refused as a replay of one already taken."""
    env.dispatcher.error = RuntimeError("the database went away")
    form = dict(parse_qsl((FIXTURES / "slash_command.txt").read_text()))
    form.update(response_url=env.slack.response_url("cmd"))
    body = urlencode(form)
    headers = signed(body)
    assert (await env.post(body, headers))[0] == 200
    await env.slack.wait_for(lambda: env.slack.responses["cmd"])
    env.dispatcher.error = None
    assert (await env.post(body, headers))[0] == 200
    await env.slack.wait_for(lambda: len(env.slack.responses["cmd"]) == 2)
    assert [r["text"] for r in env.slack.responses["cmd"]] == [FAILED, "Acknowledged #42."]
    assert (await env.post(body, headers))[0] == 401  # handled now: the same request again is a replay


async def test_a_broken_template_still_answers_with_the_text(env: Env) -> None:
    def broken(kind: str, platform: str, context: Mapping[str, Any]) -> dict[str, Any]:
        raise ValueError("template incident-list.slack.json.j2: output is not valid JSON")
    env.adapter.renderer.render_json = broken  # type: ignore[method-assign]
    env.dispatcher.reply = Reply("3 open incidents", message=Outbound("incident-list", {}))
    await env.command(text="list")
    await env.slack.wait_for(lambda: env.slack.responses["cmd"])
    assert env.slack.responses["cmd"][0]["text"] == "3 open incidents"


async def test_a_body_that_is_not_utf8_is_a_bad_request(env: Env) -> None:
    body = b"payload=\xff\xfe"
    ts = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    resp = await env.client.post("/slack/events", data=body, headers={
        "Content-Type": FORM, "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={mac}"})  # signed as it is
    assert resp.status == 400


async def test_a_mention_is_the_umbrella_command_and_is_taken_once(env: Env) -> None:
    body = (FIXTURES / "app_mention.json").read_text()
    for _ in range(2):  # Slack retries an event it thinks was lost
        status, _ = await env.post(body, signed(body, content_type="application/json"))
        assert status == 200
    await env.slack.wait_for(lambda: env.slack.called("chat.postEphemeral"))
    assert env.dispatcher.commands == [CommandEvent(
        name="chatops", args=["ack", "42"], actor=Actor("slack", "U01ALICE", "", None),
        chat=MessageRef("slack", "C0OPS", "1700000003.000200", None))]
    params = env.slack.called("chat.postEphemeral")[0].params
    # not in the mention's own thread: there is none, and Slack shows an ephemeral message only in a thread that exists
    assert (params["channel"], params["user"], params.get("thread_ts")) == ("C0OPS", "U01ALICE", None)
    assert env.slack.ephemerals[0]["shown"]


@pytest.mark.parametrize(("text", "args"), [
    ("ack 42", ["ack", "42"]),
    ("  ack   42  ", ["ack", "42"]),
    ("", []),
    ('override dba "until 18:00"', ["override", "dba", "until 18:00"]),
    ("swap \u201cnext week\u201d", ["swap", "next week"]),  # smart quotes from a phone
    ('note "left open', ["note", '"left', "open"]),  # unbalanced: plain words
    ("note don't page", ["note", "don't", "page"]),
    ("note a &lt;b&gt; &amp;amp;", ["note", "a", "<b>", "&amp;"]),
    ("show\u00a042", ["show", "42"]),  # Option+Space on a Mac
    ("show\u2007\u202f42\u3000x", ["show", "42", "x"]),  # figure, narrow no-break, ideographic spaces
    ("\u200bshow\u200b 42\ufeff", ["show", "42"]),  # zero-width: no part of a word
    ('override dba "until\u00a018:00"', ["override", "dba", "until 18:00"]),
])
def test_command_text_is_split_like_a_shell_but_tolerant(text: str, args: list[str]) -> None:
    assert split_args(text) == args


# -- outbound ---------------------------------------------------------------------------------------

BUTTONS = [
    Button("ack", 42, label="Acknowledge", style="primary"),
    Button("res", 42, label="Resolve", style="danger", confirm="Resolve #42 for everyone?"),
    Button("rb", 42, "restart-nginx", label="Restart nginx", confirm="Run restart-nginx on db-01?"),
    Button("rb", 42, "flush-cache", label="Flush cache"),
]


async def test_alert_words_never_become_mentions_or_channel_links(env: Env) -> None:
    """Block Kit parses `@channel`, `@here` and channel names in mrkdwn unless the text object is verbatim."""
    await env.adapter.send("C0OPS", Outbound("incident", {"title": "@channel disk full, see #general"}, buttons=BUTTONS))
    [post] = env.slack.called("chat.postMessage")
    section = post.params["blocks"][0]
    assert section["text"]["type"] == "mrkdwn" and section["text"]["verbatim"] is True
    assert section["text"]["text"] == "incident: @channel disk full, see #general"


async def test_send_update_and_reply_draw_buttons_with_encoded_values(env: Env) -> None:
    incident = Outbound("incident", {"title": "DiskFull on db-01"}, buttons=BUTTONS)
    ref = await env.adapter.send("C0OPS", incident)
    [(channel, ts)] = env.slack.messages
    assert ref == MessageRef("slack", "C0OPS", ts, None) and channel == "C0OPS"
    [post] = env.slack.called("chat.postMessage")
    assert post.token == env.slack.token
    assert post.params["text"] == "incident: DiskFull on db-01"
    section, actions_block = post.params["blocks"]
    assert section["text"]["text"] == "incident: DiskFull on db-01"
    ack, res, rb1, rb2 = actions_block["elements"]
    elements = (ack, res, rb1, rb2)
    assert [e["action_id"] for e in elements] == ["chatops:ack", "chatops:res", "chatops:rb", "chatops:rb:3"]
    assert [e["value"] for e in elements] == ["ack:42", "res:42", "rb:42:restart-nginx", "rb:42:flush-cache"]
    assert [e.get("style") for e in (ack, res, rb1, rb2)] == ["primary", "danger", None, None]
    assert res["confirm"]["text"]["text"] == "Resolve #42 for everyone?" and res["confirm"]["style"] == "danger"
    assert rb1["confirm"]["confirm"]["text"] == "Restart nginx" and "style" not in rb1["confirm"]
    assert "confirm" not in ack and ack["text"] == {"type": "plain_text", "text": "Acknowledge", "emoji": True}

    await env.adapter.update(ref, Outbound("incident", {"title": "DiskFull (acknowledged)"}, buttons=BUTTONS[1:2]))
    [update] = env.slack.called("chat.update")
    assert (update.params["channel"], update.params["ts"]) == ("C0OPS", ref.message_id)
    assert update.params["blocks"][-1]["elements"][0]["value"] == "res:42"
    assert env.slack.messages[("C0OPS", ref.message_id)]["text"] == "incident: DiskFull (acknowledged)"

    line = await env.adapter.reply(ref, Outbound("thread", {"title": "Alice acknowledged"}))
    assert line == MessageRef("slack", "C0OPS", list(env.slack.messages)[-1][1], ref.message_id)
    again = await env.adapter.reply(line, Outbound("thread", {"title": "Bob resolved"}))
    assert again.thread_id == ref.message_id  # a reply to a reply stays in the same thread
    posts = env.slack.called("chat.postMessage")
    assert [p.params.get("thread_ts") for p in posts] == [None, ref.message_id, ref.message_id]
    assert [b["type"] for b in posts[1].params["blocks"]] == ["section"]  # no buttons, no actions block


async def test_a_sent_button_clicked_round_trips_to_the_same_action(env: Env) -> None:
    ref = await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}, buttons=BUTTONS))
    element = env.slack.called("chat.postMessage")[0].params["blocks"][-1]["elements"][2]
    payload = click_payload()
    payload["message"]["ts"] = payload["container"]["message_ts"] = ref.message_id
    payload["actions"][0].update(action_id=element["action_id"], value=element["value"])
    await env.click(payload)
    await env.slack.wait_for(lambda: env.dispatcher.actions)
    event = env.dispatcher.actions[0]
    assert (event.action, event.incident_id, event.arg, event.source) == ("rb", 42, "restart-nginx", ref)


async def test_more_than_25_buttons_are_split_into_several_actions_blocks(env: Env) -> None:
    buttons = [Button("rb", 42, f"runbook-{n}", label=f"Runbook {n}") for n in range(30)]
    await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}, buttons=buttons))
    blocks = env.slack.called("chat.postMessage")[0].params["blocks"]
    assert [len(b["elements"]) for b in blocks if b["type"] == "actions"] == [25, 5]


async def test_notify_is_ephemeral_in_a_chat_or_a_direct_message(env: Env) -> None:
    alice = Actor("slack", "U01ALICE", "alice")
    await env.adapter.notify(alice, MessageRef("slack", "C0OPS", "1700000000.000100"), "You need the <responder> role")
    [eph] = env.slack.called("chat.postEphemeral")
    assert (eph.params["channel"], eph.params["user"]) == ("C0OPS", "U01ALICE")
    assert eph.params["text"] == "You need the &lt;responder&gt; role"
    await env.adapter.notify(alice, None, "Your swap was approved")
    assert env.slack.called("conversations.open")[0].params["users"] == "U01ALICE"
    [dm] = env.slack.called("chat.postMessage")
    assert (dm.params["channel"], dm.params["text"]) == ("D01ALICE", "Your swap was approved")
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.notify(Actor("telegram", "111"), None, "hi")
    assert caught.value.permanent


# -- errors -----------------------------------------------------------------------------------------

async def test_a_429_becomes_retry_after(env: Env) -> None:
    env.slack.burst = 2
    message = Outbound("incident", {"title": "x"})
    await env.adapter.send("C0BUSY", message)
    await env.adapter.send("C0BUSY", message)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send("C0BUSY", message)
    assert caught.value.retry_after == 1.0 and not caught.value.permanent
    assert "ratelimited" in str(caught.value)
    assert [c.status for c in env.slack.calls] == [200, 200, 429]  # and slack_sdk did not retry by itself
    await env.adapter.send("C0OTHER", message)  # the limit is per channel


@pytest.mark.parametrize("error", ["channel_not_found", "not_in_channel", "is_archived", "invalid_blocks"])
async def test_refusals_that_retrying_cannot_fix_are_permanent(env: Env, error: str) -> None:
    env.slack.fail("chat.postMessage", error)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send("C0GONE", Outbound("incident", {"title": "x"}))
    assert caught.value.permanent and caught.value.retry_after is None and error in str(caught.value)
    if error == "not_in_channel":  # what to do, also before auth.test told the bot's name
        assert str(caught.value) == "slack chat.postMessage: not_in_channel: invite the bot: /invite @<the bot> in C0GONE"


async def test_updating_a_message_that_is_gone_is_permanent(env: Env) -> None:
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.update(MessageRef("slack", "C0OPS", "1600000000.000100"), Outbound("incident", {}))
    assert caught.value.permanent and "message_not_found" in str(caught.value)


async def test_a_wrong_token_is_permanent(env: Env) -> None:
    adapter = SlackAdapter(settings(env.slack, "xoxb-revoked"), renderer=StubRenderer(), dispatcher=env.dispatcher)
    with pytest.raises(DeliveryError) as caught:
        await adapter.send("C0OPS", Outbound("incident", {"title": "x"}))
    assert caught.value.permanent and "invalid_auth" in str(caught.value)


@pytest.mark.parametrize(("status", "error"),
                         [(500, "internal_error"), (503, "service_unavailable"), (200, "fatal_error")])
async def test_server_errors_are_retryable(env: Env, status: int, error: str) -> None:
    env.slack.fail("chat.postMessage", error, status=status)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}))
    assert not caught.value.permanent and caught.value.retry_after is None
    assert len(env.slack.calls) == 1


async def test_a_dropped_connection_is_retryable_and_not_retried_by_slack_sdk(env: Env) -> None:
    env.slack.fail("chat.postMessage", "", disconnect=True, times=2)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}))
    assert not caught.value.permanent
    assert len(env.slack.calls) == 1  # slack_sdk's default handler would have tried again


async def test_an_unreachable_slack_is_retryable(env: Env) -> None:
    async with FakeSlack() as gone:
        url = gone.api_url
    adapter = SlackAdapter(SlackSettings(bot_token="xoxb-x", signing_secret=SECRET, api_url=url),
                           renderer=StubRenderer(), dispatcher=env.dispatcher)
    with pytest.raises(DeliveryError) as caught:
        await adapter.send("C0OPS", Outbound("incident", {"title": "x"}))
    assert not caught.value.permanent
    assert not caught.value.unknown  # refused before anything was sent: sending it again (or elsewhere) is safe


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_post_slack_took_whose_answer_was_lost_may_have_arrived(env: Env, reset: bool) -> None:
    """The connection goes after Slack took the message, before its answer (aiohttp: ServerDisconnectedError when
    closed, ClientOSError when reset): the message is in the channel, so it must not count as not delivered."""
    env.slack.lose_answer("chat.postMessage", reset=reset)
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}))
    assert [m["text"] for m in env.slack.messages.values()] == ["incident: x"]
    assert caught.value.unknown and not caught.value.permanent


async def test_a_post_carries_its_delivery_key_and_is_found_by_it(env: Env) -> None:
    """The outbox's key rides on the post as message metadata; `find` reads the channel (or the thread) with
    include_all_metadata around the time the answer was lost, and takes only a message of this bot with that key."""
    card = await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}, key="card-7"))
    line = await env.adapter.reply(card, Outbound("thread", {"title": "Acknowledged"}, key="line-9"))
    await env.adapter.update(card, Outbound("incident", {"title": "x (acknowledged)"}))
    posted = env.slack.messages[("C0OPS", card.message_id)]
    assert posted["metadata"] == {"event_type": "chatops_delivery", "event_payload": {"delivery": "card-7"}}
    assert "metadata" not in env.slack.called("chat.update")[0].params  # (an edit keeps it)
    assert await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time()) == card
    assert await env.adapter.find("C0OPS", "line-9", thread=card.message_id, sent_at=time.time()) == line
    assert await env.adapter.find("C0OPS", "line-9", thread=None, sent_at=time.time()) is None  # not in the channel
    assert await env.adapter.find("C0OPS", "card-8", thread=None, sent_at=time.time()) is None
    assert await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time() + 3600) is None  # not then
    history = env.slack.called("conversations.history")[0].params
    assert history["include_all_metadata"] == "1" and history["inclusive"] == "1"


async def test_a_page_is_found_by_its_key_in_the_persons_direct_conversation(env: Env) -> None:
    """A page goes to the person's direct conversation with the bot; the outbox knows only their user id when its
    answer was lost. Slack reads no conversation by a user id (channel_not_found): `find` opens theirs first."""
    page = await env.adapter.page("U02BOB", Outbound("incident", {"title": "x"}, key="page-3"))
    assert page.chat_id == "D02BOB"
    assert await env.adapter.find("U02BOB", "page-3", thread=None, sent_at=time.time()) == page
    assert await env.adapter.find("U02BOB", "page-4", thread=None, sent_at=time.time()) is None
    assert {c.params["channel"] for c in env.slack.called("conversations.history")} == {"D02BOB"}


async def test_find_takes_no_other_bots_message_and_reads_past_a_busy_page(env: Env) -> None:
    """Another bot (a staging copy of this one, say) posted the same key; then 300 messages: the lookup pages on
    and finds our own."""
    ours = await env.adapter.send("C0OPS", Outbound("incident", {"title": "x"}, key="card-7"))
    metadata = {"event_type": "chatops_delivery", "event_payload": {"delivery": "card-7"}}
    for n in range(301):
        ts = env.slack._next_ts()
        env.slack.messages[("C0OPS", ts)] = {"type": "message", "ts": ts, "text": f"chatter {n}", "user": "U01ALICE",
                                             **({"bot_id": "B0OTHER", "metadata": metadata} if n == 0 else {})}
    assert await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time()) == ours
    assert len(env.slack.called("conversations.history")) == 2  # 200 a page


async def test_a_lookup_limited_after_its_first_page_is_given_up_not_started_over(env: Env) -> None:
    """Slack's 1 call a minute (and 15 messages a page) for apps distributed outside the Marketplace: a lookup that
    needs a second page would start over after the wait and be limited there again, for ever."""
    for n in range(250):
        ts = env.slack._next_ts()
        env.slack.messages[("C0OPS", ts)] = {"type": "message", "ts": ts, "text": f"chatter {n}", "user": "U01ALICE"}
    env.slack.fail("conversations.history", "ratelimited", status=429, retry_after=60)  # the first page
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time())
    assert caught.value.retry_after == 60 and not caught.value.permanent  # wait, and look again
    env.slack.fail("conversations.history", "ratelimited", status=429, retry_after=60, after=1)  # the second
    with pytest.raises(DeliveryError) as caught:
        await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time())
    assert caught.value.permanent and "after 1 page(s)" in str(caught.value)


async def test_a_lookup_slack_refuses_is_permanent(env: Env) -> None:
    """The app installed without channels:history, or the bot not in the channel (it posts through
    chat:write.public): the outbox then posts again rather than wait for a lookup that cannot work."""
    for error in ("missing_scope", "not_in_channel"):
        env.slack.fail("conversations.history", error)
        with pytest.raises(DeliveryError) as caught:
            await env.adapter.find("C0OPS", "card-7", thread=None, sent_at=time.time())
        assert caught.value.permanent and error in str(caught.value)


async def test_slack_url_verification_is_answered(env: Env) -> None:
    body = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                       "type": "url_verification"})
    status, text = await env.post(body, signed(body, content_type="application/json"))
    assert status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in text


# -- setup ------------------------------------------------------------------------------------------

def test_the_manifest_points_everything_at_one_request_url() -> None:
    m = manifest(public_url="https://bot.example.com/", bot_name="oncall-bot")
    url = "https://bot.example.com/slack/events"
    commands = {c["command"]: c for c in m["features"]["slash_commands"]}
    assert set(commands) == {"/incident", "/ack", "/chatops", "/oncall", "/swap", "/override"}
    assert all(c["url"] == url and c["description"] and c["usage_hint"] for c in commands.values())
    assert m["settings"]["interactivity"] == {"is_enabled": True, "request_url": url}
    assert m["settings"]["event_subscriptions"] == {"request_url": url, "bot_events": ["app_mention"]}
    # no users:read: nothing reads people's profiles (a slash command escapes @alice to her id)
    assert {"chat:write", "chat:write.public", "commands", "im:write", "app_mentions:read",
            "channels:history", "groups:history", "im:history"} == set(m["oauth_config"]["scopes"]["bot"])
    assert m["display_information"]["name"] == "oncall-bot" == m["features"]["bot_user"]["display_name"]
    json.dumps(m)  # pasteable


def test_bolt_does_not_warn_that_the_bot_token_will_be_unused(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Deployments set SLACK_BOT_TOKEN (app.yaml reads it); Bolt reads it too and warned at every start."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-from-the-environment")
    with caplog.at_level(logging.DEBUG):
        SlackAdapter(SlackSettings(bot_token="xoxb-x", signing_secret=SECRET, api_url="http://127.0.0.1:9/api/"),
                     renderer=StubRenderer(), dispatcher=RecordingDispatcher())
    assert not [r for r in caplog.records if "will be unused" in r.getMessage()]


@pytest.mark.parametrize("text,args", [
    ("page 1 <@U02BOB|bob> look <!channel> and <@U01ALICE>", ["page", "1", "@bob", "look", "@channel", "and", "@U01ALICE"]),
    ("<!here> <!everyone> <!subteam^S01|@dbas> <!subteam^S02>", ["@here", "@everyone", "@dbas", "@S02"]),
    ("<#C0OPS|ops> <#C0DB> <https://x.example/a?b=1&amp;c=2|the wiki> <https://y.example> <mailto:a@b.c|a@b.c>",
     ["#ops", "#C0DB", "the", "wiki", "(https://x.example/a?b=1&c=2)", "https://y.example", "a@b.c"]),
    ("<!date^1700000000^{date}|Nov 14> &lt;@U01ALICE&gt;", ["Nov", "14", "<@U01ALICE>"]),  # typed, not a mention
])
def test_mentions_and_links_slack_marks_up_become_plain_words(text: str, args: list[str]) -> None:
    """Without people to name them by, a person is their label, else their id (SlackAdapter names known people)."""
    assert split_args(text) == args


@pytest.mark.parametrize("typed, meant", [
    ("<@U0MM|max> db is down", "mmueller"),  # Max's name is another person's id: `max` found Maximilian
    ("<@U0MM> db is down", "mmueller"),
    ("<@U0MAX|maximilian> db is down", "max"),
    ("<@U0OB> db won't start", "obrien"),  # the quote of O'Brien paired with the one of "won't"
    ('<@U0OB|o\'brien> and <@U0MM> "now"', "obrien"),
    ("<@U0BOB|bob> ok", "bob"),
])
def test_a_typed_mention_names_the_person_slack_identified(typed: str, meant: str) -> None:
    """A mention became the person's name as a word of the command; a name that is another person's id, or is no
    plain word, is their app.yaml id instead, so the command still means whom Slack identified."""
    from types import SimpleNamespace

    from bot.config import Person, find_person

    people = [Person(id="max", name="Maximilian", slack="U0MAX"), Person(id="mmueller", name="Max", slack="U0MM"),
              Person(id="obrien", name="O'Brien", slack="U0OB"), Person(id="bob", name="Bob", slack="U0BOB")]
    adapter = SimpleNamespace(dispatcher=SimpleNamespace(config=SimpleNamespace(people=people)))
    words = split_args(typed, lambda user, label: SlackAdapter._name_of(adapter, user, label))  # type: ignore[arg-type]
    found = find_person(people, words[0])
    assert found is not None and found.id == meant, words
    assert "won't" in words or "won't" not in typed, words  # the rest of the note reads as typed
