"""The outbox delivers once, after restarts and failures, and gives up visibly when it must."""

from __future__ import annotations

import asyncio
import json
import contextlib
import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main as cli
from handlers.outbox import Budget, _Buckets
from sqlmodel import select

from storage.db import SQLITE_BUSY_TIMEOUT_MS
from storage.models import AuditEvent, OutboxItem
from tests.botkit import T0, Harness, bot_on, fixture, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import slack_config
from tests.test_telegram_flow import GROUP, Both, both, posted_on_both  # noqa: F401 (both: a fixture)

GENEROUS = {"slack": Budget(chat=(1200, 10), group_chat=None, edits=(1200, 10), platform=(6000, 50))}


async def drain(h: Harness, *, step: timedelta = timedelta(seconds=1), seconds: float = 10) -> None:
    """Let time pass on the bot's clock until nothing is pending (or fail saying what is)."""
    deadline = time.monotonic() + seconds
    while await h.count_pending():
        assert time.monotonic() < deadline, f"still pending: {await h.pending()}"
        h.clock.advance(step)
        h.bot.outbox.nudge()
        await asyncio.sleep(0.05)


def parents(fake: FakeSlack) -> list[str]:
    return [c.params["text"] for c in fake.called("chat.postMessage") if not c.params.get("thread_ts")]


async def test_pending_deliveries_go_out_after_a_restart_and_none_twice(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with running_bot(url) as h:  # no Slack adapter: the incident's post waits in the outbox
        await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
        await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
        assert await h.count_pending() == 3  # two posts to ops-slack, one to ops-telegram
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake)) as h:
            await fake.wait_for(lambda: len(parents(fake)) == 2, timeout=5)
            assert sorted(p.split("#")[1].split(" ")[0] for p in parents(fake)) == ["1", "2"]
        async with running_bot(url, slack_config(fake)) as h:  # and again: nothing is sent twice
            h.bot.outbox.nudge()
            await asyncio.sleep(0.5)
            assert len(parents(fake)) == 2
            # Telegram is not on in this bot: its delivery waits for it.
            assert [row[:4] for row in await h.pending()] == [(2, "ops-telegram", "post", "incident.opened")]


async def test_a_replica_that_loses_the_delivery_lock_mid_round_posts_no_more(tmp_path: Path) -> None:
    """Replicas on PostgreSQL: the lock's connection dies while this replica posts the first of three new cards;
    another replica takes over and reads the same pending rows. This one stops there, instead of posting the
    other two as well (the new leader posts them; here, this replica once it leads again)."""
    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)  # three posts in one round are within the budget
            leading = True

            async def may_deliver() -> bool:
                return leading

            slack = h.bot.adapters["slack"]
            real_send = slack.send

            async def send(chat: str, message: Any) -> Any:
                nonlocal leading
                ref = await real_send(chat, message)
                leading = False  # the lock went during this call
                return ref

            h.bot.outbox.may_deliver = may_deliver
            slack.send = send  # type: ignore[method-assign]
            alerts = [{"asset_name": f"web-{i}", "signature": "Down", "severity": "high", "message": "down",
                       "tool_source": "t"} for i in range(3)]
            assert (await h.post("open", alerts))[0] == 200  # three incidents in one commit: one round posts them
            await fake.wait_for(lambda: parents(fake), timeout=5)
            await asyncio.sleep(0.5)
            assert len(parents(fake)) == 1 and await h.count_pending() == 2
            leading = True
            slack.send = real_send  # type: ignore[method-assign]
            h.bot.outbox.nudge()
            await fake.wait_for(lambda: len(parents(fake)) == 3, timeout=5)
            for _ in range(100):  # the last post's row is marked sent just after Slack's answer
                if not await h.count_pending():
                    break
                await asyncio.sleep(0.02)
            assert await h.count_pending() == 0 and len(parents(fake)) == 3


async def test_a_direct_message_read_again_just_as_it_goes_is_not_sent_twice(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages loop reads what is due while the direct message to Alice is on its way, still pending, and Slack
    answers before the loop has looked at which people's lanes are busy (a busy machine). Before: her lane had
    ended, so the row read a moment before went again, and Alice got the message twice."""
    from handlers.notify import direct_row
    from handlers.outbox import OutboxWorker
    from tests.recording import poll

    text = "Please take a look at #7"
    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            outbox = h.bot.outbox
            answer = fake.hold("chat.postMessage")  # her message is on its way until Slack answers
            real_first, real_round = OutboxWorker._waiting_first, outbox._people_and_notices
            rounds = 0

            async def waiting_first(session: Any, rows: list[OutboxItem], now: datetime) -> list[OutboxItem]:
                if "@alice" in outbox._lanes and any(r.details.get("text") == text for r in rows):
                    answer.set()  # Slack answers her lane between this round's read and its look at the lanes
                    await poll(lambda: not outbox._lanes, 5, lambda: "Alice's lane ends")
                return await real_first(session, rows, now)

            async def people_and_notices(*args: Any, **kwargs: Any) -> int:
                nonlocal rounds
                calls = await real_round(*args, **kwargs)
                rounds += 1
                return calls

            monkeypatch.setattr(OutboxWorker, "_waiting_first", staticmethod(waiting_first))
            monkeypatch.setattr(outbox, "_people_and_notices", people_and_notices)
            async with h.bot.db.transaction() as session:
                session.add(direct_row("alice", text, T0))
            outbox.nudge()
            sent = lambda: [c for c in fake.calls if c.method == "chat.postMessage" and c.params.get("text") == text]
            await poll(lambda: sent(), 5, lambda: "her message goes")
            outbox.nudge()  # a round while it is on its way
            await poll(lambda: answer.is_set(), 5, lambda: "a round reads it while it is on its way")
            then = rounds
            await poll(lambda: rounds > then and not outbox._lanes, 5, lambda: "that round, and what it started")
            assert len(sent()) == 1
            assert await h.count_pending() == 0


async def test_notices_for_a_platform_that_is_off_do_not_hold_back_pages_and_messages(tmp_path: Path) -> None:
    """A backlog of channel notices no adapter can send (Telegram off) waits, and the rows behind it go out."""
    from handlers.notify import direct_row, notice_row

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            batch = h.bot.outbox.batch
            async with h.bot.db.transaction() as session:
                session.add_all([notice_row("ops-telegram", f"handoff {i}", T0) for i in range(batch + 10)])
                session.add(direct_row("alice", "Please take a look at #7", T0))
            h.bot.outbox.nudge()
            await fake.wait_for(lambda: any(c.params.get("text") == "Please take a look at #7"
                                            for c in fake.called("chat.postMessage")), timeout=5)
            for _ in range(100):  # the direct message's row is marked sent just after Slack's answer
                if await h.count_pending() == batch + 10:
                    break
                await asyncio.sleep(0.02)
            assert await h.count_pending() == batch + 10  # the notices wait for Telegram; none is lost
            async with h.bot.db.transaction() as session:  # a notice for a channel app.yaml no longer has
                session.add(notice_row("ops-gone", "handoff", T0))
            h.bot.outbox.nudge()
            for _ in range(100):
                if (await h.pending()) and h.bot.metrics.outbox_dead.labels("ops-gone")._value.get() == 1:
                    break
                await asyncio.sleep(0.02)
            assert h.bot.metrics.outbox_dead.labels("ops-gone")._value.get() == 1  # given up at once, and counted


async def test_a_busy_channel_holds_back_no_other_channel(tmp_path: Path) -> None:
    """60 new incidents for #ops, then one for #dev, in a round of at most 20 messages: #dev's card goes out at
    once; #ops's wait their turn in its own budget."""
    import tests.botkit as botkit

    base = botkit.CONFIG.replace("  - {id: ops-telegram, platform: telegram, chat: \"-100123\"}",
                                 "  - {id: dev-slack, platform: slack, chat: C0DEV}").replace(
        "  - {match: {team: dba}, channels: [ops-slack, ops-telegram]}", "  - {match: {team: dev}, channels: [dev-slack]}")
    async with FakeSlack(per_second=2, burst=2) as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake), base=base) as h:
            h.bot.outbox.batch = 20
            alerts = [{"asset_name": f"web-{i}", "signature": "Down", "severity": "high", "message": f"web-{i} down",
                       "tool_source": "t"} for i in range(60)]
            for chunk in range(0, 60, 10):
                assert (await h.post("open", alerts[chunk:chunk + 10]))[0] == 200
            dev = {"asset_name": "build-1", "signature": "Red", "severity": "high", "message": "build red",
                   "tool_source": "t", "labels": {"team": "dev"}}
            assert (await h.post("open", dev))[0] == 200
            await fake.wait_for(lambda: any(c.params.get("channel") == "C0DEV" for c in fake.called("chat.postMessage")),
                                timeout=3)
            assert len([c for c in fake.called("chat.postMessage") if c.params.get("channel") == "C0OPS"]) < 20


async def test_a_new_incidents_card_goes_before_the_thread_lines_of_older_ones(tmp_path: Path) -> None:
    """An alert storm: 20 incidents' threads have 60 escalation lines waiting ("Paged Bob on Telegram."), a minute of
    the channel's budget of about a post a second. A new incident opens: its card goes out within seconds, not after
    those lines (before: minutes into a real storm, while its page had gone long ago). Each older thread still gets
    its lines in the order they happened."""
    from handlers.notify import queue_thread_line
    from handlers.outbox import BUDGETS
    from storage.models import Incident

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)  # the older incidents' cards, at once
            fake.rate_limit = False
            alerts = [{"asset_name": f"app-{i}", "signature": "Down", "severity": "high", "message": f"app-{i} down",
                       "tool_source": "t"} for i in range(20)]
            for chunk in range(0, 20, 10):
                assert (await h.post("open", alerts[chunk:chunk + 10]))[0] == 200
            await fake.wait_for(lambda: len(parents(fake)) == 20, timeout=5)
            for _ in range(100):
                if not await h.count_pending():
                    break
                await asyncio.sleep(0.02)
            assert await h.count_pending() == 0
            h.bot.outbox.buckets = _Buckets(BUDGETS)  # Slack's pace from here on
            fake.rate_limit = True
            async with h.bot.db.transaction() as session:
                for incident in (await session.execute(select(Incident).order_by(Incident.id))).scalars().all():
                    for n in range(1, 4):
                        queue_thread_line(session, incident, h.clock.now(), "escalation.paged",
                                          {"line": f"Paged Bob on Telegram ({n} of 3 about #{incident.id})."})
            h.bot.outbox.nudge()

            def lines() -> list[str]:
                return [c.params["text"] for c in fake.called("chat.postMessage") if c.params.get("thread_ts")]

            await fake.wait_for(lambda: len(lines()) >= 3, timeout=5)  # the storm's lines are on their way
            started = time.monotonic()
            new = {"asset_name": "db-01", "signature": "Down", "severity": "critical", "message": "db-01 down",
                   "tool_source": "t"}
            assert (await h.post("open", new))[0] == 200
            await fake.wait_for(lambda: len(parents(fake)) == 21, timeout=10)
            waited = time.monotonic() - started
            assert waited < 5, f"the new card waited {waited:.1f} s behind {len(lines())} older thread lines"
            assert len(lines()) < 20  # it went before most of them, not after
            threads: dict[str, list[str]] = {}
            for call in fake.called("chat.postMessage"):
                if call.params.get("thread_ts"):
                    threads.setdefault(call.params["thread_ts"], []).append(call.params["text"])
            for said in threads.values():  # each thread's lines in the order they happened
                assert said == sorted(said) and [t.split(" ")[4].strip("(") for t in said] == [
                    str(n) for n in range(1, len(said) + 1)], said


@pytest.mark.parametrize(("error", "says"), [
    ("channel_not_found", "channel_not_found: C0OPS is a wrong id, or private: /invite @chatops in it"),
    ("not_in_channel", "not_in_channel: invite the bot: /invite @chatops in C0OPS"),
    ("is_archived", "is_archived: C0OPS is archived: unarchive it, or give channels[].chat another channel in app.yaml"),
])
async def test_a_refusal_that_cannot_succeed_becomes_a_dead_letter(tmp_path: Path, error: str, says: str) -> None:
    """The error says what to do about it, not only Slack's code."""
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", error)
        url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
        async with running_bot(url, slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: fake.calls and fake.calls[-1].method == "chat.postMessage", timeout=5)
            for _ in range(50):
                if not await h.count_pending():
                    break
                await asyncio.sleep(0.05)
            assert await h.pending() == [] and parents(fake) == []
            metrics = await (await h.client.get("/metrics")).text()
            assert 'chatops_outbox_dead_total{channel="ops-slack"} 1.0' in metrics
            assert 'chatops_outbox{status="dead"} 1.0' in metrics
        config = tmp_path / "app.yaml"
        config.write_text(f"storage: {{url: '{url}'}}\nchannels: [{{id: ops-slack, platform: slack, chat: C0OPS}}]\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert await asyncio.to_thread(cli, ["outbox", "list", "--status", "dead", "-c", str(config)]) == 0
        listing = out.getvalue()
        assert "#1" in listing and "ops-slack" in listing and "dead" in listing
        assert f"slack chat.postMessage: {says}" in listing
        assert "totals: dead 1" in listing


async def test_a_dead_letter_is_sent_again_with_outbox_retry_once_the_cause_is_fixed(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "not_in_channel")  # the bot was not invited yet
        url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
        config = tmp_path / "app.yaml"
        config.write_text(f"storage: {{url: '{url}'}}\nchannels: [{{id: ops-slack, platform: slack, chat: C0OPS}}]\n"
                          "audit: {hmac_key: test-key-0123456789ab}\n")  # the bot's key: the retry is audited in its chain
        async with running_bot(url, slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            for _ in range(50):
                if (await row_state(h))[0][0] == "dead":
                    break
                await asyncio.sleep(0.05)
            [(state, _, _)] = await row_state(h)
            assert state == "dead" and parents(fake) == []
            h.clock.set(datetime.now(UTC))  # the command line runs on the wall clock
            out = io.StringIO()  # someone invites the bot, then:
            with contextlib.redirect_stdout(out):
                assert await asyncio.to_thread(cli, ["outbox", "retry", "--dead", "-c", str(config)]) == 0
            assert out.getvalue().startswith("1 delivery queued again: 1;")
            await drain(h)
            assert len(parents(fake)) == 1 and [r[0] for r in await row_state(h)] == ["sent"]
            assert "outbox.retried" in await h.actions()
            async with h.bot.db.sessions() as session:
                assert (await h.bot.audit.verify(session)).ok
                # in the incident's own timeline (`audit export --incident`, `incidents show`)
                retried = (await session.execute(select(AuditEvent).where(AuditEvent.action == "outbox.retried"))
                           ).scalars().all()
                assert [(e.incident_id, e.subject_id) for e in retried] == [(1, "1")]
            with contextlib.redirect_stdout(io.StringIO()) as shown:  # the timeline says which (it said nothing)
                assert await asyncio.to_thread(cli, ["incidents", "show", "1", "--wide", "-c", str(config)]) == 0
            [line] = [line for line in shown.getvalue().splitlines() if "outbox.retried" in line]
            assert line.endswith("delivery #1 queued again"), line
            with contextlib.redirect_stdout(io.StringIO()) as nothing:
                assert await asyncio.to_thread(cli, ["outbox", "retry", "7", "-c", str(config)]) == 1
            assert nothing.getvalue() == ("there is no delivery #7: only dead deliveries are sent again (`chatops "
                                          "outbox list --status all` shows them)\n")
            # one that is not dead says what it is ("no dead deliveries with those ids (1)" left that to find out)
            with contextlib.redirect_stdout(io.StringIO()) as sent:
                assert await asyncio.to_thread(cli, ["outbox", "retry", "1", "7", "-c", str(config)]) == 1
            assert sent.getvalue() == ("#1 is sent; there is no delivery #7: only dead deliveries are sent again "
                                       "(`chatops outbox list --status all` shows them)\n")


async def test_outbox_retry_dead_leaves_what_a_platform_took_without_answering(tmp_path: Path) -> None:
    """`outbox retry --dead` sent again a direct message whose platform took it without confirming (settled dead
    as unconfirmed: it may have arrived), so the person read it twice. It leaves those now, as it leaves pages;
    named by id, one is sent again all the same."""
    from handlers.notify import direct_row
    from storage.queries import UNCONFIRMED

    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: '{url}'}}\nchannels: [{{id: ops-slack, platform: slack, chat: C0OPS}}]\n"
                      "audit: {hmac_key: test-key-0123456789ab}\n")
    async with running_bot(url) as h:
        async with h.bot.db.transaction() as session:
            unconfirmed, refused = direct_row("alice", "Swap #3?", T0), direct_row("alice", "Swap #4?", T0)
            unconfirmed.status, unconfirmed.last_error = "dead", UNCONFIRMED + "Slack took it but never confirmed it"
            refused.status, refused.last_error = "dead", "slack chat.postMessage: channel_not_found"
            session.add_all([unconfirmed, refused])
            await session.flush()
            ids = {"Swap #3?": unconfirmed.id, "Swap #4?": refused.id}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await asyncio.to_thread(cli, ["outbox", "retry", "--dead", "-c", str(config)]) == 0
    assert out.getvalue().startswith(f"1 delivery queued again: {ids['Swap #4?']};"), out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert await asyncio.to_thread(cli, ["outbox", "retry", str(ids["Swap #3?"]), "-c", str(config)]) == 0


async def test_a_thread_line_that_failed_holds_back_the_later_ones(tmp_path: Path) -> None:
    from tests.test_slack_flow import Slack, incident_posted

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)  # no wait for Slack's budget between the lines
            s = Slack(h, fake)
            ts = await incident_posted(s)
            fake.fail("chat.postMessage", "internal_error", status=500)  # the next post: the Acknowledged line
            await s.answer(await s.command("/incident", "ack 1"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" and not c.ok for c in fake.calls), timeout=5)
            await s.answer(await s.command("/incident", "resolve 1"))
            await drain(h)
            lines = [p["text"] for p in s.posts(thread=ts)]
            assert [line.split(" by ")[0] for line in lines] == ["Acknowledged", "Resolved"], lines


async def test_an_incident_message_deleted_in_the_chat_is_posted_afresh(tmp_path: Path) -> None:
    from tests.test_slack_flow import Slack, incident_posted

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            s = Slack(h, fake)
            first = await incident_posted(s)
            fake.fail("chat.update", "message_not_found")  # someone deleted it
            await s.answer(await s.command("/incident", "ack 1"))
            await drain(h)
            assert len(parents(fake)) == 2  # the card, posted again
            second = await h.message_of(1)
            assert second != first
            assert "Acknowledged" in parents(fake)[-1]  # as the incident is now
            # the line waiting when the card went follows the new card into its thread; nothing was given up on
            await fake.wait_for(lambda: s.posts(thread=second), timeout=5)
            assert [p["text"].split(" by ")[0] for p in s.posts(thread=second)] == ["Acknowledged"]
            assert "dead" not in [r[0] for r in await row_state(h)]


async def test_a_thread_line_whose_message_was_deleted_posts_the_card_afresh(tmp_path: Path) -> None:
    """Slack answers thread_not_found to a line for a deleted message: the card is posted again (the line was
    dead-lettered, and the incident had no message in the channel any more)."""
    from tests.test_slack_flow import Slack, incident_posted

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            s = Slack(h, fake)
            first = await incident_posted(s)
            await drain(h)
            fake.fail("chat.postMessage", "thread_not_found")  # the Acknowledged line: its card was deleted
            await s.answer(await s.command("/incident", "ack 1"))
            await drain(h)
            assert len(parents(fake)) == 2 and await h.message_of(1) != first
            assert "dead" not in [r[0] for r in await row_state(h)]


async def test_server_errors_are_retried_with_back_off_and_then_delivered_once(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "internal_error", status=500, times=2)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            posts = lambda: [c for c in fake.calls if c.method == "chat.postMessage"]  # noqa: E731
            await fake.wait_for(lambda: len(posts()) >= 1, timeout=5)
            await asyncio.sleep(0.3)
            assert parents(fake) == [] and len(posts()) == 1  # the retry waits for its back-off (2 s)
            [(_, _, _, _, due, error)] = await h.pending()
            assert error and "internal_error" in error and due == (h.clock.now() + timedelta(seconds=2)).isoformat()
            await drain(h)
            assert len(parents(fake)) == 1 and [c.status for c in fake.calls if c.method == "chat.postMessage"] == [500, 500, 200]


def cards(fake: FakeSlack, channel: str = "C0OPS") -> list[dict[str, Any]]:
    """The messages in a channel outside threads, as Slack has them (the incident cards, the notices)."""
    return [m for (c, _), m in fake.messages.items() if c == channel and "thread_ts" not in m]


def thread(fake: FakeSlack, ts: str) -> list[str]:
    return [m["text"] for m in fake.messages.values() if m.get("thread_ts") == ts]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_card_slack_took_whose_answer_was_lost_is_found_not_posted_twice(database: str, tmp_path: Path,
                                                                                  pg_schema: str) -> None:
    """Slack stores the card, then the connection drops before its answer: the bot cannot tell whether it arrived.
    Before posting again it looks in the channel for the card (by the delivery key in its metadata), finds it and
    records it: the channel has one card, the one the bot redraws (before: a second card, and the first stayed
    Firing with live buttons)."""
    from tests.test_slack_flow import Slack, button_values, text_of

    async with FakeSlack() as fake, bot_on(database, tmp_path, pg_schema, slack_config(fake)) as h:
        s = Slack(h, fake)
        fake.lose_answer("chat.postMessage", when=lambda params: not params.get("thread_ts"))
        await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
        await drain(h, seconds=15)
        [card] = cards(fake)
        assert await h.message_of(1) == card["ts"] and len(fake.called("conversations.history")) == 1
        assert [r[0] for r in await row_state(h)] == ["sent", "sent"]  # the post, and the redraw of what it found
        await s.answer(await s.command("/incident", "ack 1"))
        await drain(h, seconds=15)
        [card] = cards(fake)
        assert "Acknowledged" in text_of(card) and "ack:1" not in button_values(card)


def _alert(asset: str, tool: str = "t") -> dict[str, str]:
    return {"asset_name": asset, "signature": "DiskFull", "severity": "high", "message": "disk full", "tool_source": tool}


async def test_the_look_for_a_lost_card_waits_its_time_whatever_else_of_the_incident_is_due(tmp_path: Path) -> None:
    """The look waits LOOK_AFTER for Slack to store what it took; a second alert of the incident made a redraw
    due at once, and the look came with it, found nothing yet and posted a second card."""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
        h.bot.outbox.buckets = _Buckets(GENEROUS)
        fake.lose_answer("chat.postMessage")
        assert (await h.post("open", _alert("db-01", "tool-1")))[0] == 200
        await fake.wait_for(lambda: cards(fake), timeout=5)
        await asyncio.sleep(0.3)  # the lost answer is settled: the rows are marked, the look due in 15 s
        (key, stored), = fake.messages.items()
        del fake.messages[key]  # Slack has not stored it yet
        assert (await h.post("open", _alert("db-01", "tool-2")))[0] == 200  # the same incident again: a redraw
        for _ in range(10):
            h.clock.advance(timedelta(seconds=1))
            h.bot.outbox.nudge()
            await asyncio.sleep(0.05)
        assert not fake.called("conversations.history") and len(parents(fake)) == 1  # no look yet, no second post
        fake.messages[key] = stored  # stored now
        await drain(h, seconds=15)
        assert len(fake.called("conversations.history")) == 1 and len(parents(fake)) == 1 and len(cards(fake)) == 1


async def test_a_lost_card_waiting_for_its_look_spends_none_of_the_channels_budget(tmp_path: Path) -> None:
    """A card whose answer was lost waits LOOK_AFTER before it is looked for; alerts to its incident meanwhile make a
    redraw and a line due every round (it was acknowledged). It spent a post of the channel's budget each round for
    nothing, ahead of another incident's card, which waited for the look."""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
        # a post a second and no burst: every post the budget allows in a round is one a wasted try would take
        from tests.test_slack_flow import Slack

        s = Slack(h, fake)
        h.bot.outbox.buckets = _Buckets({"slack": Budget(chat=(60, 1), group_chat=None, edits=(50, 10),
                                                         platform=(600, 50))})
        fake.lose_answer("chat.postMessage")
        assert (await h.post("open", _alert("db-01", "tool-1")))[0] == 200
        await fake.wait_for(lambda: cards(fake), timeout=5)
        await asyncio.sleep(0.3)  # the lost answer is settled: the rows are marked, the look due in 15 s
        acked = await s.answer(await s.command("/incident", "ack 1"))  # a redraw and a line of it, due now
        assert acked["text"] == "Acknowledged #1."
        await asyncio.sleep(1.5)  # rounds go by (the bot's clock stands: the look stays not due)
        assert (await h.post("open", _alert("app-2")))[0] == 200  # another incident, the same channel
        await fake.wait_for(lambda: len(cards(fake)) == 2, timeout=5)
        assert not fake.called("conversations.history") and len(parents(fake)) == 2


async def test_a_rate_limited_look_holds_back_only_what_it_looks_for(tmp_path: Path) -> None:
    """conversations.history has its own budget (one call a minute for some apps): its 429 paused every post and
    edit in the channel, so another incident's card waited out the minute."""
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
        h.bot.outbox.buckets = _Buckets(GENEROUS)
        fake.lose_answer("chat.postMessage")
        fake.fail("conversations.history", "ratelimited", status=429, retry_after=30)
        assert (await h.post("open", _alert("web-1")))[0] == 200
        await fake.wait_for(lambda: cards(fake), timeout=5)
        await asyncio.sleep(0.3)
        h.clock.advance(timedelta(seconds=20))
        h.bot.outbox.nudge()
        await fake.wait_for(lambda: any(c.method == "conversations.history" for c in fake.calls), timeout=5)  # a 429
        await asyncio.sleep(0.3)
        assert (await h.post("open", _alert("web-2")))[0] == 200  # another incident, the same channel
        started = time.monotonic()
        while len(cards(fake)) < 2:
            assert time.monotonic() - started < 5, "the second incident's card waited for the look's rate limit"
            h.clock.advance(timedelta(seconds=1))
            h.bot.outbox.nudge()
            await asyncio.sleep(0.1)


async def test_a_card_cut_off_by_a_crash_while_slack_answers_is_found_after_the_restart(tmp_path: Path) -> None:
    """The bot dies (SIGKILL, the machine lost) after Slack took the card and before its answer: the rows were still
    pending, so the restarted bot posted a second card, and the first stayed Firing. The rows are marked before the
    post goes, and the restarted bot looks for it first."""
    import sqlite3

    async with FakeSlack() as fake:
        answer = fake.hold("chat.postMessage")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            assert (await h.post("open", _alert("db-01")))[0] == 200
            await fake.wait_for(lambda: fake.calls and fake.calls[-1].method == "chat.postMessage", timeout=5)
            await asyncio.sleep(0.2)
            # What a crash leaves on disk now: a copy of the store, taken while Slack's answer is on its way.
            with sqlite3.connect(tmp_path / "bot.db") as live, sqlite3.connect(tmp_path / "crashed.db") as copy:
                live.backup(copy)
            answer.set()
        del fake._held["chat.postMessage"]
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'crashed.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)
            await drain(h, seconds=15)
            assert len(parents(fake)) == 1 and len(cards(fake)) == 1  # one post, found after the restart
            assert len(fake.called("conversations.history")) == 1
            assert await h.message_of(1) == cards(fake)[0]["ts"]


async def test_a_thread_line_slack_took_whose_answer_was_lost_is_not_posted_twice(tmp_path: Path) -> None:
    from tests.test_slack_flow import Slack, incident_posted

    async with FakeSlack() as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)  # no wait for Slack's budget between the lines
            s = Slack(h, fake)
            ts = await incident_posted(s)
            fake.lose_answer("chat.postMessage", when=lambda params: params.get("thread_ts") == ts)
            await s.answer(await s.command("/incident", "ack 1"))
            await fake.wait_for(lambda: thread(fake, ts), timeout=5)
            await s.answer(await s.command("/incident", "resolve 1"))
            await drain(h, seconds=15)
            assert [line.split(" by ")[0] for line in thread(fake, ts)] == ["Acknowledged", "Resolved"]
            assert len(fake.called("conversations.replies")) == 1


async def test_a_card_that_never_reached_slack_is_looked_for_then_posted(tmp_path: Path) -> None:
    """The connection drops before Slack took the card (the bot cannot tell this from a lost answer): the lookup
    finds nothing, so the card is posted; a missing card would be worse than two."""
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "", disconnect=True)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await drain(h, seconds=15)
            [card] = cards(fake)
            assert await h.message_of(1) == card["ts"] and len(fake.called("conversations.history")) == 1
            assert [r[0] for r in await row_state(h)] == ["sent"]


async def test_a_lookup_slack_refuses_posts_again_and_says_which_scope_it_needs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An app installed before the history scopes were asked for: the lookup is refused (missing_scope), so the card
    is posted again (it may show twice) rather than lost, and the log says what to do."""
    async with FakeSlack() as fake:
        fake.lose_answer("chat.postMessage")
        fake.fail("conversations.history", "missing_scope")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await drain(h, seconds=15)
            first, second = cards(fake)
            assert await h.message_of(1) == second["ts"] and [r[0] for r in await row_state(h)] == ["sent"]
    assert any("missing_scope" in r.getMessage() and "channels:history" in r.getMessage() for r in caplog.records)


async def test_a_lookup_while_slack_is_in_trouble_waits_and_posts_nothing_meanwhile(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.lose_answer("chat.postMessage")
        fake.fail("conversations.history", "service_unavailable", status=503, times=2)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await drain(h, seconds=15)
            [card] = cards(fake)
            assert await h.message_of(1) == card["ts"]
            assert [c.status for c in fake.calls if c.method == "conversations.history"] == [503, 503, 200]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_lost_new_alerts_line_is_not_folded_with_the_alerts_after_it(database: str, tmp_path: Path,
                                                                              pg_schema: str) -> None:
    """"2 new alerts" is lost on its way back; 3 more alerts arrive and the pending lines are folded before the
    bot looks for it. It is found, and the thread counts every alert once: 2, then 3."""

    def alert(tool: str) -> dict[str, str]:  # the group of fixture 03 (alertname + instance), one alert per tool
        return {"asset_name": "db-01", "signature": "DiskFull", "severity": "high", "message": "disk full",
                "tool_source": tool}

    async with FakeSlack() as fake, bot_on(database, tmp_path, pg_schema, slack_config(fake)) as h:
        h.bot.outbox.buckets = _Buckets(GENEROUS)
        assert (await h.post("open", alert("tool-0")))[0] == 200
        await fake.wait_for(lambda: cards(fake), timeout=5)
        await drain(h)
        ts = cards(fake)[0]["ts"]
        fake.lose_answer("chat.postMessage", when=lambda params: params.get("thread_ts") == ts)
        for tool in ("tool-1", "tool-2"):
            assert (await h.post("open", alert(tool)))[0] == 200
        h.clock.advance(timedelta(seconds=31))  # the new-alerts line waits 30 s to gather
        h.bot.outbox.nudge()
        await fake.wait_for(lambda: thread(fake, ts), timeout=5)
        await asyncio.sleep(0.3)  # the lost answer is settled (the rows wait to look for it)
        for tool in ("tool-3", "tool-4", "tool-5"):
            assert (await h.post("open", alert(tool)))[0] == 200
        await h.bot.outbox.compact()
        await drain(h, seconds=15)
        assert thread(fake, ts) == ["2 new alerts", "3 new alerts"]


async def test_a_notice_slack_took_whose_answer_was_lost_is_not_posted_twice(tmp_path: Path) -> None:
    from handlers.notify import notice_row

    async with FakeSlack() as fake:
        fake.lose_answer("chat.postMessage")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            async with h.bot.db.transaction() as session:
                session.add(notice_row("ops-slack", "Bob is on call now", h.clock.now()))
            h.bot.outbox.nudge()
            await drain(h, seconds=15)
            assert [m["text"] for m in cards(fake)] == ["Bob is on call now"]


async def row_state(h: Harness) -> list[tuple[str, int, str | None]]:
    async with h.bot.db.sessions() as session:
        rows = (await session.execute(select(OutboxItem).order_by(OutboxItem.id))).scalars().all()
    return [(r.status, r.attempts, r.last_error) for r in rows]


async def retried_after(h: Harness, advance: timedelta) -> None:
    """Move the clock on and wait until the row's next attempt has been made."""
    before = (await row_state(h))[0][1]
    h.clock.advance(advance)
    deadline = time.monotonic() + 5
    while (await row_state(h))[0][1] == before and (await row_state(h))[0][0] == "pending":
        assert time.monotonic() < deadline, "no new attempt"
        h.bot.outbox.nudge()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("error", "status"), [
    ("service_unavailable", 503),  # Slack down for a couple of hours
    ("invalid_auth", 200),  # the token revoked, then fixed (a restart, in real life)
])
async def test_a_platform_in_trouble_for_a_while_loses_nothing(tmp_path: Path, error: str, status: int) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", error, status=status, times=1000)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            for _ in range(9):  # 2 h 15 min, a try every 15 minutes: past the 8 tries that used to be all
                await retried_after(h, timedelta(minutes=15))
            [(state, attempts, last)] = await row_state(h)
            assert state == "pending" and attempts > 8 and error in (last or "")  # past the old 8 tries, still held
            ready = await (await h.client.get("/readyz")).json()
            metrics = await (await h.client.get("/metrics")).text()
            if error == "invalid_auth":  # says so where operators look (auth.test at start took the token)
                assert ready["adapters"]["slack"].startswith("token refused (slack chat.postMessage: invalid_auth)")
                assert 'chatops_adapter_up{adapter="slack"} 0.0' in metrics
            else:
                assert ready["adapters"]["slack"] == "on"
            fake._failures["chat.postMessage"].clear()  # back
            await drain(h, step=timedelta(minutes=1), seconds=10)
            assert len(parents(fake)) == 1 and [r[0] for r in await row_state(h)] == ["sent"]
            assert (await (await h.client.get("/readyz")).json())["adapters"]["slack"] == "on"
            assert 'chatops_adapter_up{adapter="slack"} 1.0' in await (await h.client.get("/metrics")).text()


async def test_a_failing_cards_back_off_holds_while_its_incident_keeps_hearing_alerts(tmp_path: Path) -> None:
    """Slack answers 500 to every post while another tool reports the incident each second: each new row brought the
    card's next try forward, 10 tries in 20 s where its back-off (2, 4, 8, 16 s) allows 4 or 5."""
    async with FakeSlack(rate_limit=False) as fake:
        fake.fail("chat.postMessage", "internal_error", status=500, times=1000)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            def alert(tool: str) -> dict[str, str]:
                return {"asset_name": "db-01", "signature": "DiskFull", "severity": "high", "message": "disk full",
                        "tool_source": tool}

            assert (await h.post("open", alert("tool-0")))[0] == 200
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            for second in range(1, 21):
                h.clock.advance(timedelta(seconds=1))
                assert (await h.post("open", alert(f"tool-{second}")))[0] == 200
                await asyncio.sleep(0.3)
            posts = len([c for c in fake.calls if c.method == "chat.postMessage"])
            assert 2 <= posts <= 5, posts  # at 0, 2, 6, 14 s (and 30); a loaded machine may fall behind, never ahead
            fake._failures["chat.postMessage"].clear()  # back
            await drain(h, step=timedelta(seconds=5), seconds=10)
            assert len(parents(fake)) == 1


async def test_cards_that_waited_for_the_token_go_as_soon_as_it_works_again(tmp_path: Path) -> None:
    """Slack refused the bot's token for incident #1's card; then the token worked again (a newer card went): #1's
    card still waited for its back-off (up to 5 minutes) behind the newer one. The pages that waited for the token
    went at once; now the cards and lines do too."""
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "invalid_auth", times=4)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            deadline = time.monotonic() + 5  # (its first refusal recorded)
            while (await row_state(h))[0][1] != 1:
                assert time.monotonic() < deadline, await row_state(h)
                await asyncio.sleep(0.05)
            for wait in (2, 4, 8):  # its back-off: the next try is 16 s away
                await retried_after(h, timedelta(seconds=wait))
            assert [(state, attempts) for state, attempts, _ in await row_state(h)] == [("pending", 4)]
            await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))  # the token works again
            # #2's card went, which told the bot the token works: #1's followed at once (the bot's clock held still)
            await fake.wait_for(lambda: len(parents(fake)) == 2, timeout=5)
            assert [p.split(" \u00b7 ")[2].split()[0] for p in parents(fake)] == ["#2", "#1"]
            deadline = time.monotonic() + 5  # (each row is marked sent once its post's answer is recorded)
            while [state for state, _, _ in await row_state(h)][:2] != ["sent", "sent"]:
                assert time.monotonic() < deadline, await row_state(h)
                await asyncio.sleep(0.05)


async def test_a_token_slack_refuses_shows_at_start_not_at_the_first_delivery(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        wrong = slack_config(fake).replace(fake.token, "xoxb-not-the-token")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", wrong) as h:
            ready = await (await h.client.get("/readyz")).json()
            assert ready["adapters"]["slack"].startswith("token refused (slack auth.test: invalid_auth)"), ready
            assert 'chatops_adapter_up{adapter="slack"} 0.0' in await (await h.client.get("/metrics")).text()
            assert not [c for c in fake.calls if c.method != "auth.test"]  # nothing else was tried yet


async def test_the_log_names_the_setting_that_holds_a_refused_slack_token(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The token usually comes from SLACK_BOT_TOKEN, not from app.yaml itself: the key is named, and where to look."""
    async with FakeSlack() as fake:
        wrong = slack_config(fake).replace(fake.token, "xoxb-not-the-token")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", wrong):
            pass
    [said] = [r.getMessage() for r in caplog.records if "the token was refused" in r.getMessage()]
    assert said == ("slack: the token was refused (slack auth.test: invalid_auth); messages wait until it works: fix "
                    "adapters.slack.bot_token (in app.yaml, or the variable it names)"), said


async def test_a_platform_in_trouble_is_given_up_on_after_a_day(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "service_unavailable", status=503, times=10_000)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            for _ in range(12):  # a try every three hours
                await retried_after(h, timedelta(hours=3))
                if (await row_state(h))[0][0] == "dead":
                    break
            [(state, _, last)] = await row_state(h)
            assert state == "dead" and "service_unavailable" in (last or "")
            assert h.clock.now() - T0 >= timedelta(hours=24)


async def test_rate_limits_cost_no_attempts(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "ratelimited", status=429, times=12, retry_after=30)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox._monotonic = lambda: h.clock.now().timestamp()  # Retry-After pauses on the bot's clock
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: any(c.method == "chat.postMessage" for c in fake.calls), timeout=5)
            await drain(h, step=timedelta(seconds=30), seconds=20)
            assert len(parents(fake)) == 1
            assert [c.status for c in fake.calls if c.method == "chat.postMessage"] == [429] * 12 + [200]
            assert await row_state(h) == [("sent", 0, None)]


async def test_slack_429s_are_budgets_not_losses(tmp_path: Path) -> None:
    async with FakeSlack(per_second=2, burst=1, retry_after=1) as fake:
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            h.bot.outbox.buckets = _Buckets(GENEROUS)  # let the bot overrun Slack's limit on purpose
            for n in range(5):
                body = {"asset_name": f"app-{n}", "signature": "Down", "severity": "high", "message": f"app-{n} down",
                        "tool_source": "probe"}
                assert (await h.post("open", body))[0] == 200
            await drain(h, step=timedelta(seconds=1), seconds=15)
            statuses = [c.status for c in fake.calls if c.method == "chat.postMessage"]
            assert 429 in statuses  # Slack pushed back...
            assert sorted(parents(fake)) == sorted(set(parents(fake))) and len(parents(fake)) == 5  # ...and nothing was lost or doubled


async def test_a_storm_the_platform_cannot_take_folds_into_one_redraw_and_one_line(tmp_path: Path) -> None:
    """Slack is off while 11 more alerts of a posted incident's group arrive: 11 redraws and 11 "new alert"
    lines pile up. Folding leaves one of each, the line counting all 11; when Slack is back, that is what it gets."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"

    def alert(tool: str) -> dict[str, str]:  # one group (alertname + instance), one alert per tool
        return {"asset_name": "db-01", "signature": "DiskFull", "severity": "high", "message": "disk full",
                "tool_source": tool}

    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake)) as h:  # the incident opens and is posted
            assert (await h.post("open", alert("tool-0")))[0] == 200
            await fake.wait_for(lambda: len(parents(fake)) == 1, timeout=5)
            await drain(h)
        async with running_bot(url) as h:  # Slack is off: 11 more alerts of the group
            for i in range(1, 12):
                assert (await h.post("open", alert(f"tool-{i}")))[0] == 200
            pending = [row[2:4] for row in await h.pending()]
            assert pending.count(("update", "alerts.changed")) == 11
            assert pending.count(("reply", "alerts.grouped")) == 11
            first_line_due = min(row[4] for row in await h.pending() if row[3] == "alerts.grouped")

            assert await h.bot.outbox.compact() == 10 + 10
            assert [row[2:4] for row in await h.pending()] == [("update", "alerts.changed"),
                                                               ("reply", "alerts.grouped")]
            assert (await h.outbox())[-1][4] == {"count": 11}
            assert [row[4] for row in await h.pending() if row[3] == "alerts.grouped"] == [first_line_due]
            assert await h.bot.outbox.compact() == 0  # nothing left to fold
        updates_before = len(fake.called("chat.update"))
        async with running_bot(url, slack_config(fake)) as h:  # Slack is back: one redraw, one line
            await drain(h, seconds=15, step=timedelta(seconds=5))
            assert len(fake.called("chat.update")) == updates_before + 1 and len(parents(fake)) == 1
            lines = [c.params["text"] for c in fake.called("chat.postMessage") if c.params.get("thread_ts")]
            assert lines == ["11 new alerts"], lines


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_the_delivery_loop_folds_on_its_own(database: str, tmp_path: Path, pg_schema: str) -> None:
    async with bot_on(database, tmp_path, pg_schema) as h:  # no Slack: rows pile up
        h.bot.outbox.compact_seconds = 0.0  # every round (30 s in a running bot)
        for i in range(6):
            await h.post("open", {"asset_name": "db-01", "signature": "DiskFull", "severity": "high",
                                  "message": "disk full", "tool_source": f"tool-{i}"})
        for _ in range(100):
            if len(await h.pending()) == 3:
                break
            await asyncio.sleep(0.05)
        assert [row[2:4] for row in await h.pending()] == [
            ("post", "incident.opened"), ("update", "alerts.changed"), ("reply", "alerts.grouped")]


async def test_folding_redraws_keeps_a_persons_redraw_from_counting_as_routine(tmp_path: Path) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:  # no Slack: rows wait
        await h.post("open", {"asset_name": "db-01", "signature": "DiskFull", "severity": "high",
                              "message": "disk full", "tool_source": "t"})
        [incident] = await h.incidents()
        async with h.bot.db.transaction() as session:
            for event in ("alerts.changed", "incident.changed", "alerts.changed"):  # alert traffic, an ack, traffic
                session.add(OutboxItem(created_at=T0, due_at=T0, incident_id=incident.id, channel="ops-slack",
                                       kind="update", event=event, details={}))
        assert await h.bot.outbox.compact(["ops-slack"]) == 2
        assert [row[2:4] for row in await h.pending() if row[2] == "update"] == [("update", "incident.changed")]


def test_a_line_waiting_after_a_failure_or_a_rate_limit_holds_back_the_ones_after_it() -> None:
    from handlers.outbox import _thread_lines

    def line(n: int, event: str, due: timedelta, attempts: int = 0, **details: object) -> OutboxItem:
        return OutboxItem(id=n, created_at=T0, due_at=T0 + due, incident_id=1, channel="ops-slack", kind="reply",
                          event=event, details={"name": "Alice", **details}, attempts=attempts)

    ack, res = line(1, "incident.acknowledged", timedelta(seconds=30)), line(2, "incident.resolved", timedelta(0))
    assert _thread_lines([ack, res], T0) == []  # the ack waits out a 429 (no attempt spent): the resolve waits too
    failed = line(1, "incident.acknowledged", timedelta(seconds=4), attempts=2)
    assert _thread_lines([failed, res], T0) == []
    burst = line(1, "alerts.grouped", timedelta(seconds=30), count=3)  # waits on purpose to gather a burst...
    # ...but a line that goes now takes the burst before it along, first: the thread keeps the order of events
    assert [text for _, text in _thread_lines([burst, res], T0)] == ["3 new alerts", "Resolved by Alice"]
    after = line(3, "alerts.grouped", timedelta(seconds=30), count=2)  # came after the resolve: it still waits
    assert [(text, [r.id for r in rows]) for rows, text in _thread_lines([burst, res, after], T0)] == [
        ("3 new alerts", [1]), ("Resolved by Alice", [2])]
    assert [text for _, text in _thread_lines([after], T0 + timedelta(seconds=31))] == ["2 new alerts"]
    later = T0 + timedelta(seconds=31)
    assert [text.split(" by ")[0] for _, text in _thread_lines([ack, res], later)] == ["Acknowledged", "Resolved"]


def test_merged_resolved_lines_name_the_sources_that_sent_them() -> None:
    from handlers.outbox import _thread_lines

    def line(n: int, count: int, source: str) -> OutboxItem:
        return OutboxItem(id=n, created_at=T0, due_at=T0, incident_id=1, channel="ops-slack", kind="reply",
                          event="alerts.resolved", details={"count": count, "source": source})

    assert [text for _, text in _thread_lines([line(1, 2, "am"), line(2, 1, "am")], T0)] == ["3 alerts resolved by am"]
    assert [text for _, text in _thread_lines([line(1, 2, "am"), line(2, 1, "grafana")], T0)] == [
        "3 alerts resolved by am, grafana"]


async def test_a_platform_that_never_answered_ends_the_attempt() -> None:
    """Telegram took the message and did not answer in time: the attempt stops there, for a page and a direct
    message alike (it may have arrived; sending it again, on Telegram or on Slack, would come twice)."""
    from bot.chat import DeliveryError, Outbound
    from bot.config import Person
    from handlers.paging import send_page

    class Stub:
        def __init__(self, platform: str, error: DeliveryError | None) -> None:
            self.platform, self.error, self.sent = platform, error, 0

        async def page(self, user_id: str, message: Outbound) -> None:
            self.sent += 1
            if self.error is not None:
                raise self.error

    bob = Person(id="bob", name="Bob", telegram=222222, slack="U02BOB")
    message = Outbound("text", {"text": "hi"}, text="hi")
    adapters = {"telegram": Stub("telegram", DeliveryError("telegram sendMessage: Timed out", unknown=True)),
                "slack": Stub("slack", None)}
    attempt = await send_page(adapters, bob, message, ["telegram", "slack"])  # type: ignore[arg-type]
    assert attempt.platform is None and attempt.unknown == "telegram"
    assert (adapters["telegram"].sent, adapters["slack"].sent) == (1, 0)
    assert attempt.problem(bob, adapters, what="message").startswith(  # type: ignore[arg-type]
        "Telegram took it but never confirmed it, so the message may have arrived; it is not sent again, so as not "
        "to send the message twice (")


async def test_metrics_show_how_long_a_delivery_has_been_waiting(tmp_path: Path) -> None:
    """A leader that hangs (SIGSTOP, a stalled VM) holds its lock, and every card and page waited unseen: no metric
    said so. Rows for a platform that is off wait on purpose and do not count."""
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'off.db'}") as h:  # no chat adapter on
        await h.post("open", _alert("db-01"))
        h.clock.advance(timedelta(minutes=5))
        assert "chatops_outbox_oldest_due_seconds 0.0" in await (await h.client.get("/metrics")).text()
    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
        async def hung() -> bool:
            return False  # this replica does not deliver, and nobody else does

        h.bot.outbox.may_deliver = hung
        await h.post("open", _alert("db-01"))
        h.clock.advance(timedelta(minutes=2))
        assert "chatops_outbox_oldest_due_seconds 120.0" in await (await h.client.get("/metrics")).text()
        assert not cards(fake)


def _busy(tmp_path: Path) -> Exception:
    """A write SQLite turned away for another connection's write transaction, as SQLAlchemy raises it."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        try:
            other.execute("CREATE TABLE t (x)")
        except sqlite3.OperationalError as exc:
            return OperationalError("UPDATE outbox ...", {}, exc)
        raise AssertionError("the database was not locked")
    finally:
        holder.close()
        other.close()


@pytest.mark.parametrize("what", ["card", "line"])
async def test_a_post_the_platform_took_whose_recording_failed_is_recorded_not_sent_again(
        both: Both, what: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Telegram took the card (or a thread line), and the transaction recording it found the database locked: the
    rows stayed pending and the next round sent it again. The group had two cards, the bot tracked only the second,
    and the first stayed Firing with live buttons for good. Now the outcome is kept and recorded once the database
    answers again, and nothing is sent twice."""
    b = both
    if what == "line":
        await posted_on_both(b)
    adapter = b.h.bot.adapters["telegram"]
    db, real_transaction = b.h.bot.db, b.h.bot.db.transaction
    took, failures = asyncio.Event(), []

    def transaction() -> Any:
        task = asyncio.current_task()
        if took.is_set() and task is not None and task.get_name() == "outbox-telegram" and not failures:
            failures.append(1)  # the transaction after the platform's answer: the one recording it
            raise _busy(tmp_path)
        return real_transaction()

    method = "send" if what == "card" else "reply"
    real_call = getattr(adapter, method)

    async def call(*args: Any, **kwargs: Any) -> Any:
        answer = await real_call(*args, **kwargs)
        took.set()
        return answer

    setattr(adapter, method, call)
    db.transaction = transaction  # type: ignore[method-assign]
    if what == "card":
        await b.h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    else:
        await b.slack.answer(await b.slack.command("/incident", "ack 1"))

    async def telegram_rows() -> list[tuple[str, str]]:
        async with b.h.bot.db.sessions() as session:
            return [(r.event, r.status) for r in (await session.execute(select(OutboxItem).where(
                OutboxItem.channel == "ops-telegram").order_by(OutboxItem.id))).scalars().all()]

    deadline = time.monotonic() + 10
    while not failures or any(status == "pending" for _, status in await telegram_rows()):
        assert time.monotonic() < deadline, f"still pending: {await telegram_rows()}"
        await asyncio.sleep(0.1)
    for _ in range(3):  # a few more rounds: nothing goes again
        b.h.bot.outbox.nudge()
        await asyncio.sleep(0.3)
    assert all(status == "sent" for _, status in await telegram_rows())
    sent = [c.params for c in b.tg.called("sendMessage") if c.params["chat_id"] == GROUP]
    assert len([p for p in sent if not p.get("reply_parameters")]) == 1  # one card, not two
    [card] = [mid for (chat, mid), m in b.tg.messages.items() if chat == GROUP and not m.get("reply_to_message")]
    assert await b.h.message_of(1, "ops-telegram") == str(card)  # the one the bot tracks (and redraws)
    if what == "line":
        assert len([p for p in sent if "Acknowledged by Alice" in p["text"]]) == 1  # one line, not two
    said = [r for r in caplog.records if "recording it failed" in r.getMessage()]
    went = ("the card of #1 went out in ops-telegram" if what == "card"
            else "the reply incident.acknowledged about #1 in ops-telegram went out")
    assert [r.getMessage() for r in said] == [
        f"outbox: {went}, but recording it failed (OperationalError: the database stayed locked for "
        f"{SQLITE_BUSY_TIMEOUT_MS / 1000:g} s (another process's write transaction: a chatops command, or one "
        "stuck?)); trying again in 1 s"]


async def test_a_round_that_finds_the_store_busy_says_so_in_a_line_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another writer held the store (a chatops command beside the bot on SQLite): the outbox's round and the timers'
    beat each logged an ERROR with a 40-line traceback, as for a bug. They say it in one warning line now, as the
    periodic jobs do."""
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        busy = _busy(tmp_path)
        why = (f"OperationalError: the database stayed locked for {SQLITE_BUSY_TIMEOUT_MS / 1000:g} s (another "
               "process's write transaction: a chatops command, or one stuck?)")
        outbox_round, timers_round = h.bot.outbox._round, h.bot.timers._round
        failed: list[str] = []

        async def busy_outbox(key: str | None, *, wait: bool = False) -> int:
            if "outbox" not in failed:
                failed.append("outbox")
                raise busy
            return await outbox_round(key, wait=wait)

        async def busy_timers() -> Any:
            if "timers" not in failed:
                failed.append("timers")
                raise busy
            return await timers_round()

        async def peek() -> Any:
            raise busy  # (a beat whose peek fails claims anyway)

        h.bot.outbox._round, h.bot.timers._round = busy_outbox, busy_timers  # type: ignore[method-assign]
        h.bot.timers._peek = peek  # type: ignore[method-assign]
        h.bot.outbox.nudge()
        await h.bot.timers.tick()
        deadline = time.monotonic() + 5
        while len(failed) < 2:
            assert time.monotonic() < deadline, failed
            h.bot.outbox.nudge()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
    said = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if "busy" in r.getMessage()]
    assert sorted(said) == [
        ("WARNING", f"outbox round found the store busy ({why}); retrying in 0.5s", None),
        ("WARNING", f"timer tick failed; retrying at the next beat (the store was busy: {why})", None)]


async def test_the_only_replica_on_sqlite_leads_delivery_in_its_metrics(tmp_path: Path) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        assert 'chatops_leading{job="outbox"} 1.0' in await (await h.client.get("/metrics")).text()


async def test_a_telegram_on_webhooks_has_no_polling_job_in_the_metrics(tmp_path: Path) -> None:
    """chatops_leading{job="telegram-polling"} said 1 where nothing polls (Telegram's default mode is webhook)."""
    extra = ("adapters:\n  telegram: {bot_token: '123:abc', webhook_secret: s3cret-token-for-tests, "
             "api_url: 'http://127.0.0.1:9/bot'}\n")
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra) as h:
        metrics = await (await h.client.get("/metrics")).text()
        assert 'chatops_leading{job="outbox"} 1.0' in metrics and 'job="telegram-polling"' not in metrics
