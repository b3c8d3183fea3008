"""An alert storm costs chat calls in proportion to incidents, not alerts: alert traffic redraws an incident's card at
most once per refresh interval (handlers/outbox.py REFRESH, 30 s), with the incident as it is when it goes, while a
state change (a click, the source resolving it) redraws it at once.

The real bot (intake, outbox worker, dispatcher) against the fake Slack Web API, on a clock the test moves.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from handlers.outbox import Budget, _Buckets
from storage.models import OutboxItem
from tests.botkit import T0, Harness, bot_on, running_bot
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, button_values, slack_config, text_of

GENEROUS = {"slack": Budget(chat=(6000, 100), group_chat=None, edits=(6000, 100), platform=(60000, 500))}
GROUP = '{}:{alertname="Storm"}'


def notification(*pods: int, status: str = "firing", severity: str = "critical", team: str = "web"
                 ) -> dict[str, Any]:
    """An Alertmanager notification of the Storm group carrying the alerts of these pods (team dba: routed to the
    Slack and the Telegram channel, else to Slack's)."""
    labels = {"alertname": "Storm", "severity": severity, "team": team}
    alerts = [{"status": status, "labels": {**labels, "pod": f"p{pod}"},
               "annotations": {"summary": "Storm"}, "startsAt": "2026-11-24T03:59:00Z",
               "endsAt": "2026-11-24T04:30:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
               "generatorURL": "", "fingerprint": f"storm{pod:06d}"} for pod in pods]
    return {"receiver": "bot", "status": status, "alerts": alerts, "groupLabels": {"alertname": "Storm"},
            "commonLabels": {"alertname": "Storm"}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "version": "4", "groupKey": GROUP, "truncatedAlerts": 0}


def fast(h: Harness) -> None:
    """No budget holds a call back (what is counted is what the outbox chose to send), and the delivery loop does
    not pause between rounds (a simulated storm of many seconds runs in a few)."""
    h.bot.outbox.buckets = _Buckets(GENEROUS)
    h.bot.outbox.min_interval = 0.0


async def settle(h: Harness) -> None:
    """Let the outbox send everything due on the bot's clock now (rows due later wait)."""
    for _ in range(500):
        async with h.bot.db.sessions() as session:
            due = (await session.execute(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.status == "pending", OutboxItem.due_at <= h.clock.now()))).scalar_one()
        if not due:
            return
        h.bot.outbox.nudge()
        await asyncio.sleep(0.02)
    raise AssertionError(f"still due: {await h.pending()}")


async def alert(h: Harness, pod: int, *, severity: str = "critical", team: str = "web") -> None:
    result, _, _ = await h.post("am", notification(pod, severity=severity, team=team))
    assert result == 200
    await settle(h)


def card(fake: FakeSlack) -> dict[str, Any]:
    """The incident's parent message as it was posted."""
    [post] = [c.params for c in fake.called("chat.postMessage") if not c.params.get("thread_ts")]
    return post


def updates(fake: FakeSlack) -> list[str]:
    return [text_of(c.params) for c in fake.called("chat.update")]


def lines(fake: FakeSlack) -> list[str]:
    return [c.params["text"] for c in fake.called("chat.postMessage") if c.params.get("thread_ts")]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_an_alert_a_second_for_a_minute_redraws_the_card_every_30_s_and_draws_the_final_count(
        database: str, tmp_path: Path, pg_schema: str) -> None:
    """Before: 1 post and 49 chat.update for 50 alerts in 50 s (one per alert notification)."""
    async with FakeSlack(rate_limit=False) as fake, bot_on(database, tmp_path, pg_schema, slack_config(fake)) as h:
        fast(h)
        await alert(h, 0)  # the incident opens at T0 and is posted
        assert "1 alert" in text_of(card(fake)) and not updates(fake)
        for pod in range(1, 50):  # one more alert a second, for 49 s
            h.clock.advance(timedelta(seconds=1))
            await alert(h, pod)
            # (the 30th second: 30 s after the post; the thread's "N new alerts" lines go every 30 s too)
            assert len(updates(fake)) == (1 if pod >= 30 else 0), (pod, updates(fake))
        assert "31 alerts" in updates(fake)[0]  # what the incident was when the redraw went
        for _ in range(11):  # the storm is over; the count waits for its turn, 30 s after the last redraw
            h.clock.advance(timedelta(seconds=1))
            await settle(h)
        assert h.clock.now() == T0 + timedelta(seconds=60)
        assert len(updates(fake)) == 2 and "50 alerts" in updates(fake)[-1]  # nothing lost: the final count
        h.clock.advance(timedelta(seconds=60))
        await settle(h)
        assert len(updates(fake)) == 2  # and nothing more to redraw
        # (the thread's "N new alerts" lines, gathered every 30 s as before, count every alert too)
        assert len(lines(fake)) == 2 and sum(int(line.split()[0]) for line in lines(fake)) == 49, lines(fake)


async def test_two_alerts_a_second_for_90_s_cost_a_redraw_per_30_s(tmp_path: Path) -> None:
    """The reviewer's second storm: before, 84 chat.update in 90 s (58 in the worst minute)."""
    async with FakeSlack(rate_limit=False) as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                                slack_config(fake)) as h:
        fast(h)
        await alert(h, 0)
        at: list[float] = []  # when each redraw went, in seconds after the post
        for pod in range(1, 180):
            h.clock.advance(timedelta(seconds=0.5))
            before = len(updates(fake))
            await alert(h, pod)
            at += [(h.clock.now() - T0).total_seconds()] * (len(updates(fake)) - before)
        for _ in range(60):
            h.clock.advance(timedelta(seconds=0.5))
            await settle(h)
        assert at == [30.0, 60.0] and len(updates(fake)) == 3 and "180 alerts" in updates(fake)[-1]


async def test_an_ack_and_the_sources_resolution_during_a_storm_redraw_at_once(tmp_path: Path) -> None:
    async with FakeSlack(rate_limit=False) as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                                slack_config(fake)) as h:
        fast(h)
        s = Slack(h, fake)
        await alert(h, 0)
        ts = await h.message_of(1)
        for pod in range(1, 11):
            h.clock.advance(timedelta(seconds=1))
            await alert(h, pod)
        assert not updates(fake)  # the storm's redraws wait for their 30 s
        ack = next(v for v in button_values(card(fake), tagged=True) if v.startswith("ack:"))
        status, _, _ = await s.click(ack, ts)  # 10 s into the storm: redrawn now, not at 30 s
        assert status == 200
        await fake.wait_for(lambda: updates(fake), timeout=5)
        [acked] = updates(fake)
        assert "Acknowledged" in acked and "11 alerts" in acked
        for pod in range(11, 21):  # the storm goes on: its redraws wait 30 s after the ack's
            h.clock.advance(timedelta(seconds=1))
            await alert(h, pod)
        assert len(updates(fake)) == 1
        h.clock.advance(timedelta(seconds=1))
        result, _, _ = await h.post("am", notification(*range(21), status="resolved"))  # 21 s in: resolved now
        assert result == 200
        await settle(h)
        assert len(updates(fake)) == 2 and "Resolved" in updates(fake)[-1] and "21 alerts" in updates(fake)[-1]


async def test_a_more_severe_alert_during_a_storm_redraws_at_once(tmp_path: Path) -> None:
    async with FakeSlack(rate_limit=False) as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                                slack_config(fake)) as h:
        fast(h)
        await alert(h, 0, severity="warning")
        for pod in range(1, 6):
            h.clock.advance(timedelta(seconds=1))
            await alert(h, pod, severity="warning")
        assert not updates(fake) and "Medium" in text_of(card(fake))
        h.clock.advance(timedelta(seconds=1))
        await alert(h, 6)  # critical, 6 s in
        [raised] = updates(fake)
        assert "Critical" in raised and "7 alerts" in raised


async def test_a_waiting_redraw_goes_after_a_restart(tmp_path: Path) -> None:
    """The wait is in the outbox rows (due at the end of the interval), not in the process: a redraw held when the
    bot stopped goes after the next start, on time, with the incident as it is then."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack(rate_limit=False) as fake:
        async with running_bot(url, slack_config(fake)) as h:
            clock = h.clock
            fast(h)
            await alert(h, 0)
            for pod in range(1, 6):
                clock.advance(timedelta(seconds=1))
                await alert(h, pod)
            assert not updates(fake)
        async with running_bot(url, slack_config(fake), clock=clock) as h:
            fast(h)
            await settle(h)
            clock.advance(timedelta(seconds=5))
            h.bot.outbox.nudge()
            await asyncio.sleep(0.3)
            await settle(h)
            assert not updates(fake)  # 10 s after the post: still waiting
            clock.set(T0 + timedelta(seconds=30))
            await settle(h)
            assert len(updates(fake)) == 1 and "6 alerts" in updates(fake)[0]


async def test_telegram_cards_are_redrawn_for_a_storm_every_30_s_as_slacks_are(tmp_path: Path) -> None:
    """The wait is the outbox's, for every platform's card: in a Telegram group an edit spends the group's 20
    messages a minute, which a storm's redraws took from the thread lines."""
    from tests.fake_telegram import FakeTelegram
    from tests.test_telegram_flow import GROUP as TG_GROUP, TG_SECRET

    async with FakeSlack(rate_limit=False) as fake, FakeTelegram() as tg:
        extra = slack_config(fake) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                      f"api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra) as h:
            fast(h)
            h.bot.outbox.buckets = _Buckets({**GENEROUS, "telegram": GENEROUS["slack"]})
            await alert(h, 0, team="dba")
            [tg_card] = [c.params for c in tg.called("sendMessage") if c.params["chat_id"] == TG_GROUP]

            def tg_edits() -> list[str]:
                return [str(c.params["text"]) for c in tg.called("editMessageText") if c.params["chat_id"] == TG_GROUP]

            for pod in range(1, 40):
                h.clock.advance(timedelta(seconds=1))
                await alert(h, pod, team="dba")
                assert len(tg_edits()) == len(updates(fake)) == (1 if pod >= 30 else 0), pod
            h.clock.advance(timedelta(seconds=30))
            await settle(h)
            assert len(tg_edits()) == len(updates(fake)) == 2
            assert "40 alerts" in tg_edits()[-1] and "40 alerts" in updates(fake)[-1] and "#1" in tg_card["text"]


async def test_a_redraw_time_ahead_of_the_clock_holds_nothing(tmp_path: Path) -> None:
    """A message redrawn at a time ahead of this clock (a replica whose clock ran ahead, a clock set back): its alert
    traffic was held 30 s, then 30 s again, round after round, until the clock caught up, and the card kept its
    old count. It is redrawn at once, and from then on held from the time of that redraw."""
    from sqlalchemy import update

    from storage.models import IncidentMessage

    async with FakeSlack(rate_limit=False) as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                                                slack_config(fake)) as h:
        fast(h)
        await alert(h, 0)
        async with h.bot.db.transaction() as session:
            await session.execute(update(IncidentMessage).values(updated_at=h.clock.now() + timedelta(minutes=5)))
        h.clock.advance(timedelta(seconds=1))
        await alert(h, 1)
        assert len(updates(fake)) == 1 and "2 alerts" in updates(fake)[0], updates(fake)
        h.clock.advance(timedelta(seconds=1))
        await alert(h, 2)
        assert len(updates(fake)) == 1  # held again, 30 s from that redraw
        for _ in range(30):
            h.clock.advance(timedelta(seconds=1))
            await settle(h)
        assert len(updates(fake)) == 2 and "3 alerts" in updates(fake)[-1], updates(fake)
