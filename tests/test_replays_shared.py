"""A replay is refused by every replica sharing PostgreSQL, and after a restart: signed alerts, Slack commands and
clicks, Slack events, Telegram updates are claimed in the store (storage/replays.py). Most tests here need two
replicas, so PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import func, select

from bot.chat import FAILED
from bot.auth import sign
from bot.server import Bot
from storage.models import AlertRecord, AlertSignature, SeenRequest
from tests.botkit import CONFIG, FIXTURES, Harness, bot_on, fixture, running_bot
from tests.conftest import drop_schema, postgres_url
from tests.fake_slack import FakeSlack, signed as slack_signed
from tests.fake_telegram import FakeTelegram

SLACK_SECRET = "slack-signing-secret-for-tests"
TG_SECRET = "wh-secret"


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
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted; sign the "
                                              "request again (a new timestamp) to send it again, or give each request "
                                              "an X-Delivery-ID, whose retries get the first answer")
    assert await rejected(other, "replayed") == 1
    status, answer, _ = await other.post("generic", body, {**headers, "X-Delivery-ID": "d-9"})
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted with another "
                                              "X-Delivery-ID, or none (a retry repeats the first one)")
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

    async def handled(h: Harness, key: str, window: timedelta) -> bool:
        """Whether `h` took the request and handled it (its claim settled), or found it taken."""
        handling = await h.bot.replays.begin("test", key, window)
        if handling is None or not await handling.ready():
            return False
        await handling.settle()
        return True

    assert await handled(one, "k", timedelta(minutes=10))
    assert not await handled(other, "k", timedelta(minutes=10))
    assert await handled(other, "other-key", timedelta(hours=1))
    one.clock.advance(timedelta(minutes=11))
    await other.bot.replays.purge()  # "k" ended; "other-key" has 49 minutes left
    async with one.bot.db.sessions() as s:
        assert (await s.execute(select(SeenRequest.scope, SeenRequest.key))).all() == [("test", "other-key")]
    assert await handled(other, "k", timedelta(minutes=10))  # ended: anyone's again


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
            assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted; sign the request again (a new timestamp) "
                                                      "to send it again, or give each request an X-Delivery-ID, whose retries get the first answer")
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
            handling = await h.bot.replays.begin("slack", "v0=abc", timedelta(minutes=10))
            assert handling is not None and await handling.ready()  # taken as ours
            assert time.monotonic() - started < 2
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await asyncio.sleep(0.5)  # the claim finishes on its own once the lock is free
        await handling.settle()
        assert await h.bot.replays.begin("slack", "v0=abc", timedelta(minutes=10)) is None


# -- a click, command or event cut off before it acted is handled when the platform retries it --------------------

def telegram_config(fake: FakeTelegram) -> str:
    return (f"adapters:\n  telegram: {{bot_token: '{fake.token}', webhook_secret: {TG_SECRET}, "
            f"api_url: '{fake.api_url}'}}\n")


def tap(update_id: int, incident: int) -> dict:
    """Alice taps Acknowledge under the incident's card in the group, as Telegram posts it (and retries it)."""
    update = json.loads((FIXTURES / "telegram" / "callback_query.json").read_text())
    update["update_id"] = update_id
    query = update["callback_query"]
    query["id"], query["data"] = f"cb{update_id}", f"ack:{incident}"
    query["message"]["chat"]["id"] = -100123
    return update


async def deliver(h: Harness, update: dict, status: int = 200) -> None:
    """Telegram posts the update; the bot answers `status` once its handling ended."""
    assert await post_update(h, update) == status


async def post_update(h: Harness, update: dict) -> int:
    answer = await h.client.post("/telegram/webhook", json=update,
                                 headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
    return answer.status


def toasts(fake: FakeTelegram) -> list[str | None]:
    return [c.params.get("text") for c in fake.called("answerCallbackQuery")]


def hold(h: Harness, kind: str = "action") -> tuple[asyncio.Event, asyncio.Event]:
    """The replica's dispatcher takes each click (or command) and holds it until `go` is set, before it acts (the
    bot busy, or about to be killed): (entered, go)."""
    entered, go = asyncio.Event(), asyncio.Event()
    name, dispatcher = f"handle_{kind}", h.bot.dispatcher

    async def held(event: object) -> object:
        entered.set()
        await go.wait()
        return await getattr(type(dispatcher), name)(dispatcher, event)
    setattr(h.bot.dispatcher, name, held)
    return entered, go


async def tapped_at_both(one: Harness, other: Harness,
                         update: dict) -> tuple[asyncio.Event, asyncio.Future[list[int]]]:
    """A tap reaches `one`, whose dispatcher holds it (set the returned event to let it act), then its copy reaches
    `other` (Telegram's retry, at another replica); and the statuses the two answer, once they do."""
    entered, go = hold(one)
    first = asyncio.ensure_future(post_update(one, update))
    await asyncio.wait_for(entered.wait(), 5)
    return go, asyncio.gather(first, post_update(other, update))


async def killed(h: Harness) -> None:
    """The bot dies where it is (SIGKILL): the handling of what it took is cut off, and nothing after it runs; what
    it committed stays in the store."""
    tasks = [task for adapter in h.bot.adapters.values() for name in ("_loops", "_tasks")  # (polling first)
             for task in getattr(adapter, name, ())]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def claims(h: Harness, scope: str) -> int:
    async with h.bot.db.sessions() as s:
        return (await s.execute(select(func.count()).select_from(SeenRequest).where(SeenRequest.scope == scope))
                ).scalar_one()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_telegram_update_cut_off_by_a_crash_is_handled_when_telegram_retries_it(tmp_path: Path, pg_schema: str,
                                                                                        database: str) -> None:
    """The bot claimed Alice's tap on Acknowledge, then was killed before the acknowledgement committed. Telegram's
    retry after the restart is handled (the claim of a handling that never ended lapses within a minute or so, not
    an hour); once handled, a retry of it after another restart is refused."""
    url = postgres_url() if database == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    schema = pg_schema if database == "postgres" else None
    try:
        async with FakeTelegram() as fake:
            async with running_bot(url, telegram_config(fake), schema=schema) as h:
                assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
                entered, _ = hold(h)
                posting = asyncio.ensure_future(post_update(h, tap(7001, 1)))
                await asyncio.wait_for(entered.wait(), 5)
                assert await claims(h, "telegram") == 1  # claimed and committed; then the bot is killed
                await killed(h)
                assert await posting == 503  # not a 2xx: Telegram sends it again (as when the connection dies)
                clock = h.clock
            clock.advance(timedelta(minutes=2))
            async with running_bot(url, telegram_config(fake), schema=schema, clock=clock) as h:
                await deliver(h, tap(7001, 1))  # Telegram's retry: the first delivery was not answered 2xx
                await fake.wait_for(lambda: toasts(fake), timeout=5)
                assert toasts(fake) == ["Acknowledged #1."]
                [incident] = await h.incidents()
                assert (incident.status, incident.acknowledged_by) == ("acknowledged", "alice")
            clock.advance(timedelta(minutes=2))
            async with running_bot(url, telegram_config(fake), schema=schema, clock=clock) as h:
                await deliver(h, tap(7001, 1))  # and again: this time it was handled
                await asyncio.sleep(1.5)
                assert toasts(fake) == ["Acknowledged #1."]
                assert (await h.actions(1)).count("incident.acknowledged") == 1
    finally:
        if database == "postgres":
            await drop_schema(url, pg_schema)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_telegram_update_whose_handling_failed_is_handled_when_telegram_retries_it(
        tmp_path: Path, pg_schema: str, database: str) -> None:
    """The store failed Alice's acknowledgement before it committed (she is told something went wrong): Telegram's
    retry of the update is handled, not dropped as one already taken."""
    async with FakeTelegram() as fake, bot_on(database, tmp_path, pg_schema, telegram_config(fake)) as h:
        assert (await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
        spec, failed = h.bot.dispatcher.actions["ack"], []

        async def failing_once(event: object, person: object) -> object:
            if not failed:
                failed.append(event)
                raise ConnectionResetError("the database went away")
            return await spec.handler(event, person)  # type: ignore[arg-type]
        h.bot.dispatcher.actions["ack"] = replace(spec, handler=failing_once)
        await deliver(h, tap(7002, 1), 503)  # not handled: Telegram sends it again
        assert toasts(fake) == [FAILED]
        await deliver(h, tap(7002, 1))
        assert toasts(fake) == [FAILED, "Acknowledged #1."]
        assert (await h.incidents())[0].status == "acknowledged"
        assert (await h.actions(1)).count("incident.acknowledged") == 1


async def test_a_retry_at_another_replica_waits_for_the_first_and_takes_over_only_if_it_died(
        tmp_path: Path, pg_schema: str) -> None:
    """Telegram retries an update (the first delivery's answer was lost) to the other replica while the first still
    handles it: the other waits, and does not act when the first did. When the first dies before it acted, the
    other handles it once the first's claim lapses."""
    async with FakeTelegram() as fake:
        async with replicas(tmp_path, pg_schema, telegram_config(fake)) as (one, other):
            assert (await one.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
            assert (await one.post("am", fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
            go, answers = await tapped_at_both(one, other, tap(7101, 1))
            await asyncio.sleep(1.5)
            assert toasts(fake) == [] and (await one.incidents())[0].status == "triggered" and not answers.done()
            go.set()
            assert await asyncio.wait_for(answers, 5) == [200, 200]  # the copy once the first acted
            assert toasts(fake) == ["Acknowledged #1."]
            assert (await one.actions(1)).count("incident.acknowledged") == 1

            _, answers = await tapped_at_both(one, other, tap(7102, 2))
            await asyncio.sleep(1.5)
            assert len(toasts(fake)) == 1
            await killed(one)
            one.clock.advance(timedelta(minutes=2))
            assert await asyncio.wait_for(answers, 5) == [503, 200]  # the dead one's cut off, the other's handled
            assert toasts(fake)[1:] == ["Acknowledged #2."]
            second = (await other.incidents())[1]
            assert (second.status, second.acknowledged_by) == ("acknowledged", "alice")
            assert (await other.actions(2)).count("incident.acknowledged") == 1


async def test_polled_taps_cut_off_by_a_crash_are_handled_by_the_replica_that_polls_next(
        tmp_path: Path, pg_schema: str) -> None:
    """With `mode: polling`, the replica that polls took taps and died while handling them. Its next getUpdates had
    confirmed them to Telegram as it began to handle them, and Telegram never gives a confirmed update again: the
    other replica, polling in its stead, got none, and the incidents stayed unacknowledged for good. Now what it had
    not finished is fetched by the other replica and handled there, each tap once; what it had handled is not
    handled again."""
    def quick(bot: Bot) -> None:  # a follower looks for the polling lock every 50 ms, not every 10 s
        bot.adapters["telegram"].follower_wait = 0.05  # type: ignore[attr-defined]

    async with FakeTelegram() as fake:
        extra = f"adapters:\n  telegram: {{bot_token: '{fake.token}', api_url: '{fake.api_url}', mode: polling}}\n"
        async with bot_on("postgres", tmp_path, pg_schema, extra) as one:
            async with running_bot(postgres_url(), extra, schema=pg_schema, clock=one.clock, prepare=quick) as other:
                [lock] = [leader for leader in one.bot.leaders if leader.name == "telegram-polling"]
                assert await lock.held()  # the first replica polls
                for n in range(5):
                    assert (await one.post("open", {"asset_name": f"web-{n}", "signature": "Down", "severity": "low",
                                                    "message": "down", "tool_source": "x"}))[0] == 200
                for n in (1, 2):
                    fake.push_update(tap(8000 + n, n))
                await fake.wait_for(lambda: len(toasts(fake)) == 2, timeout=5)
                entered, _ = hold(one)
                for n in (3, 4, 5):
                    fake.push_update(tap(8000 + n, n))
                await asyncio.wait_for(entered.wait(), 5)
                while await claims(one, "telegram") < 5:  # all three taken, held before they act
                    await asyncio.sleep(0.05)
                await killed(one)
                await lock.close()  # (its connection goes with the process, and the lock with it)
                polled = [c.params.get("offset") for c in fake.called("getUpdates")]
                assert max(o for o in polled if o is not None) == 8003  # the three held are not confirmed
                one.clock.advance(timedelta(minutes=2))  # their claims, left by the dead replica, lapse
                await fake.wait_for(lambda: len(toasts(fake)) == 5, timeout=10)
                await asyncio.sleep(1.5)
                assert sorted(toasts(fake)) == [f"Acknowledged #{n}." for n in range(1, 6)]
                for n in range(1, 6):
                    assert (await other.actions(n)).count("incident.acknowledged") == 1
                assert fake.called("getUpdates")[-1].params["offset"] == 8006  # all confirmed once handled


async def test_a_handling_that_outlasts_its_lease_keeps_it_while_it_runs(tmp_path: Path, pg_schema: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first replica takes longer than a lease (a slow store, a platform's flood control): it renews its claim
    while it runs, so the retry waiting at the other replica does not take it over, and Alice's tap acts once."""
    import storage.replays

    monkeypatch.setattr(storage.replays, "RENEW_EVERY", 0.2)
    async with FakeTelegram() as fake:
        async with replicas(tmp_path, pg_schema, telegram_config(fake)) as (one, other):
            assert (await one.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200
            go, answers = await tapped_at_both(one, other, tap(7201, 1))
            for _ in range(4):  # four minutes on the clock, each one renewed by the first replica
                await asyncio.sleep(0.5)
                one.clock.advance(timedelta(seconds=50))
            await asyncio.sleep(1.5)
            assert toasts(fake) == [] and (await other.incidents())[0].status == "triggered"
            go.set()
            assert await asyncio.wait_for(answers, 5) == [200, 200]
            assert toasts(fake) == ["Acknowledged #1."]
            assert (await other.actions(1)).count("incident.acknowledged") == 1


async def test_a_slack_event_cut_off_by_a_crash_is_handled_when_slack_retries_it(
        slack_pair: tuple[Harness, Harness, FakeSlack]) -> None:
    one, other, fake = slack_pair
    event = json.dumps({"type": "event_callback", "team_id": "T0FAKE", "api_app_id": "A0FAKE", "event_id": "Ev0002",
                        "event_time": 1700000000, "event": {"type": "app_mention", "user": "U01ALICE",
                                                             "text": "<@U0BOT> help", "channel": "C0OPS",
                                                             "ts": "1700000000.000200"}})
    entered, _ = hold(one, "command")
    headers = slack_signed(event, secret=SLACK_SECRET, content_type="application/json")
    assert (await one.client.post("/slack/events", data=event, headers=headers)).status == 200
    await asyncio.wait_for(entered.wait(), 5)
    await killed(one)
    one.clock.advance(timedelta(minutes=2))
    headers = {**slack_signed(event, secret=SLACK_SECRET, content_type="application/json"),
               "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    assert (await other.client.post("/slack/events", data=event, headers=headers)).status == 200
    await fake.wait_for(lambda: fake.called("chat.postEphemeral"), timeout=5)
    await asyncio.sleep(0.5)
    assert len(fake.called("chat.postEphemeral")) == 1  # the help, to Alice, once


async def test_a_slack_click_cut_off_by_a_crash_is_handled_when_it_comes_again(
        slack_pair: tuple[Harness, Harness, FakeSlack]) -> None:
    """The same signed click again (a proxy that retries at another replica when the first died): when the first
    replica was killed before it acted, the copy is handled once its claim lapsed; while the first still handles
    it, a copy waits and does nothing; once it was handled, a copy is a replay (401)."""
    from tests.test_slack_flow import CLICK

    one, other, fake = slack_pair
    assert (await one.post("am", fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
    assert (await one.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json")))[0] == 200

    def click(incident: int) -> tuple[str, dict[str, str]]:
        payload = json.loads(json.dumps(CLICK))
        payload["user"] = {"id": "U01ALICE", "username": "alice", "name": "alice", "team_id": "T0FAKE"}
        payload["response_url"] = fake.response_url(f"click{incident}")
        action = payload["actions"][0]
        action.update(value=f"ack:{incident}", action_id="chatops:ack", action_ts=f"17000{incident}.1")
        body = urlencode({"payload": json.dumps(payload)})
        return body, slack_signed(body, secret=SLACK_SECRET)

    body, headers = click(1)
    entered, _ = hold(one)
    assert (await one.client.post("/slack/events", data=body, headers=headers)).status == 200
    await asyncio.wait_for(entered.wait(), 5)
    await killed(one)
    one.clock.advance(timedelta(minutes=2))
    assert (await other.client.post("/slack/events", data=body, headers=headers)).status == 200
    await fake.wait_for(lambda: fake.responses.get("click1"), timeout=5)
    assert [r["text"] for r in fake.responses["click1"]] == ["Acknowledged #1."]

    body, headers = click(2)
    entered, go = hold(one)
    assert (await one.client.post("/slack/events", data=body, headers=headers)).status == 200
    await asyncio.wait_for(entered.wait(), 5)
    assert (await other.client.post("/slack/events", data=body, headers=headers)).status == 200
    await asyncio.sleep(1.5)
    assert "click2" not in fake.responses
    go.set()
    await fake.wait_for(lambda: fake.responses.get("click2"), timeout=5)
    await asyncio.sleep(1.5)
    assert [r["text"] for r in fake.responses["click2"]] == ["Acknowledged #2."]
    assert (await other.client.post("/slack/events", data=body, headers=headers)).status == 401
    assert [i.status for i in await other.incidents()] == ["acknowledged", "acknowledged"]
    assert (await other.actions()).count("incident.acknowledged") == 2
