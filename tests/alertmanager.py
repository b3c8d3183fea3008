"""Real processes for end-to-end tests: `chatops serve` and a Prometheus Alertmanager, with their logs.

Both write their output to a file (never an undrained pipe), are stopped by
their own pid, and say what went wrong with the log attached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

CHATOPS = str(Path(sys.executable).with_name("chatops"))
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
NOT_INSTALLED = "prometheus-alertmanager is not installed; .ci/run installs it from Debian"


def require_alertmanager() -> tuple[str, str]:
    """The alertmanager and amtool executables, or skip the test saying why."""
    if ALERTMANAGER is None or AMTOOL is None:
        missing = " and ".join(n for n, p in (("alertmanager", ALERTMANAGER), ("amtool", AMTOOL)) if p is None)
        pytest.skip(f"{NOT_INSTALLED} (not on PATH: {missing})")
    return ALERTMANAGER, AMTOOL


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Process:
    """A child process whose stdout and stderr go to `log_path`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"----- {self.name} (pid {self.proc.pid}, {state}) log {self.log_path} -----\n{self.log()}"

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log_file.close()
        return self.proc.returncode

    def wait_http(self, url: str, *, timeout: float = 20, expect: int = 200) -> bytes:
        """The body of `url` once it answers `expect`; fails with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early with {self.proc.returncode}\n{self.describe()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == expect:
                        return resp.read()
                    last = resp.status
            except urllib.error.HTTPError as exc:
                last = exc.code
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"{url} did not answer {expect} within {timeout}s (last: {last!r})\n{self.describe()}")


def clean_env() -> dict[str, str]:
    """This environment without anything that would switch on an adapter or change the bot's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TELEGRAM_", "TEAMS_", "CHATOPS_"))}


def two_ports() -> tuple[int, int]:
    """Two different free ports on 127.0.0.1: the bot's and Alertmanager's."""
    first = free_port()
    while (second := free_port()) == first:
        pass
    return first, second


def start_bot(config: Path, log_path: Path) -> Process:
    return Process("chatops serve", [CHATOPS, "serve", "-c", str(config)], log_path, env=clean_env(),
                   cwd=config.parent)


def chatops(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHATOPS, *args], capture_output=True, text=True, timeout=timeout, env=clean_env())


def incidents(config: Path) -> list[dict[str, Any]]:
    """`chatops incidents list --format json`: the store as an operator sees it."""
    result = chatops("incidents", "list", "--format", "json", "-c", str(config))
    assert result.returncode == 0, f"chatops incidents list failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def alertmanager_config(*, webhook_url: str, bearer: str) -> str:
    """Group per alert, flush after 1 s, tell the webhook about resolutions, authenticate with a bearer token."""
    return json.dumps({  # JSON is YAML; nothing to quote by hand
        "route": {
            "receiver": "chatops",
            "group_by": ["alertname", "instance"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{
            "name": "chatops",
            "webhook_configs": [{
                "url": webhook_url,
                "send_resolved": True,
                "http_config": {"authorization": {"type": "Bearer", "credentials": bearer}},
            }],
        }],
    }, indent=2)


class Alertmanager(Process):
    """A single, non-clustered Alertmanager on 127.0.0.1:`port`, with its data in `workdir`."""

    def __init__(self, workdir: Path, port: int, config_text: str):
        binary, self.amtool_path = require_alertmanager()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = workdir / "alertmanager.yml"
        config.write_text(config_text)
        (workdir / "am-data").mkdir(exist_ok=True)
        super().__init__("alertmanager", [
            binary,
            f"--config.file={config}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url={self.url}",
            "--cluster.listen-address=",  # no gossip: one instance, no port to collide on
            "--log.level=debug",
        ], workdir / "alertmanager.log", cwd=workdir)

    def amtool(self, *args: str) -> str:
        argv = [self.amtool_path, *args, f"--alertmanager.url={self.url}"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        return result.stdout

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels` (0 if there are none)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric_name, _, label_text = head.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total
