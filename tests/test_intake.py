"""Alert intake through the real HTTP endpoint: captured payloads become the right incidents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from storage.models import AlertRecord, AuditEvent, Delivery, Incident
from tests.botkit import Harness, bot_on, fixture


@pytest.fixture(params=["sqlite", "postgres"])
async def h(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Harness]:
    async with bot_on(request.param, tmp_path, pg_schema) as harness:
        yield harness


@pytest.mark.parametrize("resolved_first", [True, False])
async def test_an_alert_resolving_while_another_of_its_group_starts_firing_keeps_the_incident_open(
        h: Harness, resolved_first: bool) -> None:
    """Alertmanager sorts a group's alerts by labels: the one resolving may come first in the notification that
    brings the new one firing. The incident resolved itself there, and a second one opened (a new card, and its
    escalation all over again) although the group never stopped firing."""
    first = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    old, new = first["alerts"]
    first["alerts"] = [old]
    assert (await h.post("am", json.dumps(first)))[0] == 200
    then = {**first, "alerts": [{**old, "status": "resolved", "endsAt": "2026-11-24T04:05:00Z"}, new]}
    await still_open_after(h, then, resolved_first, {old["fingerprint"]: "alert_resolved",
                                                     new["fingerprint"]: "grouped"})


async def still_open_after(h: Harness, then: dict[str, Any], resolved_first: bool, changes: dict[str, str]) -> None:
    """`then`, a notification whose first alert resolves (the other first, unless `resolved_first`), answered with
    `changes` by fingerprint, leaves the group's one incident open, with one of its two alerts firing."""
    if not resolved_first:
        then["alerts"].reverse()
    status, body, _ = await h.post("am", json.dumps(then))
    assert status == 200
    assert {r["fingerprint"]: r["change"] for r in body["results"]} == changes
    [incident] = await h.incidents()
    assert (incident.status, incident.alert_count, incident.firing_count) == ("triggered", 2, 1)
    assert "incident.resolved" not in await h.actions(incident.id)


@pytest.mark.parametrize("resolved_first", [True, False])
async def test_an_alert_firing_again_while_the_last_other_one_resolves_keeps_the_incident_open(
        h: Harness, resolved_first: bool) -> None:
    """A group of two: the first resolves (the second fires on), then a notification brings the first firing again and
    the second resolved. The first's record said "resolved" from the notification before, and was taken for one that
    ended in this one: with the second's resolve read first, the incident resolved itself and the first opened a new
    one, paging again, although the group never stopped firing."""
    first = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    one, two = first["alerts"]
    assert (await h.post("am", json.dumps(first)))[0] == 200
    ended = {**one, "status": "resolved", "endsAt": "2026-11-24T04:05:00Z"}
    assert (await h.post("am", json.dumps({**first, "alerts": [ended, two]})))[0] == 200
    then = {**first, "alerts": [{**two, "status": "resolved", "endsAt": "2026-11-24T04:06:00Z"}, one]}
    await still_open_after(h, then, resolved_first, {one["fingerprint"]: "refired", two["fingerprint"]: "alert_resolved"})


async def test_alertmanager_captures_group_resolve_and_route(h: Harness) -> None:
    status, body, _ = await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    assert status == 200
    assert [r["change"] for r in body["results"]] == ["opened", "grouped"]
    [inc] = await h.incidents()
    assert (inc.status, inc.severity, inc.alert_count, inc.firing_count) == ("triggered", "critical", 2, 2)
    assert inc.title == "Disk /var 97% full on db-01"
    assert inc.sources == ["am"] and inc.channels == ["ops-slack", "ops-telegram"]  # team=dba route
    assert inc.critical_asset and inc.priority == 90 + 2 + 20  # one duplicate, a critical asset
    assert inc.links["alertmanager"] == "http://vm:19093"
    # the group's silence in Alertmanager, as its own templates link it: the notification's common labels
    assert inc.links["silence"] == ("http://vm:19093/#/silences/new?filter=%7Balertname%3D%22DiskFull%22%2C"
                                    "cluster%3D%22prod-eu%22%2Cjob%3D%22node%22%2Cseverity%3D%22critical%22%2C"
                                    "team%3D%22dba%22%7D")

    # 02: db-01 resolved, db-02 still firing: the incident stays open.
    status, body, _ = await h.post("am", fixture("alertmanager/02-diskfull-1-resolved-1-firing.json"))
    assert status == 200
    [inc] = await h.incidents()
    assert inc.status == "triggered" and inc.firing_count == 1
    assert [(a.fingerprint, a.status) for a in await h.alerts(inc.id)] == [
        ("996ea11b7469dd3e", "resolved"), ("42d9f3192a0205d7", "firing")]

    # 03: another group, severity "warning" -> medium, catch-all route.
    await h.post("am", fixture("alertmanager/03-highcpu-firing.json"))
    incidents = await h.incidents()
    assert [(i.title, i.severity, i.channels) for i in incidents][1] == ("CPU above 90% for 10m", "medium", ["ops-slack"])

    # The last alert of the first incident resolves: the source resolves the incident.
    resolved = json.loads(fixture("alertmanager/02-diskfull-1-resolved-1-firing.json"))
    resolved["alerts"][1]["status"] = "resolved"
    resolved["alerts"][1]["endsAt"] = "2026-11-24T04:10:00Z"
    status, body, _ = await h.post("am", resolved)
    assert body["results"][1]["change"] == "resolved"
    inc = (await h.incidents())[0]
    assert (inc.status, inc.resolved_by) == ("resolved", "source:am")

    assert await h.outbox() == [
        (1, "ops-slack", "post", "incident.opened", {}),
        (1, "ops-telegram", "post", "incident.opened", {}),
        (1, "ops-slack", "update", "alerts.changed", {}),
        (1, "ops-slack", "reply", "alerts.resolved", {"count": 1, "source": "am"}),
        (1, "ops-telegram", "update", "alerts.changed", {}),
        (1, "ops-telegram", "reply", "alerts.resolved", {"count": 1, "source": "am"}),
        (2, "ops-slack", "post", "incident.opened", {}),
        (1, "ops-slack", "update", "incident.changed", {}),  # resolved: redrawn at once, not with alert traffic
        (1, "ops-slack", "reply", "incident.resolved", {"by": "source", "source": "am"}),
        (1, "ops-telegram", "update", "incident.changed", {}),
        (1, "ops-telegram", "reply", "incident.resolved", {"by": "source", "source": "am"}),
        (1, "@pages", "pages", "incident.changed", {}),  # its escalation's pages, if any, say Resolved now
    ]
    assert await h.actions(1) == [
        "incident.opened", "alert.received", "incident.grouped", "alert.received",
        "alert.resolved", "alert.received", "alert.resolved", "incident.resolved",
    ]


async def test_truncated_alerts_are_said_on_the_incident_counted_once_and_validated(h: Harness) -> None:
    """Alertmanager's max_alerts cut the list: the incident's timeline says how many were left out."""
    payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    payload["truncatedAlerts"] = 3
    status, body, _ = await h.post("am", payload, headers={"X-Delivery-ID": "am-t1"})
    assert status == 200 and body["truncated"] == 3 and body["alerts"] == 2
    [inc] = await h.incidents()
    assert await h.actions(inc.id) == ["incident.opened", "alert.received", "incident.grouped", "alert.received",
                                       "alerts.truncated"]
    async with h.bot.db.sessions() as s:
        event = (await s.execute(select(AuditEvent).where(AuditEvent.action == "alerts.truncated"))).scalar_one()
    assert event.details["count"] == 3 and event.details["received"] == 2
    assert "raise max_alerts" in event.details["note"] and event.subject_id == str(inc.id)
    again = await h.post("am", payload, headers={"X-Delivery-ID": "am-t1"})  # a retry: replayed, counted once
    assert again[1] == body and again[2]["X-Idempotent-Replay"] == "true"
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alerts_truncated_total{source="am"} 3.0' in metrics

    status, body, _ = await h.post("am", payload)  # Alertmanager's next notification of the group, no delivery id
    assert status == 200 and body["truncated"] == 3
    assert (await h.actions(inc.id)).count("alerts.truncated") == 1  # the same number: said once
    payload["truncatedAlerts"] = 5
    await h.post("am", payload)
    assert (await h.actions(inc.id)).count("alerts.truncated") == 2  # a new number: said again
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alerts_truncated_total{source="am"} 11.0' in metrics  # every notification counts

    payload["truncatedAlerts"] = 0  # nothing left out: nothing said
    status, body, _ = await h.post("am", payload)
    assert status == 200 and "truncated" not in body
    assert (await h.actions(inc.id)).count("alerts.truncated") == 2

    for bad in (-1, "3", 2.5, True):
        payload["truncatedAlerts"] = bad
        status, body, _ = await h.post("am", payload)
        assert status == 422 and body["field"] == "truncatedAlerts", (bad, body)
        assert "whole number" in body["error"]
    for absurd in (10**30, 2**31):  # more alerts than an Alertmanager could hold: not added to the counter for good
        payload["truncatedAlerts"] = absurd
        status, body, _ = await h.post("am", payload)
        assert status == 422 and body["field"] == "truncatedAlerts", (absurd, body)
        assert body["error"].startswith(f"truncatedAlerts: expected a whole number from 0 to 2147483647, got {absurd}")
    assert (await h.actions(inc.id)).count("alerts.truncated") == 2
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alerts_truncated_total{source="am"} 11.0' in metrics


async def test_a_repeated_alert_brings_its_links_up_to_date(h: Harness) -> None:
    """Alertmanager moved (a new externalURL) and the rule's runbook moved: the next notification of the same
    alerts updates the incident's links, and the alert's own."""
    payload = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    await h.post("am", payload)
    [inc] = await h.incidents()
    assert inc.links["alertmanager"] == "http://vm:19093"
    payload["externalURL"] = "https://alertmanager.example.com"
    assert inc.links["runbook"] == "https://runbooks.example.com/disk-full"
    payload["alerts"][0]["annotations"]["runbook_url"] = "https://wiki.example.com/runbooks/disk-full"
    status, body, _ = await h.post("am", payload)
    assert status == 200 and [r["change"] for r in body["results"]] == ["resent", "resent"]
    [inc] = await h.incidents()
    assert inc.links["alertmanager"] == "https://alertmanager.example.com"
    assert inc.links["runbook"] == "https://wiki.example.com/runbooks/disk-full"
    first = (await h.alerts(inc.id))[0]
    assert first.links["runbook"] == "https://wiki.example.com/runbooks/disk-full"


async def test_a_new_firing_after_resolution_opens_a_linked_incident(h: Harness) -> None:
    payload = json.loads(fixture("alertmanager/03-highcpu-firing.json"))
    await h.post("am", payload)
    payload["alerts"][0]["status"] = "resolved"
    await h.post("am", payload)
    h.clock.advance(timedelta(minutes=30))
    payload["alerts"][0]["status"] = "firing"
    status, body, _ = await h.post("am", payload)
    assert body["results"][0] == {"fingerprint": "6c930f72e1341143", "incident": 2, "change": "opened"}
    first, second = await h.incidents()
    assert (first.status, second.status, second.previous_id) == ("resolved", "triggered", first.id)


async def test_firing_resolved_firing_in_one_delivery_links_the_second_incident_to_the_first(h: Harness) -> None:
    one = {"asset_name": "web-3", "signature": "Down", "severity": "high", "message": "down", "tool_source": "zabbix"}
    status, body, _ = await h.post("open", [one, {**one, "status": "resolved"}, {**one, "message": "down again"}])
    assert status == 200 and [r["change"] for r in body["results"]] == ["opened", "resolved", "opened"]
    first, second = await h.incidents()
    assert (first.status, second.status, second.previous_id) == ("resolved", "triggered", first.id)
    async with h.bot.db.sessions() as s:
        opened = (await s.execute(select(AuditEvent).where(AuditEvent.action == "incident.opened")
                                  .order_by(AuditEvent.seq))).scalars().all()
    assert [(e.incident_id, e.details["previous_id"]) for e in opened] == [(first.id, None), (second.id, first.id)]
    async with h.bot.db.sessions() as s:
        assert (await h.bot.audit.verify(s)).ok


async def test_an_alert_sent_again_more_severe_is_stored_at_its_new_severity(h: Harness) -> None:
    one = {"asset_name": "web-5", "signature": "Slow", "severity": "low", "message": "slow", "tool_source": "t"}
    await h.post("open", one)
    await h.post("open", {**one, "severity": "critical"})
    [inc] = await h.incidents()
    [record] = await h.alerts(inc.id)
    assert (inc.severity, record.severity) == ("critical", "critical")  # the alert said low in incidents show


async def test_a_nul_in_alert_text_is_stored_without_it(h: Harness) -> None:
    body = b'{"asset_name": "n1", "signature": "s", "severity": "info", "message": "bad\\u0000byte", "tool_source": "t"}'
    status, answer, _ = await h.post("open", body)
    assert status == 200 and answer["results"][0]["change"] == "opened"  # PostgreSQL text holds no NUL: it was a 500
    [inc] = await h.incidents()
    assert inc.title == "badbyte"


async def test_an_empty_link_stored_by_an_older_version_takes_the_first_real_one(h: Harness) -> None:
    one = {"asset_name": "web-4", "signature": "Down", "severity": "high", "message": "down", "tool_source": "t"}
    await h.post("open", {**one, "links": {"runbook": ""}})
    [inc] = await h.incidents()
    assert inc.links == {}  # an empty link is none
    async with h.bot.db.transaction() as s:  # as versions that kept empty links stored it
        await s.execute(update(Incident).where(Incident.id == inc.id).values(links={"runbook": ""}))
    status, body, _ = await h.post("open", {**one, "tool_source": "t2", "links": {"runbook": "https://wiki/rb"}})
    assert body["results"][0]["change"] == "grouped"
    [inc] = await h.incidents()
    assert inc.links == {"runbook": "https://wiki/rb"}


async def test_an_alert_racing_a_person_who_resolves_opens_a_new_incident(h: Harness) -> None:
    """PostgreSQL: the alert's transaction reads the incident while another resolves it. It must see the resolve once
    that commits (it waits on the row), not join the incident it read before and write over it."""
    if not h.bot.db.is_postgres:
        pytest.skip("SQLite: one writer at a time, so the alert's transaction begins after the resolve")
    one = {"asset_name": "web-5", "signature": "Down", "severity": "high", "message": "down", "tool_source": "t"}
    await h.post("open", one)
    [inc] = await h.incidents()
    async with h.bot.db.transaction() as s:  # a person resolving #1, slowly
        await s.execute(update(Incident).where(Incident.id == inc.id)
                        .values(status="resolved", resolved_at=h.clock.now(), resolved_by="alice"))
        posting = asyncio.create_task(h.post("open", {**one, "tool_source": "t2", "message": "down again"}))
        await asyncio.sleep(0.5)  # the alert's transaction reads #1 now
    status, body, _ = await posting
    assert status == 200 and body["results"][0]["change"] == "opened" and body["results"][0]["incident"] != inc.id
    first, second = await h.incidents()
    assert (first.status, first.alert_count, second.status, second.previous_id) == ("resolved", 1, "triggered", first.id)


@asynccontextmanager
async def another_replica(h: Harness, pg_schema: str) -> AsyncIterator[Harness]:
    """A second bot on h's PostgreSQL schema and clock (skipped on SQLite: replicas share PostgreSQL)."""
    if not h.bot.db.is_postgres:
        pytest.skip("replicas share PostgreSQL")
    from tests.conftest import postgres_url
    from tests.botkit import running_bot

    async with running_bot(postgres_url(), schema=pg_schema, clock=h.clock) as other:
        yield other


async def test_one_delivery_id_at_two_replicas_at_once_is_stored_once_and_replayed(
        h: Harness, pg_schema: str) -> None:
    async with another_replica(h, pg_schema) as other:
        for round in range(5):
            body = {"asset_name": f"web-{round}", "signature": "Down", "severity": "high", "message": "down",
                    "tool_source": "t"}
            headers = {"X-Delivery-ID": f"same-{round}"}
            answers = await asyncio.gather(h.post("open", body, headers), other.post("open", body, headers))
            assert sorted(a[0] for a in answers) == [200, 200], answers
            assert sorted(a[2].get("X-Idempotent-Replay", "") for a in answers) == ["", "true"]
            assert answers[0][1] == answers[1][1]
    assert len(await h.incidents()) == 5 and all(i.alert_count == 1 for i in await h.incidents())


async def test_one_alert_at_two_replicas_at_once_under_two_group_keys_opens_one_incident(
        h: Harness, pg_schema: str) -> None:
    """The same alert (one fingerprint) sent to two replicas at once under two group keys (a generic sender's
    instance label; an alert in two Alertmanager groups): the replicas locked only the group keys, so both found no
    record of it and each opened an incident for it, two cards and two escalations for one alert. The alert is
    locked too: the second waits for the first, and its repeat joins the first's incident."""
    async with another_replica(h, pg_schema) as other:
        for round in range(8):
            body = {"asset_name": f"web-{round}", "signature": "Down", "severity": "high", "message": "down",
                    "tool_source": "t"}
            answers = await asyncio.gather(h.post("open", {**body, "labels": {"instance": f"pod-{round}-a"}}),
                                           other.post("open", {**body, "labels": {"instance": f"pod-{round}-b"}}))
            assert [a[0] for a in answers] == [200, 200], answers
            changes = sorted(a[1]["results"][0]["change"] for a in answers)
            assert changes == ["duplicate", "opened"], answers
            assert answers[0][1]["results"][0]["incident"] == answers[1][1]["results"][0]["incident"]
    incidents = await h.incidents()
    assert len(incidents) == 8 and all((i.alert_count, i.firing_count) == (1, 1) for i in incidents)


async def test_default_grouping_by_alertname_and_instance(h: Harness) -> None:
    await h.post("am-plain", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    incidents = await h.incidents()
    assert [i.group_key for i in incidents] == ["alertname=DiskFull|instance=db-01:9100", "alertname=DiskFull|instance=db-02:9100"]


async def test_grouping_window_and_duplicates(h: Harness) -> None:
    alert = {"asset_name": "web-1", "signature": "NginxDown", "severity": "high", "message": "down", "tool_source": "zabbix"}
    for _ in range(3):
        await h.post("open", alert)
    [inc] = await h.incidents()
    assert (inc.alert_count, inc.notifications, inc.priority) == (1, 3, 60 + 4)
    # Another tool reports the same thing within the window: grouped, +10 for two tools.
    h.clock.advance(timedelta(minutes=10))
    await h.post("limited", {**alert, "tool_source": "datadog"})
    [inc] = await h.incidents()
    assert inc.sources == ["open/zabbix", "limited/datadog"] and inc.alert_count == 2 and inc.priority == 60 + 6 + 10
    # Quiet for longer than the window: a new alert of that key opens a fresh incident.
    h.clock.advance(timedelta(minutes=16))
    await h.post("open", {**alert, "tool_source": "nagios"})
    assert len(await h.incidents()) == 2
    # A third tool soon after joins that fresh incident, not yet another one (the quiet one is still open).
    h.clock.advance(timedelta(minutes=5))
    _, answer, _ = await h.post("open", {**alert, "tool_source": "icinga"})
    first, fresh = await h.incidents()
    assert answer["results"][0]["change"] == "grouped" and answer["results"][0]["incident"] == fresh.id
    assert (first.alert_count, fresh.alert_count) == (2, 2)


async def test_concurrent_posts_are_all_committed_once(h: Harness) -> None:
    async def one(i: int):
        alert = {"asset_name": f"host-{i % 7}", "signature": "HighLatency", "severity": "medium",
                 "message": f"latency {i}", "tool_source": "bench", "dedup_key": f"d-{i}"}
        return (await h.post("open", alert))[0]

    statuses = await asyncio.gather(*(one(i) for i in range(300)))
    assert statuses == [200] * 300
    assert await h.count(AlertRecord) == 300
    async with h.bot.db.sessions() as s:
        verdict = await h.bot.audit.verify(s)
    assert verdict.ok
    assert await h.count(AuditEvent) == 600  # opened + received for each (every dedup_key is its own incident)


async def test_idempotent_delivery_id(h: Harness) -> None:
    alert = {"asset_name": "web-1", "signature": "NginxDown", "severity": "high", "message": "down", "tool_source": "z"}
    first = await h.post("open", alert, {"X-Delivery-ID": "abc-1"})
    events = await h.count(AuditEvent)
    again = await h.post("open", alert, {"X-Delivery-ID": "abc-1"})
    assert again[0] == 200 and again[1] == first[1] and again[2]["X-Idempotent-Replay"] == "true"
    assert await h.count(AuditEvent) == events and (await h.incidents())[0].notifications == 1
    # Two copies in flight at once: one is applied, both get the same answer.
    both = await asyncio.gather(*(h.post("open", alert, {"X-Delivery-ID": "abc-2"}) for _ in range(2)))
    assert both[0][1] == both[1][1] and (await h.incidents())[0].notifications == 2
    # After 24 hours the id may be used again.
    h.clock.advance(timedelta(hours=24, minutes=1))
    await h.post("open", alert, {"X-Delivery-ID": "abc-1"})
    assert await h.count(Delivery) == 2


async def test_silenced_alert_is_recorded_but_pages_nobody(h: Harness) -> None:
    alert = {"asset_name": "web-9", "signature": "Down", "severity": "critical", "message": "down", "tool_source": "z"}
    status, body, _ = await h.post("open", alert)
    assert status == 200 and body["results"][0]["change"] == "opened"
    [inc] = await h.incidents()
    assert inc.silenced and inc.status == "triggered"
    assert await h.outbox() == []
    assert "alert.silenced" in await h.actions(inc.id)
    # After the window ends, the same kind of alert pages again.
    h.clock.advance(timedelta(days=1))
    await h.post("open", {**alert, "asset_name": "web-90"})
    assert [o[2] for o in await h.outbox()] == ["post"]


async def test_alertmanager_resends_and_resolutions_do_not_raise_priority(h: Harness) -> None:
    await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    [inc] = await h.incidents()
    assert (inc.notifications, inc.priority) == (2, 112)
    h.clock.advance(timedelta(minutes=5))  # the same group again, as at each repeat_interval
    status, body, _ = await h.post("am", fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    assert status == 200 and [r["change"] for r in body["results"]] == ["resent", "resent"]
    await h.post("am", fixture("alertmanager/02-diskfull-1-resolved-1-firing.json"))
    [inc] = await h.incidents()
    assert (inc.notifications, inc.priority, inc.firing_count, inc.status) == (2, 112, 1, "triggered")


GENERIC = {"asset_name": "web-1", "signature": "NginxDown", "severity": "high", "message": "down", "tool_source": "z"}


async def test_a_retry_of_a_stored_delivery_gets_its_answer_even_past_the_rate_limit(h: Harness) -> None:
    first = [await h.post("limited", {**GENERIC, "dedup_key": str(i)}, {"X-Delivery-ID": f"d-{i}"}) for i in range(5)]
    assert [status for status, _, _ in first] == [200] * 5  # the burst is spent
    status, answer, headers = await h.post("limited", {**GENERIC, "dedup_key": "0"}, {"X-Delivery-ID": "d-0"})
    assert (status, answer, headers["X-Idempotent-Replay"]) == (200, first[0][1], "true")  # the stored answer
    status, _, _ = await h.post("limited", GENERIC, {"X-Delivery-ID": "d-new"})
    assert status == 429  # a new delivery still waits for the limit
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alert_rejected_total{reason="rate_limited",source="limited"} 1.0' in metrics
    assert await h.count(AlertRecord) == 5
    h.clock.advance(timedelta(days=1))  # past the idempotency window (the bucket refills too: spend it again)
    for i in range(5, 10):
        await h.post("limited", {**GENERIC, "dedup_key": str(i)})
    assert (await h.post("limited", {**GENERIC, "dedup_key": "0"}, {"X-Delivery-ID": "d-0"}))[0] == 429


async def _person(h: Harness, incident_id: int, action: str) -> None:
    """`action` (resolve, reopen) by Alice, as a button or command would do it."""
    from bot.model import Actor
    from handlers.incident_actions import perform

    result = await perform(db=h.bot.db, audit=h.bot.audit, incident_id=incident_id, action=action,
                           actor=Actor("slack", "U01ALICE", "Alice", "alice"), now=h.clock.now())
    assert result.changed, result.message


ALERT = {"asset_name": "db-5", "signature": "Down", "severity": "critical", "message": "down", "tool_source": "x"}


async def test_a_source_resolving_an_alert_a_person_resolved_first_still_counts(h: Harness) -> None:
    """Resolved by a person, then the source says its alert is over: the alert is resolved all the same, so the
    incident, if reopened, does not wait for a "resolved" the source will never send again."""
    await h.post("open", ALERT)
    await _person(h, 1, "resolve")
    _, answer, _ = await h.post("open", {**ALERT, "status": "resolved"})
    assert answer["results"][0] == {"fingerprint": answer["results"][0]["fingerprint"], "incident": 1,
                                    "change": "alert_resolved"}  # was "none", with the alert left firing
    [record] = await h.alerts(1)
    [inc] = await h.incidents()
    assert (record.status, inc.firing_count, inc.status) == ("resolved", 0, "resolved")
    await _person(h, 1, "reopen")
    assert [(i.id, i.status) for i in await h.incidents()] == [(1, "triggered")]


async def test_resolving_a_quiet_incident_does_not_hide_the_keys_current_one_in_the_same_batch(h: Harness) -> None:
    lag = {"asset_name": "k1", "signature": "Lag", "severity": "high", "message": "lag"}
    await h.post("open", {**lag, "tool_source": "a"})
    h.clock.advance(timedelta(minutes=20))  # quiet past grouping.window: the next opens #2
    await h.post("open", {**lag, "tool_source": "b"})
    _, answer, _ = await h.post("open", [{**lag, "tool_source": "a", "status": "resolved"}, {**lag, "tool_source": "c"}])
    assert [(r["incident"], r["change"]) for r in answer["results"]] == [(1, "resolved"), (2, "grouped")]
    assert len(await h.incidents()) == 2  # it opened a third


async def test_a_new_alert_before_a_still_firing_one_in_a_notification_joins_its_incident(h: Harness) -> None:
    """Alertmanager sorts a group's alerts by labels: a new alert may come before the one that is still firing.
    The notification is news from the incident wherever that alert sits in it."""
    b = {"asset_name": "h1", "signature": "Mem", "severity": "high", "message": "mem", "tool_source": "x",
         "labels": {"pod": "b"}}
    await h.post("open", b)
    h.clock.advance(timedelta(minutes=20))  # past grouping.window since #1 last heard anything
    _, answer, _ = await h.post("open", [{**b, "tool_source": "w"}, b])  # a new alert, then #1's own
    assert [(r["incident"], r["change"]) for r in answer["results"]] == [(1, "grouped"), (1, "duplicate")]
    assert len(await h.incidents()) == 1  # the new one opened #2 because it came first


async def test_an_alert_firing_after_a_person_resolved_its_incident_follows_that_incident(h: Harness) -> None:
    """X opens #1; later another alert of the key opens #2; a person resolves #1 while X fires, and X's next
    notification opens #3: it follows #1, which held X, not #2, the key's newest, which never did. A new alert of
    the key still follows the key's newest."""
    x = {"asset_name": "w1", "signature": "Lag", "severity": "high", "message": "lag", "tool_source": "t"}
    await h.post("open", x)
    h.clock.advance(timedelta(minutes=20))  # past grouping.window: the key's next alert opens #2
    await h.post("open", {**x, "tool_source": "t2"})
    await _person(h, 1, "resolve")
    h.clock.advance(timedelta(minutes=20))
    _, answer, _ = await h.post("open", x)
    assert [(r["incident"], r["change"]) for r in answer["results"]] == [(3, "opened")]
    h.clock.advance(timedelta(minutes=20))
    await h.post("open", {**x, "tool_source": "t4"})  # new to the bot: follows the key's newest
    assert [(i.id, i.previous_id) for i in await h.incidents()] == [(1, None), (2, 1), (3, 1), (4, 3)]
    async with h.bot.db.sessions() as s:
        opened = (await s.execute(select(AuditEvent).where(AuditEvent.action == "incident.opened",
                                                           AuditEvent.incident_id == 3))).scalar_one()
    assert opened.details["previous_id"] == 1


async def test_a_reopened_incident_takes_new_alerts_of_its_key(h: Harness) -> None:
    await h.post("open", ALERT)
    await h.post("open", {**ALERT, "status": "resolved"})
    h.clock.advance(timedelta(hours=1))
    await _person(h, 1, "reopen")
    h.clock.advance(timedelta(seconds=1))
    _, answer, _ = await h.post("open", {**ALERT, "tool_source": "z"})
    assert (answer["results"][0]["incident"], answer["results"][0]["change"]) == (1, "grouped")  # it opened #2
    assert len(await h.incidents()) == 1


async def test_a_silenced_incident_speaks_once_an_alert_no_silence_covers_arrives(h: Harness) -> None:
    """web-maintenance silences web-9* until 25 Nov 00:00 UTC. The incident it muted stayed muted for good, however
    long the alert kept firing after the window; now the first alert no silence covers posts it, as Alertmanager
    notifies once a group's alert is not silenced."""
    web = {"asset_name": "web-91", "signature": "Down", "severity": "critical", "message": "down", "tool_source": "x"}
    await h.post("open", web)
    [inc] = await h.incidents()
    assert inc.silenced and await h.outbox() == []
    h.clock.advance(timedelta(minutes=5))
    await h.post("open", web)  # still inside the window: still muted
    assert (await h.incidents())[0].silenced and await h.outbox() == []
    h.clock.advance(timedelta(hours=20))  # the window is over; the alert is still firing
    await h.post("open", web)
    [inc] = await h.incidents()
    assert not inc.silenced
    # posted; and its pages redrawn, if someone was paged by hand meanwhile (`/incident page`: none here)
    assert await h.outbox() == [(1, "ops-slack", "post", "incident.opened", {}),
                                (1, "@pages", "pages", "incident.changed", {})]
    assert "incident.unsilenced" in await h.actions(1)


async def test_a_silenced_alert_in_a_spoken_incident_is_no_news_and_an_unsilenced_one_unmutes(tmp_path: Path) -> None:
    from tests.botkit import CONFIG, running_bot

    base = CONFIG.replace("silences:\n", "silences:\n  - {id: pod-b, matchers: {pod: b}, starts: 2026-01-01T00:00:00Z}\n")
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", base=base) as h:
        mem = {"asset_name": "h1", "signature": "Mem", "severity": "critical", "message": "mem"}
        await h.post("open", {**mem, "tool_source": "x", "labels": {"pod": "b"}})  # silenced: opens #1 muted
        await h.post("open", {**mem, "tool_source": "y", "labels": {"pod": "a"}})  # not silenced: #1 speaks
        [inc] = await h.incidents()
        assert not inc.silenced and await h.outbox() == [(1, "ops-slack", "post", "incident.opened", {}),
                                                         (1, "@pages", "pages", "incident.changed", {})]
        await h.post("open", {**mem, "asset_name": "h2", "tool_source": "x", "labels": {"pod": "a"}})  # #2, spoken
        await h.post("open", {**mem, "asset_name": "h2", "tool_source": "y", "labels": {"pod": "b"}})  # silenced
        assert [o[3] for o in await h.outbox() if o[0] == 2] == ["incident.opened"]  # no "1 new alert" line


async def test_two_tools_through_one_generic_source_count_as_two_reporters(h: Harness) -> None:
    """The +10 for two or more tools: Nagios and Zabbix sending to one generic endpoint are two tools (their
    tool_source), as two sources are. The list is capped: a sender cannot grow it without end."""
    lat = {"asset_name": "web-7", "signature": "HighLatency", "severity": "warning", "message": "slow"}
    await h.post("open", {**lat, "tool_source": "nagios"})
    await h.post("open", {**lat, "tool_source": "zabbix"})
    [inc] = await h.incidents()
    assert inc.sources == ["open/nagios", "open/zabbix"] and inc.priority == 30 + 2 + 10  # it was 30 + 2
    for i in range(12):
        await h.post("open", {**lat, "tool_source": f"probe-{i}"})
    [inc] = await h.incidents()
    assert len(inc.sources) == 10 and inc.sources[:2] == ["open/nagios", "open/zabbix"]
    # An incident stored before tools were told apart lists the bare source: its tool replaces it, not adds to it.
    await h.post("open", {**lat, "asset_name": "web-8", "tool_source": "nagios"})
    async with h.bot.db.transaction() as session:
        old = (await session.execute(select(Incident).where(Incident.id == 2))).scalar_one()
        old.sources = ["open"]
        session.add(old)
    await h.post("open", {**lat, "asset_name": "web-8", "tool_source": "nagios"})
    [_, inc] = await h.incidents()
    assert inc.sources == ["open/nagios"] and inc.priority == 30 + 2  # one tool: no +10


async def test_very_long_keys_are_stored_and_group_on_every_database(h: Harness) -> None:
    """A 3,000-character host name, dedup_key or Alertmanager fingerprint: PostgreSQL's index takes no entry that
    long (the whole notification got a 500, and Alertmanager resent it forever). Kept as their start and a hash of
    the whole, they are stored, and the same long key still finds its incident."""
    long_host = "h" * 3000
    alert = {"asset_name": long_host, "signature": "Down", "severity": "high", "message": "down", "tool_source": "t"}
    for _ in range(2):
        status, body, _ = await h.post("limited", alert)
        assert status == 200, body
    status, body, _ = await h.post("limited", {**alert, "asset_name": "web-1", "dedup_key": "k" * 3000})
    assert status == 200, body
    am = json.loads(fixture("alertmanager/01-diskfull-firing-2-alerts.json"))
    am["alerts"][0]["fingerprint"] = "f" * 4000
    am["alerts"][0]["labels"]["alertname"] = "A" * 4000
    status, body, _ = await h.post("am", am)
    assert status == 200, body
    incidents = await h.incidents()
    assert [i.alert_count for i in incidents][:2] == [1, 1] and incidents[0].notifications == 2
    assert all(len(i.group_key) <= 500 for i in incidents)
    [first] = await h.alerts(incidents[0].id)
    assert first.labels["instance"] == long_host  # the labels keep the whole value


async def test_a_postgresql_that_stops_answering_gets_senders_503_not_a_wait_without_end(
        tmp_path: Path, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table locked by someone's long transaction (or a server that stopped answering): intake gives up after
    the bot's DB_WAIT and answers 503 with Retry-After, which Alertmanager retries; nothing is half-written. It
    waited as long as the lock was held (once 150 s, past any sender's timeout)."""
    import time

    import asyncpg

    import bot.server
    from tests.conftest import postgres_url

    url = postgres_url()
    monkeypatch.setattr(bot.server, "DB_WAIT", 1.0)
    async with bot_on("postgres", tmp_path, pg_schema) as h:
        alert = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down", "tool_source": "t"}
        assert (await h.post("open", alert))[0] == 200
        locker = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"),
                                       server_settings={"search_path": pg_schema})
        try:
            locking = locker.transaction()
            await locking.start()
            await locker.execute("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            status, body, headers = await h.post("open", {**alert, "asset_name": "web-2"})
            assert (status, headers.get("Retry-After")) == (503, "5"), body
            assert time.monotonic() - started < 5
            await locking.rollback()
        finally:
            await locker.close()
        assert (await h.post("open", {**alert, "asset_name": "web-3"}))[0] == 200
        assert [i.group_key for i in await h.incidents()] == ["alertname=Down|instance=web-1",
                                                               "alertname=Down|instance=web-3"]  # web-2: nothing


async def test_a_replica_starting_while_another_holds_the_schema_lock_waits_its_turn(
        tmp_path: Path, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bot's statement limit (DB_WAIT) is for its work, not for waiting behind another replica's start-up or
    migration: a start that waits longer still starts."""
    import asyncpg

    import bot.server
    from storage.db import _PG_INIT_LOCK
    from tests.conftest import postgres_url

    url = postgres_url()
    monkeypatch.setattr(bot.server, "DB_WAIT", 1.0)
    holder = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", _PG_INIT_LOCK)
        asyncio.get_running_loop().call_later(2.5, lambda: asyncio.ensure_future(
            holder.execute("SELECT pg_advisory_unlock($1)", _PG_INIT_LOCK)))
        async with bot_on("postgres", tmp_path, pg_schema) as h:  # waits 2.5 s, past DB_WAIT
            alert = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down",
                     "tool_source": "t"}
            # It works once started. Its statements still have 1 s, which a loaded machine can miss: a 503 then
            # says to retry, as Alertmanager would.
            deadline = asyncio.get_running_loop().time() + 30
            while (status := (await h.post("open", alert))[0]) == 503 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.5)
            assert status == 200
    finally:
        await holder.close()


async def test_an_incidents_links_follow_the_alert_that_brought_them_not_whichever_repeats_last(h: Harness) -> None:
    """Two alerts of one incident, each with its own runbook link, sent again in turn: the incident keeps the first
    one's link (it did not flip with each repeat); when that alert brings a new link, the incident takes it."""
    one = {"asset_name": "web-5", "signature": "Down", "severity": "high", "message": "down"}
    first, second = {**one, "tool_source": "t1"}, {**one, "tool_source": "t2"}
    changes = []
    for alert, link in ((first, "https://wiki/a"), (second, "https://wiki/b"), (first, "https://wiki/a"),
                        (second, "https://wiki/b")):
        status, body, _ = await h.post("open", {**alert, "links": {"runbook": link}})
        changes.append(body["results"][0]["change"])
        [inc] = await h.incidents()
        assert inc.links == {"runbook": "https://wiki/a"}
    assert changes == ["opened", "grouped", "duplicate", "duplicate"]
    await h.post("open", {**first, "links": {"runbook": "https://wiki/a2"}})  # its runbook moved
    await h.post("open", {**second, "links": {"runbook": "https://wiki/b"}})
    [inc] = await h.incidents()
    assert inc.links == {"runbook": "https://wiki/a2"}
    assert [r.links for r in await h.alerts(inc.id)] == [{"runbook": "https://wiki/a2"}, {"runbook": "https://wiki/b"}]


REUSED = ("X-Delivery-ID '{}' was used within the last 24 h for a different body: give each delivery its own id")


async def _rejected(h: Harness, reason: str) -> float:
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    line = next((m for m in metrics if m.startswith("chatops_alert_rejected_total") and f'reason="{reason}"' in m), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def test_a_delivery_id_reused_for_a_different_body_is_a_422_not_the_first_answer(h: Harness) -> None:
    """A sender that puts an event id in X-Delivery-ID sends the problem and its recovery under one id: the recovery
    was answered 200 with the first answer (X-Idempotent-Replay) and dropped. Only the same body is a retry (the
    IETF Idempotency-Key draft): compared inflated, so a gzip retry of the same JSON is one."""
    import gzip

    problem = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down", "tool_source": "z"}
    first = await h.post("open", problem, {"X-Delivery-ID": "d-1"})
    assert first[0] == 200
    status, answer, headers = await h.post("open", {**problem, "status": "resolved"}, {"X-Delivery-ID": "d-1"})
    assert (status, answer) == (422, {"error": REUSED.format("d-1")}) and "X-Idempotent-Replay" not in headers
    assert await _rejected(h, "delivery_id_reused") == 1
    [inc] = await h.incidents()
    assert (inc.status, inc.notifications) == ("triggered", 1)
    again = await h.post("open", gzip.compress(json.dumps(problem).encode()),
                         {"X-Delivery-ID": "d-1", "Content-Encoding": "gzip"})  # the same delivery, retried
    assert (again[0], again[1], again[2]["X-Idempotent-Replay"]) == (200, first[1], "true")
    # Ten alerts under one id at once: one is stored and answered 200, the others are told why not.
    answers = await asyncio.gather(*(h.post("open", {**problem, "asset_name": f"db-{i}"}, {"X-Delivery-ID": "d-2"})
                                     for i in range(10)))
    assert sorted(status for status, _, _ in answers) == [200] + [422] * 9
    assert {answer["error"] for status, answer, _ in answers if status == 422} == {REUSED.format("d-2")}
    assert await h.count(AlertRecord) == 2 and await _rejected(h, "delivery_id_reused") == 10


async def test_a_delivery_id_stored_without_a_digest_is_still_replayed(h: Harness) -> None:
    """Deliveries stored by an older version have no digest of their body: a repeat of their id gets the first answer,
    as it did then (whatever its body)."""
    problem = {"asset_name": "web-1", "signature": "Down", "severity": "high", "message": "down", "tool_source": "z"}
    first = await h.post("open", problem, {"X-Delivery-ID": "old-1"})
    async with h.bot.db.transaction() as session:
        await session.execute(update(Delivery).values(digest=None))
    again = await h.post("open", {**problem, "message": "other"}, {"X-Delivery-ID": "old-1"})
    assert (again[0], again[1], again[2]["X-Idempotent-Replay"]) == (200, first[1], "true")


async def test_a_different_body_under_a_stored_id_past_the_rate_limit_is_a_422(h: Harness) -> None:
    first = [await h.post("limited", {**GENERIC, "dedup_key": str(i)}, {"X-Delivery-ID": f"d-{i}"}) for i in range(5)]
    assert [status for status, _, _ in first] == [200] * 5  # the burst is spent
    status, answer, headers = await h.post("limited", {**GENERIC, "dedup_key": "x"}, {"X-Delivery-ID": "d-0"})
    assert (status, answer) == (422, {"error": REUSED.format("d-0")}) and "X-Idempotent-Replay" not in headers
    assert await _rejected(h, "delivery_id_reused") == 1


async def test_alerts_whose_labels_hold_the_key_separators_open_their_own_incidents(h: Harness) -> None:
    """Two different problems whose labels, joined, made the same group key: the second was grouped into the
    first's incident."""
    def one(alertname: str, instance: str, fingerprint: str) -> dict[str, object]:
        return {"status": "firing", "labels": {"alertname": alertname, "instance": instance, "severity": "high"},
                "annotations": {}, "fingerprint": fingerprint}

    for alert in (one("A|instance=B", "", "f1"), one("A", "B|instance=", "f2")):
        status, body, _ = await h.post("am-plain", {"version": "4", "status": "firing", "alerts": [alert]})
        assert status == 200 and body["results"][0]["change"] == "opened", body
    assert [i.group_key for i in await h.incidents()] == [r"alertname=A\|instance\=B|instance=",
                                                          r"alertname=A|instance=B\|instance\="]


async def test_a_silenced_more_severe_alert_does_not_raise_reroute_or_page_a_spoken_incident(tmp_path: Path) -> None:
    """A medium incident people see; an alert a maintenance window covers joins it, critical and of the dba team: the
    incident became critical, took the dba route's channels and escalation, and paged (at night too). The muted
    alert is recorded and grouped, and changes none of that."""
    from tests.botkit import CONFIG, running_bot

    base = CONFIG.replace("silences:\n", "silences:\n  - {id: pod-b, matchers: {pod: b}, starts: 2026-01-01T00:00:00Z}\n")
    base = base.replace("  - {match: {team: dba}, channels: [ops-slack, ops-telegram]}",
                        "  - {match: {team: dba}, channels: [ops-slack, ops-telegram], escalation: dba}")
    extra = "escalation_policies:\n  - {id: dba, steps: [{notify: {people: [alice]}, wait: 5m}]}\n"
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, base=base) as h:
        mem = {"asset_name": "h1", "signature": "Mem", "message": "mem", "tool_source": "x"}
        await h.post("open", {**mem, "severity": "medium", "labels": {"team": "web"}})
        await h.post("open", {**mem, "severity": "critical", "labels": {"team": "dba", "pod": "b"}})
        [inc] = await h.incidents()
        assert (inc.severity, inc.channels, inc.escalation, inc.silenced) == ("medium", ["ops-slack"], None, False)
        assert inc.alert_count == 1 and "alert.silenced" in await h.actions(1)
        assert "incident.rerouted" not in await h.actions(1)
        async with h.bot.db.sessions() as session:
            from storage.models import Escalation

            assert await session.get(Escalation, 1) is None  # nobody paged


async def test_a_generic_alerts_severity_is_a_label_routes_and_silences_match(tmp_path: Path) -> None:
    """A generic alert carried no `severity` label (only alertname, instance, tool), so a route or a silence on
    severity, as Alertmanager's and Grafana's alerts are routed, never matched it: its critical alerts went to the
    catch-all. It carries the severity as the sender wrote it now."""
    from tests.botkit import CONFIG, running_bot

    base = CONFIG.replace("  - {match: {team: dba}, channels: [ops-slack, ops-telegram]}",
                          '  - {match: {severity: "=~(?i)highest|critical"}, channels: [ops-slack, ops-telegram]}')
    base = base.replace("silences:\n", "silences:\n  - {id: no-debug, matchers: {severity: debug}, "
                                       "starts: 2026-11-24T00:00:00Z, ends: 2026-11-25T00:00:00Z}\n")
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", base=base) as h:
        for asset, severity in (("db-1", "Highest"), ("web-1", "low"), ("app-1", "debug")):
            status, body, _ = await h.post("open", {"asset_name": asset, "signature": "DiskFull", "severity": severity,
                                                    "message": "disk full", "tool_source": "nagios"})
            assert status == 200, body
        highest, low, debug = await h.incidents()
        assert (highest.severity, highest.channels) == ("critical", ["ops-slack", "ops-telegram"])
        assert (low.severity, low.channels, low.silenced) == ("low", ["ops-slack"], False)
        assert (debug.severity, debug.silenced) == ("info", True)
        [record] = await h.alerts(highest.id)
        assert record.labels == {"alertname": "DiskFull", "instance": "db-1", "tool": "nagios", "severity": "Highest"}
