"""Replicas on one PostgreSQL database take turns leading chat delivery: what a change of leader leaves behind is
settled by the next leader, whoever it is, and a replica that does not lead costs the database little. One frozen
inside a transaction holds back the others' alerts and escalations for seconds, not for as long as it is frozen."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from bot.clock import FakeClock
from bot.metrics import Metrics
from bot.server import DB_WAIT
from handlers.timers import TimerService
from storage import timers as timer_store
from storage.db import IDLE_IN_TRANSACTION, LOCK_WAIT, SESSION_LIMITS, Database, Leader, explain_failure
from storage.models import AuditEvent, AuditHead, OutboxItem, Timer
from tests import botkit
from tests.botkit import Harness, running_bot
from tests.conftest import drop_schema, postgres_url
from tests.fake_slack import FakeSlack
from tests.test_outbox import parents
from tests.test_slack_flow import slack_config

OUTBOX_HOLDER = (
    "SELECT l.pid FROM (SELECT hashtextextended(:n, 0) AS k) AS key JOIN pg_locks l ON l.locktype = 'advisory' "
    "AND l.granted AND l.objsubid = 1 AND l.classid = ((key.k >> 32) & 4294967295)::oid "
    "AND l.objid = (key.k & 4294967295)::oid "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")


@contextlib.asynccontextmanager
async def replica_a(fake: FakeSlack, schema: str) -> AsyncIterator[Harness]:
    """Replica A, the whole bot with its Slack adapter, leading delivery; its schema is dropped after."""
    url = postgres_url()
    try:
        async with running_bot(url, slack_config(fake), schema=schema) as h:
            yield h
    finally:
        await drop_schema(url, schema)


async def b_takes_the_lead_from(a: Harness, schema: str) -> tuple[Database, Leader]:
    """A's database connection drops, and with it the outbox lock; replica B asks first and leads. (A's questions
    wait meanwhile, so that B, not A, takes the freed lock: the order an outage of A's connection gives.)"""
    b_db = Database(postgres_url(), schema=schema)
    b = Leader(b_db, "outbox")
    a_leader = a.bot.leaders[0]
    async with a_leader._asking:
        async with b_db.engine.connect() as conn:
            pid = (await conn.execute(text(OUTBOX_HOLDER), {"n": f"chatops:{schema}:outbox"})).scalar_one()
            assert (await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})).scalar_one()
        for _ in range(200):
            if await b.held():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("replica B never took the freed outbox lock")
    return b_db, b


async def first_card(h: Harness, fake: FakeSlack) -> int:
    """An incident, its card posted by A (which leads, and has settled what an earlier leader left)."""
    assert (await h.post("am", botkit.fixture("alertmanager/03-highcpu-firing.json")))[0] == 200
    await fake.wait_for(lambda: parents(fake), timeout=10)
    [incident] = await h.incidents()
    assert incident.id is not None
    return incident.id


def thread_lines(fake: FakeSlack) -> list[str]:
    return [c.params["text"] for c in fake.called("chat.postMessage") if c.params.get("thread_ts")]


async def page_rows(h: Harness) -> list[tuple[str, str | None]]:
    async with h.bot.db.sessions() as s:
        rows = (await s.execute(select(OutboxItem).where(OutboxItem.kind == "page").order_by(OutboxItem.id))).scalars()
        return [(r.status, r.last_error) for r in rows]


async def audited(h: Harness, action: str) -> list[dict[str, Any]]:
    async with h.bot.db.sessions() as s:
        rows = (await s.execute(select(AuditEvent).where(AuditEvent.action == action))).scalars()
        return [e.details for e in rows]


def alice_page(incident_id: int, h: Harness, status: str) -> OutboxItem:
    """Step 1's page to Alice, as an escalation queues it (`sending`: as a worker claims it before the call)."""
    now = h.clock.now()
    return OutboxItem(created_at=now, due_at=now, incident_id=incident_id, channel="@alice", kind="page",
                      event="escalation.page", status=status,
                      details={"person": "alice", "step": 1, "of": 2, "business": False, "manual": True, "next": "",
                               "run": 0})


async def test_a_page_cut_off_by_a_dying_leader_is_settled_by_one_that_led_before(pg_schema: str) -> None:
    """A leads, loses the lock with its connection, and follows B; B claims a page (`sending`) and is killed while
    the platform answers; A takes over. A had settled what it found at its first lead, and never looked again: the
    page stayed `sending` for good (no thread line, no audit event, not in `outbox retry`) until A restarted. Now a
    replica settles such pages each time it takes the lead: unconfirmed, and not sent again."""
    async with FakeSlack() as fake, replica_a(fake, pg_schema) as a:
        incident_id = await first_card(a, fake)
        b_db, b = await b_takes_the_lead_from(a, pg_schema)
        try:
            async with b_db.transaction() as session:  # B's worker claims the page, and B dies during the call
                session.add(alice_page(incident_id, a, "sending"))
            await asyncio.sleep(1.5)  # A asks a few times meanwhile, and follows
        finally:
            await b.close()  # (its connection closes, as a killed process's does: the lock is free)
            await b_db.dispose()
        await fake.wait_for(lambda: any("The page to Alice is unconfirmed" in t for t in thread_lines(fake)), 10)
        [line] = [t for t in thread_lines(fake) if "The page to Alice is unconfirmed" in t]
        assert "the bot stopped while sending it, so it may have arrived; it is not sent again" in line
        assert await page_rows(a) == [("dead", "outcome unknown: the bot stopped while sending it, so it may have "
                                                "arrived; it is not sent again, so as not to page twice")]
        [failed] = await audited(a, "incident.page_failed")
        assert (failed["person"], failed["step"], failed["unknown"]) == ("alice", 1, "restart")
        assert not fake.called("conversations.open"), "the page cut off was sent again"


async def test_a_leader_that_loses_the_lock_mid_page_and_leads_again_settles_its_own_page(pg_schema: str) -> None:
    """A's page to Alice is in flight when A loses the lock; B leads for a while and goes, and A leads again and
    settles what a dying leader left `sending`. Its own page, still in flight, is not among them: when Slack answers
    it is recorded as sent ("Paged Alice"), not also as unconfirmed, and it goes once."""
    async with FakeSlack() as fake, replica_a(fake, pg_schema) as a:
        incident_id = await first_card(a, fake)
        slack = a.bot.adapters["slack"]
        real_page, answer = slack.page, asyncio.Event()

        async def page(user_id: str, message: Any) -> Any:
            await answer.wait()  # the platform is slow to answer
            return await real_page(user_id, message)

        slack.page = page  # type: ignore[method-assign]
        try:
            async with a.bot.db.transaction() as session:
                session.add(alice_page(incident_id, a, "pending"))
            a.bot.outbox.nudge()
            for _ in range(200):
                if await page_rows(a) == [("sending", None)]:
                    break
                await asyncio.sleep(0.02)
            assert await page_rows(a) == [("sending", None)]
            b_db, b = await b_takes_the_lead_from(a, pg_schema)
            try:
                await asyncio.sleep(1.5)  # A finds it does not lead
            finally:
                await b.close()
                await b_db.dispose()
            for _ in range(100):  # A leads again (and settles what it finds `sending`, but for its own page)
                if await a.bot.leaders[0].held():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # a few rounds as the leader
            assert await page_rows(a) == [("sending", None)]
        finally:
            answer.set()  # (also when an assertion fails: the bot stops only once its call returns)
        await fake.wait_for(lambda: any(t.startswith("Paged Alice on Slack") for t in thread_lines(fake)), 10)
        await asyncio.sleep(0.5)
        assert not [t for t in thread_lines(fake) if "unconfirmed" in t]
        assert await page_rows(a) == [("sent", None)]
        assert [d["person"] for d in await audited(a, "incident.paged")] == ["alice"]
        assert await audited(a, "incident.page_failed") == []
        assert len(fake.called("conversations.open")) == 1


async def test_a_follower_asks_for_the_lock_on_one_connection(pg_schema: str) -> None:
    """A replica that does not lead asks for the lock at every outbox round of each loop (a few times a second): it
    opened a database connection for every question and closed it (about 4 new sessions a second, hundreds of
    sockets in TIME-WAIT a minute). Now it asks on one connection, kept; one that breaks is replaced at once, and
    it still takes over at its next question when the leader goes."""
    url = postgres_url()
    leading, following = Database(url, schema=pg_schema), Database(url, schema=pg_schema)
    leader, follower = Leader(leading, "outbox"), Leader(following, "outbox")
    opened: list[int] = []  # the backends the follower's engine opened

    @event.listens_for(following.engine.sync_engine, "connect")
    def _opened(dbapi_connection: Any, _record: Any) -> None:
        opened.append(dbapi_connection.driver_connection.get_server_pid())

    watcher = create_async_engine(url)
    try:
        await leading.start()
        assert await leader.held()
        for _ in range(20):
            assert not await follower.held()
        assert len(opened) == 1
        async with watcher.connect() as conn:  # the server's side: the follower's one session, open
            alive = (await conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                                        {"pids": opened})).scalar_one()
            assert alive == 1
            # it ends (a restart of the database, an idle timeout): the next question is asked on a new one
            assert (await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": opened[0]})).scalar_one()
        await asyncio.sleep(0.2)
        await leader.close()  # the leader goes
        assert await follower.held()  # taken over at the next question, whatever happened to the last connection
        assert len(opened) == 2
        for _ in range(5):
            assert await follower.held()
        assert len(opened) == 2
    finally:
        await leader.close()
        await follower.close()
        await leading.dispose()
        await following.dispose()
        await watcher.dispose()
        await drop_schema(url, pg_schema)


@contextlib.asynccontextmanager
async def frozen_in_a_transaction(db: Database, statement: Any) -> AsyncIterator[AsyncSession]:
    """A replica that ran `statement` in a transaction and froze there (SIGSTOP, a paused VM, a stuck event loop):
    its connection sits idle in the transaction, holding what it locked, and says nothing more."""
    unit = db.transaction()
    session = await unit.__aenter__()
    await session.execute(statement)
    try:
        yield session
    finally:
        with contextlib.suppress(Exception):  # (ended by the database meanwhile, as it should be)
            await unit.__aexit__(None, None, None)


async def test_a_replica_frozen_mid_intake_holds_back_no_other_replicas_alerts(pg_schema: str) -> None:
    """A replica froze inside an intake transaction, holding the audit log's head: every alert to the other replicas
    waited for it and got 503 after 15 s, for as long as it stayed frozen. Now the database ends a transaction idle
    for a few seconds: the other replica's alert is stored within that bound, and the frozen one, when it runs
    again, finds its transaction gone (and says why)."""
    url = postgres_url()
    frozen_db = Database(url, schema=pg_schema, wait=DB_WAIT)  # replica A, connected as the bot connects
    try:
        async with running_bot(url, schema=pg_schema) as b, \
                frozen_in_a_transaction(frozen_db, select(AuditHead).with_for_update()) as frozen:
            started = time.monotonic()
            status, body, _ = await b.post("am", botkit.fixture("alertmanager/03-highcpu-firing.json"))
            took = time.monotonic() - started
            assert status == 200, body
            assert took < IDLE_IN_TRANSACTION + 3, f"the alert waited {took:.1f} s for the frozen replica"
            [incident] = await b.incidents()
            assert "incident.opened" in await b.actions(incident.id)
            with pytest.raises(Exception) as ended:  # A runs again: its transaction was ended, nothing of it stays
                await frozen.execute(text("SELECT 1"))
            assert "left idle over 5 s: was this process paused?" in explain_failure(ended.value, DB_WAIT)
    finally:
        await frozen_db.dispose()
        await drop_schema(url, pg_schema)


async def test_a_timer_claimed_by_a_frozen_replica_is_fired_by_another(pg_schema: str) -> None:
    """A replica froze while running an escalation step, the timer's row locked by its transaction: the others'
    claims (SKIP LOCKED) skipped the row until it ran again, and the step paged nobody meanwhile (3 minutes late in
    a review), while timers.fired_at said it was on time. Now the database ends the frozen transaction: once the
    lease lapses another replica fires the step, and records when it did."""
    url = postgres_url()
    clock = FakeClock(botkit.T0)
    a_db, b_db = Database(url, schema=pg_schema, wait=DB_WAIT), Database(url, schema=pg_schema, wait=DB_WAIT)
    fired: list[tuple[str, datetime]] = []
    try:
        await a_db.start()
        async with a_db.transaction() as session:
            timer_id = await timer_store.schedule(session, "escalation", "7", clock.now(), clock.now())
        async with a_db.transaction() as session:  # A claims it, and runs it...
            assert [t.id for t in await timer_store.claim(session, "replica-a", clock.now(), timedelta(seconds=30),
                                                          10)] == [timer_id]
        complete = update(Timer.__table__).where(Timer.__table__.c.id == timer_id).values(status="done")
        async with frozen_in_a_transaction(a_db, complete):  # ...and freezes with the row locked
            b = TimerService(db=b_db, clock=clock, metrics=Metrics(), lease=timedelta(seconds=30))

            @b.handler("escalation")
            async def step(session: AsyncSession, timer: Timer, now: datetime) -> None:
                fired.append((timer.subject, now))

            clock.advance(timedelta(minutes=1))  # A's lease lapsed
            started = time.monotonic()
            while not fired and time.monotonic() - started < IDLE_IN_TRANSACTION + 5:
                await b.tick()
                await asyncio.sleep(0.2)
            assert fired == [("7", clock.now())], "the frozen replica's timer was never fired by another"
        async with b_db.sessions() as session:
            row = await session.get(Timer, timer_id)
            assert row is not None
            assert (row.status, row.claimed_by, row.fired_at) == ("done", b.replica, clock.now())
    finally:
        await a_db.dispose()
        await b_db.dispose()
        await drop_schema(url, pg_schema)


async def test_the_leader_lock_outlives_the_idle_transaction_limit(pg_schema: str) -> None:
    """The leader's lock is a session lock on a connection idle outside any transaction: the limit on transactions
    left idle does not end it, however long the leader waits between beats."""
    url = postgres_url()
    leading, following = Database(url, schema=pg_schema, wait=DB_WAIT), Database(url, schema=pg_schema, wait=DB_WAIT)
    leader, follower = Leader(leading, "outbox"), Leader(following, "outbox")
    try:
        await leading.start()
        assert await leader.held()
        await asyncio.sleep(IDLE_IN_TRANSACTION + 2)
        assert await leader.held()
        assert not await follower.held()
    finally:
        await leader.close()
        await follower.close()
        await leading.dispose()
        await following.dispose()
        await drop_schema(url, pg_schema)


async def test_an_alert_held_up_by_a_lock_is_answered_503_with_the_reason(pg_schema: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A lock held long by a session the idle limit does not end (an operator's psql, a long command): intake
    waited out the 15 s statement limit and logged "the database is unavailable ()". Now the wait for the lock
    ends sooner, and the log says which wait it was and what likely holds it."""
    url = postgres_url()
    operator = create_async_engine(url)
    try:
        async with running_bot(url, schema=pg_schema) as b, operator.begin() as conn:
            await conn.execute(text(f'SELECT seq FROM "{pg_schema}".audit_head WHERE id = 1 FOR UPDATE'))
            started = time.monotonic()
            status, body, _ = await b.post("am", botkit.fixture("alertmanager/03-highcpu-firing.json"))
            took = time.monotonic() - started
            assert (status, body) == (503, {"error": "the database is unavailable; nothing was stored, retry later"})
            assert LOCK_WAIT - 1 < took < DB_WAIT
            said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("intake: the database is")]
            assert said == [f"intake: the database is unavailable (LockNotAvailableError: a lock was not granted "
                            f"within {LOCK_WAIT:g} s (held by another replica's transaction: is one stuck or very "
                            "slow?)); answering 503 so senders retry"]
    finally:
        await operator.dispose()
        await drop_schema(url, pg_schema)


async def test_a_timer_whose_step_times_out_says_why(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg's statement limit raises a TimeoutError with no message: the retry was logged "failed; retrying in
    2s: " and timers.last_error read "TimeoutError: ". Both now say what it likely means."""
    clock = FakeClock(botkit.T0)
    async with db.transaction() as session:
        timer_id = await timer_store.schedule(session, "escalation", "7", clock.now(), clock.now())
    service = TimerService(db=db, clock=clock, metrics=Metrics())

    @service.handler("escalation")
    async def step(session: AsyncSession, timer: Timer, now: datetime) -> None:
        raise TimeoutError()  # as asyncpg's command_timeout raises it

    await service.tick()
    async with db.sessions() as session:
        row = await session.get(Timer, timer_id)
        assert row is not None
    why = "TimeoutError: no answer from the database (down, overloaded, or a lock held by another replica?)"
    assert (row.status, row.attempt, row.last_error) == ("pending", 0, why)
    assert f"timer {timer_id} (escalation 7) failed; retrying in 2s: {why}" in [r.getMessage() for r in caplog.records]
    # A store that cannot do it for longer (a lock a maintenance job holds a minute or more) is no fault of the
    # timer's: it was given up for good after its fifth try, an escalation's step with it, and nobody was told.
    for _ in range(service.max_attempts + 2):
        clock.advance(timedelta(seconds=3))
        await service.tick()
    async with db.sessions() as session:
        row = await session.get(Timer, timer_id)
        assert row is not None and (row.status, row.attempt) == ("pending", 0)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_page_delivered_while_the_database_fails_is_recorded_when_it_answers_again(
        backend: str, tmp_path: Path, pg_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """Slack took the page, and the transaction that records it failed (a lock timeout, a database restart): the
    row stayed `sending` for good and the audit log never showed the page (only a change of leader settled it, as
    unconfirmed). Now the outcome is kept and written once the database answers again."""
    async with FakeSlack() as fake, botkit.bot_on(backend, tmp_path, pg_schema, slack_config(fake)) as h:
        incident_id = await first_card(h, fake)
        db, real_transaction = h.bot.db, h.bot.db.transaction
        answered, failures = asyncio.Event(), []

        def transaction() -> Any:
            task = asyncio.current_task()
            # the page's lane (a task of the pages loop's, named for whom it goes to: see OutboxWorker._lanes)
            lane = task is not None and task.get_name().startswith("outbox-") and task.get_name() not in (
                "outbox-pages", "outbox-slack")
            if answered.is_set() and lane and len(failures) < 2:
                failures.append(1)  # the database does not answer the pages loop, twice
                raise OperationalError("UPDATE outbox ...", {}, TimeoutError())
            return real_transaction()

        slack = h.bot.adapters["slack"]
        real_page = slack.page

        async def page(user_id: str, message: Any) -> Any:
            ref = await real_page(user_id, message)
            answered.set()
            return ref

        slack.page, db.transaction = page, transaction  # type: ignore[method-assign]
        async with real_transaction() as session:
            session.add(alice_page(incident_id, h, "pending"))
        h.bot.outbox.nudge()
        await fake.wait_for(lambda: any(t.startswith("Paged Alice on Slack") for t in thread_lines(fake)), 15)
        assert len(failures) == 2
        assert await page_rows(h) == [("sent", None)]
        assert [d["person"] for d in await audited(h, "incident.paged")] == ["alice"]
        assert await audited(h, "incident.page_failed") == []
        assert len(fake.called("conversations.open")) == 1
        said = [r.getMessage() for r in caplog.records if "recording it failed" in r.getMessage()]
        assert said[0] == ("outbox: the page to alice about #1 went out on Slack, but recording it failed "
                           "(OperationalError: (builtins.TimeoutError) ); trying again in 1 s")


async def test_limits_a_pooler_drops_are_named_with_the_statements_that_set_them(
        pg_schema: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The limits above travel as startup parameters. PgBouncer refuses one it does not know unless its
    ignore_startup_parameters lists it, and then drops it: the bot ran without them, and nothing said so. Now the start
    names what is off and the statements that set it on the bot's role, which a pooler keeps; once run, it is quiet."""
    import storage.db

    url = postgres_url()
    role = f"r_{pg_schema}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        await conn.execute(text(f'GRANT CREATE ON DATABASE "{make_url(url).database}" TO "{role}"'))
    real = storage.db.create_async_engine

    def pooler(address: Any, **kwargs: Any) -> Any:  # as PgBouncer with ignore_startup_parameters: dropped on the way
        for name in SESSION_LIMITS:
            kwargs.get("connect_args", {}).get("server_settings", {}).pop(name, None)
        return real(address, **kwargs)

    monkeypatch.setattr(storage.db, "create_async_engine", pooler)
    as_role = make_url(url).set(username=role).render_as_string(hide_password=False)
    try:
        for run_advice in (True, False):
            caplog.clear()
            db = Database(as_role, schema=pg_schema, wait=DB_WAIT)
            await db.start()
            await db.dispose()
            said = [r.getMessage() for r in caplog.records if "run with" in r.getMessage()]
            if not run_advice:
                assert said == []
                break
            assert said == [
                "PostgreSQL: the bot's connections run with idle_in_transaction_session_timeout and lock_timeout off: a "
                "pooler between the bot and the server (PgBouncer's ignore_startup_parameters, say) dropped the values "
                "the bot asks for, so a replica frozen inside a transaction would stall the others until it runs again. "
                f"Set them on the bot's role: ALTER ROLE \"{role}\" SET idle_in_transaction_session_timeout = '5000ms'; "
                f"ALTER ROLE \"{role}\" SET lock_timeout = '10000ms'"]
            async with admin.connect() as conn:  # the operator does as told
                for statement in said[0].split("role: ", 1)[1].split("; "):
                    await conn.execute(text(statement))
    finally:
        await drop_schema(url, pg_schema)
        async with admin.connect() as conn:
            await conn.execute(text(f'REVOKE CREATE ON DATABASE "{make_url(url).database}" FROM "{role}"'))
            await conn.execute(text(f'DROP ROLE "{role}"'))
        await admin.dispose()


async def test_metrics_say_which_replica_leads_delivery(pg_schema: str) -> None:
    """Only the log said which replica delivers chat work (and pages): `chatops_leading{job}` is 1 there, 0 on the
    others, and follows the lock when another replica takes it."""
    async with FakeSlack() as fake, replica_a(fake, pg_schema) as a:
        await first_card(a, fake)  # (A delivers: it leads)
        assert 'chatops_leading{job="outbox"} 1.0' in await (await a.client.get("/metrics")).text()
        b_db, b = await b_takes_the_lead_from(a, pg_schema)
        try:
            for _ in range(100):  # A asks again at its next round, and follows
                if not a.bot.leaders[0].leading:
                    break
                await asyncio.sleep(0.05)
            assert 'chatops_leading{job="outbox"} 0.0' in await (await a.client.get("/metrics")).text()
        finally:
            await b.close()
            await b_db.dispose()
