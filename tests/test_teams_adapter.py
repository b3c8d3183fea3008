"""The Teams adapter against a fake Bot Framework (tests/fake_teams.py): the channel's JWT checked on every
`POST /api/messages`, commands and clicks through the dispatcher, cards, replies and pages through the Bot Connector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters import SETTINGS_MODELS
from bot.config import ConfigError, parse_config
from tests.botkit import PEOPLE, running_bot
from tests.fake_teams import APP_ID, CHANNEL, FakeTeams

TEAMS_PEOPLE = PEOPLE.replace("slack: U01ALICE,", 'slack: U01ALICE, teams: "29:1alice",').replace(
    "slack: U02BOB}", "slack: U02BOB, teams: 5c1d2e3f-0000-4000-8000-00000000b0b0}")


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
