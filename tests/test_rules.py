"""Pure domain rules: routing, silences, grouping keys, priority, lifecycle, severity."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from adapters import SETTINGS_MODELS
from bot.alerts import Alert, normalize_severity, parse_generic, parse_grafana, read_body
from bot.config import ConfigError, Silence, parse_config
from bot.incidents import InvalidTransition, priority, transition
from bot.routing import group_key, matches, select_routes, silence_ends, silenced_by

CFG = """
channels:
  - {id: a, platform: slack, chat: C0A}
  - {id: b, platform: slack, chat: C0B}
  - {id: c, platform: slack, chat: C0C}
routes:
  - {match: {team: dba}, channels: [a], continue: true}
  - {match: {instance: "=~db-0[0-9]:.*", severity: "!=info"}, channels: [b]}
  - {match: {}, channels: [c]}
silences:
  - {id: nightly, matchers: {job: backup}, weekly: {days: [mon], start: "23:00", end: "02:00", timezone: Europe/Berlin}}
  - {id: once, matchers: {instance: "!~prod-.*"}, starts: 2026-11-24T10:00:00+01:00, ends: 2026-11-24T12:00:00+01:00}
"""


def config():
    return parse_config(CFG, adapter_models=SETTINGS_MODELS, env={}).config


@pytest.mark.parametrize(("labels", "channels"), [
    ({"team": "dba", "instance": "db-01:9100", "severity": "critical"}, ["a", "b"]),  # continue: true
    ({"team": "dba", "instance": "web-1"}, ["a", "c"]),
    ({"instance": "db-01:9100", "severity": "info"}, ["c"]),
    ({"instance": "db-011:9100"}, ["c"]),  # =~ is anchored: db-0[0-9]: does not match db-011:
    ({}, ["c"]),
])
def test_routes_first_match_wins_unless_continue(labels: dict[str, str], channels: list[str]) -> None:
    routes = select_routes(config().routes, labels)
    chosen = [ch for r in routes for ch in r.channels]
    assert chosen == channels


def test_matchers() -> None:
    assert matches({"a": "=~x.*", "b": "!=y", "c": "!~z+"}, {"a": "xyz", "b": "n", "c": "q"})
    assert not matches({"a": "=~x"}, {"a": "xy"})  # anchored
    assert matches({"missing": "!=v"}, {})
    assert not matches({"missing": "v"}, {})


def test_weekly_silence_across_midnight_in_local_time() -> None:
    cfg = config()
    labels = {"job": "backup", "instance": "prod-1"}
    berlin_monday_2330 = datetime(2026, 11, 23, 22, 30, tzinfo=UTC)  # 23:30 CET
    assert silenced_by(cfg.silences, labels, berlin_monday_2330, "UTC").id == "nightly"
    berlin_tuesday_0130 = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)  # 01:30 CET, still Monday night
    assert silenced_by(cfg.silences, labels, berlin_tuesday_0130, "UTC") is not None
    assert silenced_by(cfg.silences, labels, datetime(2026, 11, 24, 1, 30, tzinfo=UTC), "UTC") is None  # 02:30
    assert silenced_by(cfg.silences, labels, datetime(2026, 11, 25, 22, 30, tzinfo=UTC), "UTC") is None  # wednesday
    # The window is Monday night only: 01:30 on Monday (Sunday night) and Tuesday 23:30 are outside it.
    assert silenced_by(cfg.silences, labels, datetime(2026, 11, 23, 0, 30, tzinfo=UTC), "UTC") is None
    assert silenced_by(cfg.silences, labels, datetime(2026, 11, 24, 22, 30, tzinfo=UTC), "UTC") is None


def test_a_weekly_silence_from_midnight_to_midnight_is_the_whole_day() -> None:
    cfg = parse_config(CFG + '  - {id: weekend, matchers: {team: web}, weekly: {days: [sat], start: "00:00", '
                       'end: "00:00", timezone: Europe/Berlin}}\n', adapter_models=SETTINGS_MODELS, env={}).config
    labels = {"team": "web"}
    for hour in (0, 12, 23):  # Saturday 28 Nov in Berlin (UTC+1): it was never active
        at = datetime(2026, 11, 28, hour, 30, tzinfo=ZoneInfo("Europe/Berlin"))
        assert silenced_by(cfg.silences, labels, at, "UTC").id == "weekend", hour
    for at in (datetime(2026, 11, 27, 23, 30, tzinfo=ZoneInfo("Europe/Berlin")),
               datetime(2026, 11, 29, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))):
        assert silenced_by(cfg.silences, labels, at, "UTC") is None, at


def test_one_off_silence_window() -> None:
    cfg = config()
    inside = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)  # 11:00 +01:00
    assert silenced_by(cfg.silences, {"instance": "staging-1"}, inside, "UTC").id == "once"
    assert silenced_by(cfg.silences, {"instance": "prod-1"}, inside, "UTC") is None
    assert silenced_by(cfg.silences, {"instance": "staging-1"}, inside + timedelta(hours=1), "UTC") is None


def _weekly(days: str, start: str, end: str) -> Silence:
    return parse_config(f'silences:\n  - {{id: w, matchers: {{a: b}}, weekly: {{days: [{days}], start: "{start}", '
                        f'end: "{end}", timezone: Europe/Berlin}}}}\n', adapter_models=SETTINGS_MODELS,
                        env={}).config.silences[0]


def test_a_weekly_window_ends_at_its_local_end_across_a_dst_change() -> None:
    """When the window that muted an incident ends, the incident may speak (handlers/silences.py): the end is the
    window's wall time in its own zone, not its length added in UTC."""
    berlin = ZoneInfo("Europe/Berlin")
    fall = _weekly("sun", "01:00", "03:30")  # 25 Oct 2026: 03:00 CEST becomes 02:00 CET, the window lasts 3.5 h
    at = datetime(2026, 10, 25, 2, 30, tzinfo=berlin)  # (CEST, before the change)
    end = silence_ends(fall, at, "UTC")
    assert end == datetime(2026, 10, 25, 2, 30, tzinfo=UTC)  # 03:30 CET, 3.5 hours after 01:00 CEST
    assert silenced_by([fall], {"a": "b"}, end - timedelta(seconds=1), "UTC") is not None
    assert silenced_by([fall], {"a": "b"}, end, "UTC") is None
    # 29 Mar 2026: 02:00 CET becomes 03:00 CEST, so 02:30 never comes; the window ends as the clocks skip it.
    spring = _weekly("sun", "01:00", "02:30")
    assert silence_ends(spring, datetime(2026, 3, 29, 0, 30, tzinfo=UTC), "UTC") == datetime(2026, 3, 29, 1, 0,
                                                                                               tzinfo=UTC)
    # 02:30 comes twice in October: the window ends at the first, and is not active again in the second pass of
    # 02:00-02:30 (the incident it muted spoke at the first 02:30; alerts after it were silenced all the same)
    twice = _weekly("sun", "01:00", "02:30")
    assert silence_ends(twice, datetime(2026, 10, 25, 0, 0, tzinfo=UTC), "UTC") == datetime(2026, 10, 25, 0, 30,
                                                                                              tzinfo=UTC)
    saturday_night = _weekly("sat", "22:00", "02:30")
    assert silence_ends(saturday_night, datetime(2026, 10, 24, 20, 30, tzinfo=UTC), "UTC") == datetime(
        2026, 10, 25, 0, 30, tzinfo=UTC)
    for window in (twice, saturday_night):
        covered = [minute for minute in range(0, 150, 5) if silenced_by(
            [window], {"a": "b"}, datetime(2026, 10, 24, 23, 0, tzinfo=UTC) + timedelta(minutes=minute), "UTC")]
        assert covered == list(range(0, 90, 5))  # 23:00Z (01:00 CEST) to 00:30Z (02:30 CEST), not 01:00-01:30Z
    # The second pass of the hour is inside a window that ends after it (03:30 CET), and one that starts before
    assert silenced_by([fall], {"a": "b"}, datetime(2026, 10, 25, 1, 15, tzinfo=UTC), "UTC") is not None
    assert silenced_by([_weekly("sat", "22:00", "04:00")], {"a": "b"}, datetime(2026, 10, 25, 1, 15, tzinfo=UTC),
                       "UTC") is not None


def test_a_silence_ends_when_nothing_of_it_covers_the_time_any_more() -> None:
    friday_night = _weekly("fri", "22:00", "06:00")
    assert silence_ends(friday_night, datetime(2026, 11, 28, 2, 0, tzinfo=UTC), "UTC") == datetime(
        2026, 11, 28, 5, 0, tzinfo=UTC)  # Saturday 06:00 CET
    weekend = _weekly("sat, sun", "00:00", "00:00")  # back to back: it ends Monday 00:00, not Sunday
    assert silence_ends(weekend, datetime(2026, 11, 28, 10, 0, tzinfo=UTC), "UTC") == datetime(
        2026, 11, 29, 23, 0, tzinfo=UTC)
    assert silence_ends(_weekly("mon, tue, wed, thu, fri, sat, sun", "00:00", "00:00"),
                        datetime(2026, 11, 28, 10, 0, tzinfo=UTC), "UTC") is None  # every day, whole: no end
    cfg = config()
    once = next(s for s in cfg.silences if s.id == "once")
    assert silence_ends(once, datetime(2026, 11, 24, 10, 0, tzinfo=UTC), "UTC") == datetime(2026, 11, 24, 11, 0,
                                                                                              tzinfo=UTC)
    open_ended = parse_config("silences:\n  - {matchers: {a: b}, starts: 2026-11-24T10:00:00Z}\n",
                              adapter_models=SETTINGS_MODELS, env={}).config.silences[0]
    assert silence_ends(open_ended, datetime(2026, 11, 25, tzinfo=UTC), "UTC") is None


def test_bad_silences_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("silences:\n  - {matchers: {a: b}}\n  - {matchers: {a: b}, starts: 2026-11-24T10:00:00}\n",
                     adapter_models=SETTINGS_MODELS, env={})
    assert [f"{p}: {m}" for p, m in info.value.problems] == [
        "silences[0]: give starts/ends or a weekly window",
        "silences[1].starts: give the time with a UTC offset, e.g. 2026-11-25T22:00:00+01:00",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config("silences:\n  - {matchers: {a: '=~('}, starts: 2026-11-24T10:00:00Z}\n",
                     adapter_models=SETTINGS_MODELS, env={})
    assert [f"{p}: {m}" for p, m in info.value.problems][0].startswith(
        "silences[0].matchers.a: invalid regular expression '(': missing ), unterminated subpattern")


def _alert(**kw) -> Alert:
    base = dict(source="am", fingerprint="f", status="firing", labels={"alertname": "A", "instance": "i", "svc": "s"},
                annotations={}, severity="high", summary="x")
    return Alert(**{**base, **kw})


def test_group_keys() -> None:
    by = ["alertname", "instance"]
    assert group_key(by, None, _alert()) == "alertname=A|instance=i"
    assert group_key(by, "groupKey", _alert(group_key="{}:{alertname=\"A\"}")) == 'group:am:{}:{alertname="A"}'
    assert group_key(by, "svc", _alert()) == "svc=s"
    assert group_key(by, "groupKey", _alert(dedup_key="d1")) == "dedup:am:d1"


def test_priority_formula() -> None:
    t0 = datetime(2026, 11, 24, tzinfo=UTC)
    p = lambda **kw: priority(**{"severity": "high", "duplicates": 0, "source_count": 1, "critical_asset": False,  # noqa: E731
                                 "opened_at": t0, "now": t0, **kw})
    assert [p(severity=s) for s in ("critical", "high", "medium", "low", "info")] == [90, 60, 30, 10, 0]
    assert p(duplicates=3) == 66 and p(duplicates=50) == 80
    assert p(source_count=2) == 70 and p(critical_asset=True) == 80
    assert p(now=t0 + timedelta(hours=3, minutes=59)) == 57 and p(now=t0 + timedelta(days=3)) == 50


def test_lifecycle() -> None:
    assert transition("triggered", "acknowledge") == "acknowledged"
    assert transition("acknowledged", "resolve") == "resolved"
    assert transition("resolved", "reopen") == "triggered"
    with pytest.raises(InvalidTransition, match="cannot acknowledge an incident that is resolved"):
        transition("resolved", "acknowledge")


@pytest.mark.parametrize(("raw", "level"), [
    ("CRITICAL", "critical"), ("P1", "critical"), ("Disaster", "critical"), ("error", "high"), ("High", "high"),
    ("warning", "medium"), ("Average", "medium"), ("minor", "low"), ("info", "info"), ("Not classified", "info"),
    ("Highest", "critical"), ("Lowest", "info"), ("S1", "critical"), ("s2", "high"), ("Blocker", "critical"),
    ("urgent", "critical"), ("SEVERE", "high"), ("trivial", "info"), ("P1-Critical", "critical"),
    ("critical/page", "critical"),
])
def test_severity_normalization(raw: str, level: str) -> None:
    assert normalize_severity(raw) == level


def test_generic_list_with_labels_and_dedup() -> None:
    alerts = parse_generic([
        {"asset_name": "db-1", "signature": "Replication lag", "severity": "warning", "message": "lag 30s\nmore",
         "tool_source": "zabbix", "labels": {"team": "dba"}, "dedup_key": "zbx-991"},
        {"asset_name": "db-1", "signature": "Replication lag", "severity": "ok", "message": "recovered",
         "tool_source": "zabbix", "status": "resolved"},
    ], "gen")
    assert [(a.status, a.severity, a.summary) for a in alerts] == [("firing", "medium", "lag 30s"), ("resolved", "info", "recovered")]
    assert alerts[0].labels == {"alertname": "Replication lag", "instance": "db-1", "tool": "zabbix", "severity": "warning",
                                "team": "dba"}
    assert alerts[0].fingerprint == "zbx-991" and alerts[0].dedup_key == "zbx-991"
    same_signal = {"asset_name": "db-1", "signature": "Replication lag", "severity": "high", "message": "m", "tool_source": "zabbix"}
    assert alerts[1].fingerprint == parse_generic(same_signal, "gen")[0].fingerprint


GENERIC = {"asset_name": "web-9", "signature": "Memory", "severity": "high", "tool_source": "datadog"}


@pytest.mark.parametrize(("message", "title"), [
    ("\n\nMemory at 97% on web-9\nmore", "Memory at 97% on web-9"),
    ("%%%\nhost stopped reporting\n%%%", "host stopped reporting"),  # Datadog's $EVENT_MSG markdown
    ("  \n%%%\n%%%", "Memory"),  # nothing but blanks and markers: the signature
    # at most 300 characters, cut with an ellipsis (it ended mid-word, as if that were all)
    ("very long alert title " * 20, ("very long alert title " * 20)[:299] + "\u2026"),
    ("x" * 300, "x" * 300),
])
def test_a_generic_title_is_the_first_line_that_says_something(message: str, title: str) -> None:
    [a] = parse_generic({**GENERIC, "message": message}, "gen")
    assert a.summary == title


def test_generic_label_values_read_as_json_writes_them() -> None:
    [a] = parse_generic({**GENERIC, "message": "m", "labels": {"prod": True, "canary": False, "replicas": 2.0,
                                                               "ratio": 0.5, "count": 3, "owner": None}}, "gen")
    assert {k: a.labels[k] for k in ("prod", "canary", "replicas", "ratio", "count", "owner")} == {
        "prod": "true", "canary": "false", "replicas": "2", "ratio": "0.5", "count": "3", "owner": ""}


def test_generic_links_graph_is_the_graph_and_empty_links_are_none() -> None:
    [a] = parse_generic({**GENERIC, "message": "m", "links": {"graph": "https://dd/graph", "runbook": "",
                                                             "dashboard": None}}, "gen")
    assert a.links == {"generator": "https://dd/graph"}


@pytest.mark.parametrize("status", [None, ""])
def test_a_generic_status_left_empty_is_firing(status: object) -> None:
    [a] = parse_generic({**GENERIC, "message": "m", "status": status}, "gen")
    assert a.status == "firing"


def test_grafana_no_data_and_error_alerts_are_named_after_their_rule_and_grouped_by_it() -> None:
    def one(alertname: str, rule: str, **annotations: str) -> dict[str, object]:
        return {"status": "firing", "labels": {"alertname": alertname, "rulename": rule, "grafana_folder": "infra"},
                "annotations": {"summary": "Disk above 90%", **annotations}, "fingerprint": f"{alertname}{rule}"}

    alerts = parse_grafana({"version": "1", "alerts": [
        one("DatasourceNoData", "Disk full"), one("DatasourceNoData", "Queue lag"),
        one("DatasourceError", "Disk full", Error="[sse.dataQueryError] failed to execute query [A]: timeout\nmore"),
        one("DiskFull", "Disk full")]}, "grafana")
    assert [a.summary for a in alerts] == [
        "Disk full: no data", "Queue lag: no data",
        "Disk full: datasource error ([sse.dataQueryError] failed to execute query [A]: timeout)", "Disk above 90%"]
    keys = [group_key(["alertname", "instance"], None, a) for a in alerts]
    assert keys == ["alertname=DatasourceNoData/Disk full|instance=", "alertname=DatasourceNoData/Queue lag|instance=",
                    "alertname=DatasourceError/Disk full|instance=", "alertname=DiskFull|instance="]
    assert alerts[0].labels["alertname"] == "DatasourceNoData"  # routes and silences see Grafana's labels


def test_a_nul_in_alert_text_is_dropped_not_stored() -> None:
    body = b'{"asset_name": "n\\u0000x", "signature": "s", "severity": "info", "message": "bad\\u0000byte", ' \
           b'"tool_source": "t", "labels": {"k\\u0000": "v\\u0000"}}'
    [a], _ = read_body("generic", "gen", body)
    assert (a.summary, a.labels["instance"], a.labels["k"]) == ("badbyte", "nx", "v")


@pytest.mark.parametrize(("raw", "level"), [("P0", "critical"), ("SEV 1", "critical"), ("Sev-2", "high"),
                                            ("sev_3", "medium"), ("SEV0", "critical")])
def test_severity_words_with_separators(raw: str, level: str) -> None:
    assert normalize_severity(raw, default="") == level


@pytest.mark.parametrize("raw", ["1", "low-critical", "sev/1", "whatever"])
def test_a_severity_the_bot_does_not_know_is_none_of_its_levels(raw: str) -> None:
    """A number alone means different levels to different tools (Zabbix' 1 is information, syslog's alert), and
    words that disagree say nothing: they stay unknown (medium for Alertmanager and Grafana, a 422 for generic)."""
    assert normalize_severity(raw, default="") == ""


@pytest.mark.parametrize("status", ["Warn", "No Data", "Re-Triggered", "Renotify"])
def test_datadog_monitor_states_are_firing(status: str) -> None:
    [a] = parse_generic({**GENERIC, "message": "m", "status": status}, "gen")
    assert a.status == "firing"


@pytest.mark.parametrize("timestamp", [1796432400, 1796432400.0, "1796432400", 1796432400000, "1796432400000"])
def test_a_generic_timestamp_may_be_unix_time(timestamp: object) -> None:
    [a] = parse_generic({**GENERIC, "message": "m", "timestamp": timestamp}, "gen")
    assert a.starts_at == datetime(2026, 12, 5, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(("timestamp", "problem"), [
    ("2026.12.05 01:00:00", "timestamp: not an RFC 3339 time: '2026.12.05 01:00:00'"),
    (10 ** 30, "timestamp: out of range: '1000000000000000000000000000000'"),
    (True, "timestamp: expected an RFC 3339 time, got a boolean"),
])
def test_a_generic_timestamp_that_is_no_time_is_named(timestamp: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_generic({**GENERIC, "message": "m", "timestamp": timestamp}, "gen")


def test_a_person_is_found_by_id_before_name_and_a_shared_name_finds_nobody() -> None:
    from bot.config import Person, find_person, unknown_person

    people = [Person(id="rob", name="Bob"), Person(id="bob", name="Robert"),
              Person(id="alex.k", name="Alex"), Person(id="alex.m", name="Alex", telegram=333)]
    assert find_person(people, "bob").id == "bob"  # an id, though rob's name is Bob
    assert find_person(people, "Robert").id == "bob" and find_person(people, "333").id == "alex.m"
    assert find_person(people, "Alex") is None
    assert unknown_person(people, "Alex") == "'Alex' could be `alex.k` or `alex.m` (the same name): name them by id."
    assert unknown_person(people, "zed") == "I don't know 'zed' (people in app.yaml: rob, bob, alex.k, alex.m)."


def test_group_keys_of_labels_holding_separators_do_not_collide_and_ordinary_ones_are_unchanged() -> None:
    """alertname `A|instance=B` without an instance and alertname `A` on instance `B|instance=` both made
    `alertname=A|instance=B|instance=`: one incident for two problems. `\\`, `|` and `=` inside a label are escaped,
    only where present, so every key of labels without them stays as stored (open incidents keep matching)."""
    by = ["alertname", "instance"]
    one = group_key(by, None, _alert(labels={"alertname": "A|instance=B", "instance": ""}))
    other = group_key(by, None, _alert(labels={"alertname": "A", "instance": "B|instance="}))
    assert one != other
    assert (one, other) == (r"alertname=A\|instance\=B|instance=", r"alertname=A|instance=B\|instance\=")
    assert group_key(by, None, _alert(labels={"alertname": "A\\", "instance": "|x"})) != group_key(
        by, None, _alert(labels={"alertname": "A\\|x", "instance": ""}))
    ordinary = {"alertname": "DiskFull: /var 97% (db-01)", "instance": "db-01:9100/ü {x}"}
    assert group_key(by, None, _alert(labels=ordinary)) == "alertname=DiskFull: /var 97% (db-01)|instance=db-01:9100/ü {x}"
    assert group_key(["svc"], "svc", _alert(labels={"svc": "a|b=c"})) == r"svc=a\|b\=c"
    assert group_key(by, "svc", _alert()) == "svc=s"
