"""A replay is refused by every replica sharing PostgreSQL, and after a restart: signed alerts, Slack commands and
clicks, Slack events, Telegram updates are claimed in the store (storage/replays.py). Most tests here need two
replicas, so PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import func, select

from bot.auth import sign
from storage.models import AlertRecord, AlertSignature, SeenRequest
from tests.botkit import CONFIG, Harness, bot_on, running_bot
from tests.conftest import drop_schema, postgres_url
from tests.fake_slack import FakeSlack, signed as slack_signed
from tests.fake_telegram import FakeTelegram

SLACK_SECRET = "slack-signing-secret-for-tests"


# A second source that shares the generic source's secret (a sender configured twice, say).
SHARED_SECRET = "  - {id: generic2, kind: generic, auth: {hmac_secret: generic-secret}}\n"


@asynccontextmanager
async def replicas(tmp_path: Path, pg_schema: str, extra: str = "", *,
                   base: str | None = None) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two replicas on one PostgreSQL schema, one clock (skipped without PostgreSQL)."""
    async with bot_on("postgres", tmp_path, pg_schema, extra, base=base) as one:
        async with running_bot(postgres_url(), extra, schema=pg_schema, clock=one.clock, base=base) as other:
            yield one, other


@pytest.fixture
async def pair(tmp_path: Path, pg_schema: str) -> AsyncIterator[tuple[Harness, Harness]]:
    base = CONFIG.replace("critical_assets:", SHARED_SECRET.strip("\n") + "\ncritical_assets:", 1)
    async with replicas(tmp_path, pg_schema, base=base) as both:
        yield both


def alert_signed(h: Harness, body: bytes) -> dict[str, str]:
    ts = str(int(h.clock.now().timestamp()))
    return {"X-Signature": f"sha256={sign('generic-secret', body, ts)}", "X-Timestamp": ts}


async def rejected(h: Harness, reason: str) -> float:
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    line = next((m for m in metrics if m.startswith("chatops_alert_rejected_total") and f'reason="{reason}"' in m), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def stored_alerts(h: Harness) -> int:
    async with h.bot.db.sessions() as s:
        return (await s.execute(select(func.sum(AlertRecord.received_count)))).scalar_one() or 0


async def test_a_signed_alert_replayed_to_another_replica_is_refused_there(pair: tuple[Harness, Harness]) -> None:
    one, other = pair
    body = json.dumps({"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down",
                       "tool_source": "t"}).encode()
    headers = alert_signed(one, body)
    assert (await one.post("generic", body, headers))[0] == 200
    status, answer, _ = await other.post("generic", body, headers)
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted (send "
                                              "X-Delivery-ID to retry safely)")
    assert await rejected(other, "replayed") == 1
    status, answer, _ = await other.post("generic", body, {**headers, "X-Delivery-ID": "d-9"})
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted with another "
                                              "X-Delivery-ID (a retry repeats the first one)")
    assert await stored_alerts(one) == 1

    # A sender's retry under the X-Delivery-ID of the first request gets the first answer at either replica.
    body = json.dumps({"asset_name": "web-2", "signature": "Down", "severity": "high", "message": "down",
                       "tool_source": "t"}).encode()
    headers = {**alert_signed(one, body), "X-Delivery-ID": "d-1"}
    first = await one.post("generic", body, headers)
    again = await other.post("generic", body, headers)
    assert (first[0], again[0], again[1], again[2].get("X-Idempotent-Replay")) == (200, 200, first[1], "true")
    assert await stored_alerts(one) == 2


async def test_one_signed_alert_at_two_replicas_at_once_is_stored_once(pair: tuple[Harness, Harness]) -> None:
    one, other = pair
    for round in range(5):
        body = json.dumps({"asset_name": f"db-{round}", "signature": "Down", "severity": "high", "message": "down",
                           "tool_source": "t"}).encode()
        headers = alert_signed(one, body)
        answers = await asyncio.gather(one.post("generic", body, headers), other.post("generic", body, headers))
        assert sorted(a[0] for a in answers) == [200, 401], answers
    assert await stored_alerts(one) == 5 and len(await one.incidents()) == 5


async def test_a_retry_that_arrives_with_its_first_copy_is_answered_as_a_repeat(pair: tuple[Harness, Harness]) -> None:
    """The same signed request twice at once under one X-Delivery-ID (a sender's retry racing its first try): one
    is stored, the other gets its answer; neither is refused as a replay."""
    one, _ = pair
    for round in range(5):
        body = json.dumps({"asset_name": f"mq-{round}", "signature": "Down", "severity": "high", "message": "down",
                           "tool_source": "t"}).encode()
        headers = {**alert_signed(one, body), "X-Delivery-ID": f"retry-{round}"}
        answers = await asyncio.gather(one.post("generic", body, headers), one.post("generic", body, headers))
        assert [a[0] for a in answers] == [200, 200], answers
        assert sorted(a[2].get("X-Idempotent-Replay", "") for a in answers) == ["", "true"]
    assert await stored_alerts(one) == 5


async def test_a_signature_taken_by_one_source_is_a_replay_at_another_anywhere(pair: tuple[Harness, Harness]) -> None:
    """Two sources with one secret: a request taken at one is a replay at the other, at this replica (its memory)
    and at another one (the store), alike."""
    one, other = pair
    body = json.dumps({"asset_name": "web-7", "signature": "Down", "severity": "high", "message": "down",
                       "tool_source": "t"}).encode()
    headers = alert_signed(one, body)
    assert (await one.post("generic", body, headers))[0] == 200
    assert (await one.post("generic2", body, headers))[0] == 401
    assert (await other.post("generic2", body, headers))[0] == 401
    assert await stored_alerts(one) == 1


async def test_a_claim_ends_with_its_window_and_the_job_deletes_it(pair: tuple[Harness, Harness]) -> None:
    one, other = pair
    assert await one.bot.replays.claim("test", "k", timedelta(minutes=10))
    assert not await other.bot.replays.claim("test", "k", timedelta(minutes=10))
    assert await other.bot.replays.claim("test", "other-key", timedelta(hours=1))
    one.clock.advance(timedelta(minutes=11))
    await other.bot.replays.purge()  # "k" ended; "other-key" has 49 minutes left
    async with one.bot.db.sessions() as s:
        assert (await s.execute(select(SeenRequest.scope, SeenRequest.key))).all() == [("test", "other-key")]
    assert await other.bot.replays.claim("test", "k", timedelta(minutes=10))  # ended: anyone's again


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_signed_alert_replayed_after_a_restart_is_refused(tmp_path: Path, pg_schema: str,
                                                                 database: str) -> None:
    """The process's memory is gone after a restart; the store still says the signature was taken (on SQLite too,
    where one bot serves the store), so a copy sent inside its window is refused. A future-dated timestamp keeps
    its signature valid longer, and the claim lasts as long."""
    url = postgres_url() if database == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    schema = pg_schema if database == "postgres" else None
    body = json.dumps({"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down",
                       "tool_source": "t"}).encode()
    try:
        async with running_bot(url, schema=schema) as h:
            ts = str(int(h.clock.now().timestamp()) + 240)  # the sender's clock 4 minutes ahead (max_skew is 5)
            headers = {"X-Signature": f"sha256={sign('generic-secret', body, ts)}", "X-Timestamp": ts}
            assert (await h.post("generic", body, headers))[0] == 200
            clock = h.clock
        clock.advance(timedelta(minutes=8))  # past now + max_skew, within the timestamp's own window
        async with running_bot(url, schema=schema, clock=clock) as h:
            status, answer, _ = await h.post("generic", body, headers)
            assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted "
                                                      "(send X-Delivery-ID to retry safely)")
            # PostgreSQL claims it (replicas share the store); SQLite logs it for the next start's memory
            kept = SeenRequest if database == "postgres" else AlertSignature
            assert await stored_alerts(h) == 1 and await h.count(kept) == 1
            clock.advance(timedelta(minutes=3))  # the timestamp is past its window now: the claim is not needed
            await h.bot.replays.purge()
            assert await h.count(kept) == 0
    finally:
        if database == "postgres":
            await drop_schema(url, pg_schema)


@pytest.fixture
async def slack_pair(tmp_path: Path, pg_schema: str) -> AsyncIterator[tuple[Harness, Harness, FakeSlack]]:
    async with FakeSlack() as fake:
        extra = (f"adapters:\n  slack: {{bot_token: {fake.token}, signing_secret: {SLACK_SECRET}, "
                 f"api_url: '{fake.api_url}'}}\n")
        async with replicas(tmp_path, pg_schema, extra) as (one, other):
            yield one, other, fake


async def test_a_slack_command_replayed_to_another_replica_is_refused_there(
        slack_pair: tuple[Harness, Harness, FakeSlack]) -> None:
    one, other, fake = slack_pair
    form = urlencode({"token": "x", "team_id": "T0FAKE", "channel_id": "C0OPS", "channel_name": "ops",
                      "user_id": "U01ALICE", "user_name": "alice", "command": "/oncall", "text": "",
                      "response_url": fake.response_url("cmd"), "trigger_id": "1.2.3"})
    headers = slack_signed(form, secret=SLACK_SECRET)
    assert (await one.client.post("/slack/events", data=form, headers=headers)).status == 200
    await fake.wait_for(lambda: fake.responses.get("cmd"), timeout=5)
    answer = await other.client.post("/slack/events", data=form, headers=headers)
    assert (answer.status, (await answer.json())["error"]) == (
        401, "replayed request: Slack already sent this one")
    await asyncio.sleep(0.3)
    assert len(fake.responses["cmd"]) == 1  # answered once, by the first replica


async def test_a_slack_event_retried_to_another_replica_is_handled_once(
        slack_pair: tuple[Harness, Harness, FakeSlack]) -> None:
    one, other, fake = slack_pair
    event = json.dumps({"type": "event_callback", "team_id": "T0FAKE", "api_app_id": "A0FAKE", "event_id": "Ev0001",
                        "event_time": 1700000000, "event": {"type": "app_mention", "user": "U01ALICE",
                                                             "text": "<@U0BOT> help", "channel": "C0OPS",
                                                             "ts": "1700000000.000100"}})
    for h, retry in ((one, None), (other, "1")):
        headers = slack_signed(event, secret=SLACK_SECRET, content_type="application/json")
        if retry:
            headers.update({"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": "http_timeout"})
        assert (await h.client.post("/slack/events", data=event, headers=headers)).status == 200
    await fake.wait_for(lambda: fake.called("chat.postEphemeral"), timeout=5)
    await asyncio.sleep(0.5)
    assert len(fake.called("chat.postEphemeral")) == 1  # the help, to Alice, once


async def test_a_telegram_update_delivered_to_two_replicas_is_handled_once(tmp_path: Path, pg_schema: str) -> None:
    async with FakeTelegram() as fake:
        extra = (f"adapters:\n  telegram: {{bot_token: '{fake.token}', webhook_secret: wh-secret, "
                 f"api_url: '{fake.api_url}'}}\n")
        async with replicas(tmp_path, pg_schema, extra) as (one, other):
            update = {"update_id": 4242, "message": {
                "message_id": 7, "date": 1700000000, "text": "/help",
                "chat": {"id": 111111, "type": "private"},
                "from": {"id": 111111, "is_bot": False, "first_name": "Alice"},
                "entities": [{"type": "bot_command", "offset": 0, "length": 5}]}}
            for h in (one, other):
                answer = await h.client.post("/telegram/webhook", json=update,
                                             headers={"X-Telegram-Bot-Api-Secret-Token": "wh-secret"})
                assert answer.status == 200
            await fake.wait_for(lambda: fake.called("sendMessage"), timeout=5)
            await asyncio.sleep(0.5)
            assert len(fake.called("sendMessage")) == 1


async def test_the_signature_log_is_purged_in_chunks_oldest_first(tmp_path: Path, pg_schema: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands a second on a busy SQLite bot: the job deletes the expired ones a chunk at a time, and keeps the
    ones still in their window."""
    import storage.replays
    from storage.replays import SIGNATURES

    monkeypatch.setattr(storage.replays, "PURGE_CHUNK", 7)
    async with bot_on("sqlite", tmp_path, pg_schema) as h:
        now = h.clock.now()
        async with h.bot.db.transaction() as session:
            await session.execute(SIGNATURES.insert(), [
                {"signature": f"s{i}", "delivery_id": None, "expires_at": now + timedelta(minutes=i - 20)}
                for i in range(30)])
        await h.bot.replays.purge()
        async with h.bot.db.sessions() as session:
            left = (await session.execute(select(SIGNATURES.c.signature).order_by(SIGNATURES.c.id))).scalars().all()
        assert left == [f"s{i}" for i in range(21, 30)]  # s0..s20 ended (s20 just now); the rest are still valid


async def test_a_claim_behind_a_busy_sqlite_writer_gives_up_after_a_second(tmp_path: Path, pg_schema: str) -> None:
    """Another connection holds SQLite's write lock (intake in a storm): a Slack command's claim does not wait out
    SQLite's 10 s busy timeout before the command is answered, which Slack wants within 3 s."""
    import sqlite3
    import time

    async with bot_on("sqlite", tmp_path, pg_schema) as h:
        holder = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            assert await h.bot.replays.claim("slack", "v0=abc", timedelta(minutes=10))  # taken as ours
            assert time.monotonic() - started < 2
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await asyncio.sleep(0.5)  # the claim finishes on its own once the lock is free
        assert not await h.bot.replays.claim("slack", "v0=abc", timedelta(minutes=10))
