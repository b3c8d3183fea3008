"""What bench/storm.py and bench/click_latency.py share: the bot as a subprocess, a timed fake Slack,
signed alerts and clicks, reads of the bot's SQLite file, and the figures' tables.

Not a benchmark itself; `python bench/storm.py --help` and `python bench/click_latency.py --help`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from bot.auth import sign  # noqa: E402
from tests.fake_slack import Call, FakeSlack, signed  # noqa: E402

SOURCE_SECRET = "bench-secret-0123456789"
SIGNING_SECRET = "bench-slack-signing-secret"
CLICKER = {"id": "U01ALICE", "username": "alice", "name": "alice", "team_id": "T0FAKE"}
CLICK = json.loads((ROOT / "tests" / "fixtures" / "slack" / "block_actions.json").read_text())
# Slack's published Web API tiers for the methods the bot calls besides chat.postMessage (per minute, burst):
# chat.update is Tier 3 ("50+ per minute", short bursts allowed), chat.postEphemeral Tier 4 ("100+").
SLACK_TIERS: dict[str, tuple[float, int]] = {"chat.update": (50, 10), "chat.postEphemeral": (100, 10)}

ALERTS_FACT = re.compile(r"(\d+) alerts? from ")
INSTANCE_FACT = re.compile(r"instance ([A-Za-z0-9_.:-]+)")
NEW_ALERTS = re.compile(r"^(\d+) new alerts?$")


# -- the fake Slack, with arrival times ---------------------------------------------------------------

class TimedSlack(FakeSlack):
    """tests.fake_slack.FakeSlack that stamps every call (`call.at`) and response_url post with
    time.perf_counter() on arrival, and can hold more methods to a per-minute budget (429 beyond)."""

    def __init__(self, *, method_limits: dict[str, tuple[float, int]] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.method_limits = dict(method_limits or {})
        self.method_buckets: dict[str, tuple[float, float]] = {}
        self.response_at: dict[str, list[float]] = defaultdict(list)

    def _answer(self, call: Call) -> tuple[int, dict[str, Any], dict[str, str]]:
        now = time.perf_counter()
        call.at = now  # type: ignore[attr-defined]
        limit = self.method_limits.get(call.method)
        if limit is not None and call.token == self.token and not self._take(call.method, limit, now):
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(self.retry_after)}
        status, body, headers = super()._answer(call)
        if call.method == "chat.postMessage" and body.get("ok"):
            call.ts = body["ts"]  # type: ignore[attr-defined]  # which message a parent post made
        return status, body, headers

    def _take(self, method: str, limit: tuple[float, int], now: float) -> bool:
        per_minute, burst = limit
        tokens, last = self.method_buckets.get(method, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * per_minute / 60.0)
        allowed = tokens >= 1
        self.method_buckets[method] = (tokens - 1 if allowed else tokens, now)
        return allowed

    async def _response(self, request: web.Request) -> web.Response:
        at = time.perf_counter()
        key = request.match_info["key"]
        self.responses[key].append(await request.json())
        self.response_at[key].append(at)
        return web.json_response({"ok": True})

    # -- views ----------------------------------------------------------------------------------

    def parent_posts(self, *, ok: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == "chat.postMessage" and not c.params.get("thread_ts") and c.ok == ok]

    def thread_posts(self) -> list[Call]:
        return [c for c in self.calls if c.method == "chat.postMessage" and c.params.get("thread_ts") and c.ok]

    def updates(self) -> list[Call]:
        return [c for c in self.calls if c.method == "chat.update" and c.ok]

    def call_table(self) -> tuple[list[str], list[list[Any]]]:
        """Calls by method (postMessage split into parents and thread replies): ok, 429, other errors."""
        rows: dict[str, Counter[str]] = defaultdict(Counter)
        for c in self.calls:
            name = c.method
            if name == "chat.postMessage":
                name += " (thread reply)" if c.params.get("thread_ts") else " (parent)"
            rows[name]["ok" if c.ok else "429" if c.status == 429 else "other"] += 1
        order = ["chat.postMessage (parent)", "chat.postMessage (thread reply)", "chat.update"]
        names = [n for n in order if n in rows] + sorted(n for n in rows if n not in order)
        body = [[n, rows[n]["ok"], rows[n]["429"], rows[n]["other"]] for n in names]
        body.append(["total", sum(r[1] for r in body), sum(r[2] for r in body), sum(r[3] for r in body)])
        return ["Slack Web API calls", "ok", "429", "other errors"], body


def message_text(params: dict[str, Any]) -> str:
    blocks = params.get("blocks", "")
    if isinstance(blocks, str):
        try:
            blocks = json.loads(blocks)
        except ValueError:
            pass
    return str(params.get("text", "")) + " " + json.dumps(blocks, ensure_ascii=False)


def alerts_shown(params: dict[str, Any]) -> int | None:
    m = ALERTS_FACT.search(message_text(params))
    return int(m.group(1)) if m else None


def instance_shown(params: dict[str, Any]) -> str | None:
    m = INSTANCE_FACT.search(message_text(params))
    return m.group(1) if m else None


def state_shown(params: dict[str, Any]) -> str | None:
    text = str(params.get("text", ""))
    return next((s for s in ("Firing", "Acknowledged", "Resolved", "Silenced") if s in text), None)


# -- the bot as a subprocess ------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bot_config(tmp: Path, port: int, slack: FakeSlack, *, channels: Sequence[tuple[str, str]],
               routes: Sequence[dict[str, Any]], source: str) -> dict[str, Any]:
    """app.yaml (as JSON, which is YAML): SQLite in `tmp`, Slack at the fake, one HMAC generic source."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "storage": {"url": f"sqlite+aiosqlite:///{tmp}/bot.db"},
        "audit": {"hmac_key": "bench-audit-key-0001"},
        "adapters": {"slack": {"bot_token": slack.token, "signing_secret": SIGNING_SECRET, "api_url": slack.api_url}},
        "people": [{"id": "alice", "name": "Alice", "roles": ["responder"], "slack": CLICKER["id"]}],
        "channels": [{"id": cid, "platform": "slack", "chat": chat} for cid, chat in channels],
        "sources": [{"id": source, "kind": "generic", "auth": {"hmac_secret": SOURCE_SECRET}}],
        "routes": list(routes),
    }


@dataclass
class BotProcess:
    tmp: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.tmp / "bot.db"

    @property
    def config(self) -> Path:
        return self.tmp / "app.yaml"

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self.log}: {exc})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def outbox_cli(self) -> str:
        """`chatops outbox list --status pending -c app.yaml`, as an operator would ask."""
        out = subprocess.run([str(chatops_bin()), "outbox", "list", "--status", "pending", "-c", str(self.config)],
                             capture_output=True, text=True, cwd=self.tmp, timeout=60)
        return (out.stdout + out.stderr).strip()


def clean_up(tmp: Path, *, ok: bool, keep: bool, bot: BotProcess | None) -> None:
    """Stop the bot; remove the run's folder unless asked to keep it or something failed (then say where)."""
    if bot is not None:
        bot.stop()
    if ok and not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif ok:
        print(f"\nkept {tmp} (--keep)")
    else:
        print(f"\nFAILED; kept {tmp}" + (f"\nthe bot's log ({bot.log}), last lines:\n{bot.tail()}" if bot else ""))


def chatops_bin() -> Path:
    here = Path(sys.executable).with_name("chatops")
    return here if here.exists() else ROOT / ".venv" / "bin" / "chatops"


async def start_bot(tmp: Path, config: dict[str, Any], port: int) -> BotProcess:
    (tmp / "app.yaml").write_text(json.dumps(config, indent=2))
    log = tmp / "bot.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([str(chatops_bin()), "serve", "-c", str(tmp / "app.yaml")],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    bot = BotProcess(tmp, port, proc, log)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"the bot exited with {proc.returncode} before it was ready; its log, {log}:\n{bot.tail(40)}")
            try:
                async with session.get(f"{bot.url}/readyz") as r:
                    if r.status == 200:
                        body = await r.json()
                        if body.get("adapters", {}).get("slack") != "on":
                            raise SystemExit(f"the bot's Slack adapter is not on: {body}; log {log}")
                        return bot
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"the bot was not ready after 30 s; see {log}")


# -- what is sent to the bot ------------------------------------------------------------------------

Request = tuple[bytes, dict[str, str]]


def signed_alert(alert: dict[str, Any], ts: str | None = None) -> Request:
    body = json.dumps(alert).encode()
    ts = ts or str(int(time.time()))
    return body, {"Content-Type": "application/json", "X-Timestamp": ts,
                  "X-Signature": "sha256=" + sign(SOURCE_SECRET, body, ts)}


BUTTONS = {"ack": "Acknowledge", "esc": "Escalate", "res": "Resolve", "reo": "Reopen"}


def click_body(action: str, incident_id: int, channel: str, message: dict[str, Any], response_url: str,
               action_ts: str) -> str:
    """A block_actions form body shaped like tests/fixtures/slack/block_actions.json, carrying the
    clicked message as Slack does (its current text and blocks)."""
    payload: dict[str, Any] = copy.deepcopy(CLICK)
    payload["user"] = dict(CLICKER)
    payload["container"].update({"message_ts": message["ts"], "channel_id": channel})
    payload["channel"] = {"id": channel, "name": "ops"}
    payload["message"] = {**copy.deepcopy(message), "app_id": "A0CHATOPS", "team": "T0FAKE"}
    payload["response_url"] = response_url
    payload["trigger_id"] = f"{action_ts}.1234567890.0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    payload["actions"] = [{"action_id": f"chatops:{action}", "block_id": "f3Gz",
                           "text": {"type": "plain_text", "text": BUTTONS[action], "emoji": True},
                           "value": f"{action}:{incident_id}", "type": "button", "action_ts": action_ts}]
    if action == "ack":
        payload["actions"][0]["style"] = "primary"
    return urlencode({"payload": json.dumps(payload)})


def slack_headers(body: str) -> dict[str, str]:
    return signed(body, secret=SIGNING_SECRET)


# -- the bot's SQLite file, read-only ---------------------------------------------------------------

def _ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def outbox_counts(db: Path) -> Counter[str]:
    with _ro(db) as conn:
        return Counter(dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()))


def committed(db: Path) -> tuple[int, int]:
    """(sum of alerts.received_count, audit events alert.received)."""
    with _ro(db) as conn:
        alerts = conn.execute("SELECT COALESCE(SUM(received_count), 0) FROM alerts").fetchone()[0]
        audit = conn.execute("SELECT COUNT(*) FROM audit_events WHERE action = 'alert.received'").fetchone()[0]
    return alerts, audit


def incidents(db: Path) -> list[dict[str, Any]]:
    with _ro(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT id, status, alert_count, firing_count, labels FROM incidents ORDER BY id").fetchall()]


def incident_messages(db: Path) -> dict[tuple[int, str], tuple[str, str]]:
    """(incident id, channel id) -> (chat id, message ts) of each posted parent message."""
    with _ro(db) as conn:
        rows = conn.execute("SELECT incident_id, channel, chat_id, message_id FROM incident_messages").fetchall()
    return {(i, ch): (chat, ts) for i, ch, chat, ts in rows}


def pending_by_incident(db: Path) -> Counter[int]:
    with _ro(db) as conn:
        return Counter(dict(conn.execute(
            "SELECT incident_id, COUNT(*) FROM outbox WHERE status = 'pending' GROUP BY incident_id").fetchall()))


# -- figures ----------------------------------------------------------------------------------------

def pct(xs: Sequence[float], p: float) -> float:
    """The p-quantile (nearest rank); inf counts as "never arrived"."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * p) - 1))]


def ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "never"
    return f"{x * 1000:,.1f}"


def secs(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else "never" if math.isinf(x) else f"{x:,.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Aligned columns: the first left-aligned, numbers right-aligned."""
    def cell(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return indent + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


@dataclass
class Sent:
    """A stream of requests: counts by status and latencies (seconds)."""

    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first: float | None = None
    last_done: float | None = None

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def errors(self) -> str:
        bad = {s: n for s, n in self.statuses.items() if s != "200"}
        return ", ".join(f"{n} x {s}" for s, n in sorted(bad.items())) or "none"


async def post(session: aiohttp.ClientSession, url: str, req: Request, res: Sent, t0: float | None = None) -> Any:
    """POST one request; count its status, its latency from t0 (default: now), return the JSON answer if any."""
    start = time.perf_counter() if t0 is None else t0
    if res.first is None:
        res.first = time.perf_counter()
    res.sent += 1
    body = None
    try:
        async with session.post(url, data=req[0], headers=req[1]) as r:
            raw = await r.read()
            res.statuses[str(r.status)] += 1
            if r.content_type == "application/json":
                body = json.loads(raw)
    except Exception as exc:  # refused or timed out: the bot's failure, counted as such
        res.statuses[type(exc).__name__] += 1
    done = time.perf_counter()
    res.latencies.append(done - start)
    res.last_done = done if res.last_done is None else max(res.last_done, done)
    return body


# -- a paced alert stream in its own process (click_latency's background load) ---------------------

def load_process(url: str, rate: float, seconds: float, assets: list[str], labels: dict[str, str], ready: Any,
                 go: Any, progress: Any, results: Any) -> None:
    """Send alerts to `url` at `rate`/s for `seconds`, spread over `assets`; open loop (request i is due at
    i/rate, latency counted from then). Runs in a child process so its work does not delay the bench's
    own timing. Puts a dict of figures on `results`."""
    asyncio.run(_load(url, rate, seconds, assets, labels, ready, go, progress, results))


async def _load(url: str, rate: float, seconds: float, assets: list[str], labels: dict[str, str], ready: Any,
                go: Any, progress: Any, results: Any) -> None:
    n = int(rate * seconds)
    ts = str(int(time.time()) + 5)  # signed ahead: the stream must stay inside the 5 minutes of skew
    reqs = [signed_alert({"asset_name": assets[i % len(assets)], "signature": "QueueBacklog", "severity": "medium",
                          "message": f"queue depth above 10k (load #{i})", "tool_source": f"load-{i}",
                          "labels": labels}, ts) for i in range(n)]
    res = Sent()
    connector = aiohttp.TCPConnector(limit=32, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(url.rsplit("/alerts/", 1)[0] + "/healthz") as r:  # open a connection before timing
            await r.read()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        started = time.perf_counter()
        tasks = []

        async def one(req: Request, due: float) -> None:
            await post(session, url, req, res, due)
            progress[1] = res.ok
            progress[2] = sum(res.statuses.values()) - res.ok

        for i, req in enumerate(reqs):
            due = started + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            progress[0] = i + 1
            tasks.append(asyncio.create_task(one(req, due)))
        sending = time.perf_counter() - started
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    results.put({"sent": res.sent, "ok": res.ok, "errors": res.errors, "statuses": dict(res.statuses),
                 "sending_seconds": sending, "elapsed": elapsed, "p50": pct(res.latencies, 0.5),
                 "p99": pct(res.latencies, 0.99), "max": max(res.latencies, default=float("nan"))})
