"""The audit hash input is byte-identical to the original json.dumps definition, however it is built.

storage/audit.py builds the canonical JSON from pre-encoded parts and skips the
details' JSON round trip when it cannot change anything; these properties pin
both to the original code (kept below as the reference) for arbitrary values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel

import storage.audit as audit_module
from bot.model import Actor
from storage.audit import AuditLog, Entry, canonical_fields
from storage.models import AuditHead
from storage.rows import Rows


def reference_canonical(seq: Any, at: datetime, actor_person: Any, actor_platform: Any, actor_user_id: Any,
                        action: Any, subject_type: Any, subject_id: Any, incident_id: Any, details: Any) -> bytes:
    body = {
        "seq": seq,
        "at": at.isoformat(timespec="microseconds"),
        "actor": [actor_person, actor_platform, actor_user_id],
        "action": action,
        "subject": [subject_type, subject_id],
        "incident_id": incident_id,
        "details": details,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def reference_append(key: bytes | None, seq: int, prev: str, entries: list[Entry]) -> list[dict[str, Any]]:
    """append_rows as it was first written (one json.dumps of the whole body per event)."""
    rows = []
    for entry in entries:
        seq += 1
        actor = entry.actor
        at = entry.at.astimezone(UTC)
        details = json.loads(json.dumps(entry.details or {}, default=str))
        subject_id = str(entry.subject_id)
        data = prev.encode() + reference_canonical(seq, at, actor.person_id, actor.platform, actor.user_id,
                                                   entry.action, entry.subject_type, subject_id, entry.incident_id,
                                                   details)
        digest = hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()
        rows.append({"seq": seq, "at": at, "actor_person": actor.person_id, "actor_platform": actor.platform,
                     "actor_user_id": actor.user_id, "action": entry.action, "subject_type": entry.subject_type,
                     "subject_id": subject_id, "incident_id": entry.incident_id, "details": details,
                     "prev_hash": prev, "hash": digest})
        prev = digest
    return rows


class Odd:
    """Not JSON: default=str turns it into its str()."""

    def __str__(self) -> str:
        return "odd ünï \u2028 \"value\""


texts = st.text(max_size=12) | st.sampled_from(["", "ünïcödé", "\u2028\u2029", "emoji 🚨", "\x00\x1f", '"\\/'])
keys = texts | st.integers(-3, 3) | st.booleans() | st.none() | st.floats(allow_nan=False, max_value=10, min_value=-10)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | texts
           | st.datetimes(timezones=st.just(UTC)) | st.builds(Odd))
json_like = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(texts, inner, max_size=4) | st.dictionaries(keys, inner, max_size=3)),
    max_leaves=12,
)
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# JSON leaves under keys that json.dumps turns into strings (1 -> "1", True -> "true"): a round trip changes them
any_keys = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
moments = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)),
                                                  timezone(timedelta(hours=-9, minutes=-30))]))
optional = st.none() | texts
ids = st.none() | st.integers() | texts

TRICKY: list[Any] = [
    {1: "a", "1": "b"},  # two keys that json.dumps writes alike: the round trip keeps one
    {"k": {True: 1, "true": 2}},
    {"k": {1: "x"}},
    {"k": (1, [2, (3,)])},
    {"nan": float("nan"), "inf": [float("inf"), -float("inf")]},
    {"when": datetime(2026, 1, 1, tzinfo=UTC), "odd": Odd()},
    {"deep": [[[[{"x": [1.5, -0.0, 10**30]}]]]]},
    {2: "two", 1: "one"},
    {"\ud800": "lone surrogate key"},
    {"v": "lone surrogate \udfff value"},
    {"b": True, "n": None, "i": 7, "s": "ünï"},
    [],
    (),
    "",
    0,
]


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # the same failure counts as the same behaviour
        return type(exc)


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 2**63), moments, optional, texts, texts, texts, texts, texts, ids,
       json_like | plain_json | any_keys | st.sampled_from(TRICKY))
def test_canonical_fields_equals_json_dumps_of_the_body(seq: int, at: datetime, person: Any, platform: Any,
                                                      user_id: Any, action: Any, subject_type: Any, subject_id: Any,
                                                      incident_id: Any, details: Any) -> None:
    args = (seq, at, person, platform, user_id, action, subject_type, subject_id, incident_id, details)
    assert outcome(canonical_fields, *args) == outcome(reference_canonical, *args)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), texts, st.builds(Odd),
                 st.sampled_from(TRICKY)), moments)
def test_canonical_fields_with_odd_values_in_every_place(value: Any, at: datetime) -> None:
    for i in range(10):
        args: list[Any] = [1, at, "p", "slack", "U1", "a", "incident", "1", 2, {"k": 1}]
        if i == 1:
            continue  # `at` is a datetime by contract
        args[i] = value
        assert outcome(canonical_fields, *args) == outcome(reference_canonical, *args)


def test_canonical_fields_for_a_circular_value_fails_as_json_dumps_does() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    args = (1, datetime(2026, 1, 1, tzinfo=UTC), None, "cli", "x", "a", "t", "s", None, loop)
    assert outcome(canonical_fields, *args) == outcome(reference_canonical, *args) == ValueError


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = Path(tmp_path_factory.mktemp("audit")) / "chain.db"
    eng = create_engine(f"sqlite+pysqlite:///{path}")
    SQLModel.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(AuditHead.__table__.insert().values(id=1, seq=0, hash=AuditHead.GENESIS))
    yield eng
    eng.dispose()


actors = st.sampled_from([Actor.source("am"), Actor("slack", "U01", "Alice", "alice"), Actor.system(),
                          Actor("cli", "ünï", "", None)])
entries = st.builds(
    Entry,
    action=st.sampled_from(["alert.received", "incident.opened", "incident.acknowledged"]) | texts,
    actor=actors,
    subject_type=st.sampled_from(["alert", "incident"]) | texts,
    subject_id=texts | st.integers(0, 10**6),
    at=st.sampled_from([datetime(2026, 11, 25, 9, 0, 0, 1, tzinfo=UTC)]) | moments,
    details=(st.none() | st.dictionaries(texts, json_like, max_size=4) | st.dictionaries(texts, plain_json, max_size=5)
             | st.dictionaries(keys, any_keys, max_size=4) | st.sampled_from(TRICKY)),
    incident_id=st.none() | st.integers(1, 10**9),
)


def _stored(conn: Any, seqs: list[int]) -> list[tuple[Any, ...]]:
    return conn.execute(text(f"SELECT seq, details, hash FROM audit_events WHERE seq IN ({', '.join(map(str, seqs))}) "
                             "ORDER BY seq")).all()


def _entry(details: Any) -> list[Entry]:
    return [Entry("a", Actor.system(), "incident", "1", datetime(2026, 1, 1, tzinfo=UTC), details, 1)]


@pytest.mark.parametrize("key", ["audit-key", None])
@pytest.mark.parametrize("raw", [True, False])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(entries, min_size=1, max_size=8))
@example(batch=[e for d in TRICKY if "surrogate" not in str(d) for e in _entry(d)])
@example(batch=[e for d in TRICKY if "surrogate" in str(d) for e in _entry(d)])
def test_append_rows_writes_what_the_original_code_wrote(engine: Any, monkeypatch: pytest.MonkeyPatch, key: str | None,
                                                         raw: bool, batch: list[Entry]) -> None:
    if not raw:  # the Core-statement path (PostgreSQL, aiosqlite) on the same database
        class CoreRows(Rows):
            def __init__(self, conn: Any):
                super().__init__(conn)
                self.raw = None

        monkeypatch.setattr(audit_module, "Rows", CoreRows)
    log = AuditLog(key)
    with engine.begin() as conn:
        seq, prev = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        expected = outcome(reference_append, key.encode() if key else None, seq, prev, batch)
        got = outcome(log.append_rows, conn, batch)
        if isinstance(expected, type):  # the original failed (e.g. a lone surrogate): so must this
            assert got is expected
            conn.rollback()
            return
        stored = _stored(conn, [r["seq"] for r in expected])
        head = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
    assert _same(got, expected)
    assert [(s, d, h) for s, d, h in stored] == [(r["seq"], json.dumps(r["details"]), r["hash"]) for r in expected]
    assert tuple(head) == (expected[-1]["seq"], expected[-1]["hash"])


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down, with NaN equal to NaN (the round trip keeps NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)
