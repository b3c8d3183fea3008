"""The Teams adapter against a fake Bot Framework (tests/fake_teams.py): the channel's JWT checked on every
`POST /api/messages`, commands and clicks through the dispatcher, cards, replies and pages through the Bot Connector."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters import SETTINGS_MODELS
from bot.chat import DeliveryError, MessageRef, Outbound
from bot.config import ConfigError, parse_config
from tests.botkit import CONFIG, PEOPLE, Harness, bot_on, fixture, running_bot, untagged
from tests.conftest import postgres_url
from tests.fake_teams import CHANNEL, TENANT, Call, FakeTeams

TEAMS_PEOPLE = PEOPLE.replace("slack: U01ALICE,", 'slack: U01ALICE, teams: "29:1alice",').replace(
    "slack: U02BOB}", "slack: U02BOB, teams: 5c1d2e3f-0000-4000-8000-00000000b0b0}").replace(
    "{id: bob, name: Bob,", "{id: bob, name: Bob, roles: [responder],")
BOB_AAD = "5c1d2e3f-0000-4000-8000-00000000b0b0"


def teams_extra(bf: FakeTeams, **settings: object) -> str:
    return bf.yaml(**settings)


async def post(h, body: object, headers: dict[str, str]) -> tuple[int, dict]:
    resp = await h.client.post("/api/messages", data=json.dumps(body).encode(), headers=headers)
    return resp.status, await resp.json()


async def test_a_request_without_a_valid_bot_framework_token_is_refused_401(tmp_path: Path) -> None:
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", teams_extra(bf), people=TEAMS_PEOPLE) as h:
            activity = bf.message("help")
            other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            refused = {
                "missing": {"Content-Type": "application/json"},
                "junk": {"Authorization": "Bearer junk.junk.junk", "Content-Type": "application/json"},
                "not bearer": {"Authorization": "Basic dXNlcjpwYXNz", "Content-Type": "application/json"},
                "forged": bf.headers(key=other_key),
                "another app": bf.headers(audience="11111111-2222-3333-4444-555555555555"),
                "another issuer": bf.headers(issuer="https://evil.example"),
                "expired": bf.headers(expires_in=-3600),
                "no expiry": bf.headers(expires_in=None),  # (good for ever: PyJWT checks only an exp there is)
                "unknown key id": bf.headers(kid="nope"),
                "another service url": bf.headers(service_url="https://evil.example/teams/"),
            }
            for why, headers in refused.items():
                status, body = await post(h, {**activity, "id": f"x-{why}"}, headers)
                assert status == 401, (why, status, body)
                assert "unauthorized" in body["error"], why
            assert bf.calls == []  # nothing was acted on
            status, _ = await post(h, activity, bf.headers())
            assert status == 200
            await bf.wait_for(lambda: bf.called("reply"))
            [answer] = bf.called("reply")
            assert answer.conversation == CHANNEL and answer.activity_id == activity["id"]
            assert "Commands:" in answer.body["text"]
            assert answer.authorization == "Bearer bot-token-1"  # the bot's token from the fake's token endpoint


async def test_an_activity_is_read_whole_only_once_its_token_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """botbuilder read the whole activity before the token was looked at: a 1 MiB one holding 349,000 empty
    suggested actions, sent by anyone without a token, took 4.5 s of the event loop (every request, alert and page
    waited). The token is checked on the few fields it concerns; the rest is read once it is taken."""
    import adapters.teams

    read: list[set[str]] = []
    deserialize = adapters.teams.Activity.deserialize

    def spied(cls: type, data: dict) -> object:
        read.append(set(data))
        return deserialize(data)

    monkeypatch.setattr(adapters.teams.Activity, "deserialize", classmethod(spied))
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", teams_extra(bf), people=TEAMS_PEOPLE) as h:
            heavy = {**bf.message("help"), "suggestedActions": {"actions": [{}] * 250_000}}
            for headers in ({"Content-Type": "application/json"},
                            {"Authorization": "Bearer junk.junk.junk", "Content-Type": "application/json"},
                            bf.headers(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))):
                status, body = await post(h, heavy, headers)
                assert status == 401 and "unauthorized" in body["error"]
            assert not any("suggestedActions" in keys for keys in read), read
            status, _ = await post(h, {**bf.message("help"), "suggestedActions": {"actions": [{}]}}, bf.headers())
            assert status == 200 and any("suggestedActions" in keys for keys in read)  # taken: read whole
            await bf.wait_for(lambda: bf.called("reply"))


def test_bot_framework_endpoints_are_set_all_together_and_only_with_authentication() -> None:
    base = "audit: {hmac_key: test-key-0123456789ab}\nstorage: {url: 'sqlite+aiosqlite:///x.db'}\n"
    cases = {
        "adapters: {teams: {app_id: a, app_password: p, openid_metadata_url: 'https://x/openid'}}":
            "openid_metadata_url without token_issuer, login_url, oauth_scope: Bot Framework's endpoints are set all "
            "together (a sovereign cloud's), or none (the public cloud's)",
        "adapters: {teams: {allow_unauthenticated: true, openid_metadata_url: 'https://x/o', token_issuer: i, "
        "login_url: 'https://x/l', oauth_scope: s}}":
            "openid_metadata_url, token_issuer, login_url, oauth_scope need app_id: without it there is no "
            "authentication to point elsewhere",
    }
    for section, problem in cases.items():
        with pytest.raises(ConfigError) as info:
            parse_config(base + section + "\n", adapter_models=SETTINGS_MODELS, env={})
        assert [m for _, m in info.value.problems] == [problem], section


async def test_the_emulator_mode_takes_activities_without_a_token_only_when_allowed(tmp_path: Path) -> None:
    with FakeTeams() as bf:
        extra = f"adapters:\n  teams: {{allow_unauthenticated: true, service_url: '{bf.service_url}'}}\n"
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", extra, people=TEAMS_PEOPLE) as h:
            status, _ = await post(h, bf.message("help", personal=True, conversation="a:1emulator"),
                                   {"Content-Type": "application/json"})
            assert status == 200
            await bf.wait_for(lambda: bf.called("reply"))
            assert bf.called("reply")[0].authorization == ""  # no token asked for, none sent


TEAMS_CONFIG = CONFIG.replace("channels:\n", "channels:\n  - {id: ops-teams, platform: teams, chat: '%s'}\n" % CHANNEL, 1) \
    .replace("channels: [ops-slack, ops-telegram]}", "channels: [ops-teams]}") \
    .replace("{match: {}, channels: [ops-slack]}", "{match: {}, channels: [ops-teams]}")


@asynccontextmanager
async def teams_bot(tmp_path: Path, **settings: object) -> AsyncIterator[tuple[Harness, FakeTeams]]:
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", bf.yaml(**settings),
                               people=TEAMS_PEOPLE, base=TEAMS_CONFIG) as h:
            yield h, bf


def card_of(call: Call) -> dict:
    [attachment] = call.body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    return attachment["content"]


def button_values(card: dict) -> list[str]:
    """The chatops values of a card's Action.Submit buttons, a confirming one (inside its Action.ShowCard) as `?value`,
    without their incident's tag."""
    values = []
    for action in card.get("actions", []):
        if action["type"] == "Action.ShowCard":
            [inner] = action["card"]["actions"]
            values.append("?" + untagged(inner["data"]["chatops"]))
        else:
            values.append(untagged(action["data"]["chatops"]))
    return values


def tagged(card: dict, value: str) -> str:
    """The value of the card's button `value` (untagged, as button_values says it) with its tag."""
    for action in card.get("actions", []):
        inner = action["card"]["actions"][0] if action["type"] == "Action.ShowCard" else action
        if untagged(inner["data"]["chatops"]) == value.lstrip("?"):
            return inner["data"]["chatops"]
    raise AssertionError(f"no button {value} in {button_values(card)}")


async def recorded(h: Harness, incident_id: int) -> str:
    """The id of the incident's card in the Teams channel, once the outbox recorded it."""
    for _ in range(200):
        try:
            return await h.message_of(incident_id, "ops-teams")
        except Exception:
            await asyncio.sleep(0.02)
    raise AssertionError("the incident's card was not recorded")


async def say(h: Harness, bf: FakeTeams, activity: dict) -> str:
    """Teams posts `activity`; the text of the bot's answer to it (a reply to it, in its thread or 1:1 chat)."""
    status, _ = await post(h, activity, bf.headers())
    assert status == 200

    def answer() -> Call | None:
        return next((c for c in bf.called("reply") if c.activity_id == activity["id"]), None)
    await bf.wait_for(answer)
    call = answer()
    assert call is not None and call.conversation == activity["conversation"]["id"]
    return call.body.get("text") or json.dumps(card_of(call))


async def test_commands_in_a_channel_or_the_private_chat_are_answered_where_they_were_written(tmp_path: Path) -> None:
    async with teams_bot(tmp_path) as (h, bf):
        help_ = bf.message("help")
        assert (await say(h, bf, help_)).startswith("Commands:")
        assert (await post(h, help_, bf.headers()))[0] == 200  # delivered again: answered once
        await asyncio.sleep(0.1)
        assert len([c for c in bf.called("reply") if c.activity_id == help_["id"]]) == 1
        for typed in ("/chatops help", "/help", "help", "@chatops help"):
            assert (await say(h, bf, bf.message(typed, personal=True, conversation="a:1alice"))).startswith("Commands:")
        assert (await say(h, bf, bf.message("oncall"))).startswith("No rotations are configured yet")
        html_message = {**bf.message("x"), "text": "<p><at>chatops</at>&nbsp;oncall</p>", "textFormat": "xml"}
        assert (await say(h, bf, html_message)).startswith("No rotations are configured yet")
        listed = await say(h, bf, bf.message("incident list", personal=True, conversation="a:1alice"))
        assert "I don't know you" not in listed
        stranger = await say(h, bf, bf.message("incident list", user="29:1stranger"))
        assert stranger.startswith('I don\'t know you yet. Add `teams: "29:1stranger"`')
        # Bob is known by his Entra object id: his Teams id (29:...) is not in app.yaml
        bobs = await say(h, bf, bf.message("incident list", user="29:1bob", aad="5c1d2e3f-0000-4000-8000-00000000b0b0"))
        assert "I don't know you" not in bobs


async def test_an_incident_card_in_a_channel_a_click_acknowledges_once_and_redraws_it(tmp_path: Path) -> None:
    async with teams_bot(tmp_path) as (h, bf):
        status, _, _ = await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
        assert status == 200
        await bf.wait_for(lambda: bf.called("send"))
        [posted] = bf.called("send")
        assert posted.conversation == CHANNEL
        card = card_of(posted)
        assert card["type"] == "AdaptiveCard" and card["body"][0]["style"] == "attention"  # firing: red
        words = json.dumps(card, ensure_ascii=False)
        assert "Firing \u00b7 Critical \u00b7 #1" in words and "Waiting for someone to acknowledge." in words
        facts = next(e["facts"] for e in card["body"] if e["type"] == "FactSet")
        assert {"title": "Alerts", "value": "2 from am"} in facts
        assert button_values(card) == ["ack:1", "?res:1"]  # Resolve asks first
        card_id = await recorded(h, 1)
        assert card_id == posted.answered  # the id Teams gave the post

        click = bf.click(tagged(card, "ack:1"), card_id)
        status, _ = await post(h, click, bf.headers())
        assert status == 200
        status, _ = await post(h, click, bf.headers())  # Bot Framework delivers it again: acted on once
        assert status == 200
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")
        assert (await h.actions(1)).count("incident.acknowledged") == 1
        await bf.wait_for(lambda: bf.called("update") and any(c.activity_id == card_id for c in bf.called("reply")
                                                             if "Acknowledged by Alice" in json.dumps(c.body)))
        answers = [c for c in bf.called("reply") if c.activity_id == click["id"]]
        assert [c.body["text"] for c in answers] == ["Acknowledged #1."]  # in the card's thread, once
        assert answers[0].conversation == f"{CHANNEL};messageid={card_id}"
        redrawn = bf.called("update")[-1]
        assert (redrawn.conversation, redrawn.activity_id) == (CHANNEL, card_id)
        assert card_of(redrawn)["body"][0]["style"] == "warning" and button_values(card_of(redrawn)) == ["?res:1"]
        # what to do next, as it is typed on Teams (it said Slack's `/incident page`, which Teams has not)
        words = json.dumps(card_of(redrawn), ensure_ascii=False)
        assert "page someone for help with `@chatops incident page 1 PERSON`" in words and "`/incident" not in words

        answer = await say(h, bf, bf.message("incident resolve 1"))
        assert "Resolved" in answer or "resolve" in answer.lower()
        await bf.wait_for(lambda: button_values(card_of(bf.called("update")[-1])) == ["reo:1"])


async def test_a_page_opens_the_private_chat_with_an_acknowledge_button_that_acknowledges(tmp_path: Path) -> None:
    async with teams_bot(tmp_path, tenant_id="72f988bf-0000-0000-0000-000000000001") as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await recorded(h, 1)
        answer = await say(h, bf, bf.message("incident page 1 bob"))
        assert answer == "Paged Bob on Teams."
        [opened] = bf.called("create")
        assert opened.body["members"] == [{"id": BOB_AAD}] and opened.body["isGroup"] is False
        assert opened.body["channelData"] == {"tenant": {"id": "72f988bf-0000-0000-0000-000000000001"}}
        [page] = [c for c in bf.called("send") if c.conversation == opened.answered]
        card = card_of(page)
        assert button_values(card) == ["ack:1", "?res:1"]
        assert "Alice asks for your help" in json.dumps(card, ensure_ascii=False)

        click = bf.click(tagged(card, "ack:1"), page.answered, personal=True, conversation=opened.answered,
                         user="29:1bob", aad=BOB_AAD)
        assert (await post(h, click, bf.headers()))[0] == 200
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by) == ("acknowledged", "bob")


async def test_commands_typed_as_help_writes_them_work_in_the_private_chat(tmp_path: Path) -> None:
    """Help writes commands as `@chatops ack ID`. In the private chat there is no mention of the bot to pick, so
    `@chatops ack 1` came as plain text, and was answered "`@chatops` is not one of my commands"."""
    async with teams_bot(tmp_path) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await recorded(h, 1)
        assert "`@chatops ack ID`" in await say(h, bf, bf.message("help", personal=True, conversation="a:1alice"))
        assert await say(h, bf, bf.message("@chatops ack 1", personal=True, conversation="a:1alice")) == (
            "Acknowledged #1.")
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")


async def test_a_page_notes_markdown_is_inert_on_the_paged_persons_card(tmp_path: Path) -> None:
    """Alice's note to Bob ("**URGENT** approve at [Silence it here](https://evil.example/login)") showed on Bob's
    page card as bold and a link of its own label, beside the bot's Acknowledge: a person's words are shown as
    written, as an alert's are (its thread line was already)."""
    async with teams_bot(tmp_path, tenant_id=TENANT) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await recorded(h, 1)
        note = "**URGENT** approve at [Silence it here](https://evil.example/login)"
        assert await say(h, bf, bf.message(f"incident page 1 bob {note}")) == "Paged Bob on Teams."
        [opened] = bf.called("create")
        [page] = [c for c in bf.called("send") if c.conversation == opened.answered]
        said = " ".join(e["text"] for e in card_of(page)["body"] if e.get("type") == "TextBlock")
        assert "Alice asks for your help with #1: *\u200b*URGENT*\u200b* approve at [Silence it here]\u200b(" in said
        assert "](https://evil" not in said and "**URGENT" not in said


async def test_the_bot_connectors_refusals_say_when_to_retry_or_what_to_do(tmp_path: Path) -> None:
    async with teams_bot(tmp_path, tenant_id=TENANT) as (h, bf):
        teams = h.bot.adapters["teams"]
        message = Outbound("text", {"text": "hello"}, text="hello")
        bf.fail("send", 429, {"Retry-After": "7"})
        with pytest.raises(DeliveryError) as throttled:
            await teams.send(CHANNEL, message)
        assert throttled.value.retry_after == 7.0 and not throttled.value.permanent
        assert len([c for c in bf.calls if c.method == "send"]) == 1  # no retry of its own: the outbox owns them
        bf.fail("send", 403)
        with pytest.raises(DeliveryError) as forbidden:
            await teams.send(CHANNEL, message)
        assert forbidden.value.permanent and "add the app to the team" in str(forbidden.value)
        bf.fail("update", 404)
        with pytest.raises(DeliveryError) as gone:
            await teams.update(MessageRef("teams", CHANNEL, "1234"), message)
        assert gone.value.permanent and gone.value.gone
        bf.fail("send", 502)
        with pytest.raises(DeliveryError) as failed:
            await teams.send(CHANNEL, message)
        assert not failed.value.permanent and failed.value.retry_after is None
        bf.fail("create", 403)
        with pytest.raises(DeliveryError) as no_chat:
            await teams.page("29:1alice", message)
        assert no_chat.value.permanent and "must have the bot's app installed" in str(no_chat.value)
        sent = await teams.send(CHANNEL, message)  # and then it works, on the one token the bot got
        assert sent == MessageRef("teams", CHANNEL, bf.called("send")[-1].answered, None)
        assert bf.tokens_issued == 1


def test_every_sample_incident_renders_as_a_card_body_and_a_broken_override_is_named(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from bot.render import Renderer, RenderError, sample_contexts

    styles = []
    for context in sample_contexts(datetime(2026, 11, 24, 4, 0, tzinfo=UTC))["incident"]:
        payload = Renderer().render_json("incident", "teams", context)
        assert payload["text"] == context["headline"]
        styles.append(payload["body"][0]["style"])
        links = payload["body"][-1]["text"]
        assert links.startswith("[Graph](http://prom:9090/graph?g0.expr=disk) \u00b7 [Runbook]")
    assert styles == ["attention", "warning", "good", "emphasis"]  # firing, acknowledged, resolved, silenced
    (tmp_path / "incident.teams.json.j2").write_text('{"text": "x", "body": {"type": "TextBlock"}}')
    with pytest.raises(RenderError) as broken:
        Renderer(tmp_path).render_json("incident", "teams", {})
    assert "a list of Adaptive Card elements" in broken.value.problem


async def longest_stall(work: Any) -> float:
    """The longest the event loop stood still (seconds) while `work` ran."""
    gaps: list[float] = [0.0]

    async def ticking() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()
    ticker = asyncio.create_task(ticking())
    try:
        await work
    finally:
        ticker.cancel()
    return max(gaps)


async def test_the_bots_token_is_fetched_without_stopping_the_event_loop(tmp_path: Path) -> None:
    """botbuilder asks Entra ID for the bot's token with a blocking call inside its request pipeline: every webhook and
    the outbox stood still for that round trip. Fetched in a thread first, the loop keeps turning meanwhile."""
    async with teams_bot(tmp_path) as (h, bf):
        bf.token_delay = 0.5
        stall = await longest_stall(h.bot.adapters["teams"].send(CHANNEL, Outbound("text", {"text": "hi"}, text="hi")))
        assert bf.tokens_issued == 1 and stall < 0.3, stall


async def test_the_signing_keys_are_fetched_without_stopping_the_event_loop_and_a_hang_is_a_503(tmp_path: Path) -> None:
    """botbuilder fetches the Bot Framework's signing keys (first request, then daily) with a blocking call without a
    timeout: the whole bot stood still meanwhile, for good if the keys' host hung."""
    async with teams_bot(tmp_path) as (h, bf):
        bf.keys_delay = 0.5
        stall = await longest_stall(post(h, bf.message("help"), bf.headers()))
        assert stall < 0.3, stall
    (tmp_path / "b").mkdir()
    async with teams_bot(tmp_path / "b") as (h, bf):
        bf.keys_delay = 3
        h.bot.adapters["teams"].auth_wait = 0.5
        status, body = await post(h, bf.message("help"), bf.headers())
        assert status == 503 and "signing keys" in body["error"]
        # Twelve at once while the keys' host hangs: each request that gave up held a worker thread until the fetch
        # ended (anyone can send a made-up token). At most AUTH_THREADS daemon threads check tokens; the rest wait.
        import threading

        from adapters.teams import AUTH_THREADS
        answers = await asyncio.gather(*(post(h, bf.message("help"), bf.headers()) for _ in range(12)))
        assert {status for status, _ in answers} == {503}
        checking = [t for t in threading.enumerate() if t.name == "teams-auth"]
        assert 0 < len(checking) <= AUTH_THREADS and all(t.daemon for t in checking)


async def test_a_click_on_the_card_incident_show_drew_redraws_that_card(tmp_path: Path) -> None:
    async with teams_bot(tmp_path) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await recorded(h, 1)
        asked = bf.message("incident show 1", personal=True, conversation="a:1alice")
        await say(h, bf, asked)
        [shown] = [c for c in bf.called("reply") if c.activity_id == asked["id"]]
        assert button_values(card_of(shown)) == ["ack:1", "?res:1"]
        click = bf.click(tagged(card_of(shown), "ack:1"), shown.answered, personal=True, conversation="a:1alice")
        assert (await post(h, click, bf.headers()))[0] == 200
        await bf.wait_for(lambda: any(c.activity_id == shown.answered for c in bf.called("update")))
        [redrawn] = [c for c in bf.called("update") if c.activity_id == shown.answered]
        assert redrawn.conversation == "a:1alice"
        assert card_of(redrawn)["body"][0]["style"] == "warning" and button_values(card_of(redrawn)) == ["?res:1"]


async def test_a_refused_app_password_is_a_refused_token_that_says_what_to_fix(tmp_path: Path) -> None:
    async with teams_bot(tmp_path, app_password="not-the-password") as (h, bf):
        with pytest.raises(DeliveryError) as refused_:
            await h.bot.adapters["teams"].send(CHANNEL, Outbound("text", {"text": "hi"}, text="hi"))
        assert refused_.value.token_refused and refused_.value.permanent
        assert "check adapters.teams.app_id and app_password" in str(refused_.value)
        assert "not-the-password" not in str(refused_.value) and bf.calls == []


async def test_an_activity_delivered_to_two_replicas_is_acted_on_once(tmp_path: Path, pg_schema: str) -> None:
    """Bot Framework redelivers an activity it got no answer to, and behind a load balancer the copy may reach another
    replica: it is claimed in the store (PostgreSQL: replicas share it), so the command is answered once."""
    with FakeTeams() as bf:
        async with bot_on("postgres", tmp_path, pg_schema, bf.yaml(), people=TEAMS_PEOPLE, base=TEAMS_CONFIG) as one:
            async with running_bot(postgres_url(), bf.yaml(), schema=pg_schema, clock=one.clock, people=TEAMS_PEOPLE,
                                   base=TEAMS_CONFIG) as other:
                activity = bf.message("help")
                statuses = await asyncio.gather(post(one, activity, bf.headers()), post(other, activity, bf.headers()))
                assert [status for status, _ in statuses] == [200, 200]
                await bf.wait_for(lambda: bf.called("reply"))
                await asyncio.sleep(0.2)
                assert len([c for c in bf.called("reply") if c.activity_id == activity["id"]]) == 1


async def test_a_multi_tenant_bot_pages_once_it_knows_a_tenant_not_before(tmp_path: Path) -> None:
    """Teams opens a private chat only in a tenant it is told (a 400 without one). A multi-tenant bot (no tenant_id)
    learns it from the activities it receives: after a restart, before any, a page waits to be retried rather than
    going out without a tenant and failing for good."""
    async with teams_bot(tmp_path) as (h, bf):
        teams = h.bot.adapters["teams"]
        message = Outbound("text", {"text": "wake up"}, text="wake up")
        with pytest.raises(DeliveryError) as waiting:
            await teams.page(BOB_AAD, message)
        assert not waiting.value.permanent and not waiting.value.unknown and waiting.value.retry_after == 60
        assert "no Teams tenant known yet: set adapters.teams.tenant_id, or it is learnt from the first message " \
               "a person in people: sends the bot" in str(waiting.value)
        assert bf.called("create") == []
        await say(h, bf, bf.message("help"))  # someone writes to the bot: its tenant is known
        await teams.page(BOB_AAD, message)
        [opened] = bf.called("create")
        assert opened.body["channelData"] == {"tenant": {"id": TENANT}}  # the tenant of the message it received


async def test_a_strangers_message_from_another_tenant_does_not_send_the_pages_there(tmp_path: Path) -> None:
    """The tenant a multi-tenant bot pages in is learnt from people app.yaml knows: a stranger's message from another
    tenant (anyone can side-load an app with the bot's id) sent every page there, where the Bot Connector refuses it
    for good, until someone else wrote."""
    other = "e0e0e0e0-0000-4000-8000-00000000e0e0"
    async with teams_bot(tmp_path) as (h, bf):
        await say(h, bf, bf.message("help"))  # Alice, in TENANT
        stranger = bf.message("help", user="29:1stranger", personal=True, conversation="a:1stranger")
        stranger["channelData"] = {"tenant": {"id": other}}
        stranger["conversation"]["tenantId"] = other
        assert (await post(h, stranger, bf.headers()))[0] == 200
        await h.bot.adapters["teams"].page(BOB_AAD, Outbound("text", {"text": "wake up"}, text="wake up"))
        [opened] = bf.called("create")
        assert opened.body["channelData"] == {"tenant": {"id": TENANT}}


async def test_an_activity_from_another_bot_framework_channel_is_refused_403(tmp_path: Path) -> None:
    """The Bot Framework's keys sign for Direct Line and Web Chat too, whose sender picks its own from.id: such an
    activity naming Alice's Teams id acknowledged an incident as Alice."""
    async with teams_bot(tmp_path) as (h, bf):
        bf.endorsements = ["msteams", "webchat", "directline"]
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        forged = bf.message("incident ack 1", personal=True, conversation="dl-1")
        forged.update(channelId="directline", conversation={"id": "dl-1"}, **{"from": {"id": "29:1alice", "name": "x"}})
        forged.pop("channelData")
        status, body = await post(h, forged, bf.headers())
        assert status == 403 and body["error"] == ("activities from the 'directline' channel are not taken: this "
                                                   "endpoint serves Microsoft Teams")
        [incident] = await h.incidents()
        assert incident.status == "triggered" and bf.called("reply") == []
        await say(h, bf, bf.message("incident ack 1"))  # Teams' own activity still is taken
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")


async def test_the_same_activity_id_in_two_conversations_is_two_clicks(tmp_path: Path) -> None:
    """Teams' activity ids are millisecond times, unique within a conversation only: Bob's click in another thread
    with the id of Alice's was dropped as a repeat of hers, silently."""
    async with teams_bot(tmp_path) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        assert (await h.post("am", fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
        await bf.wait_for(lambda: len(bf.called("send")) >= 2)
        first, second = await recorded(h, 1), await recorded(h, 2)
        cards = {call.answered: card_of(call) for call in bf.called("send")}
        alice = bf.click(tagged(cards[first], "ack:1"), first)
        bob = bf.click(tagged(cards[second], "ack:2"), second, user="29:1bob", aad=BOB_AAD)
        alice["id"] = bob["id"] = "1700000000123"
        assert [(await post(h, click, bf.headers()))[0] for click in (alice, bob)] == [200, 200]
        assert [(i.id, i.status, i.acknowledged_by) for i in await h.incidents()] == [
            (1, "acknowledged", "alice"), (2, "acknowledged", "bob")]


async def test_the_fake_refuses_a_chat_without_a_tenant_as_the_bot_connector_does(tmp_path: Path) -> None:
    import aiohttp

    with FakeTeams() as bf:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{bf.service_url}v3/conversations",
                                      json={"isGroup": False, "members": [{"id": BOB_AAD}]})
            assert resp.status == 400 and bf.called("create") == []


def test_check_config_warns_of_a_teams_section_without_a_tenant() -> None:
    base = "audit: {hmac_key: test-key-0123456789ab}\nstorage: {url: 'sqlite+aiosqlite:///x.db'}\n"
    loaded = parse_config(base + "adapters: {teams: {app_id: a, app_password: p}}\n", adapter_models=SETTINGS_MODELS,
                          env={})
    assert [w for w in loaded.warnings if w.startswith("adapters.teams.tenant_id")] == [
        "adapters.teams.tenant_id: not set: a multi-tenant bot learns its tenant from the first message a person in "
        "people: sends it, so after a restart pages on Teams wait for one (Teams opens a private chat only in a tenant it is told); "
        "set it to your tenant's id"]
    loaded = parse_config(base + f"adapters: {{teams: {{app_id: a, app_password: p, tenant_id: {TENANT}}}}}\n",
                          adapter_models=SETTINGS_MODELS, env={})
    assert not [w for w in loaded.warnings if "tenant" in w]


async def test_a_thread_line_that_asks_everyone_mentions_the_channel(tmp_path: Path) -> None:
    """A channel escalation step's line (the outbox's "thread" with mention "here": Slack's @here) mentions the channel
    on Teams, as a mention entity of the channel's conversation; the story's other lines mention nobody."""
    async with teams_bot(tmp_path) as (h, bf):
        teams = h.bot.adapters["teams"]
        card = MessageRef("teams", CHANNEL, "1234", None)
        line = "Step 1 of 1: nobody has acknowledged yet."
        await teams.reply(card, Outbound("thread", {"line": line, "incident_id": 1, "mention": "here"}, text=line))
        await teams.reply(card, Outbound("thread", {"line": "Acknowledged by Alice.", "incident_id": 1},
                                         text="Acknowledged by Alice."))
        asking, quiet = bf.called("reply")
        assert (asking.conversation, asking.activity_id) == (CHANNEL, "1234")
        assert asking.body["text"] == f"<at>channel</at> {line}"
        assert asking.body["entities"] == [{"type": "mention", "text": "<at>channel</at>",
                                            "mentioned": {"id": CHANNEL, "name": "channel"}}]
        assert quiet.body["text"] == "Acknowledged by Alice." and not quiet.body.get("entities")


async def test_the_emulator_mode_is_warned_of_at_check_config_and_start_and_readyz_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`allow_unauthenticated: true` (no app_id) takes any activity: anyone who reaches /api/messages acts as anyone.
    Taken (the local emulator needs it), but never silently."""
    import logging

    from bot.server import log_startup

    warning = ("adapters.teams.allow_unauthenticated: true and no app_id: anyone who can reach /api/messages can act "
               "as any person: only for the Bot Framework Emulator on your own machine")
    with FakeTeams() as bf:
        extra = f"adapters:\n  teams: {{allow_unauthenticated: true, service_url: '{bf.service_url}'}}\n"
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", extra, people=TEAMS_PEOPLE) as h:
            assert warning in h.bot.loaded.warnings
            with caplog.at_level(logging.WARNING):
                log_startup(h.bot.loaded, h.bot)
            assert warning in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            ready = await (await h.client.get("/readyz")).json()
            assert ready["adapters"]["teams"] == "on, unauthenticated"
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", bf.yaml(allow_unauthenticated=True),
                               people=TEAMS_PEOPLE) as h:  # with an app_id, the token is checked all the same
            assert not [w for w in h.bot.loaded.warnings if "allow_unauthenticated" in w]
            assert (await (await h.client.get("/readyz")).json())["adapters"]["teams"] == "on"


async def test_a_post_that_got_no_answer_is_logged_as_one_that_may_show_twice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Bot Connector call that timed out may have been posted; Teams cannot look a post up, so the outbox's retry may
    post it a second time: the log says so, naming the conversation."""
    import logging

    import adapters.teams

    monkeypatch.setattr(adapters.teams, "TIMEOUT", 0.3)
    async with teams_bot(tmp_path) as (h, bf):
        bf.connector_delay = 1.0
        with caplog.at_level(logging.WARNING, logger="chatops.teams"), pytest.raises(DeliveryError) as lost:
            await h.bot.adapters["teams"].reply(MessageRef("teams", CHANNEL, "1234", None),
                                                Outbound("text", {"text": "hi"}, text="hi"))
        assert lost.value.unknown and [c.method for c in bf.calls] == ["reply"]
        [said] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert said.startswith(f"teams: a reply in {CHANNEL} got no answer (TimeoutError") and said.endswith(
            "): it may have been posted, and Teams cannot be asked whether it was, so the retry may show it twice")


async def test_an_activity_while_the_bots_token_is_refused_is_acted_on_and_answered_200(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bot's own token refused (a wrong app_password): what someone sends is still received and acted on (an
    acknowledgement stops the paging), with a 200 (a redelivery cannot help until an operator fixes the password); no
    answer can be sent, and the log says why, in one line."""
    import logging

    async with teams_bot(tmp_path, app_password="not-the-password") as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        with caplog.at_level(logging.WARNING, logger="chatops.teams"):
            status, _ = await post(h, bf.message("incident ack 1"), bf.headers())
        assert status == 200
        [incident] = await h.incidents()
        assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")
        said = [r for r in caplog.records if r.name == "chatops.teams" and r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in said] == [
            f"teams: no answer to 29:1alice in {CHANNEL}: the bot's token was refused (Failed to get access token: "
            "invalid_client); check adapters.teams.app_id and app_password"]
        assert not [r for r in said if r.exc_info] and bf.calls == []


async def test_a_person_mentioned_in_a_command_is_that_person(tmp_path: Path) -> None:
    """`@chatops incident page 1 @Bob`: Teams sends Bob's mention as `<at>Bob</at>` in the text and an entity with his
    ids; the bot's own mention is dropped, another person's is their id (people[].teams has Bob's Entra object id)."""
    async with teams_bot(tmp_path, tenant_id=TENANT) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await recorded(h, 1)
        asked = bf.message("incident page 1 <at>Bob Builder</at> please look")
        asked["entities"].append({"type": "mention", "text": "<at>Bob Builder</at>",
                                  "mentioned": {"id": "29:1bob", "name": "Bob Builder", "aadObjectId": BOB_AAD}})
        assert await say(h, bf, asked) == "Paged Bob on Teams."
        [opened] = bf.called("create")
        assert opened.body["members"] == [{"id": BOB_AAD}]
        page = json.dumps(card_of(next(c for c in bf.called("send") if c.conversation == opened.answered)))
        assert "please look" in page and "Builder" not in page


async def test_help_on_teams_shows_the_commands_as_they_are_typed_there(tmp_path: Path) -> None:
    """Teams has no slash commands: help shows each as a message to the bot (`@chatops ack ID`), not Slack's `/ack ID`."""
    async with teams_bot(tmp_path) as (h, bf):
        shown = await say(h, bf, bf.message("help"))
        assert "`@chatops ack ID`: acknowledge an incident" in shown
        assert "`@chatops oncall [ROTATION] | @chatops oncall schedule ROTATION" in shown
        assert shown.endswith("`@chatops COMMAND ...` runs any of them; `@chatops help` shows this.")
        assert "`/" not in shown and "| /" not in shown
        # and every answer that names a command names it so (they said Slack's `/ack ID`, which Teams cannot take)
        assert await say(h, bf, bf.message("ack")) == "Usage: `@chatops ack ID`, for example `@chatops ack 42`."
        assert (await say(h, bf, bf.message("incident"))).startswith("Usage: `@chatops incident list | show ID")


async def test_start_in_a_channel_tells_its_id_for_channels_chat(tmp_path: Path) -> None:
    """Teams shows nobody a channel's conversation id, which channels[].chat needs: `@chatops start` there says it."""
    async with teams_bot(tmp_path) as (h, bf):
        other = "19:b0b0b0b0b0b0b0b0@thread.tacv2"
        started = await say(h, bf, bf.message("start", conversation=other))
        assert started.startswith("Hello Alice! Your Teams id 29:1alice is linked to `alice`")
        assert started.endswith(f"This channel's id for app.yaml's channels[].chat is {other}.")
        stranger = await say(h, bf, bf.message("start", user="29:1admin", conversation=f"{other};messageid=77"))
        assert stranger.endswith(f"This channel's id for app.yaml's channels[].chat is {other}.")
        private = await say(h, bf, bf.message("start", personal=True, conversation="a:1alice"))
        assert "channels[].chat" not in private


async def test_a_refusal_for_a_missing_or_empty_token_is_logged_as_what_it_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """botbuilder fails on a missing header or an empty bearer token with an AttributeError or IndexError: the log
    said that, which reads like a crash of the bot's."""
    import logging

    async with teams_bot(tmp_path) as (h, bf):
        with caplog.at_level(logging.INFO, logger="chatops.teams"):
            for i, headers in enumerate(({"Content-Type": "application/json"},
                                         {"Authorization": "Bearer ", "Content-Type": "application/json"},
                                         {"Authorization": "Bearer", "Content-Type": "application/json"})):
                assert (await post(h, {**bf.message("help"), "id": f"x{i}"}, headers))[0] == 401
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teams: refused an activity")]
        assert said == ["teams: refused an activity: no Authorization header",
                        "teams: refused an activity: an empty bearer token",
                        "teams: refused an activity: an empty bearer token"]


async def test_a_refusal_says_what_to_do_about_what_was_being_done(tmp_path: Path) -> None:
    """A 403 on a page (opening the person's chat, or posting in it) is about the person's app, not channels[].chat."""
    async with teams_bot(tmp_path, tenant_id=TENANT) as (h, bf):
        teams = h.bot.adapters["teams"]
        message = Outbound("text", {"text": "hello"}, text="hello")
        for method in ("create", "send"):
            bf.fail(method, 403)
            with pytest.raises(DeliveryError) as refused_:
                await teams.page(BOB_AAD, message)
            said = str(refused_.value)
            assert refused_.value.permanent and "must have the bot's app installed" in said, method
            assert "channels[].chat" not in said, method
        bf.fail("send", 403)
        with pytest.raises(DeliveryError) as channel:
            await teams.send(CHANNEL, message)
        assert "add the app to the team (or chat) of channels[].chat" in str(channel.value)
        assert "installed" not in str(channel.value)


async def test_a_single_tenant_bot_refuses_activities_from_another_tenant(tmp_path: Path) -> None:
    """With tenant_id set, an activity from another tenant (anyone can side-load an app with the bot's id) was acted on
    and answered, a stranger's `start` told that tenant's ids; it is refused 403 and nothing is done or sent."""
    other = "e0e0e0e0-0000-4000-8000-00000000e0e0"
    async with teams_bot(tmp_path, tenant_id=TENANT) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await bf.wait_for(lambda: bf.called("send"))
        sent = len(bf.calls)
        foreign = bf.message("incident ack 1", personal=True, conversation="a:1other")
        foreign["channelData"] = {"tenant": {"id": other}}
        foreign["conversation"]["tenantId"] = other
        status, body = await post(h, foreign, bf.headers())
        assert status == 403 and body["error"] == "activities from another tenant than adapters.teams.tenant_id are not taken"
        await asyncio.sleep(0.2)
        assert len(bf.calls) == sent and (await h.incidents())[0].status == "triggered"
        own = bf.message("incident ack 1")  # its own tenant's still is, its GUID in any case
        own["channelData"] = {**own.get("channelData", {}), "tenant": {"id": TENANT.upper()}}
        own["conversation"]["tenantId"] = TENANT.upper()
        assert "Acknowledged #1." in await say(h, bf, own)


async def test_a_message_without_a_conversation_id_is_a_400_not_a_500(tmp_path: Path) -> None:
    async with teams_bot(tmp_path) as (h, bf):
        activity = bf.message("help")
        activity["conversation"]["id"] = None
        status, body = await post(h, activity, bf.headers())
        assert status == 400 and body["error"] == "not a Bot Framework activity (no conversation.id)"
        for service_url in (None, 5, ""):  # (taken with a good token: its serviceurl claim was compared with nothing)
            activity = bf.message("help")
            activity["serviceUrl"] = service_url
            status, body = await post(h, activity, bf.headers())
            assert status == 400 and body["error"] == "not a Bot Framework activity (no serviceUrl)", service_url


async def test_a_slow_bot_connector_does_not_hold_the_activitys_answer_past_the_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acknowledgement is done at once; the answer to the click (and the card's redraw) waited for a Bot
    Connector taking 40 s, past the Bot Framework's 15 s for the activity's answer. They share one TIMEOUT now."""
    import time

    import adapters.teams

    async with teams_bot(tmp_path) as (h, bf):
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        await bf.wait_for(lambda: bf.called("send"))
        card_id = await recorded(h, 1)
        [posted] = bf.called("send")
        monkeypatch.setattr(adapters.teams, "TIMEOUT", 0.5)
        bf.connector_delay = 3.0
        started = time.monotonic()
        status, _ = await post(h, bf.click(tagged(card_of(posted), "ack:1"), card_id), bf.headers())
        assert status == 200 and time.monotonic() - started < 2.0
        assert (await h.incidents())[0].status == "acknowledged"


def test_a_token_signed_with_an_unknown_key_is_logged_as_that_not_as_a_crash() -> None:
    """botbuilder looks a token's key id up with an IndexError for one it does not have: the log read like a crash."""
    from adapters.teams import refusal

    assert refusal("Bearer a.b.c", IndexError("list index out of range")) == (
        "signed with a key the Bot Framework's signing keys do not have")


async def test_a_buttons_question_names_commands_as_they_are_typed_on_teams(tmp_path: Path) -> None:
    """The Run button of a runbook whose commands are too long for its question said "`/incident runbook 1` shows
    them whole", Slack's words, on a Teams card."""
    from bot.chat import Button, Outbound

    async with teams_bot(tmp_path) as (h, _bf):
        teams = h.bot.adapters["teams"]
        question = "Its commands are too long for this dialog: `/incident runbook 1` shows them whole."
        activity = teams.to_activity(Outbound("text", {"text": "Runbooks"},
                                              [Button("rb", 1, arg="long", label="Run: Long", confirm=question)]))
        words = json.dumps(activity.attachments[0].content, ensure_ascii=False)
        assert "`@chatops incident runbook 1` shows them whole" in words and "`/incident" not in words


async def test_an_answer_the_clicked_message_already_says_is_not_said_twice(tmp_path: Path) -> None:
    """Bob accepts Alice's swap in his private chat: the question was replaced by "Accepted: ..." and the same
    sentence was posted again under it."""
    rotation = ("rotations:\n  - {id: dba, members: [alice, bob], shift: 1w, handoff: 'mon 09:00', start: 2026-11-02, "
                "timezone: Europe/Berlin, reminder: 0s}\n")
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", bf.yaml() + rotation,
                               people=TEAMS_PEOPLE, base=TEAMS_CONFIG) as h:
            asked = bf.message("swap bob next", personal=True, conversation="a:1291alice")
            assert (await post(h, asked, bf.headers()))[0] == 200
            await bf.wait_for(lambda: [c for c in bf.called("send") if "Accept" in json.dumps(c.body)])
            [question] = [c for c in bf.called("send") if "Accept" in json.dumps(c.body)]
            accept = next(a["data"]["chatops"] for a in card_of(question)["actions"] if a["title"] == "Accept")
            click = bf.click(accept, question.answered, personal=True, conversation=question.conversation,
                             user="29:1bob", aad=BOB_AAD)
            assert (await post(h, click, bf.headers()))[0] == 200
            await bf.wait_for(lambda: [c for c in bf.called("update") if c.activity_id == question.answered])
            [settled] = [c for c in bf.called("update") if c.activity_id == question.answered]
            assert settled.body["text"].startswith("Accepted: you are on call for `dba`")
            await asyncio.sleep(0.3)
            assert [c for c in bf.called("reply") if c.activity_id == click["id"]] == []
            # Alice's own message loses its Cancel request, which no longer does anything, and says why; Bob's, the
            # one he clicked, is redrawn by his click alone.
            [mine] = [c for c in bf.called("send") if "Cancel request" in json.dumps(c.body)]
            await bf.wait_for(lambda: [c for c in bf.called("update") if c.activity_id == mine.answered])
            [redrawn] = [c for c in bf.called("update") if c.activity_id == mine.answered]
            assert redrawn.body["text"].endswith("\n\nAccepted by Bob.") and not redrawn.body.get("attachments")
            assert len([c for c in bf.called("update") if c.activity_id == question.answered]) == 1


async def test_an_answer_the_bot_connector_throttles_is_sent_once_it_may(tmp_path: Path) -> None:
    """A 429 on the answer to a command (Retry-After: 1) dropped it: the person never saw it, though the turn had
    14 s left. It is sent again once the Bot Connector says, within the turn's 15 s."""
    async with teams_bot(tmp_path) as (h, bf):
        bf.fail("reply", 429, {"Retry-After": "1"})
        activity = bf.message("help")
        assert (await post(h, activity, bf.headers()))[0] == 200
        answers = [c for c in bf.calls if c.method == "reply" and c.activity_id == activity["id"]]
        assert [c.status for c in answers] == [429, 200] and "Commands:" in answers[-1].body["text"]
        bf.fail("reply", 429, {"Retry-After": "30"}, times=1)  # past the turn's budget: not waited for
        started = asyncio.get_running_loop().time()
        assert (await post(h, bf.message("help"), bf.headers()))[0] == 200
        assert asyncio.get_running_loop().time() - started < 5


async def test_an_alerts_words_on_a_card_are_shown_as_they_came(tmp_path: Path) -> None:
    """Rewording every text of a card made an alert's "`/swap` is 95% full" (a mount point) "`@chatops swap` ..."."""
    body = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    for alert in body["alerts"]:
        alert["annotations"]["summary"] = "`/swap` is 95% full"
    async with teams_bot(tmp_path) as (h, bf):
        assert (await h.post("am", body))[0] == 200
        await bf.wait_for(lambda: bf.called("send"))
        words = json.dumps(card_of(bf.called("send")[0]), ensure_ascii=False)
        assert "`/swap` is 95% full" in words and "@chatops swap" not in words


def test_commands_are_reworded_for_teams_only_in_the_bots_code_spans() -> None:
    """Rewording every `/word` that is a command name reached a runbook's output (`SIZE /swap.img`), a URL
    (`?redirect=/oncall/team`) and a person's page note (`check /start.sh`)."""
    from bot.config import parse_config
    from bot.dispatch import Dispatcher

    dispatcher = Dispatcher(parse_config(CONFIG + PEOPLE, adapter_models=SETTINGS_MODELS, env={}).config)
    for name in ("swap", "oncall", "start", "incident"):
        dispatcher.command(name, usage=f"/{name}", help="x")(lambda *a: None)
    dispatcher.typed_on("teams", (), umbrella="@chatops")
    assert dispatcher.as_typed("teams", "Use `/incident page 1 PERSON` or `/swap cancel 4`.") == (
        "Use `@chatops incident page 1 PERSON` or `@chatops swap cancel 4`.")
    for kept in ("SIZE /swap.img file 2G", "https://sso.example.com/login?redirect=/oncall/team",
                 "Alice paged Bob: \u201ccheck /start.sh\u201d", "```\n/swap.img\n```",
                 # a runbook's steps, as an approver is shown them: what runs, word for word
                 "`/usr/sbin/swapoff /swap.img`; then `/usr/bin/env --config=/oncall.conf /start.sh`",
                 "`/start.sh --now`", "`/oncall.sh`"):
        assert dispatcher.as_typed("teams", kept) == kept
    assert dispatcher.as_typed("teams", "`/swap PERSON DATE | /swap list`") == (
        "`@chatops swap PERSON DATE | @chatops swap list`")  # (a usage's alternatives)


@asynccontextmanager
async def runbook_bot(tmp_path: Path, command: list[str]) -> AsyncIterator[tuple[Harness, FakeTeams, str]]:
    """The Teams bot with a medium-risk runbook `restart-db` (steps: `command`) on #1's route, Dave its approver, and
    #1 posted: the harness, the fake, and #1's card's id."""
    runbooks = ("runbooks:\n  - {id: restart-db, title: Restart db, match: {alertname: DiskFull}, risk: medium,\n"
                f"     steps: [{{run: {json.dumps(command)}, timeout: 5s}}]}}\n")
    people = TEAMS_PEOPLE.rstrip() + '\n  - {id: dave, name: Dave, roles: [responder, approver], teams: "29:1dave"}\n'
    config = TEAMS_CONFIG.replace("{match: {team: dba}, channels: [ops-teams]}",
                                  "{match: {team: dba}, channels: [ops-teams], runbooks: [restart-db]}")
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", bf.yaml(tenant_id=TENANT) + runbooks,
                               people=people, base=config) as h:
            assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
            yield h, bf, await recorded(h, 1)


async def test_a_runbook_command_on_teams_is_shown_as_it_runs(tmp_path: Path) -> None:
    """A step `python3 -c "import app.__main__ as m; m.run(**{})"` was shown on Teams, in `incident runbook 1` and
    in the approver's question, with zero-width spaces inside `__` and `**` (to keep Teams from reading bold): it
    looked the same, and a copy of it did not run. Such a text goes where nothing reads markdown, as it is: a code
    span of a message, or a card's RichTextBlock."""
    step = "import app.__main__ as m; m.run(**{})"
    async with runbook_bot(tmp_path, ["/usr/bin/python3", "-c", step]) as (h, bf, card_id):
        listing = bf.message("incident runbook 1")
        assert step in await say(h, bf, listing)
        [listed] = [c for c in bf.called("reply") if c.activity_id == listing["id"]]
        # (in a code span, which markdown reads nothing in: as it runs, and the message's markdown kept)
        assert listed.body["textFormat"] == "markdown" and "\u200b" not in listed.body["text"]
        run = tagged(card_of(bf.called("send")[0]), "?rb:1:restart-db")
        assert (await post(h, bf.click(run, card_id), bf.headers()))[0] == 200
        await bf.wait_for(lambda: [c for c in bf.called("send") if c.conversation == "a:1291dave"])
        [question] = [c for c in bf.called("send") if c.conversation == "a:1291dave"]
        [block] = card_of(question)["body"]
        assert block["type"] == "RichTextBlock" and step in block["inlines"][0]["text"]
        assert "\u200b" not in json.dumps(card_of(question), ensure_ascii=False)


async def test_messages_without_an_id_are_each_answered_and_a_redelivery_is_not(tmp_path: Path) -> None:
    """An activity was known by its conversation and id: two messages without an id (an emulator's) were one, and
    the second was dropped as the first delivered again. Known by what they say now; the same one again is still
    answered once."""
    async with teams_bot(tmp_path) as (h, bf):
        first = {k: v for k, v in bf.message("help", personal=True, conversation="a:1alice").items() if k != "id"}
        second = {k: v for k, v in bf.message("oncall", personal=True, conversation="a:1alice").items() if k != "id"}
        for activity in (first, second, first):
            assert (await post(h, activity, bf.headers()))[0] == 200
        await bf.wait_for(lambda: len([c for c in bf.calls if c.conversation == "a:1alice"]) >= 2)
        await asyncio.sleep(0.3)
        sent = [c.body.get("text", "") for c in bf.calls if c.conversation == "a:1alice"]
        assert [text.split(":")[0] for text in sent] == ["Commands", "No rotations are configured yet"], sent




async def test_a_refused_click_in_a_channel_is_answered_in_the_clickers_private_chat(tmp_path: Path) -> None:
    """Carol (no roles) clicks Acknowledge on the channel's card: "Acknowledge needs the `responder` role, and Carol
    has no roles" was a reply in the card's thread, for everyone following the channel. Teams has no ephemeral
    message: it goes to her private chat with the bot, and a stranger's too. When that chat cannot be opened (the app
    not installed for them: 403), the thread's reply, as before."""
    people = TEAMS_PEOPLE.rstrip() + '\n  - {id: carol, name: Carol, teams: "29:1carol"}\n'
    with FakeTeams() as bf:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", bf.yaml(tenant_id=TENANT),
                               people=people, base=TEAMS_CONFIG) as h:
            assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
            card_id = await recorded(h, 1)
            ack = tagged(card_of(bf.called("send")[0]), "ack:1")
            for user, aad, said in (("29:1carol", "ca401000-0000-4000-8000-000000000001",
                                     "Acknowledge needs the `responder` role, and Carol has no roles"),
                                    ("29:1stranger", "57a40000-0000-4000-8000-000000000002", "I don't know you yet")):
                click = bf.click(ack, card_id, user=user, aad=aad)
                assert (await post(h, click, bf.headers()))[0] == 200
                chat = f"a:1{aad}"  # (the fake's id for the private chat it opens with that member)
                await bf.wait_for(lambda c=chat: [s for s in bf.called("send") if s.conversation == c])
                [private] = [c for c in bf.called("send") if c.conversation == chat]
                assert private.body["text"].startswith(said)
                assert [c for c in bf.called("reply") if c.activity_id == click["id"]] == []

            bf.fail("create", 403)
            click = bf.click(ack, card_id, user="29:1other", aad="07e40000-0000-4000-8000-000000000003")
            assert (await post(h, click, bf.headers()))[0] == 200
            await bf.wait_for(lambda: [r for r in bf.called("reply") if r.activity_id == click["id"]])
            [public] = [r for r in bf.called("reply") if r.activity_id == click["id"]]
            assert public.body["text"].startswith("I don't know you yet")
            [incident] = await h.incidents()
            assert incident.status == "triggered"


async def test_a_reject_by_someone_who_may_not_is_answered_privately(tmp_path: Path) -> None:
    """Bob (a responder, no approver) presses Reject on Alice's runbook request in the channel's thread: "Reject
    needs the `approver` role ..." was a reply there; it goes to his private chat, as other refusals do."""
    async with runbook_bot(tmp_path, ["/bin/echo", "restarted"]) as (h, bf, card_id):
        run = tagged(card_of(bf.called("send")[0]), "?rb:1:restart-db")
        assert (await post(h, bf.click(run, card_id), bf.headers()))[0] == 200  # Alice asks
        await bf.wait_for(lambda: [c for c in bf.called("reply") if '"title": "Reject"' in json.dumps(c.body)])
        [line] = [c for c in bf.called("reply") if '"title": "Reject"' in json.dumps(c.body)]
        reject = tagged(card_of(line), "rej:1:1")
        click = bf.click(reject, line.answered, user="29:1bob", aad=BOB_AAD)
        assert (await post(h, click, bf.headers()))[0] == 200
        await bf.wait_for(lambda: [c for c in bf.called("send") if c.conversation == f"a:1{BOB_AAD}"])
        [private] = [c for c in bf.called("send") if c.conversation == f"a:1{BOB_AAD}"]
        assert private.body["text"].startswith("Reject needs the `approver` role")
        assert [c for c in bf.called("reply") if c.activity_id == click["id"]] == []
