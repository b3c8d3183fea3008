"""Alert payloads (Alertmanager, Grafana, generic JSON) -> neutral alerts.

Parsers are pure: they take the decoded JSON and return `Alert`s, or raise
`ShapeError` naming the field that is wrong (the HTTP layer answers 422).
`read_body` does the whole step from a request's bytes, with the answer for a
body that is not a payload (`BodyError`: 400 or 422, and why).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

SEVERITIES = ("critical", "high", "medium", "low", "info")
# The words a severity label may say (any case; spaces, `_` and `-` inside are ignored: `SEV-1`, `Sev 1`, `p_1`).
# Jira's priorities are Highest, High, Medium, Low, Lowest (and its older Blocker, Critical, Major, Minor,
# Trivial); S1-S5 and SEV1-SEV5 read as P1-P5; Java's and syslog's levels as what they name.
_SEVERITY_WORDS = {
    "critical": ("critical", "crit", "fatal", "emergency", "emerg", "alert", "disaster", "page", "highest", "blocker",
                 "urgent", "p0", "p1", "s0", "s1", "sev0", "sev1"),
    "high": ("high", "error", "err", "major", "severe", "p2", "s2", "sev2"),
    "medium": ("medium", "warning", "warn", "average", "moderate", "p3", "s3", "sev3"),
    "low": ("low", "minor", "p4", "s4", "sev4"),
    "info": ("info", "informational", "information", "notice", "debug", "ok", "none", "not classified", "lowest",
             "trivial", "p5", "s5", "sev5"),
}
_SEPARATORS = re.compile(r"[\s_-]+")
# Keyed without separators, as a value is looked up once stripped of them: `not classified` is `Not_Classified` too.
_SEVERITY = {_SEPARATORS.sub("", word): level for level, words in _SEVERITY_WORDS.items() for word in words}
_WORDS = re.compile(r"[^\W_]+")  # the words of a compound value: `P1-Critical`, `critical/page`
_LEVELS: dict[str, str | None] = {}  # raw value -> its level (None: unknown), so that each is worked out once
_MAX_LEVELS = 4096  # raw values remembered (a sender inventing new ones cannot grow it for good)
_FRACTION = re.compile(r"(\.\d{6})\d+")


class ShapeError(ValueError):
    """The payload parsed as JSON but is not the shape this source sends."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


MAX_KEY = 500  # characters of a fingerprint or group key kept as they are (bounded_key)


def bounded_key(key: str) -> str:
    """`key`, or for a longer one its start and a hash of the whole: the same key always maps to the same text, and
    it fits a database index (PostgreSQL's refuses an entry of more than about 2,700 bytes)."""
    if len(key) <= MAX_KEY:
        return key
    return f"{key[:MAX_KEY - 80]}…sha256:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


@dataclass
class Alert:
    source: str
    fingerprint: str
    status: str  # firing | resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    severity: str
    summary: str
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    links: dict[str, str] = field(default_factory=dict)
    group_key: str | None = None  # the sender's own grouping (Alertmanager/Grafana groupKey)
    dedup_key: str | None = None  # an explicit deduplication key sent with the alert (generic)
    unknown_severity: str | None = None  # the severity label's value when the bot does not know it (medium then)

    @property
    def asset(self) -> str:
        return self.labels.get("instance") or self.labels.get("asset") or self.labels.get("host", "")


def severity_level(value: str) -> str | None:
    """The level a severity label's value names, or None for a value the bot does not know (nor an empty one).
    A compound value (`P1-Critical`, `critical/page`) names the level its known words agree on."""
    level = _LEVELS.get(value, "")
    if level != "":
        return level
    word = value.strip().lower()
    level = _SEVERITY.get(word) or _SEVERITY.get(_SEPARATORS.sub("", word))  # SEV-1, Sev 1, p_1
    if level is None:
        levels = {_SEVERITY[w] for w in _WORDS.findall(word) if w in _SEVERITY}
        level = levels.pop() if len(levels) == 1 else None
    if len(value) <= 100:  # (a longer one, which is no severity anyone means, is not kept)
        if len(_LEVELS) >= _MAX_LEVELS:
            _LEVELS.clear()
        _LEVELS[value] = level
    return level


def normalize_severity(value: Any, default: str = "medium") -> str:
    if value is None or value == "":
        return default
    return severity_level(value if isinstance(value, str) else str(value)) or default


def _label_severity(labels: dict[str, str]) -> tuple[str, str | None]:
    """An Alertmanager or Grafana alert's severity, from its `severity` label (else one spelt `Severity`,
    `SEVERITY`...): its level, `medium` without one, and the label's value when the bot does not know it (the alert
    is `medium` then, and the bot says so: chatops_alerts_unknown_severity_total and its log)."""
    raw = labels.get("severity")
    if raw is None:
        raw = next((v for k, v in labels.items() if k.lower() == "severity"), None)
    if not raw:
        return "medium", None
    level = severity_level(raw)
    return (level, None) if level is not None else ("medium", raw)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(where, f"expected an object, got {_kind(value)}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    out = {}
    for k, v in _obj(value, where).items():
        if isinstance(v, (dict, list)):
            raise ShapeError(f"{where}.{k}", f"expected a string, got {_kind(v)}")
        out[str(k)] = _label_text(v)
    return out


def _label_text(value: Any) -> str:
    """A JSON scalar as a label value, written as JSON writes it (`true`, not Python's `True`; `2`, not `2.0`), so
    that routes and silences written `prod: "true"` match it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def _text(obj: dict[str, Any], key: str, where: str, *, required: bool = False, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ShapeError(f"{where}.{key}" if where else key, "required")
        return default
    if isinstance(value, (dict, list, bool)):
        raise ShapeError(f"{where}.{key}" if where else key, f"expected a string, got {_kind(value)}")
    return str(value)


def _field(where: str, key: str) -> str:
    """A field's path as an error names it: bare in a single generic object (`where` ""), as its other fields are."""
    return f"{where}.{key}" if where else key


def _time(obj: dict[str, Any], key: str, where: str) -> datetime | None:
    raw = obj.get(key)
    if raw in (None, "") or (isinstance(raw, str) and raw.startswith("0001-01-01")):
        return None
    if not isinstance(raw, str):
        raise ShapeError(_field(where, key), f"expected an RFC 3339 time, got {_kind(raw)}")
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", raw.upper().replace("Z", "+00:00")))  # RFC 3339: t, z too
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except ValueError:
        raise ShapeError(_field(where, key), f"not an RFC 3339 time: {raw[:40]!r}") from None
    except OverflowError:  # 9999-12-31T23:30:00-05:00 is past the last UTC time Python has
        raise ShapeError(_field(where, key), f"out of range: {raw[:40]!r}") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_or_time(obj: dict[str, Any], key: str, where: str) -> datetime | None:
    """An RFC 3339 time, or Unix time as Datadog's `$LAST_UPDATED`-style fields and most tools send it: a number or
    a string of digits, in seconds (milliseconds when it is that big). 0 is no time (a tool's unset field, as Go's
    zero time is Alertmanager's); a time before 1970 is a mistake, refused."""
    raw = obj.get(key)
    before = "is before 1970 (expected Unix time in seconds or milliseconds, or RFC 3339)"
    if isinstance(raw, bool) or not (isinstance(raw, (int, float)) or (isinstance(raw, str) and raw.isascii()
                                                                      and raw.isdigit())):
        moment = _time(obj, key, where)
        if moment is not None and moment < _EPOCH:
            raise ShapeError(_field(where, key), f"out of range: {raw[:40]!r} {before}")
        return moment
    try:
        number = float(raw)
    except OverflowError:  # an integer past the largest float (JSON allows any number of digits)
        raise ShapeError(_field(where, key), f"out of range: {str(raw)[:40]}... (expected Unix time in seconds or "
                                             "milliseconds, or RFC 3339)") from None
    if number == 0:
        return None
    if number < 0:
        raise ShapeError(_field(where, key), f"out of range: {str(raw)[:40]!r} {before}")
    if number > 1e11:  # past 5138 AD in seconds: milliseconds
        number /= 1000
    try:
        return datetime.fromtimestamp(number, UTC)
    except (OverflowError, OSError, ValueError):
        raise ShapeError(_field(where, key), f"out of range: {str(raw)[:40]!r}") from None


def _status(obj: dict[str, Any], where: str, default: str | None = None) -> str:
    raw = obj.get("status")
    if raw in (None, "") and default is not None:  # optional, and left empty
        raw = default
    value = str(raw).lower() if isinstance(raw, str) else raw
    if value in FIRING_WORDS:
        return "firing"
    if value in RESOLVED_WORDS:
        return "resolved"
    field = f"{where}.status" if where else "status"
    if raw is None:
        raise ShapeError(field, "required ('firing' or 'resolved')")
    raise ShapeError(field, f"expected 'firing' or 'resolved' (or a monitor's word for one: {', '.join(FIRING_WORDS)}; "
                            f"{', '.join(RESOLVED_WORDS)}), got {_as_json(raw)}")


# A generic alert's status words, any case: monitors' own (Datadog's Warn and No Data are alerts firing, Re-Triggered
# and Renotify again; Zabbix's problem and OK; Nagios' notification types and host and service states)
FIRING_WORDS = ("firing", "alerting", "triggered", "problem", "open", "warn", "no data", "re-triggered", "renotify",
                "down", "unreachable", "critical", "warning", "unknown")
RESOLVED_WORDS = ("resolved", "ok", "recovered", "closed", "recovery", "up")


def _as_json(value: Any) -> str:
    """A value as the sender wrote it (JSON, not Python's repr: true, not True), cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _alerts_list(payload: dict[str, Any]) -> list[Any]:
    alerts = payload.get("alerts")
    if alerts is None:
        raise ShapeError("alerts", "required")
    if not isinstance(alerts, list):
        raise ShapeError("alerts", f"expected a list, got {_kind(alerts)}")
    return alerts


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def parse_alertmanager(payload: Any, source: str) -> list[Alert]:
    """Alertmanager webhook, `version: "4"`."""
    payload = _obj(payload, "body")
    version = payload.get("version")
    if version is not None and str(version) != "4":
        raise ShapeError("version", f"unsupported Alertmanager webhook version {_as_json(version)} (expected \"4\")")
    group_key = _text(payload, "groupKey", "") or None
    external = _text(payload, "externalURL", "")
    common = payload.get("commonLabels")  # only for the silence link: a malformed one is left out, not refused
    if not (isinstance(common, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in common.items())):
        common = {}
    out = []
    for i, raw in enumerate(_alerts_list(payload)):
        where = f"alerts[{i}]"
        a = _obj(raw, where)
        labels = _str_map(a.get("labels"), f"{where}.labels")
        if not labels:
            raise ShapeError(f"{where}.labels", "required: an alert without labels cannot be grouped")
        annotations = _str_map(a.get("annotations"), f"{where}.annotations")
        severity, unknown = _label_severity(labels)
        links = {"generator": _text(a, "generatorURL", where), "runbook": annotations.get("runbook_url", ""),
                 "dashboard": annotations.get("dashboard_url", ""), "alertmanager": external,
                 "silence": silence_link(external, common or labels)}
        out.append(Alert(
            source=source,
            fingerprint=_text(a, "fingerprint", where) or _fingerprint(labels),
            status=_status(a, where),
            labels=labels,
            annotations=annotations,
            severity=severity,
            summary=annotations.get("summary") or annotations.get("description") or labels.get("alertname", "alert"),
            starts_at=_time(a, "startsAt", where),
            ends_at=_time(a, "endsAt", where),
            links={k: v for k, v in links.items() if v},
            group_key=group_key,
            unknown_severity=unknown,
        ))
    return out


def silence_link(external_url: str, labels: dict[str, str]) -> str:
    """Alertmanager's page for a new silence, its matchers filled in from `labels` (the notification's common
    labels, as Alertmanager's own templates do, so that it covers the whole group; the person can narrow it there
    before saving): "" without an http(s) externalURL."""
    base = external_url.strip().rstrip("/")
    if not labels or not base.lower().startswith(("http://", "https://")):
        return ""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    matchers = ",".join(f"{name}={quoted(value)}" for name, value in sorted(labels.items()))
    return f"{base}/#/silences/new?filter={quote('{' + matchers + '}', safe='')}"


def parse_grafana(payload: Any, source: str) -> list[Alert]:
    """Grafana unified alerting webhook, `version: "1"`."""
    payload = _obj(payload, "body")
    version = payload.get("version")
    if version is not None and str(version) != "1":
        raise ShapeError("version", f"unsupported Grafana webhook version {_as_json(version)} (expected \"1\")")
    group_key = _text(payload, "groupKey", "") or None
    out = []
    for i, raw in enumerate(_alerts_list(payload)):
        where = f"alerts[{i}]"
        a = _obj(raw, where)
        labels = _str_map(a.get("labels"), f"{where}.labels")
        if not labels:  # (Grafana always sends alertname and grafana_folder: unrelated alerts would group as one)
            raise ShapeError(f"{where}.labels", "required: an alert without labels cannot be grouped")
        annotations = _str_map(a.get("annotations"), f"{where}.annotations")
        severity, unknown = _label_severity(labels)
        if a.get("valueString"):
            annotations.setdefault("value", _text(a, "valueString", where))
        values = _grafana_values(a.get("values"), f"{where}.values")
        if values:
            annotations.setdefault("values", values)
        links = {"generator": _text(a, "generatorURL", where), "dashboard": _text(a, "dashboardURL", where),
                 "panel": _text(a, "panelURL", where), "silence": _text(a, "silenceURL", where),
                 "image": _text(a, "imageURL", where), "runbook": annotations.get("runbook_url", "")}
        summary = annotations.get("summary") or labels.get("alertname") or _text(payload, "title", "") or "alert"
        if labels.get("rulename") and labels.get("alertname") in GRAFANA_STAND_INS:
            # Named after what went wrong, not after the rule, whose own summary speaks of a threshold crossed.
            problem = "no data" if labels["alertname"] == "DatasourceNoData" else "datasource error"
            error = first_line(annotations.get("Error", ""), "")
            summary = f"{labels['rulename']}: {problem}" + (f" ({error})" if error else "")
        out.append(Alert(
            source=source,
            fingerprint=_text(a, "fingerprint", where) or _fingerprint(labels),
            status=_status(a, where),
            labels=labels,
            annotations=annotations,
            severity=severity,
            summary=summary,
            starts_at=_time(a, "startsAt", where),
            ends_at=_time(a, "endsAt", where),
            links={k: v for k, v in links.items() if v},
            group_key=group_key,
            unknown_severity=unknown,
        ))
    return out


# Grafana's alerts for a rule whose query returned nothing, or failed: their alertname says which, their `rulename`
# label names the rule (and the rule's own labels and annotations come along).
GRAFANA_STAND_INS = ("DatasourceNoData", "DatasourceError")


def alert_name(labels: dict[str, str]) -> str:
    """`alertname` as incidents are grouped by it: for Grafana's no-data and error alerts, with the rule's name, since
    their alertname is the same for every rule (two rules without data are two incidents, not one)."""
    name = labels.get("alertname", "")
    if name in GRAFANA_STAND_INS and labels.get("rulename"):
        return f"{name}/{labels['rulename']}"
    return name


def first_line(text: str, fallback: str) -> str:
    """The first line of `text` that says something (not blank, not Datadog's `%%%` markdown fence), at most 300
    characters (a longer one ends with an ellipsis where it is cut: it ended mid-word, as if that were all); `fallback`
    if none does."""
    for line in text.splitlines():
        line = line.strip()
        if line and line != "%%%":
            return line if len(line) <= 300 else line[:299] + "\u2026"
    return fallback


def _grafana_values(raw: Any, where: str) -> str:
    """Grafana's `values` (query ref id -> number; the whole map may be null) as its own default message shows them:
    `B=93.7, C=1`. A null value is shown as `B=null` (Grafana's type holds numbers only, but a notification refused
    for it would be lost: Grafana does not retry a 4xx)."""
    if raw is None:
        return ""
    parts = []
    for ref, number in sorted(_obj(raw, where).items()):
        if number is None:
            parts.append(f"{ref}=null")
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ShapeError(f"{where}.{ref}", f"expected a number, got {_kind(number)}")
        is_whole = isinstance(number, float) and number.is_integer() and abs(number) < 1e21
        parts.append(f"{ref}={int(number) if is_whole else number}")
    return ", ".join(parts)


_GENERIC_KEYS = {"asset_name", "signature", "severity", "message", "tool_source", "status", "labels",
                 "dedup_key", "links", "annotations", "timestamp"}


def parse_generic(payload: Any, source: str) -> list[Alert]:
    """`{asset_name, signature, severity, message, tool_source, status?, labels?, dedup_key?}`, one or a list."""
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise ShapeError("body", "expected an alert object or a non-empty list of them")
    out = []
    for i, raw in enumerate(items):
        where = f"[{i}]" if isinstance(payload, list) else ""
        a = _obj(raw, where or "body")
        unknown = sorted(set(a) - _GENERIC_KEYS) if not _GENERIC_KEYS.issuperset(a) else None
        if unknown:
            raise ShapeError(f"{where}.{unknown[0]}" if where else unknown[0],
                             f"unknown field (expected: {', '.join(sorted(_GENERIC_KEYS))})")
        asset = _text(a, "asset_name", where, required=True)
        signature = _text(a, "signature", where, required=True)
        message = _text(a, "message", where, required=True)
        tool = _text(a, "tool_source", where, required=True)
        # (an empty tool_source counted as a second tool: +10 priority for one tool)
        blank = next((key for key, value in (("asset_name", asset), ("signature", signature), ("tool_source", tool))
                      if not value.strip()), None)
        if blank is not None:
            raise ShapeError(_field(where, blank), "must not be empty")
        severity_raw = _text(a, "severity", where, required=True)  # ({"level": "critical"} was read as its words)
        severity = normalize_severity(severity_raw, default="")
        if not severity:
            raise ShapeError(f"{where}.severity" if where else "severity",
                             f"unknown severity {_as_json(severity_raw)} (expected one of: {', '.join(SEVERITIES)}, or a synonym such as warning, error, P1)")
        # `severity` as written, as Alertmanager's and Grafana's alerts carry it: routes and silences match it
        labels = {"alertname": signature, "instance": asset, "tool": tool, "severity": severity_raw,
                  **_str_map(a.get("labels"), f"{where}.labels" if where else "labels")}
        dedup = _text(a, "dedup_key", where) or None
        out.append(Alert(
            source=source,
            fingerprint=dedup or _fingerprint({"asset": asset, "signature": signature, "tool": tool}),
            status=_status(a, where, default="firing"),
            labels=labels,
            annotations={"message": message, **_str_map(a.get("annotations"), f"{where}.annotations" if where else "annotations")},
            severity=severity,
            summary=first_line(message, signature),
            starts_at=_epoch_or_time(a, "timestamp", where),
            links={("generator" if name == "graph" else name): url  # the card's Graph link
                   for name, url in _str_map(a.get("links"), f"{where}.links" if where else "links").items() if url},
            dedup_key=dedup,
        ))
    return out


_SORTED_JSON = json.JSONEncoder(sort_keys=True)
try:  # json.dumps(labels, sort_keys=True) without making the C encoder anew each call
    from _json import make_encoder as _make_encoder

    _sorted_json = _make_encoder(None, _SORTED_JSON.default, json.encoder.encode_basestring_ascii, None,
                                 _SORTED_JSON.key_separator, _SORTED_JSON.item_separator, True, False, True)
except ImportError:  # pragma: no cover - CPython has it
    _sorted_json = None


def _fingerprint(labels: dict[str, str]) -> str:
    text = None
    if _sorted_json is not None:
        try:
            text = "".join(_sorted_json(labels, 0))
        except RecursionError:  # a circular value: let json.dumps say so
            pass
    if text is None:
        text = _SORTED_JSON.encode(labels)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The most alerts a notification may say it left out. Alertmanager sends a uint64 (its group's length less
# max_alerts), but a group of 2**31 alerts would take it terabytes of memory (well over 1 KB an alert): no sender
# gets near this, and a larger number is a mistake or mischief that would stay in chatops_alerts_truncated_total
# (a counter, never lowered) for good. int32's limit, which Grafana's and every other sender's number fits too.
MAX_TRUNCATED = 2**31 - 1


def truncated_count(kind: str, payload: Any) -> int:
    """How many alerts the sender left out of this notification (Alertmanager's and Grafana's
    `truncatedAlerts`, set when a receiver's `max_alerts` cut the list); 0 for other senders."""
    if kind not in ("alertmanager", "grafana") or not isinstance(payload, dict):
        return 0
    raw = payload.get("truncatedAlerts")
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_TRUNCATED:
        raise ShapeError("truncatedAlerts", f"expected a whole number from 0 to {MAX_TRUNCATED}, got {_as_json(raw)}")
    return raw


class BodyError(ValueError):
    """A request body that is not a payload of its source's kind: the HTTP status (400: not JSON, or JSON
    this bot cannot keep; 422: the wrong shape), the rejection reason counted in /metrics, and the message."""

    def __init__(self, status: int, reason: str, message: str, field: str | None = None):
        self.status, self.reason, self.message, self.field = status, reason, message, field
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The answer's JSON body."""
        return {"error": self.message, "field": self.field} if self.field is not None else {"error": self.message}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:40]} is too large for a JSON number here")
    return value


# json.loads, without NaN and Infinity (written so, or as a number too large to be anything else)
_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite).decode
_dumps_utf8 = json.JSONEncoder(ensure_ascii=False).encode  # then .encode(): fails on a lone surrogate


MAX_NESTING = 512  # levels of [ and { in a body; Python's own limit (near 1,000) depends on where it is parsed
_TOO_DEEP = f"malformed JSON: nested too deeply (more than {MAX_NESTING} levels)"


def _deeper_than(payload: Any, limit: int) -> bool:
    """Whether lists and objects in `payload` nest more than `limit` levels (without recursion)."""
    todo = [(payload, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > limit:
            return True
        inner = value.values() if isinstance(value, dict) else value
        todo.extend((v, depth + 1) for v in inner if isinstance(v, (dict, list)))
    return False


def read_body(kind: str, source_id: str, body: bytes) -> tuple[list[Alert], int]:
    """A request's body -> its alerts and how many the sender left out (`truncated_count`); BodyError if it is
    not a `kind` payload. Run where the alerts are needed: the HTTP front, or the intake writer process."""
    try:
        if body[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte order mark, which JSON forbids senders and lets us ignore
            body = body[3:]
        payload = _decode(body.decode("utf-8"))
        if b"\\ud" in body or b"\\uD" in body:  # a \uD800-\uDFFF escape: a lone one is no text to store
            _dumps_utf8(payload).encode("utf-8")
        if (body.count(b"[") + body.count(b"{") > MAX_NESTING and isinstance(payload, (dict, list))
                and _deeper_than(payload, MAX_NESTING)):
            raise RecursionError  # answered as the decoder's own, below: the same limit wherever it runs
        if b"\\u0000" in body:  # a NUL: PostgreSQL's text holds none, and in alert text it means nothing
            payload = _without_nul(payload)
    except UnicodeDecodeError:
        raise BodyError(400, "malformed", "body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BodyError(400, "malformed", f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BodyError(400, "malformed", _TOO_DEEP) from None
    except UnicodeEncodeError:
        raise BodyError(400, "malformed", "malformed JSON: a string holds half of a UTF-16 surrogate pair "
                                          "(a lone \\uD800-\\uDFFF escape)") from None
    except ValueError as exc:  # NaN or Infinity; an integer of more than 4,300 digits
        problem = "a number of more than 4,300 digits" if "integer string conversion" in str(exc) else str(exc)
        raise BodyError(400, "malformed", f"malformed JSON: {problem}") from None
    try:
        alerts, truncated = PARSERS[kind](payload, source_id), truncated_count(kind, payload)
    except ShapeError as exc:
        article = "an" if kind[0] in "aeiou" else "a"
        raise BodyError(422, "bad_shape", f"{exc.field}: {exc.problem} (not {article} {kind} payload?)",
                        exc.field) from None
    for alert in alerts:
        if len(alert.fingerprint) > MAX_KEY:
            alert.fingerprint = bounded_key(alert.fingerprint)
    return alerts, truncated


def _without_nul(value: Any) -> Any:
    """`value` with every NUL character taken out of its strings (and keys); nesting is at most MAX_NESTING here."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


PARSERS: dict[str, Callable[[Any, str], list[Alert]]] = {
    "alertmanager": parse_alertmanager,
    "grafana": parse_grafana,
    "generic": parse_generic,
}
