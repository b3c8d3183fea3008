"""bot.view: what an incident message says, its buttons and its thread lines."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.actions import Action, decode, encode
from bot.view import buttons_for, incident_context, span, thread_line
from storage.models import AlertRecord, Incident

NOW = datetime(2026, 3, 3, 14, 15, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def make_incident(**over) -> Incident:
    fields = dict(
        id=42, group_key="k", title="Disk full on db-1", status="triggered", severity="critical", priority=95,
        labels={"alertname": "DiskFull", "instance": "db-1:9100", "service": "postgres"},
        links={"generator": "http://prom:9090/graph?g0.expr=disk&g0.tab=1"},
        sources=["alertmanager", "grafana"], channels=["ops-slack"], alert_count=3, firing_count=2,
        notifications=4, silenced=False, escalation="dba", opened_at=NOW - timedelta(minutes=12),
        first_seen=NOW - timedelta(minutes=12),
        last_seen=NOW,
    )
    fields.update(over)
    return Incident(**fields)


def make_alert(summary: str, *, received: datetime, **over) -> AlertRecord:
    fields = dict(incident_id=42, source="alertmanager", fingerprint=summary, status="firing", severity="critical",
                  summary=summary, labels={"alertname": "DiskFull"}, annotations={}, links={},
                  first_received=received, last_received=received)
    fields.update(over)
    return AlertRecord(**fields)


ALERTS = [
    make_alert("Disk 91% full", received=NOW - timedelta(minutes=12),
               annotations={"runbook_url": "https://wiki.example/disk", "description": "older"}),
    make_alert("Disk 97% full on /var", received=NOW - timedelta(minutes=1),
               annotations={"runbook_url": "https://wiki.example/disk", "description": "only 300 MB left"},
               links={"dashboard": "https://grafana.example/d/abc", "panel": "https://grafana.example/d/abc",
                      "silence": "https://grafana.example/alerting/silence/new?matcher=a%3Db"}),
    make_alert("Disk 93% full", received=NOW - timedelta(minutes=5)),
]


def facts(ctx: dict) -> dict[str, str]:
    return {f["key"]: f["text"] for f in ctx["facts"]}


def test_firing_incident_first_line_facts_and_next_step():
    ctx = incident_context(make_incident(), ALERTS, now=NOW)
    assert ctx["state"] == "firing"
    assert (ctx["marker"], ctx["colour"]) == ("\U0001f534", "#E01E5A")
    assert ctx["headline"] == "\U0001f534 Firing \u00b7 Critical \u00b7 #42 Disk full on db-1"
    assert ctx["ref"] == "#42" and ctx["severity"] == "critical"
    assert facts(ctx) == {
        "service": "service postgres",
        "instance": "instance db-1:9100",
        "started": "started 3 Mar 14:03 UTC",
        "alerts": "3 alerts from alertmanager and grafana",
        "firing": "2 of 3 still firing",
        "priority": "priority 95",
    }
    assert ctx["next_step"] == "Waiting for someone to acknowledge."
    assert ctx["resolved_after"] is None


def test_latest_alert_is_the_newest_received_with_showing_the_last_of_n():
    ctx = incident_context(make_incident(), ALERTS, now=NOW)
    assert ctx["latest"] == {"summary": "Disk 97% full on /var", "status": "firing", "detail": "only 300 MB left",
                             "evaluated": "", "value_string": "", "showing": "showing the last of 3"}
    one = incident_context(make_incident(alert_count=1, firing_count=1), ALERTS[:1], now=NOW)
    assert one["latest"]["showing"] == ""
    assert "firing" not in facts(one)  # "1 of 1 firing" says nothing
    assert facts(one)["alerts"] == "1 alert from alertmanager and grafana"
    assert incident_context(make_incident(), [], now=NOW)["latest"] is None


def test_latest_alert_of_an_open_incident_is_the_newest_still_firing():
    """After a partial resolve the newest alert received is the one that stopped firing (its resolve came last): the
    card showed it, unmarked, as Latest, and an on-call read a problem that was gone. An open incident's card shows
    what is still wrong, the newest alert still firing; the one that resolved is in the thread and the Firing fact."""
    stopped = make_alert("Disk 97% full on /var", received=NOW, status="resolved")
    alerts = [*ALERTS[:1], ALERTS[2], stopped]
    ctx = incident_context(make_incident(firing_count=2), alerts, now=NOW)
    assert (ctx["latest"]["summary"], ctx["latest"]["status"]) == ("Disk 93% full", "firing")
    assert ctx["latest"]["showing"] == "showing the last of 2 still firing"
    one = incident_context(make_incident(firing_count=1), [ALERTS[0], stopped], now=NOW)
    assert (one["latest"]["summary"], one["latest"]["showing"]) == ("Disk 91% full", "showing the one still firing")
    # none of the alerts drawn fires (an open incident whose firing ones are older than those drawn): marked
    gone = incident_context(make_incident(firing_count=1), [stopped], now=NOW)["latest"]
    assert (gone["summary"], gone["showing"]) == ("Disk 97% full on /var", "resolved; showing the last of 3")
    alone = incident_context(make_incident(alert_count=1, firing_count=0, status="acknowledged"), [stopped], now=NOW)
    assert alone["latest"]["showing"] == "resolved"
    # resolved: every alert is history, and the state says so; the newest is shown as before
    done = incident_context(make_incident(status="resolved", firing_count=0, resolved_at=NOW), alerts, now=NOW)
    assert (done["latest"]["summary"], done["latest"]["showing"]) == ("Disk 97% full on /var", "showing the last of 3")


def test_links_graph_runbook_dashboard_silence_deduplicated_and_safe():
    ctx = incident_context(make_incident(), ALERTS, now=NOW)
    assert ctx["links"] == [
        ("Graph", "http://prom:9090/graph?g0.expr=disk&g0.tab=1"),
        ("Runbook", "https://wiki.example/disk"),
        ("Dashboard", "https://grafana.example/d/abc"),  # the panel has the same URL: shown once
        ("Silence", "https://grafana.example/alerting/silence/new?matcher=a%3Db"),
    ]
    hostile = make_alert("x", received=NOW, annotations={"runbook_url": "javascript:alert(1)"},
                         links={"generator": "https://prom/graph?q=a|b <x>", "dashboard": "ftp://x/y"})
    ctx = incident_context(make_incident(links={}), [hostile], now=NOW)
    assert ctx["links"] == [("Graph", "https://prom/graph?q=a%7Cb%20%3Cx%3E")]


def test_acknowledged_incident_says_who_and_when():
    inc = make_incident(status="acknowledged", acknowledged_at=NOW - timedelta(minutes=3), acknowledged_by="alice")
    ctx = incident_context(inc, ALERTS, now=NOW, acknowledged_name="Alice")
    assert (ctx["state"], ctx["marker"], ctx["colour"]) == ("acknowledged", "\U0001f7e0", "#ECB22E")
    assert ctx["headline"].startswith("\U0001f7e0 Acknowledged \u00b7 Critical \u00b7 #42 ")
    assert facts(ctx)["acknowledged"] == "acknowledged by Alice, 3 Mar 14:12 UTC"
    assert ctx["next_step"] == "Alice is on it. Resolve when fixed, or escalate for help."
    # with no escalation policy the card has no Escalate: it says how to get help instead
    quiet = make_incident(status="acknowledged", acknowledged_at=NOW, acknowledged_by="alice", escalation=None)
    assert incident_context(quiet, ALERTS, now=NOW, acknowledged_name="Alice")["next_step"] == (
        "Alice is on it. Resolve when fixed, or page someone for help with `/incident page 42 PERSON`.")
    # without a display name, the stored person id is shown
    assert facts(incident_context(inc, ALERTS, now=NOW))["acknowledged"].startswith("acknowledged by alice, ")


def test_resolved_incident_says_how_long_it_took():
    inc = make_incident(status="resolved", firing_count=0, opened_at=NOW - timedelta(hours=2),
                        resolved_at=NOW - timedelta(minutes=55), resolved_by="source:alertmanager")
    ctx = incident_context(inc, ALERTS, now=NOW)
    assert (ctx["state"], ctx["marker"], ctx["colour"]) == ("resolved", "\U0001f7e2", "#2EB67D")
    assert ctx["resolved_after"] == "resolved after 1 h 5 min"
    assert facts(ctx)["resolved"] == "resolved after 1 h 5 min by alertmanager"
    assert "firing" not in facts(ctx)
    assert ctx["next_step"].startswith("Resolved after 1 h 5 min.")
    by_person = incident_context(make_incident(status="resolved", resolved_at=NOW, resolved_by="bob",
                                               opened_at=NOW - timedelta(seconds=40)),
                                 [], now=NOW, resolved_name="Bob")
    assert facts(by_person)["resolved"] == "resolved after 40 s by Bob"


def test_silenced_incident_is_grey():
    ctx = incident_context(make_incident(silenced=True), ALERTS, now=NOW)
    assert (ctx["state"], ctx["marker"], ctx["colour"]) == ("silenced", "\u26aa", "#9E9E9E")
    assert ctx["headline"].startswith("\u26aa Silenced \u00b7 ")
    assert "nobody is paged" in ctx["next_step"]
    # a resolved incident is resolved, silenced or not
    assert incident_context(make_incident(silenced=True, status="resolved", resolved_at=NOW), [], now=NOW)[
        "state"] == "resolved"


def test_next_step_from_the_caller_wins():
    step = "Paging Alice (Telegram). Bob in 5 min if nobody acknowledges."
    assert incident_context(make_incident(), ALERTS, now=NOW, next_step=step)["next_step"] == step


def test_times_in_the_requested_zone_named_with_the_day_never_how_long_ago():
    """A card is read long after it is drawn: "12 min ago" (or "15:03" alone, the next morning) would mislead."""
    ctx = incident_context(make_incident(), ALERTS, now=NOW, tz="Europe/Berlin")
    assert facts(ctx)["started"] == "started 3 Mar 15:03 CET"
    old = make_incident(opened_at=NOW - timedelta(days=2, hours=3))
    assert facts(incident_context(old, [], now=NOW, tz="Europe/Berlin"))["started"] == "started 1 Mar 12:15 CET"
    summer = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)
    ctx = incident_context(make_incident(opened_at=summer - timedelta(minutes=90)), [], now=summer,
                           tz="Europe/Berlin")
    assert facts(ctx)["started"] == "started 1 Jul 09:30 CEST"
    last_year = make_incident(opened_at=datetime(2025, 12, 31, 22, 0, tzinfo=UTC))
    assert facts(incident_context(last_year, [], now=NOW, tz="Europe/Berlin"))["started"] == \
        "started 31 Dec 2025 23:00 CET"


def test_a_time_fact_carries_its_moment_for_platforms_that_write_it_for_each_reader():
    inc = make_incident(status="acknowledged", acknowledged_at=NOW - timedelta(minutes=3), acknowledged_by="alice")
    timed = {f["key"]: (f["at"], f["when"], f["text"]) for f in incident_context(inc, [], now=NOW)["facts"] if "at" in f}
    assert timed == {
        "started": (int((NOW - timedelta(minutes=12)).timestamp()), "3 Mar 14:03 UTC", "started 3 Mar 14:03 UTC"),
        "acknowledged": (int((NOW - timedelta(minutes=3)).timestamp()), "3 Mar 14:12 UTC",
                         "acknowledged by alice, 3 Mar 14:12 UTC"),
    }


def test_naive_datetimes_are_taken_as_utc():
    inc = make_incident(opened_at=datetime(2026, 3, 3, 14, 0))
    assert facts(incident_context(inc, [], now=NOW))["started"] == "started 3 Mar 14:00 UTC"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59, "59 s"), (60, "1 min"), (12 * 60 + 59, "12 min"), (3600, "1 h"), (3900, "1 h 5 min"),
    (86400, "1 d"), (2 * 86400 + 3 * 3600 + 59, "2 d 3 h"), (-5, "0 s"),
])
def test_span(seconds, text):
    assert span(timedelta(seconds=seconds)) == text


def test_latest_says_what_its_query_evaluated_to():
    """Grafana's `values` (kept as the `values` annotation) were stored and never shown: for a rule without a summary,
    the title only names the rule, and the value is the news."""
    older = make_alert("Queue depth", received=NOW - timedelta(minutes=5), annotations={"values": "B=9000, C=1"})
    newest = make_alert("Queue depth", received=NOW, annotations={
        "values": "B=15234.5, C=1", "value": "[ var='B' labels={queue=orders} value=15234.5 ], "
                                             "[ var='C' labels={queue=orders} value=1 ]"})
    latest = incident_context(make_incident(), [newest, older], now=NOW)["latest"]
    assert latest["evaluated"] == "B=15234.5, C=1"  # the newest alert's, short
    assert latest["value_string"] == newest.annotations["value"]  # with the series' labels, for a template of one's own
    # No `values` (a rule's own `value` annotation, or a valueString alone): that, on one line, cut.
    alone = make_alert("x", received=NOW, annotations={"value": "[ var='A' labels={} value=1 ]\n" + "9" * 400})
    said = incident_context(make_incident(), [alone], now=NOW)["latest"]["evaluated"]
    assert said.startswith("[ var='A' labels={} value=1 ] 999") and len(said) == 200 and said.endswith("\u2026")


def test_title_and_summary_are_one_line_and_bounded():
    ctx = incident_context(make_incident(title="Disk\nfull  \t on\r\ndb-1"), [
        make_alert("a" * 2000, received=NOW)], now=NOW)
    assert ctx["title"] == "Disk full on db-1"
    assert len(ctx["latest"]["summary"]) == 500 and ctx["latest"]["summary"].endswith("\u2026")
    assert incident_context(make_incident(title=""), [], now=NOW)["title"] == "Incident #42"


def test_buttons_match_the_state():
    def shown(inc):
        return [(b.label, b.action, b.style, b.confirm is not None) for b in buttons_for(inc)]

    assert shown(make_incident()) == [("Acknowledge", "ack", "primary", False), ("Escalate", "esc", "default", False),
                                      ("Resolve", "res", "danger", True)]
    assert shown(make_incident(status="acknowledged")) == [("Escalate", "esc", "default", False),
                                                           ("Resolve", "res", "danger", True)]
    assert shown(make_incident(status="resolved")) == [("Reopen", "reo", "default", False)]
    # silenced: Escalate would page nobody (and was always refused), so it is not offered
    assert shown(make_incident(silenced=True)) == [("Acknowledge", "ack", "primary", False),
                                                   ("Resolve", "res", "danger", True)]
    assert shown(make_incident(silenced=True, status="acknowledged")) == [("Resolve", "res", "danger", True)]


def test_resolve_asks_first_and_says_what_is_still_firing():
    resolve = buttons_for(make_incident(firing_count=2))[-1]
    assert resolve.confirm == ("Resolve #42 while 2 alerts are still firing? "
                               "If they keep firing, a new incident opens.")
    assert buttons_for(make_incident(firing_count=0))[-1].confirm == "Resolve #42?"
    one = buttons_for(make_incident(firing_count=1))[-1]  # before: "while 1 alert is still firing? If they keep..."
    assert one.confirm == "Resolve #42 while 1 alert is still firing? If it keeps firing, a new incident opens."


def test_buttons_encode_within_the_64_byte_limit():
    from bot.actions import MAX_ID

    for status in ("triggered", "acknowledged", "resolved"):
        for b in buttons_for(make_incident(id=MAX_ID, status=status)):  # the largest id the store holds
            d = decode(encode(b.action, b.incident_id, b.arg))
            assert (d.action, d.incident_id) == (Action(b.action), MAX_ID)


@pytest.mark.parametrize(("event", "details", "actor", "line"), [
    ("incident.acknowledged", {}, "Alice", "Acknowledged by Alice"),
    ("incident.escalated", {}, "Alice", "Escalated by Alice"),
    ("incident.escalated", {"to": "Carol", "step": 2}, None, "Escalated to Carol (step 2)"),
    ("alerts.grouped", {"count": 3}, None, "3 new alerts"),
    ("alerts.grouped", {"count": 1}, None, "1 new alert"),
    ("alerts.resolved", {"count": 2}, None, "2 alerts resolved by the source"),
    ("alerts.resolved", {"count": 1, "source": "grafana"}, None, "1 alert resolved by grafana"),
    ("incident.resolved", {"by": "source"}, None, "Resolved by the source: every alert stopped firing"),
    ("incident.resolved", {"by": "source", "source": "alertmanager"}, None,
     "Resolved by alertmanager: every alert stopped firing"),
    ("incident.resolved", {}, "Bob", "Resolved by Bob"),
    ("incident.reopened", {}, "Bob", "Reopened by Bob"),
    ("incident.something_new", {}, "Bob", "Something new by Bob"),
])
def test_thread_lines(event, details, actor, line):
    assert thread_line(event, details, actor_name=actor) == line


def test_thread_lines_mention_nobody():
    assert thread_line("incident.acknowledged", {}, actor_name="@channel\nhi") == "Acknowledged by channel hi"
    assert thread_line("incident.escalated", {"to": "@@here"}, actor_name=None) == "Escalated to here"


def test_view_and_render_are_pure_core_modules():
    """No storage, handlers, adapters or platform SDK; no wall clock."""
    for name in ("view.py", "render.py"):
        source = (ROOT / "bot" / name).read_text()
        modules = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules.add((node.module or "").split(".")[0])
        assert not modules & {"storage", "handlers", "adapters", "slack_bolt", "slack_sdk", "telegram", "botbuilder"}
        for clock in (".now(", "utcnow", "time.time", "date.today"):
            assert clock not in source, f"bot/{name} reads the clock ({clock})"


def test_no_escalate_button_on_an_incident_without_an_escalation_policy():
    """Escalate on an incident whose route names no escalation policy only ever answered "#42 has no escalation
    policy; page someone with ..."; it is drawn only where a press can escalate."""
    def labels(incident: Incident) -> list[str]:
        return [b.label for b in buttons_for(incident)]

    assert labels(make_incident(escalation=None)) == ["Acknowledge", "Resolve"]
    assert labels(make_incident(escalation=None, status="acknowledged")) == ["Resolve"]
    assert labels(make_incident(escalation="dba")) == ["Acknowledge", "Escalate", "Resolve"]
    assert labels(make_incident(escalation="dba", status="acknowledged")) == ["Escalate", "Resolve"]
