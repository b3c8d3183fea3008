"""Bad input gets a clear 4xx and loses nothing; a down database gets 503 and writes nothing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from bot.alerts import read_body
from bot.auth import sign
from handlers.intake import Outcome
from storage.db import Database
from storage.models import AlertRecord, AuditEvent
from tests.botkit import Harness, fixture, raw_post, running_bot

ALERT = {"asset_name": "web-1", "signature": "NginxDown", "severity": "high", "message": "down", "tool_source": "z"}


@pytest.fixture(params=["thread", "process"])
async def h(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Every test here runs twice: with the writer thread, where the HTTP front reads each body, and with the
    writer process (`storage.writer: process`), which reads the bodies itself (Intake.reads_bodies)."""
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                           storage_options=f"writer: {request.param}") as harness:
        yield harness


def signed(h: Harness, body: bytes, *, secret: str = "generic-secret", skew: float = 0) -> dict[str, str]:
    ts = str(int(h.clock.now().timestamp() + skew))
    return {"X-Signature": f"sha256={sign(secret, body, ts)}", "X-Timestamp": ts}


async def rejected(h: Harness, reason: str) -> float:
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    line = next((m for m in metrics if m.startswith("chatops_alert_rejected_total") and f'reason="{reason}"' in m), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def test_hmac_good_wrong_stale_replayed_and_missing(h: Harness) -> None:
    body = json.dumps(ALERT).encode()
    good = signed(h, body)
    assert (await h.post("generic", body, good))[0] == 200

    status, answer, _ = await h.post("generic", body, good)
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted; sign the "
                                              "request again (a new timestamp) to send it again, or give each request "
                                              "an X-Delivery-ID, whose retries get the first answer")

    other = json.dumps({**ALERT, "message": "other"}).encode()
    status, answer, _ = await h.post("generic", other, signed(h, other, secret="not-the-secret"))
    assert (status, answer["error"]) == (401, "invalid X-Signature signature")

    status, answer, _ = await h.post("generic", other, signed(h, other, skew=-301))
    assert status == 401 and answer["error"].startswith("X-Timestamp is 301s away from now (allowed: 300s)")

    status, answer, _ = await h.post("generic", other, {"X-Timestamp": good["X-Timestamp"]})
    assert (status, answer["error"]) == (401, "missing X-Signature header")

    status, answer, _ = await h.post("generic", other, {"X-Signature": good["X-Signature"]})
    assert (status, answer["error"]) == (401, "missing X-Timestamp header")

    for odd in ("nan", "inf", "-Infinity", "soon"):  # nan and inf would pass any comparison with the window
        status, answer, _ = await h.post("generic", other, {"X-Signature": good["X-Signature"], "X-Timestamp": odd})
        assert (status, answer["error"]) == (401, "X-Timestamp is not a Unix time in seconds")

    # A signature over a different body (tampered in transit) fails.
    status, _, _ = await h.post("generic", other, good)
    assert status == 401
    assert await rejected(h, "replayed") == 1 and await rejected(h, "bad_signature") == 2
    assert await h.count(AlertRecord) == 1

    # Its header twice: which counts would be a guess; refused as a bad signature (not as a bearer token, with no
    # WWW-Authenticate: Bearer), and its timestamp's twice as a bad timestamp.
    mine = signed(h, other)
    for doubled, reason in (("X-Signature", "bad_signature"), ("X-Timestamp", "bad_timestamp")):
        headers = [(name.encode(), value.encode()) for name, value in mine.items()] + [(doubled.encode(), b"1")]
        status, answer = await raw_post(h.client, "/alerts/generic", headers, other)
        assert (status, json.loads(answer)["error"]) == (401, f"{doubled} header sent more than once"), answer
    assert await rejected(h, "bad_signature") == 3 and await rejected(h, "bad_timestamp") == 4 + 1  # (the odd ones above)
    assert await rejected(h, "bad_credentials") == 0
    # `sha256=` in any case, as the hex may be: the same signature
    upper = {**mine, "X-Signature": "SHA256=" + mine["X-Signature"].removeprefix("sha256=").upper()}
    assert (await h.post("generic", other, upper))[0] == 200
    status, answer, _ = await h.post("generic", other, mine)
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted; sign the "
                                              "request again (a new timestamp) to send it again, or give each request "
                                              "an X-Delivery-ID, whose retries get the first answer")


@pytest.mark.parametrize(("source", "header"), [
    ("am", (b"Authorization", b"Bearer \xff\xfe")),
    ("am", (b"Authorization", "Bearer \u00e9\u00e9".encode())),
    ("grafana", (b"X-Grafana-Alerting-Signature", b"\xff")),
    ("generic", (b"X-Signature", b"sha256=\xff")),
])
async def test_a_credential_that_is_not_ascii_is_a_401_not_a_500(h: Harness, source: str,
                                                                  header: tuple[bytes, bytes]) -> None:
    body = fixture("alertmanager/03-highcpu-firing.json") if source == "am" else json.dumps(ALERT).encode()
    extra = [(b"X-Timestamp", str(int(h.clock.now().timestamp())).encode())] if source == "generic" else []
    status, answer = await raw_post(h.client, f"/alerts/{source}", [header, *extra], body)
    assert status == 401, answer
    assert json.loads(answer)["error"].startswith("invalid ")
    assert await h.count(AlertRecord) == 0


async def test_a_replay_under_another_delivery_id_is_refused_and_a_retry_under_the_same_one_is_answered(
        h: Harness) -> None:
    body = json.dumps(ALERT).encode()
    headers = {**signed(h, body), "X-Delivery-ID": "d-1"}
    assert (await h.post("generic", body, headers))[0] == 200
    status, answer, _ = await h.post("generic", body, {**headers, "X-Delivery-ID": "d-2"})  # not covered by the signature
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted with another "
                                              "X-Delivery-ID, or none (a retry repeats the first one)")
    status, answer, _ = await h.post("generic", body, {k: v for k, v in headers.items() if k != "X-Delivery-ID"})
    assert status == 401
    status, _, answer_headers = await h.post("generic", body, headers)  # the sender's own retry
    assert status == 200 and answer_headers["X-Idempotent-Replay"] == "true"
    async with h.bot.db.sessions() as session:
        assert (await session.execute(select(AlertRecord.received_count))).scalars().all() == [1]


async def test_copies_of_one_signed_request_sent_at_once_are_one_alert(h: Harness) -> None:
    body = json.dumps(ALERT).encode()
    headers = signed(h, body)
    answers = await asyncio.gather(*(h.post("generic", body, headers) for _ in range(5)))
    assert sorted(status for status, _, _ in answers) == [200, 503, 503, 503, 503]  # the copies: retry in a moment
    assert {a["error"] for status, a, _ in answers if status == 503} == {
        "the same signed request is being stored right now; retry in a moment"}
    assert all(hdrs["Retry-After"] == "1" for status, _, hdrs in answers if status == 503)
    assert (await h.post("generic", body, headers))[0] == 401  # once stored, a copy is a replay
    async with h.bot.db.sessions() as session:
        assert (await session.execute(select(AlertRecord.received_count))).scalars().all() == [1]


async def test_copies_of_one_signed_bad_body_sent_at_once_all_get_its_400(h: Harness) -> None:
    body = b'{"asset_name": "web-1"'
    headers = signed(h, body)
    answers = await asyncio.gather(*(h.post("generic", body, headers) for _ in range(3)))
    assert [(status, a["error"]) for status, a, _ in answers] == [
        (400, "malformed JSON at line 1, column 23: Expecting ',' delimiter")] * 3  # no "retry in a moment"
    assert await rejected(h, "malformed") == 3 and await rejected(h, "in_flight") == 0


async def test_copies_under_one_delivery_id_in_one_batch_are_one_alert_received(h: Harness) -> None:
    intake, body = h.bot.intake, json.dumps(ALERT).encode()
    source = next(s for s in h.bot.config.sources if s.id == "open")
    alerts = [] if intake.reads_bodies else read_body(source.kind, source.id, body)[0]
    raw = body if intake.reads_bodies else None
    outcomes = await asyncio.gather(*(intake.submit(source, alerts, "d-1", body=raw) for _ in range(5)))  # one batch
    assert [(o.status, o.replayed) for o in outcomes] == [(200, False)] + [(200, True)] * 4
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alerts_received_total{source="open",status="firing"} 1.0' in metrics
    assert await h.count(AlertRecord) == 1


def held_submit(h: Harness, outcomes: list[Outcome | None]) -> asyncio.Event:
    """intake.submit answers the n-th call with outcomes[n] once the event is set (None: the real submit)."""
    real, gate, calls = h.bot.intake.submit, asyncio.Event(), []

    async def submit(*args: Any, **kwargs: Any) -> Outcome:
        calls.append(1)
        planned = outcomes[len(calls) - 1]
        if planned is None:
            return await real(*args, **kwargs)
        await gate.wait()
        return planned

    h.bot.intake.submit = submit  # type: ignore[method-assign]
    return gate


async def test_a_retry_while_the_first_attempt_is_still_on_its_way_is_told_to_retry_not_refused(h: Harness) -> None:
    body = json.dumps(ALERT).encode()
    headers = signed(h, body)
    gate = held_submit(h, [Outcome(503, {"error": "unavailable"}), None])  # the database stalls, then fails
    first = asyncio.ensure_future(h.post("generic", body, headers))
    await asyncio.sleep(0.2)
    status, _, hdrs = await h.post("generic", body, headers)  # the sender timed out and sent it again
    assert (status, hdrs["Retry-After"]) == (503, "1")
    gate.set()
    assert (await first)[0] == 503
    assert (await h.post("generic", body, headers))[0] == 200  # and its next retry lands: nothing is lost
    assert await h.count(AlertRecord) == 1


async def test_a_failed_first_attempt_does_not_unprotect_a_copy_that_was_stored(h: Harness) -> None:
    body = json.dumps(ALERT).encode()
    headers = {**signed(h, body), "X-Delivery-ID": "d-1"}
    gate = held_submit(h, [Outcome(503, {"error": "unavailable"}), None])
    first = asyncio.ensure_future(h.post("generic", body, headers))
    await asyncio.sleep(0.2)
    assert (await h.post("generic", body, headers))[0] == 200  # the sender's retry, under its own id, is stored
    gate.set()
    assert (await first)[0] == 503
    assert (await h.post("generic", body, {**headers, "X-Delivery-ID": "d-2"}))[0] == 401  # still a replay
    async with h.bot.db.sessions() as session:
        assert (await session.execute(select(AlertRecord.received_count))).scalars().all() == [1]


async def test_a_signed_request_that_got_a_503_can_be_sent_again(h: Harness, tmp_path: Path) -> None:
    body = json.dumps(ALERT).encode()
    headers = signed(h, body)
    good = h.bot.db
    broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    h.bot.intake.db = broken
    assert (await h.post("generic", body, headers))[0] == 503
    await broken.dispose()
    h.bot.intake.db = good
    assert (await h.post("generic", body, headers))[0] == 200  # the same bytes, retried: nothing was stored before
    assert (await h.post("generic", body, headers))[0] == 401  # once stored, a copy is a replay
    assert await h.count(AlertRecord) == 1


async def test_a_delivery_id_that_is_not_printable_ascii_is_a_400(h: Harness) -> None:
    for value in (b"\xff\xfe", "caf\u00e9".encode()):  # (control characters aiohttp refuses itself)
        status, answer = await raw_post(h.client, "/alerts/open", [(b"X-Delivery-ID", value)], json.dumps(ALERT).encode())
        assert (status, json.loads(answer)["error"]) == (400, "X-Delivery-ID must be printable ASCII (a UUID, say)")
    assert await h.count(AlertRecord) == 0


async def test_grafana_hmac_over_the_body(h: Harness) -> None:
    body = json.dumps({"version": "1", "alerts": [{"status": "firing", "labels": {"alertname": "X"}}]}).encode()
    ok = await h.post("grafana", body, {"X-Grafana-Alerting-Signature": sign("grafana-secret", body)})
    assert ok[0] == 200
    bad = await h.post("grafana", body, {"X-Grafana-Alerting-Signature": sign("wrong-secret", body)})
    assert bad[0] == 401


async def test_bearer_missing_and_wrong(h: Harness) -> None:
    body = fixture("alertmanager/03-highcpu-firing.json")
    status, answer, headers = await h.post("am", body, {"Authorization": ""})
    assert (status, answer["error"]) == (401, "missing Authorization header (expected: Bearer <token>)")
    assert headers["WWW-Authenticate"] == 'Bearer realm="chatops"'
    status, answer, _ = await h.post("am", body, {"Authorization": "Bearer am-secret-tokeN"})
    assert (status, answer["error"]) == (401, "invalid bearer token")
    status, answer, _ = await h.post("am", body, {"Authorization": "Basic dXNlcjpwYXNz"})
    assert (status, answer["error"]) == (401, "Authorization header is not a Bearer token")
    assert await h.incidents() == []


async def test_rate_limit_with_retry_after(h: Harness) -> None:
    statuses = [(await h.post("limited", {**ALERT, "dedup_key": str(i)}))[0] for i in range(5)]
    assert statuses == [200] * 5
    status, answer, headers = await h.post("limited", ALERT)
    assert status == 429 and answer["error"] == "rate limit of 60/min (burst 5) exceeded"
    assert headers["Retry-After"] == "1" and headers["X-RateLimit-Limit"] == "60"
    h.clock.advance(timedelta(seconds=1))
    assert (await h.post("limited", ALERT))[0] == 200
    assert await rejected(h, "rate_limited") == 1


MALFORMED = [
    ("open", b'{"asset_name": "web-1",', 400, "malformed JSON at line 1, column 24: Expecting property name enclosed in double quotes"),
    ("open", b"\xff\xfe{}", 400, "body is not UTF-8 text"),
    ("open", b"", 400, "malformed JSON at line 1, column 1: Expecting value"),
    ("open", b"[]", 422, "body: expected an alert object or a non-empty list of them (not a generic payload?)"),
    ("open", b'"text"', 422, "body: expected an object, got a string (not a generic payload?)"),
    ("open", json.dumps({k: v for k, v in ALERT.items() if k != "signature"}).encode(), 422, "signature: required (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "severity": "apocalyptic"}).encode(), 422,
     'severity: unknown severity "apocalyptic" (expected one of: critical, high, medium, low, info, or a synonym such as warning, error, P1) (not a generic payload?)'),
    ("open", json.dumps([ALERT, {**ALERT, "labels": {"a": {"b": 1}}}]).encode(), 422, "[1].labels.a: expected a string, got an object (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "status": "exploded"}).encode(), 422, "status: expected 'firing' or 'resolved' (or a monitor's word for one: firing, alerting, triggered, problem, open, warn, no data, re-triggered, renotify, down, unreachable, critical, warning, unknown; resolved, ok, recovered, closed, recovery, up), got \"exploded\" (not a generic payload?)"),
    # a severity is a word: not read from an object's or a list's text ({"level": "critical"} was critical)
    ("open", json.dumps({**ALERT, "severity": True}).encode(), 422,
     "severity: expected a string, got a boolean (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "severity": {"level": "critical"}}).encode(), 422,
     "severity: expected a string, got an object (not a generic payload?)"),
    ("open", json.dumps([ALERT, {**ALERT, "severity": ["low"]}]).encode(), 422,
     "[1].severity: expected a string, got a list (not a generic payload?)"),
    # as the sender wrote it (JSON), not as Python prints it (1.0)
    ("open", json.dumps({**ALERT, "severity": 1.0}).encode(), 422,
     'severity: unknown severity "1.0" (expected one of: critical, high, medium, low, info, or a synonym such as warning, error, P1) (not a generic payload?)'),
    # (an empty one counted as a second tool reporting the incident: +10 priority)
    ("open", json.dumps({**ALERT, "tool_source": " "}).encode(), 422, "tool_source: must not be empty (not a generic payload?)"),
    ("am", b'{"version": "4", "alerts": [{"labels": {"alertname": "x"}}]}', 422,
     "alerts[0].status: required ('firing' or 'resolved') (not an alertmanager payload?)"),
    ("open", json.dumps({**ALERT, "asset_name": "   "}).encode(), 422, "asset_name: must not be empty (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "colour": "red"}).encode(), 422,
     "colour: unknown field (expected: annotations, asset_name, dedup_key, labels, links, message, severity, signature, status, timestamp, tool_source) (not a generic payload?)"),
    ("am", b'{"version": "4", "alerts": {}}', 422, "alerts: expected a list, got an object (not an alertmanager payload?)"),
    ("am", b'{"version": "3", "alerts": []}', 422, 'version: unsupported Alertmanager webhook version "3" (expected "4") (not an alertmanager payload?)'),
    ("am", b'{"version": {"x": {"y": 1}}, "alerts": []}', 422,
     'version: unsupported Alertmanager webhook version {"x": {"y": 1}} (expected "4") (not an alertmanager payload?)'),
    ("am", b'{"version": "4", "alerts": [], "truncatedAlerts": "5"}', 422,
     'truncatedAlerts: expected a whole number from 0 to 2147483647, got "5" (not an alertmanager payload?)'),
    ("am", b'{"version": "4"}', 422, "alerts: required (not an alertmanager payload?)"),
    ("am", b'{"version": "4", "alerts": [{"status": "firing", "labels": {"a": "b"}, "startsAt": "yesterday"}]}', 422,
     "alerts[0].startsAt: not an RFC 3339 time: 'yesterday' (not an alertmanager payload?)"),
    ("am", b'{"version": "4", "alerts": [{"status": "firing"}]}', 422,
     "alerts[0].labels: required: an alert without labels cannot be grouped (not an alertmanager payload?)"),
    ("grafana", b'{"version": "1", "alerts": [7]}', 401, "missing X-Grafana-Alerting-Signature header"),
    ("limited", b'{"asset_name": "web-1", "signature": "x", "severity": "high", "message": "m", "tool_source": "t", '
                b'"labels": {"n": ' + b"1" * 4400 + b"}}", 400, "malformed JSON: a number of more than 4,300 digits"),
    ("open", b'{"asset_name": "web-1", "signature": "x", "severity": NaN, "message": "m", "tool_source": "t"}', 400,
     "malformed JSON: NaN is not a JSON number"),
    ("open", b'[{"asset_name": "web-1", "signature": "x", "severity": "high", "message": "m", "tool_source": "t", '
             b'"labels": {"v": -Infinity}}]', 400, "malformed JSON: -Infinity is not a JSON number"),
    ("open", json.dumps({**ALERT, "asset_name": "\ud800"}).encode(), 400,
     "malformed JSON: a string holds half of a UTF-16 surrogate pair (a lone \\uD800-\\uDFFF escape)"),
    ("open", json.dumps({**ALERT, "timestamp": "9999-12-31T23:30:00-05:00"}).encode(), 422,
     "timestamp: out of range: '9999-12-31T23:30:00-05:00' (not a generic payload?)"),  # bare, as every field of one
    ("open", json.dumps([ALERT, {**ALERT, "timestamp": "yesterday"}]).encode(), 422,
     "[1].timestamp: not an RFC 3339 time: 'yesterday' (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "timestamp": "1960-01-01T00:00:00Z"}).encode(), 422,
     "timestamp: out of range: '1960-01-01T00:00:00Z' is before 1970 (expected Unix time in seconds or milliseconds, "
     "or RFC 3339) (not a generic payload?)"),
    ("open", json.dumps({**ALERT, "timestamp": 10 ** 400}).encode(), 422,
     "timestamp: out of range: " + "1" + "0" * 39 + "... (expected Unix time in seconds or milliseconds, or RFC 3339) "
     "(not a generic payload?)"),
    ("open", json.dumps([ALERT, {**ALERT, "timestamp": -1.5}]).encode(), 422,
     "[1].timestamp: out of range: '-1.5' is before 1970 (expected Unix time in seconds or milliseconds, or RFC 3339) "
     "(not a generic payload?)"),
    ("am", b'{"version": "4", "alerts": [{"status": "firing", "labels": {"a": "b"}, "startsAt": "9999-12-31T23:00:00-02:00"}]}',
     422, "alerts[0].startsAt: out of range: '9999-12-31T23:00:00-02:00' (not an alertmanager payload?)"),
    ("open", b'{"asset_name": "web-1", "signature": "x", "severity": "high", "message": "m", "tool_source": "t", '
             b'"labels": {"v": 1e400}}', 400, "malformed JSON: 1e400 is too large for a JSON number here"),
    ("nowhere", b"{}", 404, "unknown alert source 'nowhere': check sources: in app.yaml (the bot's log lists the known "
                            "ones)"),
    ("open", json.dumps({**ALERT, "message": "x" * 3000}).encode(), 413, "body larger than 2048 bytes"),
    ("open", b"[" * 100_000 + b"]" * 100_000, 413, "body larger than 2048 bytes"),
]


@pytest.mark.parametrize(("source", "body", "status", "message"), MALFORMED, ids=[f"{m[2]}-{i}" for i, m in enumerate(MALFORMED)])
async def test_malformed_bodies_get_a_precise_4xx(h: Harness, source: str, body: bytes, status: int, message: str) -> None:
    got_status, answer, _ = await h.post(source, body)
    assert (got_status, answer["error"]) == (status, message)
    if status == 422:
        assert answer["field"] == message.split(":", 1)[0]
    if status in (400, 422):
        assert await rejected(h, "malformed" if status == 400 else "bad_shape") == 1
    assert await h.count(AuditEvent) == 0


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_deeply_nested_json_is_a_4xx(tmp_path: Path, writer: str) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", storage_options=f"writer: {writer}") as h:
        too_deep = "malformed JSON: nested too deeply (more than 512 levels)"
        status, answer, _ = await h.post("limited", b"[" * 200_000 + b"]" * 200_000)
        assert (status, answer["error"]) == (400, too_deep)
        # The same limit with either writer (Python's own depends on how deep the parser's caller is).
        for depth in (513, 900, 985, 1200):
            status, answer, _ = await h.post("am-plain", b"[" * depth + b"]" * depth)
            assert (status, answer["error"]) == (400, too_deep), depth
        status, answer, _ = await h.post("am-plain", b"[" * 512 + b"]" * 512)
        assert status == 422, answer  # read as JSON: then it is no Alertmanager payload
        metrics = (await (await h.client.get("/metrics")).text()).splitlines()
        assert 'chatops_alert_rejected_total{reason="malformed",source="am-plain"} 4.0' in metrics


async def test_source_whose_secret_is_unset_is_off(tmp_path: Path) -> None:
    extra = "sources:\n  - {id: gen, kind: generic, auth: {hmac_secret: '${GEN_SECRET}'}}\n"
    from adapters import SETTINGS_MODELS
    from bot.config import parse_config

    loaded = parse_config(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path}/x.db'}}\n" + extra,
                          adapter_models=SETTINGS_MODELS, env={})
    assert loaded.sources_off == {"gen": "GEN_SECRET is not set"}
    from aiohttp.test_utils import TestClient, TestServer

    from bot.server import Bot

    bot = Bot(loaded)
    await bot.start()
    async with TestClient(TestServer(bot.web_app())) as client:
        resp = await client.post("/alerts/gen", data=json.dumps(ALERT))
        assert resp.status == 503 and resp.headers["Retry-After"] == "60"
        assert (await resp.json())["error"] == "source 'gen' is off: GEN_SECRET is not set; set it and restart the bot"
    await bot.stop()


async def test_database_down_gives_503_and_writes_nothing(h: Harness, tmp_path: Path) -> None:
    good = h.bot.db
    broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")  # its directory does not exist
    h.bot.intake.db = broken
    status, answer, headers = await h.post("open", [ALERT, {**ALERT, "asset_name": "web-2"}])
    assert status == 503 and headers["Retry-After"] == "5"
    assert answer["error"] == "the database is unavailable; nothing was stored, retry later"
    # A bad body is still a 400 (a retry could not store it), whoever reads it
    status, answer, headers = await h.post("open", b'{"asset_name": "web-1"')
    assert (status, answer["error"]) == (400, "malformed JSON at line 1, column 23: Expecting ',' delimiter")
    assert await rejected(h, "malformed") == 1
    await broken.dispose()
    h.bot.intake.db = good
    assert await h.count(AlertRecord) == 0 and await h.count(AuditEvent) == 0
    assert (await h.post("open", ALERT))[0] == 200  # the retry lands
    assert await h.count(AlertRecord) == 1


async def test_a_503_for_a_database_down_is_counted_as_refused_and_not_as_intake_time(h: Harness,
                                                                                    tmp_path: Path) -> None:
    """chatops_intake_seconds times answers that were committed; a 503 that stored nothing is counted with the
    other refusals (reason `unavailable`), as it is in chatops_http_requests_total."""
    good = h.bot.db
    broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    h.bot.intake.db = broken
    assert (await h.post("open", ALERT))[0] == 503
    await broken.dispose()
    h.bot.intake.db = good
    assert (await h.post("open", {**ALERT, "asset_name": "web-2"}))[0] == 200
    assert await rejected(h, "unavailable") == 1
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_http_requests_total{route="/alerts/{source}",status="503"} 1.0' in metrics
    assert 'chatops_intake_seconds_count{source="open"} 1.0' in metrics
    # Its buckets reach past the store's waits (10 s for SQLite's lock, 15 s for PostgreSQL) before a 503
    assert 'chatops_intake_seconds_bucket{le="30.0",source="open"} 1.0' in metrics


async def test_a_body_that_is_not_what_its_encoding_says_gets_400_not_500(h: Harness) -> None:
    """Plain JSON labelled gzip, and a gzip stream cut short: they cannot be inflated; the sender is told why."""
    import gzip

    status, answer = await raw_post(h.client, "/alerts/open", [(b"Content-Encoding", b"gzip")], json.dumps(ALERT).encode())
    assert status == 400, answer
    assert json.loads(answer)["error"] == ("the body cannot be read (Can not decode content-encoding: gzip); send it as "
                                           "its Content-Encoding and Content-Length say")
    cut = gzip.compress(json.dumps(ALERT).encode())[:-12]  # what inflates of it is JSON cut short
    status, answer = await raw_post(h.client, "/alerts/open", [(b"Content-Encoding", b"gzip")], cut)
    assert status == 400 and json.loads(answer)["error"] == ("the body cannot be read (the gzip stream is cut short); "
                                                             "send it as its Content-Encoding and Content-Length say")
    status, answer = await raw_post(h.client, "/alerts/open", [(b"Content-Encoding", b"gzip")],
                                    gzip.compress(json.dumps(ALERT).encode()))
    assert status == 200, answer  # a body that is what it says is read as any other
    assert await rejected(h, "malformed") == 2 and await h.count(AlertRecord) == 1


async def test_a_body_of_many_tiny_gzip_members_is_refused_before_it_costs_anything(h: Harness) -> None:
    """A sender joining compressed pieces makes a few gzip members, read as one body; a megabyte of empty members
    (each left zlib a copy of the rest to read: a second of CPU on the event loop, before an HMAC source's signature
    is checked, since it signs the inflated body) is refused after the 64th."""
    import gzip

    text = json.dumps(ALERT).encode()
    pieces = [gzip.compress(text[:10]), gzip.compress(text[10:40]), gzip.compress(text[40:])]
    status, answer = await raw_post(h.client, "/alerts/open", [(b"Content-Encoding", b"gzip")], b"".join(pieces))
    assert status == 200, answer
    empty = gzip.compress(b"")
    flood = empty * (1_000_000 // len(empty))
    for source, headers in (("limited", []), ("generic", [(b"X-Signature", b"sha256=" + b"0" * 64),
                                                          (b"X-Timestamp", str(int(h.clock.now().timestamp())).encode())])):
        status, answer = await raw_post(h.client, f"/alerts/{source}",
                                        [(b"Content-Encoding", b"gzip"), *headers], flood)
        assert status == 400, answer  # (the signed source: refused before its signature is even looked at)
        assert json.loads(answer)["error"] == ("the body cannot be read (more than 64 gzip members one after the "
                                               "other); send it as its Content-Encoding and Content-Length say")
    assert await h.count(AlertRecord) == 1


async def test_a_body_that_does_not_arrive_gets_408_and_the_connection_back(h: Harness,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers, then part of the body, then nothing: the request is answered once BODY_WAIT passes, instead of
    holding a connection (and its memory) open for as long as the sender likes."""
    import bot.bodies

    monkeypatch.setattr(bot.bodies, "BODY_WAIT", 0.5)
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /alerts/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"asset_name\": ")
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"the body did not arrive within 0.5 s" in answer
    assert await rejected(h, "slow_body") == 1


async def test_a_client_that_hangs_up_mid_body_is_an_abort_not_a_500(h: Harness,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Anyone can open a connection, send half a body and close it: that is the client's doing, counted as a
    rejection (`client_aborted`), not as the bot's 5xx people alert on, and logged without a traceback. On the
    server `chatops serve` runs (the test server cancels a handler whose client left; serve's does not)."""
    caplog.set_level(logging.INFO)
    runner = h.bot.runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /alerts/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"a\"")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        for _ in range(100):
            if await rejected(h, "client_aborted"):
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert await rejected(h, "client_aborted") == 1
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert not [m for m in metrics if m.startswith("chatops_http_requests_total") and 'status="5' in m], metrics
    assert 'chatops_http_requests_total{route="/alerts/{source}",status="499"} 1.0' in metrics  # nginx's word for it
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text and "the client closed the connection" in caplog.text
    assert await h.count(AlertRecord) == 0 and await h.count(AuditEvent) == 0


async def test_a_byte_order_mark_before_the_json_is_ignored(h: Harness) -> None:
    """JSON forbids senders a BOM and lets receivers ignore it; some Windows tools write one."""
    status, answer = await raw_post(h.client, "/alerts/open", [], b"\xef\xbb\xbf" + json.dumps(ALERT).encode())
    assert status == 200, answer
    assert await h.count(AlertRecord) == 1


async def test_a_credential_or_delivery_id_sent_twice_is_refused(h: Harness) -> None:
    """With two, which counts is a guess (the first here, maybe the last at a proxy in front): none is taken."""
    body = json.dumps(ALERT).encode()
    good = signed(h, body)
    for headers, expected in (
            ([(b"Authorization", b"Bearer wrong-token"), (b"Authorization", b"Bearer am-secret-token")],
             (401, "Authorization header sent more than once")),
            ([(b"X-Signature", b"sha256=" + b"0" * 64), (b"X-Signature", good["X-Signature"].encode()),
              (b"X-Timestamp", good["X-Timestamp"].encode())], (401, "X-Signature header sent more than once"))):
        source = "am" if headers[0][0] == b"Authorization" else "generic"
        payload = fixture("alertmanager/03-highcpu-firing.json") if source == "am" else body
        status, answer = await raw_post(h.client, f"/alerts/{source}", headers, payload)
        assert (status, json.loads(answer)["error"]) == expected
    status, answer = await raw_post(h.client, "/alerts/open", [(b"X-Delivery-ID", b"a"), (b"X-Delivery-ID", b"b")],
                                    body)
    assert (status, json.loads(answer)["error"]) == (400, "X-Delivery-ID sent more than once")
    assert await h.count(AlertRecord) == 0


async def test_a_wrong_path_or_method_is_answered_in_json_with_what_is_there(h: Harness,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The known sources are in the log, for the operator, not in the answer to whoever asks (no credentials)."""
    caplog.set_level(logging.INFO)
    resp = await h.client.get("/alerts/open")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert (await resp.json())["error"] == "GET is not allowed on /alerts/open; use POST"
    for path in ("/alerts/open/", "/alerts//open"):
        resp = await h.client.post(path, json=ALERT)
        assert resp.status == 404
        assert (await resp.json())["error"] == (
            f"no endpoint at {path}; alerts go to POST /alerts/SOURCE, SOURCE the id of one of sources: in app.yaml "
            "(no slash after it; the bot's log lists the known ones)")
    resp = await h.client.get("/nowhere")
    assert (resp.status, (await resp.json())["error"]) == (404, "no endpoint at /nowhere")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["POST '/alerts/open/' from 127.0.0.1: no such alert source; the known ones are am, am-plain, "
                    "generic, grafana, limited, open (said at most once a minute)"], said


async def test_unknown_sources_are_logged_with_the_known_ones_at_most_once_a_minute(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A scanner trying names cannot flood the log: one line a minute, saying how many more there were."""
    caplog.set_level(logging.INFO)
    for name, later in (("admin", 0), ("test", 1), ("x", 1), ("y", 70)):
        h.clock.advance(timedelta(seconds=later))
        status, answer, _ = await h.post(name, {})
        assert (status, answer["error"]) == (404, f"unknown alert source {name!r}: check sources: in app.yaml (the "
                                                  "bot's log lists the known ones)")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [
        "POST '/alerts/admin' from 127.0.0.1: no such alert source; the known ones are am, am-plain, generic, grafana, "
        "limited, open (said at most once a minute)",
        "POST '/alerts/y' from 127.0.0.1: no such alert source; the known ones are am, am-plain, generic, grafana, "
        "limited, open (said at most once a minute; 2 more since)"]
    assert await rejected(h, "unknown_source") == 4


async def test_rfc3339_times_with_lowercase_t_and_z_are_read(h: Harness) -> None:
    status, answer, _ = await h.post("open", {**ALERT, "timestamp": "2026-11-24t03:59:00.5z"})
    assert status == 200, answer
    async with h.bot.db.sessions() as s:
        [record] = (await s.execute(select(AlertRecord))).scalars().all()
    assert record.starts_at is not None and record.starts_at.isoformat() == "2026-11-24T03:59:00.500000+00:00"


async def test_a_generic_time_without_offset_is_utc_and_unix_time_zero_is_none(h: Harness) -> None:
    assert (await h.post("open", [{**ALERT, "asset_name": "web-1", "timestamp": "2026-11-24T03:59:00"},
                                  {**ALERT, "asset_name": "web-2", "timestamp": 0},
                                  {**ALERT, "asset_name": "web-3", "timestamp": "1764043140000"}]))[0] == 200
    async with h.bot.db.sessions() as s:
        records = (await s.execute(select(AlertRecord).order_by(AlertRecord.id))).scalars().all()
    starts = [r.starts_at.isoformat() if r.starts_at else None for r in records]
    assert starts == ["2026-11-24T03:59:00+00:00", None, "2025-11-25T03:59:00+00:00"]


async def test_a_fault_reading_a_body_is_a_500_counted_as_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A fault of the bot's while the HTTP front read a body (the writer thread's mode) was answered 500 and logged,
    and not counted in chatops_alert_rejected_total{reason="internal"} as the writer process's are."""
    import handlers.alert_http

    def broken(kind: str, source: str, body: bytes) -> Any:
        raise RuntimeError("a fault of the bot's")

    monkeypatch.setattr(handlers.alert_http, "read_body", broken)
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", storage_options="writer: thread") as h:
        status, answer, _ = await h.post("open", ALERT)
        assert (status, answer) == (500, {"error": "internal error; the details are in the bot's log"})
        assert await rejected(h, "internal") == 1
        assert any("a fault of the bot's" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_a_generic_status_takes_nagios_words_too() -> None:
    """Nagios sends its notification type (PROBLEM, RECOVERY) or the host's or service's state (DOWN, UP, CRITICAL,
    WARNING, UNKNOWN, OK): UP, DOWN, CRITICAL, WARNING, UNKNOWN and RECOVERY were refused, while problem and ok were
    taken."""
    from bot.alerts import parse_generic

    for word, status in (("DOWN", "firing"), ("CRITICAL", "firing"), ("WARNING", "firing"), ("UNKNOWN", "firing"),
                         ("UNREACHABLE", "firing"), ("PROBLEM", "firing"), ("UP", "resolved"),
                         ("RECOVERY", "resolved"), ("OK", "resolved")):
        [alert] = parse_generic({**ALERT, "status": word}, "open")
        assert alert.status == status, word
