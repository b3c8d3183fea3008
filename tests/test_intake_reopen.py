"""Reopening an incident whose alert moved on to a later one, end to end (Alertmanager, Slack).

A person resolves an incident while its alert still fires; Alertmanager's next re-send of that alert (every repeat
interval) opens a new incident, linked to the first, and the alert's newest record is there. Someone then reopens the
first incident: refused while the later one holds the alert (both would escalate for it). Once the later one is
resolved, the first reopens; it still counts the alert firing, and when the source says the alert is over, it hears it
too, and ends as any incident whose alerts all ended does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from storage.models import AuditEvent
from tests.botkit import Harness, bot_on, fixture
from tests.fake_slack import FakeSlack
from tests.test_slack_flow import Slack, button_values, slack_config, text_of

FIRING = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
RESOLVED = {**FIRING, "status": "resolved",
            "alerts": [{**FIRING["alerts"][0], "status": "resolved", "endsAt": "2026-11-24T08:30:00Z"}]}
REPEAT_INTERVAL = timedelta(hours=4)  # Alertmanager's default repeat_interval


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake)) as h:
        yield Slack(h, fake)


async def _audit(h: Harness, incident_id: int, action: str) -> AuditEvent:
    async with h.bot.db.sessions() as session:
        return (await session.execute(select(AuditEvent).where(AuditEvent.incident_id == incident_id,
                                                               AuditEvent.action == action)
                                      .order_by(AuditEvent.seq.desc()).limit(1))).scalar_one()


async def _perform(h: Harness, incident_id: int, action: str) -> None:
    """`action` by Alice, as her button or command does it."""
    from bot.model import Actor
    from handlers.incident_actions import perform

    result = await perform(db=h.bot.db, audit=h.bot.audit, incident_id=incident_id, action=action,
                           actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())
    assert result.changed, result.message


async def _posted(s: Slack, incident_id: int) -> str:
    """The Slack ts of the incident's message, once the outbox posted it."""
    await s.fake.wait_for(lambda: len(s.posts()) >= incident_id, timeout=5)
    for _ in range(100):  # the message row commits just after Slack's answer
        try:
            return await s.h.message_of(incident_id)
        except Exception:
            await asyncio.sleep(0.02)
    return await s.h.message_of(incident_id)


async def _alertmanager(s: Slack, body: dict[str, Any]) -> list[tuple[int, str]]:
    status, answer, _ = await s.h.post("am", body)
    assert status == 200, answer
    return [(r["incident"], r["change"]) for r in answer["results"]]


async def _click(s: Slack, value: str, ts: str, said: str) -> None:
    _, _, key = await s.click(value, ts)
    assert said in (await s.answer(key))["text"]


async def _resolved_then_resent(s: Slack) -> str:
    """#1 opens, Alice resolves it while its alert fires, and the repeat interval's re-send opens #2."""
    assert await _alertmanager(s, FIRING) == [(1, "opened")]
    ts1 = await _posted(s, 1)
    await _click(s, "res:1", ts1, "Resolved #1.")
    s.h.clock.advance(REPEAT_INTERVAL)
    assert await _alertmanager(s, FIRING) == [(2, "opened")]
    await _posted(s, 2)
    return ts1


async def test_a_reopen_while_its_alert_fires_in_the_later_incident_is_refused_naming_it(slack: Slack) -> None:
    """Reopened while #2 held its alert, #1 ran its escalation again beside #2's: the on-call person was paged twice
    for one alert, and acknowledging #2 did not stop #1's next steps. The reopen is refused, saying where the alert
    is; once #2 is over (the source ended the alert), #1 reopens as any resolved incident does."""
    s = slack
    ts1 = await _resolved_then_resent(s)
    await _click(s, "ack:2", await s.h.message_of(2), "Acknowledged #2.")
    await _click(s, "reo:1", ts1, "#1 is not reopened: its alert fires in #2 (acknowledged by Alice) now. Follow it "
                                  "there; reopening #1 as well would page twice for the same alert. #1 can be reopened "
                                  "once #2 is resolved.")
    assert [(i.id, i.status) for i in await s.h.incidents()] == [(1, "resolved"), (2, "acknowledged")]
    assert "incident.reopened" not in await s.h.actions(1)

    s.h.clock.advance(timedelta(minutes=30))
    assert await _alertmanager(s, RESOLVED) == [(2, "resolved")]
    assert [a.status for a in await s.h.alerts(1)] == ["resolved"]  # (counted firing in #1 until the source said)
    ended = await _audit(s.h, 1, "alert.resolved")
    assert (ended.actor_platform, ended.actor_user_id, ended.details["current_incident"]) == ("source", "am", 2)
    await _click(s, "reo:1", ts1, "Reopened #1.")
    [first, second] = await s.h.incidents()
    assert (first.status, first.firing_count) == ("triggered", 0)
    assert (second.status, second.firing_count) == ("resolved", 0)


async def test_an_alert_that_ended_in_the_later_incident_is_not_counted_firing_when_the_first_reopens(
        slack: Slack) -> None:
    """The source's "resolved" came before the reopen: the reopened #1 said "1 of 1 still firing" and waited for a
    "resolved" the source had sent already, to #2."""
    s = slack
    ts1 = await _resolved_then_resent(s)
    assert await _alertmanager(s, RESOLVED) == [(2, "resolved")]
    await _click(s, "reo:1", ts1, "Reopened #1.")
    [first, second] = await s.h.incidents()
    assert (first.status, first.firing_count) == ("triggered", 0)  # a person's to resolve: nothing left to hear of
    assert (second.status, second.firing_count) == ("resolved", 0)
    await s.fake.wait_for(lambda: button_values(s.updates(ts1)[-1]) == ["ack:1", "res:1"], timeout=5)
    assert "still firing" not in text_of(s.updates(ts1)[-1])


@pytest.mark.parametrize("later", [timedelta(minutes=5), REPEAT_INTERVAL])
async def test_a_resend_after_the_later_incident_was_resolved_too_joins_the_reopened_one(
        slack: Slack, later: timedelta) -> None:
    """#2 resolved by a person as well, then #1 reopened. The next re-send of the alert, which #1 holds, was grouped
    into #1 as a second copy of it, and the whole notification failed (500, nothing stored) at every re-send and
    retry; or, past grouping.window, it opened a third incident, and #1 was left waiting again."""
    s = slack
    ts1 = await _resolved_then_resent(s)
    await _click(s, "res:2", await s.h.message_of(2), "Resolved #2.")
    await _click(s, "reo:1", ts1, "Reopened #1.")
    s.h.clock.advance(later)
    assert await _alertmanager(s, FIRING) == [(1, "resent")]
    assert [(i.status, i.firing_count) for i in await s.h.incidents()] == [("triggered", 1), ("resolved", 1)]
    assert await _alertmanager(s, RESOLVED) == [(1, "resolved")]
    assert [(i.status, i.firing_count) for i in await s.h.incidents()] == [("resolved", 0), ("resolved", 0)]
    assert [a.status for i in (1, 2) for a in await s.h.alerts(i)] == ["resolved", "resolved"]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_sender_s_events_in_one_delivery_end_the_alert_in_the_incident_a_person_resolved(
        tmp_path: Path, pg_schema: str, database: str) -> None:
    """A generic sender posts its events in order: the alert fires again (opening #2, #1 being resolved by a person)
    and ends, in one delivery. #1 still counted it firing, and reopened it would have waited for good."""
    down = {"asset_name": "db-5", "signature": "Down", "severity": "critical", "message": "down", "tool_source": "x"}
    async with bot_on(database, tmp_path, pg_schema) as h:
        await h.post("open", down)
        await _perform(h, 1, "resolve")
        status, answer, _ = await h.post("open", [down, {**down, "status": "resolved"}])
        assert status == 200, answer
        assert [(r["incident"], r["change"]) for r in answer["results"]] == [(2, "opened"), (2, "resolved")]
        assert [a.status for i in (1, 2) for a in await h.alerts(i)] == ["resolved", "resolved"]
        assert (await _audit(h, 1, "alert.resolved")).details["current_incident"] == 2  # opened in that delivery
        await _perform(h, 1, "reopen")
        assert [(i.status, i.firing_count) for i in await h.incidents()] == [("triggered", 0), ("resolved", 0)]

