"""`server.metrics_token` and `server.calendar_token`: GET /metrics and the on-call feed for their token only, when one
is set, and for anyone, as before, when none is.

The running bot behind aiohttp's test server (tests/botkit.py); the chat side through slack-bolt and
python-telegram-bot against the fake Slack and Telegram servers.
"""

from __future__ import annotations

import logging
import shutil
import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters import SETTINGS_MODELS
from bot.cli import main
from bot.config import load_config, parse_config
from tests.botkit import Harness, running_bot
from tests.conftest import ROOT, free_port
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_config import BASE, ROUTES, problems
from tests.test_oncall import PEOPLE, ROTATIONS, parse_ics
from tests.test_serve import serving, wait_http
from tests.test_slack_flow import Slack, slack_config
from tests.test_telegram_flow import GROUP, TG_SECRET, Both

METRICS_TOKEN = "metrics-3f9a1c7e5b2d4086"
CALENDAR_TOKEN = "calendar-8e41b0c95d7a2f63"
TOKENS = f"server: {{metrics_token: {METRICS_TOKEN}, calendar_token: {CALENDAR_TOKEN}}}\n"


@pytest.fixture
async def open_bot(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'open.db'}", ROTATIONS, people=PEOPLE) as h:
        yield h


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'guarded.db'}", TOKENS + ROTATIONS, people=PEOPLE) as h:
        yield h


def families(body: str) -> list[str]:
    """The metric families a scrape holds (the values move between scrapes; what is there does not)."""
    return sorted(line for line in body.splitlines() if line.startswith("# TYPE "))


# -- GET /metrics ---------------------------------------------------------------------------------------------

async def test_metrics_want_the_bearer_token_and_tell_a_caller_without_it_what_to_send(guarded: Harness,
                                                                                      open_bot: Harness) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000"}, {"Authorization": f"Basic {METRICS_TOKEN}"},
                    {"Authorization": METRICS_TOKEN}, {"Authorization": f"Bearer {METRICS_TOKEN}x"}):
        resp = await guarded.client.get("/metrics", headers=headers)
        assert resp.status == 401, headers
        assert resp.headers["WWW-Authenticate"].startswith("Bearer"), headers
        error = (await resp.json())["error"]
        assert "`Authorization: Bearer` and the value of server.metrics_token" in error, error
        assert "authorization: {credentials: ...}" in error  # what Prometheus' scrape config calls it
        assert METRICS_TOKEN not in error
    missing = await (await guarded.client.get("/metrics")).json()
    assert missing["error"].startswith("missing Authorization header (expected: Bearer <token>)")

    right = await guarded.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert right.status == 200
    await open_bot.client.get("/metrics")  # (a request served before: the request families are there in both)
    before = await open_bot.client.get("/metrics")  # a bot without a token, as every bot answered until now
    assert right.headers["Content-Type"] == before.headers["Content-Type"]
    body = await right.text()
    assert families(body) == families(await before.text()) and "chatops_outbox{" in body
    # a refused scrape is counted as the others are, by route and status
    assert 'chatops_http_requests_total{route="/metrics",status="401"} 6.0' in (
        await (await guarded.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})).text())


async def test_without_tokens_metrics_and_the_feed_answer_anyone_as_before(open_bot: Harness) -> None:
    assert (await open_bot.client.get("/metrics")).status == 200
    resp = await open_bot.client.get("/oncall/web.ics")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/calendar; charset=utf-8"
    assert (await open_bot.client.get("/oncall/web.ics?token=anything")).status == 200  # ignored
    unknown = await open_bot.client.get("/oncall/nope.ics")
    assert unknown.status == 404
    assert "(known: dba-primary, web)" in (await unknown.json())["error"]


# -- GET /oncall/{rotation}.ics -------------------------------------------------------------------------------

async def test_the_feed_wants_its_token_in_the_url_and_serves_the_same_calendar_with_it(guarded: Harness,
                                                                                        open_bot: Harness) -> None:
    for query in ("", "?token=", "?token=wrong-token-0000000000", f"?token={CALENDAR_TOKEN}x",
                  f"?token={CALENDAR_TOKEN}&token={CALENDAR_TOKEN}", f"?tokens={CALENDAR_TOKEN}", "?token=%FF%FE"):
        resp = await guarded.client.get(f"/oncall/web.ics{query}")
        assert resp.status == 401, query
        error = (await resp.json())["error"]
        assert "this feed is private; subscribe to its URL with ?token=, the value of server.calendar_token" in error
        assert CALENDAR_TOKEN not in error
    # the token is a header-free credential: a bearer header does not stand in for it
    resp = await guarded.client.get("/oncall/web.ics", headers={"Authorization": f"Bearer {CALENDAR_TOKEN}"})
    assert resp.status == 401

    right = await guarded.client.get(f"/oncall/web.ics?token={CALENDAR_TOKEN}")
    assert right.status == 200 and right.headers["Content-Type"] == "text/calendar; charset=utf-8"
    # no cache in between keeps it (its secret is in the URL); named by the rotation's id, however it was spelt
    assert right.headers["Cache-Control"] == "private, no-store"
    odd = await guarded.client.get(f"/oncall/WEB.ics?token={CALENDAR_TOKEN}")
    assert odd.status == 200 and odd.headers["Content-Disposition"] == 'inline; filename="web.ics"'
    metrics = await guarded.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status == 200 and metrics.headers["Cache-Control"] == "private, no-store"
    # /readyz says why only to whoever has the metrics token (a file's path, a host, the adapters' states)
    ready = await guarded.client.get("/readyz")
    assert ready.status == 200 and await ready.json() == {
        "status": "ok", "database": "ok", "detail": "send server.metrics_token as `Authorization: Bearer` for the "
                                                    "details (the adapters' states, and why when not ready)"}
    told = await (await guarded.client.get("/readyz", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})).json()
    assert told["database"] == "ok" and "adapters" in told
    assert "adapters" in await (await open_bot.client.get("/readyz")).json()  # (no token set: open, as /metrics)
    body = await right.read()
    assert body == await (await open_bot.client.get("/oncall/web.ics")).read()  # the same feed, byte for byte
    assert parse_ics(body)[1]  # shifts in it
    encoded = await guarded.client.get("/oncall/web.ics?token=" + "".join(f"%{b:02X}" for b in CALENDAR_TOKEN.encode()))
    assert encoded.status == 200  # a calendar app that percent-encodes every character


async def test_an_unknown_rotation_names_the_known_ones_only_to_a_caller_with_the_token(guarded: Harness) -> None:
    for query in ("", "?token=wrong-token-0000000000"):
        resp = await guarded.client.get(f"/oncall/nope.ics{query}")
        assert resp.status == 401  # the token first: no telling which rotations exist
        text = await resp.text()
        assert "dba-primary" not in text and "web" not in text.replace("/oncall", ""), text
    resp = await guarded.client.get(f"/oncall/nope.ics?token={CALENDAR_TOKEN}")
    assert resp.status == 404
    assert "(known: dba-primary, web)" in (await resp.json())["error"]


async def test_neither_token_is_logged_when_a_request_is_refused_or_fails(guarded: Harness,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def broken(_rotation: str) -> str | None:
        raise RuntimeError("the store went away")

    guarded.bot.oncall.calendar = broken  # type: ignore[method-assign]
    resp = await guarded.client.get(f"/oncall/web.ics?token={CALENDAR_TOKEN}")
    assert resp.status == 500
    assert "unhandled error answering GET '/oncall/web.ics'" in caplog.text  # the path, without its query
    await guarded.client.get(f"/oncall/web.ics?token={CALENDAR_TOKEN}x")
    await guarded.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}x"})
    await guarded.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    # (aiohttp's access log, which writes the query, is the test server's: `chatops serve` runs without one; see
    # test_serve_with_both_tokens_answers_only_with_them_and_logs_neither)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records if r.name != "aiohttp.access")
    assert CALENDAR_TOKEN not in logged and METRICS_TOKEN not in logged


def test_serve_with_both_tokens_answers_only_with_them_and_logs_neither(tmp_path: Path) -> None:
    """The example app.yaml with METRICS_TOKEN and CALENDAR_TOKEN set, as a user runs it, at --log-level DEBUG."""
    shutil.copy(ROOT / "app.yaml", tmp_path / "app.yaml")
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def status(path: str, headers: dict[str, str] | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with serving(tmp_path, port, {"METRICS_TOKEN": METRICS_TOKEN, "CALENDAR_TOKEN": CALENDAR_TOKEN},
                 "--log-level", "DEBUG") as proc:
        assert wait_http(f"{base}/healthz", proc)[0] == 200
        assert status("/metrics") == 401
        assert status("/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"}) == 200
        assert status("/oncall/dba-primary.ics") == 401
        assert status(f"/oncall/dba-primary.ics?token={CALENDAR_TOKEN}x") == 401
        assert status(f"/oncall/dba-primary.ics?token={CALENDAR_TOKEN}") == 200
        assert status(f"/oncall/nope.ics?token={CALENDAR_TOKEN}") == 404
    log = proc.stdout.read()
    assert "GET /metrics: wants its bearer token (server.metrics_token)" in log
    assert "GET /oncall/ROTATION.ics: wants ?token= (server.calendar_token)" in log
    assert METRICS_TOKEN not in log and CALENDAR_TOKEN not in log


# -- the feed's link in chat -----------------------------------------------------------------------------------

@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = (TOKENS + ROTATIONS + slack_config(slack)
                 + f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE) as h:
            yield Both(h, Slack(h, slack), tg)


async def test_the_feeds_link_with_its_token_is_given_only_where_the_asker_alone_reads_it(both: Both) -> None:
    """`/oncall schedule` with more shifts than fit points to the feed: its link, token and all, on Slack (the answer
    is ephemeral) and in a private chat on Telegram; never in a Telegram group, where everyone reads it."""
    link = f"http://127.0.0.1:8080/oncall/web.ics?token={CALENDAR_TOKEN}"
    slack = await both.slack.answer(await both.slack.command("/oncall", "schedule web --weeks 6", user="U02BOB"))
    assert slack["response_type"] == "ephemeral"
    assert slack["text"].endswith(f"ask for fewer weeks, or subscribe to {link} (a private link: keep it to "
                                  "yourself)"), slack["text"][-300:]
    private = await both.type("/oncall schedule web --weeks 6")
    assert link in private, private[-300:]
    group = await both.type("/oncall schedule web --weeks 6", chat=GROUP)
    assert CALENDAR_TOKEN not in group
    assert group.endswith("ask for fewer weeks, or ask me in a private chat for the link to subscribe to (it holds a "
                          "secret, so not here)"), group[-300:]


# -- app.yaml ---------------------------------------------------------------------------------------------------

def test_a_rejected_endpoint_token_is_never_shown_and_empty_is_off(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    short, spaced, slashed = "Short-Secret-15", "Spaced-Secret-0123456789\n", "Slashed/Secret+0123456789="
    found = problems(BASE + ROUTES + "server: {metrics_token: ${METRICS_TOKEN}, calendar_token: ${CALENDAR_TOKEN}}\n",
                     env={"METRICS_TOKEN": short, "CALENDAR_TOKEN": spaced})
    found += problems(BASE + ROUTES + f"server: {{metrics_token: '{slashed}', calendar_token: 12345678901234567}}\n")
    assert found == [
        # (each names the variable its value came from, never the value)
        "server.metrics_token: (a secret, not shown) is shorter than 16 characters: give a longer one, such as the "
        "output of `openssl rand -hex 32` (or leave it empty for no token) (the value is from the environment "
        "variable METRICS_TOKEN)",
        "server.calendar_token: (a secret, not shown) begins or ends with a space or a line break; strip it (the value "
        "is from the environment variable CALENDAR_TOKEN)",
        "server.metrics_token: (a secret, not shown) may hold only letters, digits, `-`, `.`, `_` and `~`, which go "
        "into a URL and a header as they are; `openssl rand -hex 32` gives such a token",
        "server.calendar_token: input should be a valid string",
    ]
    assert not any(secret.strip() in line or "12345678901234567" in line
                   for line in found for secret in (short, spaced, slashed))
    # check-config says the same, and shows none of them either
    config = tmp_path / "app.yaml"
    config.write_text(textwrap.dedent(BASE + ROUTES) + "server: {metrics_token: ${METRICS_TOKEN}}\n"
                      f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\n")
    monkeypatch.setenv("METRICS_TOKEN", slashed)
    assert main(["check-config", "-c", str(config)]) == 2
    out = capsys.readouterr()
    assert "server.metrics_token: (a secret, not shown) may hold only" in out.out
    assert slashed not in out.out + out.err
    # written without a default, an unset variable is an error (the endpoint does not open by mistake)
    assert problems(BASE + ROUTES + "server: {metrics_token: ${METRICS_TOKEN}}\n") == [
        "server.metrics_token: environment variable METRICS_TOKEN is not set (set it, or write "
        "${METRICS_TOKEN:-default})"]
    # empty, as `${VAR:-}` gives while the variable is unset or empty, is off
    for env in ({}, {"METRICS_TOKEN": "", "CALENDAR_TOKEN": ""}):
        server = parse_config(textwrap.dedent(BASE + ROUTES) + "server: {metrics_token: '${METRICS_TOKEN:-}', "
                              "calendar_token: ''}\n", adapter_models=SETTINGS_MODELS, env=env).config.server
        assert server.metrics_token is None and server.calendar_token is None


def test_the_example_config_leaves_both_endpoints_open_until_their_variables_are_set() -> None:
    server = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env={}).config.server
    assert server.metrics_token is None and server.calendar_token is None
    env = {"METRICS_TOKEN": METRICS_TOKEN, "CALENDAR_TOKEN": CALENDAR_TOKEN}
    server = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env=env).config.server
    assert (server.metrics_token, server.calendar_token) == (METRICS_TOKEN, CALENDAR_TOKEN)
