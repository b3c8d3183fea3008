"""Durability: SIGKILL the bot in the middle of a stream; every alert that got a 2xx is stored, once."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp

from tests.conftest import free_port
from tests.test_serve import CHATOPS, wait_http

CONFIG = """
storage: {{url: "sqlite+aiosqlite:///{db}"}}
server: {{port: {port}}}
audit: {{hmac_key: crash-key-0123456789ab}}
channels: [{{id: ops, platform: slack, chat: C0OPS}}]
sources: [{{id: gen, kind: generic, auth: none}}]
routes: [{{match: {{}}, channels: [ops]}}]
"""


def start(cfg: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}
    return subprocess.Popen([CHATOPS, "serve", "-c", str(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


async def stream(port: int, acked: list[str], stop_after: int) -> None:
    """16 senders post numbered alerts until the bot stops answering."""
    counter = iter(range(100_000))

    async def sender(session: aiohttp.ClientSession) -> None:
        for i in counter:
            body = {"asset_name": f"host-{i % 13}", "signature": "Crash", "severity": "high",
                    "message": f"alert {i}", "tool_source": "test", "dedup_key": f"k{i}"}
            try:
                async with session.post(f"http://127.0.0.1:{port}/alerts/gen", json=body) as resp:
                    if resp.status == 200:
                        acked.append(f"k{i}")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return
            if len(acked) >= stop_after * 4:
                return

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(sender(session) for _ in range(16)))


async def streaming(port: int, acked: list[str], until: int) -> asyncio.Task[None]:
    """Start the stream and return once `until` alerts got their 2xx (or it ended, or 30 s passed)."""
    sending = asyncio.create_task(stream(port, acked, until))
    deadline = time.monotonic() + 30
    while len(acked) < until and time.monotonic() < deadline and not sending.done():
        await asyncio.sleep(0.005)
    return sending


async def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "app.yaml"
    cfg.write_text(CONFIG.format(db=tmp_path / "crash.db", port=port))
    proc = start(cfg)
    acked: list[str] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        sending = await streaming(port, acked, 400)
        proc.send_signal(signal.SIGKILL)  # in the middle of the stream: requests are in flight
        proc.wait(timeout=10)
        await asyncio.wait_for(sending, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 400, f"only {len(acked)} alerts were acknowledged before the kill"

    # Restart on the same database: it opens, and every acknowledged alert is there exactly once.
    proc = start(cfg)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    every_acked_alert_stored_once(tmp_path / "crash.db", acked, cfg)


def every_acked_alert_stored_once(database: Path, acked: list[str], cfg: Path) -> None:
    """Every alert that got a 2xx is in the store, none twice, and the audit chain verifies."""
    with sqlite3.connect(database) as db:
        stored = [row[0] for row in db.execute("SELECT fingerprint FROM alerts")]
    assert len(stored) == len(set(stored)), "an alert was stored twice"
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged alerts were lost, e.g. {sorted(missing)[:5]}"
    verify = subprocess.run([CHATOPS, "audit", "verify", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
