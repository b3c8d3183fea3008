"""End to end: a real Prometheus Alertmanager notifies a real `chatops serve` over HTTP.

amtool fires an alert; Alertmanager groups it and calls the bot's webhook with
its bearer token; the incident appears in `chatops incidents list`. amtool then
ends the alert; Alertmanager sends the resolution (send_resolved) and the
incident is resolved by the source. A caller with the wrong token is refused.
Skipped, with the reason, where Alertmanager is not installed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.alertmanager import (Alertmanager, Process, alertmanager_config, chatops, incidents, require_alertmanager,
                                rfc3339, start_bot, two_ports)

BEARER = "e2e-bearer-token-7f3a9c"
DEADLINE = 30.0  # seconds to wait for each change to reach the bot (it takes about 1-2 s)
LABELS = {"alertname": "DiskFull", "instance": "db-1", "severity": "critical"}
SUMMARY = "Disk almost full"
GENERATOR = "http://prometheus.example:9090/graph?g0.expr=disk_free"

APP_YAML = """\
storage: {{url: "sqlite+aiosqlite:///{db}"}}
server: {{host: 127.0.0.1, port: {port}}}
audit: {{hmac_key: e2e-audit-key-0123456789ab}}
channels:
  - {{id: ops-slack, platform: slack, chat: C0OPS}}
sources:
  - {{id: am, kind: alertmanager, auth: {{bearer: {bearer}}}}}
routes:
  - {{match: {{}}, channels: [ops-slack]}}
"""


@dataclass
class Stack:
    config: Path
    bot: Process
    bot_url: str
    am: Alertmanager

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print both processes' logs if the block fails (pytest shows them with the failure)."""
        try:
            yield
        except BaseException:
            print(self.bot.describe())
            print(self.am.describe())
            raise


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_alertmanager()
    bot_port, am_port = two_ports()
    config = tmp_path / "app.yaml"
    config.write_text(APP_YAML.format(db=tmp_path / "bot.db", port=bot_port, bearer=BEARER))
    checked = chatops("check-config", "-c", str(config))
    assert checked.returncode == 0, f"the test's app.yaml is invalid:\n{checked.stdout}{checked.stderr}"

    bot_url = f"http://127.0.0.1:{bot_port}"
    started: list[Process] = []
    try:
        bot = start_bot(config, tmp_path / "bot.log")
        started.append(bot)
        bot.wait_http(f"{bot_url}/readyz")
        am = Alertmanager(tmp_path, am_port, alertmanager_config(webhook_url=f"{bot_url}/alerts/am", bearer=BEARER))
        started.append(am)
        am.wait_http(f"{am.url}/-/ready")
        yield Stack(config, bot, bot_url, am)
    finally:
        for process in reversed(started):
            process.stop()


def _wait_for(what: str, ready: Callable[[list[dict[str, Any]]], bool], stack: Stack,
              timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """`chatops incidents list` once `ready(listing)`; fails naming `what` and the last listing after `timeout` s."""
    deadline = time.monotonic() + timeout
    listed: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for process in (stack.bot, stack.am):
            if process.proc.poll() is not None:
                raise AssertionError(f"{process.name} exited with {process.proc.returncode} while waiting for {what}")
        listed = incidents(stack.config)
        if ready(listed):
            return listed
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout}s; the bot last listed: {json.dumps(listed, indent=2)}")


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _webhook_payload(alertname: str) -> dict[str, Any]:
    """What Alertmanager would send, for the requests that do not come from it."""
    labels = {"alertname": alertname, "instance": "db-9", "severity": "critical"}
    return {
        "version": "4", "groupKey": f'{{}}:{{alertname="{alertname}"}}', "status": "firing", "receiver": "chatops",
        "groupLabels": {"alertname": alertname}, "commonLabels": labels, "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093", "truncatedAlerts": 0,
        "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "should never be stored"},
                    "startsAt": "2026-11-24T04:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "", "fingerprint": "0123456789abcdef"}],
    }


def test_alertmanager_fires_and_resolves_an_incident_in_the_running_bot(stack: Stack) -> None:
    am, config = stack.am, stack.config
    label_args = [f"{k}={v}" for k, v in LABELS.items()]
    with stack.logs_on_failure():
        # Wrong, missing or non-Bearer credentials are refused before anything is stored.
        for headers in ({"Authorization": "Bearer not-the-token"}, {}, {"Authorization": f"Basic {BEARER}"}):
            status, body = _post(f"{stack.bot_url}/alerts/am", _webhook_payload("Intruder"), headers)
            assert status == 401, (headers, status, body)
            assert "error" in body and "results" not in body
        assert incidents(config) == []

        # Fire: amtool -> Alertmanager -> (group_wait 1s) -> POST /alerts/am with the bearer token.
        am.amtool("alert", "add", *label_args, f"--annotation=summary={SUMMARY}", f"--generator-url={GENERATOR}")
        [firing_in_am] = am.api("/api/v2/alerts")
        assert firing_in_am["status"]["state"] == "active"

        [incident] = _wait_for("open incident", lambda listed: any(i["status"] == "triggered" for i in listed), stack)
        assert incident["title"] == SUMMARY
        assert incident["severity"] == "critical"
        assert incident["status"] == "triggered"
        assert (incident["alert_count"], incident["firing"]) == (1, 1)
        assert incident["sources"] == ["am"] and incident["channels"] == ["ops-slack"]
        assert incident["labels"] == LABELS
        # the silence link: Alertmanager's new-silence page, filled in with the group's labels
        silence = (f"{am.url.rstrip('/')}/#/silences/new?filter=%7Balertname%3D%22DiskFull%22%2C"
                   "instance%3D%22db-1%22%2Cseverity%3D%22critical%22%7D")
        assert incident["links"] == {"alertmanager": am.url, "generator": GENERATOR, "silence": silence}
        assert (incident["resolved_at"], incident["resolved_by"]) == (None, None)

        # The bot stored Alertmanager's own fingerprint for the alert.
        shown = chatops("incidents", "show", str(incident["id"]), "-c", str(config))
        assert shown.returncode == 0, shown.stdout + shown.stderr
        # (the alerts come first; the timeline's detail names the fingerprint too)
        alert_row = next(line for line in shown.stdout.splitlines() if firing_in_am["fingerprint"] in line)
        assert " firing " in alert_row and " critical " in alert_row

        # Resolve: the same labels with an end time that has passed; Alertmanager sends the resolution.
        am.amtool("alert", "add", *label_args, f"--annotation=summary={SUMMARY}", f"--generator-url={GENERATOR}",
                  f"--end={rfc3339(datetime.now(UTC))}")

        [resolved] = _wait_for("resolved incident",
                               lambda listed: bool(listed) and all(i["status"] == "resolved" for i in listed), stack)
        assert resolved["id"] == incident["id"]
        assert resolved["resolved_by"] == "source:am"
        assert resolved["resolved_at"] is not None
        assert (resolved["alert_count"], resolved["firing"]) == (1, 0)
        assert resolved["title"] == SUMMARY and resolved["severity"] == "critical"

        # Alertmanager saw both notifications accepted (it counts a non-2xx answer as failed).
        assert am.metric("alertmanager_notifications_total", integration="webhook") >= 2
        assert am.metric("alertmanager_notifications_failed_total", integration="webhook") == 0

        # Everything the webhook did is on an intact audit chain.
        verify = chatops("audit", "verify", "-c", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_skip_message_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Alertmanager is missing the e2e test is skipped, saying how CI gets it."""
    import tests.alertmanager as helper

    monkeypatch.setattr(helper, "ALERTMANAGER", None)
    with pytest.raises(pytest.skip.Exception, match="prometheus-alertmanager is not installed; .ci/run installs it"):
        helper.require_alertmanager()
