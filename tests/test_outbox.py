"""The outbox delivers once, after restarts and failures, and gives up visibly when it must."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from datetime import timedelta
from pathlib import Path

import pytest

from bot.cli import main as cli
from handlers.outbox import Budget, _Buckets
from tests.botkit import Harness, bot_on, fixture, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import slack_config

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


async def test_a_refusal_that_cannot_succeed_becomes_a_dead_letter(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "channel_not_found")
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
        assert "slack chat.postMessage: channel_not_found" in listing
        assert "totals: dead 1" in listing


async def test_server_errors_are_retried_with_back_off_and_then_delivered_once(tmp_path: Path) -> None:
    async with FakeSlack() as fake:
        fake.fail("chat.postMessage", "internal_error", status=500, times=2)
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", slack_config(fake)) as h:
            await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
            await fake.wait_for(lambda: len(fake.calls) >= 1, timeout=5)
            await asyncio.sleep(0.3)
            assert parents(fake) == [] and len(fake.calls) == 1  # the retry waits for its back-off (2 s)
            [(_, _, _, _, due, error)] = await h.pending()
            assert error and "internal_error" in error and due == (h.clock.now() + timedelta(seconds=2)).isoformat()
            await drain(h)
            assert len(parents(fake)) == 1 and [c.status for c in fake.calls if c.method == "chat.postMessage"] == [500, 500, 200]


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
            assert pending.count(("update", "incident.changed")) == 11
            assert pending.count(("reply", "alerts.grouped")) == 11
            first_line_due = min(row[4] for row in await h.pending() if row[3] == "alerts.grouped")

            assert await h.bot.outbox.compact() == 10 + 10
            assert [row[2:4] for row in await h.pending()] == [("update", "incident.changed"),
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
            ("post", "incident.opened"), ("update", "incident.changed"), ("reply", "alerts.grouped")]
