"""No body, however wrong, gets a 500: hypothesis throws bytes, JSON and near-valid payloads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.auth import sign
from tests.botkit import Harness, running_bot

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
label_maps = st.dictionaries(st.sampled_from(["alertname", "instance", "severity", "team", "x"]), scalars | st.text(max_size=8), max_size=4)
am_alert = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["firing", "resolved", "weird"]) | scalars,
    "labels": label_maps | json_values, "annotations": label_maps | json_values,
    "startsAt": st.sampled_from(["2026-11-24T03:50:00Z", "0001-01-01T00:00:00Z", "2026-13-45T99:00:00Z"]) | scalars,
    "endsAt": scalars, "fingerprint": scalars, "generatorURL": scalars,
})
am_payload = st.fixed_dictionaries({"alerts": st.lists(am_alert, max_size=3) | json_values},
                                   optional={"version": st.sampled_from(["4", "1", 4]), "groupKey": scalars})
grafana_payload = st.fixed_dictionaries({"alerts": st.lists(am_alert, max_size=3) | json_values},
                                        optional={"version": st.sampled_from(["1", "4"]), "title": scalars})
generic_alert = st.fixed_dictionaries({}, optional={
    k: scalars | json_values for k in ("asset_name", "signature", "severity", "message", "tool_source", "status", "labels", "dedup_key")
})
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | am_payload.map(lambda v: ("am", v))
    | grafana_payload.map(lambda v: ("grafana", v))
    | (generic_alert | st.lists(generic_alert, max_size=3)).map(lambda v: ("open", v))
)


@pytest.fixture(scope="module", params=["thread", "process"])
def fuzz_bot(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
             ) -> Iterator[tuple[asyncio.AbstractEventLoop, Harness]]:
    """The bot with the writer thread (the HTTP front reads the bodies) and with the writer process (it does)."""
    loop = asyncio.new_event_loop()
    path: Path = tmp_path_factory.mktemp("fuzz")
    ctx = running_bot(f"sqlite+aiosqlite:///{path / 'fuzz.db'}", storage_options=f"writer: {request.param}")
    harness = loop.run_until_complete(ctx.__aenter__())
    yield loop, harness
    loop.run_until_complete(ctx.__aexit__(None, None, None))
    loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, source=st.sampled_from(["am", "grafana", "open", "am-plain"]))
def test_no_body_gives_a_500(fuzz_bot: tuple[asyncio.AbstractEventLoop, Harness], body: Any, source: str) -> None:
    loop, h = fuzz_bot
    if isinstance(body, tuple):
        source, payload = body
        body = json.dumps(payload).encode()
    headers = {"X-Grafana-Alerting-Signature": sign("grafana-secret", body)} if source == "grafana" else {}
    status, answer, _ = loop.run_until_complete(h.post(source, body, headers))
    assert status in (200, 400, 413, 422), (status, answer)
    assert ("error" in answer) == (status != 200)
