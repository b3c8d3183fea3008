"""Grafana unified alerting webhooks end to end: the payload Grafana sends, signed the way Grafana signs it.

Payload: tests/fixtures/grafana/README.md says where the fixtures come from. Signing, as Grafana does it
(grafana/alerting http/hmac.go): hex HMAC-SHA256 of the raw body, or of `{unix seconds}:{body}` when a
timestamp header is configured; the hex digest goes in the signature header as is (no `sha256=` prefix).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.auth import sign
from storage.models import AlertRecord, AuditEvent
from tests import botkit
from tests.botkit import Harness, bot_on, fixture, running_bot

FIRING = "grafana/01-firing-2-alerts.json"
RESOLVED = "grafana/02-resolved-2-alerts.json"
SIGNATURE = "X-Grafana-Alerting-Signature"  # Grafana's default header name
TIMESTAMP = "X-Grafana-Alerting-Timestamp"  # Grafana has no default: the contact point names it
MEM, CPU = "c6eadffa33fcdf37", "bc97ff14869b13e3"
RESOLVED_MEM_VALUES = "B=71.5478515625, C=0"  # the resolved capture's values for the memory alert

# A second Grafana source that sends a timestamp header, next to botkit's body-only "grafana" source.
_GRAFANA_LINE = "  - {id: grafana, kind: grafana, auth: {hmac_secret: grafana-secret, header: X-Grafana-Alerting-Signature, timestamp_header: null}}\n"
_GRAFANA_TS_LINE = ("  - {id: grafana-ts, kind: grafana, auth: {hmac_secret: grafana-ts-secret, "
                    f"header: {SIGNATURE}, timestamp_header: {TIMESTAMP}}}}}\n")


def grafana_signature(secret: str, body: bytes, timestamp: str | None = None) -> str:
    """HMACRoundTripper.sign from grafana/alerting http/hmac.go, written out here rather than taken from bot.auth."""
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    if timestamp is not None:
        mac.update(timestamp.encode())
        mac.update(b":")
    mac.update(body)
    return mac.hexdigest()


def signed(body: bytes, secret: str = "grafana-secret") -> dict[str, str]:
    return {SIGNATURE: grafana_signature(secret, body), "Content-Type": "application/json", "User-Agent": "Grafana"}


def go_wire(payload: object) -> bytes:
    """The bytes Go's json.Marshal would send: compact, with <, > and & escaped as \\u003c, \\u003e, \\u0026."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@pytest.fixture(params=["sqlite", "postgres"])
async def h(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Harness]:
    async with bot_on(request.param, tmp_path, pg_schema) as harness:
        yield harness


@pytest.fixture
async def h_ts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    assert _GRAFANA_LINE in botkit.CONFIG, "botkit's grafana source changed: update _GRAFANA_LINE"
    monkeypatch.setattr(botkit, "CONFIG", botkit.CONFIG.replace(_GRAFANA_LINE, _GRAFANA_LINE + _GRAFANA_TS_LINE))
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as harness:
        yield harness


async def test_firing_payload_opens_incidents_that_keep_grafana_links_and_values(h: Harness) -> None:
    body = fixture(FIRING)
    sent = json.loads(body)["alerts"]
    status, answer, _ = await h.post("grafana", body, signed(body))
    assert status == 200, answer
    assert answer["results"] == [{"fingerprint": MEM, "incident": 1, "change": "opened"},
                                 {"fingerprint": CPU, "incident": 2, "change": "opened"}]

    mem, cpu = await h.incidents()
    # Title from the summary annotation; Grafana's severity label: critical stays critical, warning is medium.
    assert (mem.title, mem.severity, mem.status) == ("Memory above 90% on app-01:9100 (zone us-1)", "critical", "triggered")
    assert (cpu.title, cpu.severity, cpu.status) == ("CPU above 85% on app-02:9100 (zone eu-1)", "medium", "triggered")
    assert mem.group_key == "alertname=High memory usage|instance=app-01:9100"
    assert (mem.sources, mem.channels, mem.alert_count, mem.firing_count) == (["grafana"], ["ops-slack"], 1, 1)
    assert mem.labels["grafana_folder"] == "Infrastructure" and mem.labels["team"] == "blue"

    # Every link Grafana sent, on the incident and on the alert record.
    a = sent[0]
    assert mem.links == {"generator": a["generatorURL"], "dashboard": a["dashboardURL"], "panel": a["panelURL"],
                         "silence": a["silenceURL"], "image": a["imageURL"], "runbook": a["annotations"]["runbook_url"]}
    assert mem.links["panel"].endswith("&viewPanel=78") and "matcher=__alert_rule_uid__%3D1afz29v7z" in mem.links["silence"]
    # Grafana sends "" for a rule without a dashboard: no empty links.
    assert cpu.links == {"generator": sent[1]["generatorURL"], "silence": sent[1]["silenceURL"],
                         "runbook": sent[1]["annotations"]["runbook_url"]}

    [record] = await h.alerts(mem.id)
    assert (record.source, record.fingerprint, record.status) == ("grafana", MEM, "firing")
    assert record.links == mem.links
    assert utc(record.starts_at) == datetime(2026, 11, 24, 3, 51, 3, 157076, tzinfo=UTC)  # sent as +02:00
    assert record.ends_at is None  # Grafana's "0001-01-01T00:00:00Z"
    # The evaluated values stay visible next to Grafana's own annotations.
    assert record.annotations == {
        **a["annotations"],
        "value": "[ var='B' labels={instance=app-01:9100} value=93.71044921875 ], "
                 "[ var='C' labels={instance=app-01:9100} value=1 ]",
        "values": "B=93.71044921875, C=1",
    }
    [cpu_record] = await h.alerts(cpu.id)
    assert cpu_record.annotations["values"] == "B=97.2515527950311, C=1"

    assert await h.outbox() == [(1, "ops-slack", "post", "incident.opened", {}),
                                (2, "ops-slack", "post", "incident.opened", {})]

    # Grafana re-sends the group every repeat_interval: duplicates, not new incidents, and not new
    # occurrences either (the priority does not climb while nothing changes).
    h.clock.advance(timedelta(minutes=5))
    status, answer, _ = await h.post("grafana", body, signed(body))
    assert [r["change"] for r in answer["results"]] == ["resent", "resent"]
    assert [(i.notifications, i.priority) for i in await h.incidents()] == [(1, 90), (1, 30)]


async def test_the_card_shows_what_the_rule_evaluated_to(tmp_path: Path) -> None:
    """The values were stored and shown nowhere: not on the card, not in `incidents show`. For a Grafana rule, what
    its query returned is what the people woken up need first."""
    from tests.fake_slack import FakeSlack
    from tests.test_slack_flow import slack_config

    async with FakeSlack() as fake, running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
                                               slack_config(fake)) as h:
        body = fixture(FIRING)
        assert (await h.post("grafana", body, signed(body)))[0] == 200

        def cards() -> list[str]:  # the section of the card that says what the latest alert says
            posts = [c.params for c in fake.called("chat.postMessage") if not c.params.get("thread_ts")]
            blocks = [p["blocks"] if isinstance(p["blocks"], list) else json.loads(p["blocks"]) for p in posts]
            return [b["text"]["text"] for post in blocks for b in post
                    if b["type"] == "section" and b["text"]["text"].startswith("*Latest:*")]

        await fake.wait_for(lambda: len(cards()) == 2, timeout=5)
    assert sorted(card.split("\n")[:2] for card in cards()) == [
        ["*Latest:* CPU above 85% on app-02:9100 (zone eu-1)", "*Values:* B=97.2515527950311, C=1"],
        ["*Latest:* Memory above 90% on app-01:9100 (zone us-1)", "*Values:* B=93.71044921875, C=1"]]


async def test_resolved_payload_resolves_both_incidents(h: Harness) -> None:
    firing = fixture(FIRING)
    await h.post("grafana", firing, signed(firing))
    h.clock.advance(timedelta(minutes=15))

    body = fixture(RESOLVED)
    status, answer, _ = await h.post("grafana", body, signed(body))
    assert status == 200, answer
    assert answer["results"] == [{"fingerprint": MEM, "incident": 1, "change": "resolved"},
                                 {"fingerprint": CPU, "incident": 2, "change": "resolved"}]
    mem, cpu = await h.incidents()
    assert [(i.status, i.resolved_by, i.firing_count) for i in (mem, cpu)] == [("resolved", "source:grafana", 0)] * 2
    [record] = await h.alerts(mem.id)
    assert record.status == "resolved"
    assert utc(record.ends_at) == datetime(2026, 11, 24, 4, 14, 3, 157076, tzinfo=UTC)  # Grafana's endsAt
    # The values it ended with, not those it fired with (B=93.71044921875, C=1): `incidents show` lists them.
    assert record.annotations["values"] == RESOLVED_MEM_VALUES
    assert await h.actions(mem.id) == ["incident.opened", "alert.received", "alert.resolved", "incident.resolved"]
    assert [o[3] for o in await h.outbox() if o[2] == "reply"] == ["incident.resolved", "incident.resolved"]


async def test_contact_point_test_notification_is_accepted(tmp_path: Path) -> None:
    """The "Test" button: one alert, `values: null`, `valueString: ""`, no dashboard."""
    payload = json.loads(fixture(FIRING))
    payload["alerts"] = [{**payload["alerts"][1], "labels": {"alertname": "TestAlert", "instance": "Grafana"},
                          "annotations": {"summary": "Notification test"}, "values": None, "valueString": "",
                          "fingerprint": "57c6d9296de2ad39"}]
    body = go_wire(payload)
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert status == 200, answer
        [inc] = await h.incidents()
        assert (inc.title, inc.severity) == ("Notification test", "medium")
        [record] = await h.alerts(inc.id)
        assert record.annotations == {"summary": "Notification test"}


async def test_body_signature_as_grafana_sends_it(tmp_path: Path) -> None:
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        body = fixture(FIRING)
        assert (await h.post("grafana", body, signed(body)))[0] == 200
        # The bytes exactly as Go marshals them (compact, "&" as \u0026): the signature covers the raw body.
        wire = go_wire(json.loads(fixture(RESOLVED)))
        assert b"\\u0026" in wire
        assert (await h.post("grafana", wire, signed(wire)))[0] == 200

        status, answer, _ = await h.post("grafana", body, signed(body, secret="not-the-secret"))
        assert (status, answer["error"]) == (401, f"invalid {SIGNATURE} signature")
        tampered = body.replace(b'"severity": "warning"', b'"severity": "info"')
        assert tampered != body
        status, answer, _ = await h.post("grafana", tampered, signed(body))
        assert (status, answer["error"]) == (401, f"invalid {SIGNATURE} signature")
        status, answer, _ = await h.post("grafana", body, {"Content-Type": "application/json"})
        assert (status, answer["error"]) == (401, f"missing {SIGNATURE} header")
        assert await h.count(AlertRecord) == 2


async def test_timestamped_signature_as_grafana_sends_it(h_ts: Harness) -> None:
    h = h_ts
    body = fixture(FIRING)
    now = str(int(h.clock.now().timestamp()))
    grafana = {SIGNATURE: grafana_signature("grafana-ts-secret", body, now), TIMESTAMP: now}
    status, answer, _ = await h.post("grafana-ts", body, grafana)
    assert status == 200, answer
    assert [r["change"] for r in answer["results"]] == ["opened", "opened"]

    # The same request again inside the window is a replay.
    status, answer, _ = await h.post("grafana-ts", body, grafana)
    assert (status, answer["error"]) == (401, "replayed request: this signature was already accepted; sign the request again (a new timestamp) "
                                              "to send it again, or give each request an X-Delivery-ID, whose retries get the first answer")

    other = fixture(RESOLVED)
    # The generic sources' `{timestamp}.{body}` is not what Grafana signs.
    dotted = {SIGNATURE: sign("grafana-ts-secret", other, now), TIMESTAMP: now}
    status, answer, _ = await h.post("grafana-ts", other, dotted)
    assert (status, answer["error"]) == (401, f"invalid {SIGNATURE} signature")
    # A timestamp that is not the one signed.
    later = str(int(now) + 1)
    status, answer, _ = await h.post("grafana-ts", other, {**grafana, TIMESTAMP: later})
    assert (status, answer["error"]) == (401, f"invalid {SIGNATURE} signature")
    stale = str(int(now) - 301)
    status, answer, _ = await h.post("grafana-ts", other, {SIGNATURE: grafana_signature("grafana-ts-secret", other, stale),
                                                           TIMESTAMP: stale})
    assert status == 401 and answer["error"].startswith(f"{TIMESTAMP} is 301s away from now (allowed: 300s)")
    status, answer, _ = await h.post("grafana-ts", other, {SIGNATURE: grafana_signature("grafana-ts-secret", other, now)})
    assert (status, answer["error"]) == (401, f"missing {TIMESTAMP} header")

    h.clock.advance(timedelta(minutes=15))
    now = str(int(h.clock.now().timestamp()))
    status, answer, _ = await h.post("grafana-ts", other, {SIGNATURE: grafana_signature("grafana-ts-secret", other, now),
                                                           TIMESTAMP: now})
    assert status == 200 and [r["change"] for r in answer["results"]] == ["resolved", "resolved"]
    assert await h.actions() == [
        "incident.opened", "alert.received", "incident.opened", "alert.received",
        # (an incident resolves once the whole notification is read: another alert in it could still fire for it)
        "alert.resolved", "alert.resolved", "incident.resolved", "incident.resolved",
    ]
    assert await h.count(AuditEvent) == 8


async def test_a_null_value_is_shown_not_refused(tmp_path: Path) -> None:
    """Grafana's values are numbers, but a notification refused for a null one would be lost (no retry on a 4xx)."""
    payload = json.loads(fixture(FIRING))
    payload["alerts"][0]["values"] = {"B": None, "C": 1}
    body = go_wire(payload)
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert status == 200, answer
        [first] = await h.alerts(1)
        assert first.annotations["values"] == "B=null, C=1"


@pytest.mark.parametrize(("values", "field", "problem"), [
    ([44.2], "alerts[0].values", "expected an object, got a list"),
    ({"B": "44.2"}, "alerts[0].values.B", "expected a number, got a string"),
    ({"C": True}, "alerts[0].values.C", "expected a number, got a boolean"),
])
async def test_values_of_the_wrong_shape_get_a_422(tmp_path: Path, values: object, field: str, problem: str) -> None:
    payload = json.loads(fixture(FIRING))
    payload["alerts"][0]["values"] = values
    body = go_wire(payload)
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert (status, answer["error"]) == (422, f"{field}: {problem} (not a grafana payload?)")
        assert await h.count(AlertRecord) == 0


@pytest.mark.parametrize("labels", ["absent", {}, None])
async def test_an_alert_without_labels_gets_a_422_as_from_alertmanager(tmp_path: Path, labels: object) -> None:
    """Grafana alerts without labels were taken, and unrelated ones all grouped into one incident."""
    payload = json.loads(fixture(FIRING))
    for a in payload["alerts"]:
        if labels == "absent":
            a.pop("labels")
        else:
            a["labels"] = labels
    body = go_wire(payload)
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert (status, answer["error"]) == (
            422, "alerts[0].labels: required: an alert without labels cannot be grouped (not a grafana payload?)")
        assert await h.count(AlertRecord) == 0


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_severity_words_are_read_and_an_unknown_one_is_counted_and_logged(
        tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture) -> None:
    """Jira's priorities, S1-S4, compound words and a label spelt `Severity` are understood; a value the bot does not
    know is medium as before, but counted per source and named in the log, at most once a minute per source (with
    the writer process the body is read there, and the count comes back with its answer)."""
    said = {"Highest": "critical", "High": "high", "Lowest": "info", "S1": "critical", "s3": "medium",
            "urgent": "critical", "blocker": "critical", "severe": "high", "P1-Critical": "critical",
            "critical/page": "critical", "1": "medium", "sev-unknown": "medium"}
    alerts = [{"status": "firing", "labels": {"alertname": "Sev", "instance": f"i-{n}", "severity": raw},
               "annotations": {}, "fingerprint": f"fp-{n}"} for n, raw in enumerate(said)]
    alerts.append({"status": "firing", "labels": {"alertname": "Sev", "instance": "spelt", "Severity": "Critical"},
                   "annotations": {}, "fingerprint": "fp-spelt"})
    body = go_wire({"version": "1", "status": "firing", "alerts": alerts})
    caplog.set_level(logging.WARNING, logger="chatops.intake")
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", storage_options=f"writer: {writer}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert status == 200, answer
        async with h.bot.db.sessions() as s:
            stored = {r.fingerprint: (r.severity, r.labels) for r in (await s.execute(select(AlertRecord))).scalars()}
        assert {raw: stored[f"fp-{n}"][0] for n, raw in enumerate(said)} == said
        assert stored["fp-spelt"][0] == "critical"
        assert stored["fp-10"][1]["severity"] == "1"  # the label keeps what the sender said
        h.clock.advance(timedelta(seconds=30))
        again = go_wire({"version": "1", "status": "firing", "alerts": alerts[10:11]})
        assert (await h.post("grafana", again, signed(again)))[0] == 200
        am = {"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {
            "alertname": "Other", "severity": "Sev-X"}, "annotations": {}}]}
        assert (await h.post("am", am))[0] == 200
        h.clock.advance(timedelta(seconds=31))
        again = go_wire({"version": "1", "status": "firing", "alerts": alerts[11:12]})
        assert (await h.post("grafana", again, signed(again)))[0] == 200
        metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert 'chatops_alerts_unknown_severity_total{source="grafana"} 4.0' in metrics
    assert 'chatops_alerts_unknown_severity_total{source="am"} 1.0' in metrics
    lines = [r.getMessage() for r in caplog.records if "severity the bot does not know" in r.getMessage()]
    tail = ("taken as medium; say critical, high, medium, low or info, or a synonym (README, Alert intake), in their "
            "severity label (said at most once a minute")
    assert lines == [
        f"source grafana sent 2 alert(s) with a severity the bot does not know ('1', 'sev-unknown'): {tail})",
        f"source am sent 1 alert(s) with a severity the bot does not know ('Sev-X'): {tail})",
        f"source grafana sent 1 alert(s) with a severity the bot does not know ('sev-unknown'): {tail}; 1 more since)"]


async def test_not_classified_is_info_however_its_separators_are_written(tmp_path: Path) -> None:
    """Zabbix's lowest severity, "Not classified", reaches Grafana as `Not_Classified` and other tools as
    `not-classified`: spaces, `_` and `-` inside a severity are ignored (README), so each is info, not an unknown
    severity taken as medium."""
    said = ["Not classified", "Not_Classified", "not-classified", "NOT  CLASSIFIED", "notclassified"]
    alerts = [{"status": "firing", "labels": {"alertname": "Zbx", "instance": f"i-{n}", "severity": raw},
               "annotations": {}, "fingerprint": f"fp-{n}"} for n, raw in enumerate(said)]
    body = go_wire({"version": "1", "status": "firing", "alerts": alerts})
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
        assert status == 200, answer
        async with h.bot.db.sessions() as s:
            stored = {r.fingerprint: r.severity for r in (await s.execute(select(AlertRecord))).scalars()}
        metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    assert {raw: stored[f"fp-{n}"] for n, raw in enumerate(said)} == {raw: "info" for raw in said}
    assert not [m for m in metrics if m.startswith("chatops_alerts_unknown_severity_total{")]


async def test_an_unsupported_version_is_said_as_the_sender_wrote_it(tmp_path: Path) -> None:
    """The 422 showed Python's repr of the version ({'x': {'y': 1}}), not the JSON the sender wrote."""
    body = go_wire({"version": {"x": {"y": 1}}, "alerts": []})
    async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as h:
        status, answer, _ = await h.post("grafana", body, signed(body))
    assert (status, answer) == (422, {"error": 'version: unsupported Grafana webhook version {"x": {"y": 1}} (expected '
                                               '"1") (not a grafana payload?)', "field": "version"})
