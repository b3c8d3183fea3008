"""The whole story, from the outside: a real Alertmanager alert becomes a live Slack message in a running bot.

Alertmanager (Debian's prometheus-alertmanager) fires through `chatops serve` (a subprocess), which posts the
incident to the fake Slack Web API; a signed Acknowledge click edits it and tells the thread; Alertmanager's
resolution resolves it; `chatops audit export` has every step, with Alice's click. Skipped, with the
reason, where Alertmanager is not installed.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from tests.alertmanager import (Alertmanager, Process, alertmanager_config, chatops, require_alertmanager, rfc3339,
                                start_bot, two_ports)
from tests.fake_slack import FakeSlack, signed

BEARER = "e2e-bearer-token-slack-1"
SIGNING = "e2e-slack-signing-secret"
LABELS = ["alertname=DiskFull", "instance=db-1", "severity=critical"]
CLICK = json.loads((Path(__file__).parent / "fixtures" / "slack" / "block_actions.json").read_text())

APP_YAML = """\
storage: {{url: "sqlite+aiosqlite:///{db}"}}
server: {{host: 127.0.0.1, port: {port}}}
audit: {{hmac_key: e2e-audit-key-0123456789ab}}
adapters:
  slack: {{bot_token: {token}, signing_secret: {signing}, api_url: "{api_url}"}}
people:
  - {{id: alice, name: Alice, roles: [responder], slack: U01ALICE}}
channels:
  - {{id: ops-slack, platform: slack, chat: C0OPS}}
sources:
  - {{id: am, kind: alertmanager, auth: {{bearer: {bearer}}}}}
routes:
  - {{match: {{}}, channels: [ops-slack]}}
"""


async def eventually(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_alertmanager_alert_lives_in_slack_and_every_action_is_audited(tmp_path: Path) -> None:
    require_alertmanager()
    bot_port, am_port = two_ports()
    async with FakeSlack() as slack:
        config = tmp_path / "app.yaml"
        config.write_text(APP_YAML.format(db=tmp_path / "bot.db", port=bot_port, token=slack.token, signing=SIGNING,
                                          api_url=slack.api_url, bearer=BEARER))
        bot_url = f"http://127.0.0.1:{bot_port}"
        started: list[Process] = []
        try:
            bot = await asyncio.to_thread(start_bot, config, tmp_path / "bot.log")
            started.append(bot)
            await asyncio.to_thread(bot.wait_http, f"{bot_url}/readyz")
            am = Alertmanager(tmp_path, am_port, alertmanager_config(webhook_url=f"{bot_url}/alerts/am", bearer=BEARER))
            started.append(am)
            await asyncio.to_thread(am.wait_http, f"{am.url}/-/ready")
            try:
                await _story(slack, am, bot_url, config)
            except BaseException:
                print(bot.describe())
                print(am.describe())
                raise
        finally:
            for process in reversed(started):
                await asyncio.to_thread(process.stop)


async def _story(slack: FakeSlack, am: Alertmanager, bot_url: str, config: Path) -> None:
    def parents() -> list[dict[str, Any]]:
        return [c.params for c in slack.called("chat.postMessage") if not c.params.get("thread_ts")]

    await asyncio.to_thread(am.amtool, "alert", "add", *LABELS, "--annotation=summary=Disk almost full")
    [post] = await eventually("the incident's message in Slack", parents)
    assert "#1" in post["text"] and "Disk almost full" in post["text"]
    # Alertmanager's own page for a new silence, filled in with the group's labels (its externalURL + the matchers)
    silence = (f"<{am.url.rstrip('/')}/#/silences/new?filter="
               "%7Balertname%3D%22DiskFull%22%2Cinstance%3D%22db-1%22%2Cseverity%3D%22critical%22%7D|Silence>")
    assert silence in json.dumps(post["blocks"])
    ts = next(ts for (channel, ts) in slack.messages if channel == "C0OPS")

    payload = json.loads(json.dumps(CLICK))
    payload["container"]["message_ts"] = payload["message"]["ts"] = ts
    payload["actions"][0]["value"] = "ack:1"
    payload["response_url"] = slack.response_url("ack")
    body = urlencode({"payload": json.dumps(payload)})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{bot_url}/slack/events", data=body, headers=signed(body, secret=SIGNING)) as resp:
            assert resp.status == 200
    await eventually("the click's answer", lambda: slack.responses.get("ack"))
    assert slack.responses["ack"][-1]["text"] == "Acknowledged #1."

    def threaded() -> list[str]:
        return [c.params["text"] for c in slack.called("chat.postMessage") if c.params.get("thread_ts") == ts]

    await eventually("the thread line", lambda: "Acknowledged by Alice" in " ".join(threaded()))
    await eventually("the edited message", lambda: "Acknowledged" in slack.messages[("C0OPS", ts)]["text"])

    await asyncio.to_thread(am.amtool, "alert", "add", *LABELS, "--annotation=summary=Disk almost full",
                            f"--end={rfc3339(datetime.now(UTC))}")
    await eventually("the resolution in the thread", lambda: "Resolved by am: every alert stopped firing" in " ".join(threaded()))
    await eventually("the resolved message", lambda: "Resolved" in slack.messages[("C0OPS", ts)]["text"])
    assert len(parents()) == 1

    export = await asyncio.to_thread(chatops, "audit", "export", "--incident", "1", "-c", str(config))
    assert export.returncode == 0, export.stderr
    events = [json.loads(line) for line in export.stdout.splitlines()]
    actions = [e["action"] for e in events]
    assert actions[:2] == ["incident.opened", "alert.received"]
    assert "incident.acknowledged" in actions and actions[-2:] == ["alert.resolved", "incident.resolved"]
    [ack] = [e for e in events if e["action"] == "incident.acknowledged"]
    assert ack["actor"] == {"person": "alice", "platform": "slack", "user_id": "U01ALICE"}
    verify = await asyncio.to_thread(chatops, "audit", "verify", "-c", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
