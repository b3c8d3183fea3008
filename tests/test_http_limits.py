"""What anyone who can reach the bot may send costs it little and holds nothing for long: a compressed body is inflated
only where one is taken, after the checks that can come first, and never past the size limit; a body or a request head
that does not arrive in time is answered or closed; a client that hangs up is the client's doing, not the bot's error;
running out of files for connections is said once a minute, not ten thousand times a second."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

import bot.bodies
import bot.server
from adapters.telegram import SECRET_HEADER
from bot.auth import sign
from bot.server import AcceptErrors
from storage.models import AlertRecord
from tests.botkit import Harness, running_bot
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent
SIGNING = "slack-signing-secret-for-tests"
TG_SECRET = "telegram-webhook-secret"
ALERT = {"asset_name": "web-1", "signature": "NginxDown", "severity": "high", "message": "down", "tool_source": "z"}


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    """The bot with Slack and Telegram on (against fakes), as the internet sees it."""
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = (f"adapters:\n  slack: {{bot_token: {slack.token}, signing_secret: {SIGNING}, "
                 f"api_url: '{slack.api_url}'}}\n"
                 f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra) as harness:
            yield harness


def gzip_bomb(mebibytes: int) -> bytes:
    """A gzip stream of `mebibytes` MiB of zeros, about a thousandth of that in size (made without deflating them
    all: after a full flush, each MiB deflates to the same bytes)."""
    zeros = bytes(1 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first + block * (mebibytes - 1) + deflater.flush()
            + struct.pack("<II", crc, (mebibytes << 20) & 0xFFFFFFFF))


def post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    """A request written byte for byte; `length`, the Content-Length it says, when that is not the body's."""
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body) if length is None else length}",
            "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 30)
    return int(head[0].split()[1]), headers, body


@asynccontextmanager
async def as_served(h: Harness) -> AsyncIterator[tuple[str, int]]:
    """The bot's web app on the server `chatops serve` runs (the test server differs: it cancels a handler whose
    client left), with the settings read now; its address."""
    runner = h.bot.runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][:2]
    finally:
        await runner.cleanup()


async def http_count(h: Harness, route: str, status: int) -> float:
    metrics = (await (await h.client.get("/metrics")).text()).splitlines()
    prefix = f'chatops_http_requests_total{{route="{route}",status="{status}"}} '
    return next((float(m[len(prefix):]) for m in metrics if m.startswith(prefix)), 0.0)


# -- compressed bodies ------------------------------------------------------------------------------------------------

async def test_a_gzip_bomb_without_credentials_costs_the_bot_no_inflating(h: Harness) -> None:
    """1 MB of gzip that inflates to 1000 MiB, about 2 s of CPU to inflate, sent to endpoints by a caller without
    credentials: each answers at once, and what is left of the body is read as it came, not inflated (aiohttp
    inflated it, also after the answer, on any route). The next request on the connection is answered once the
    server has read past each body; the bot's CPU time over all of it stays small."""
    bomb = gzip_bomb(1000)
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    cpu = time.process_time()
    answers = []
    for path, headers in [("/alerts/nosuch", ()), ("/alerts/am", ("Authorization: Bearer wrong-token",)),
                          ("/slack/events", ()), ("/telegram/webhook", ())]:
        writer.write(post(path, bomb, "Content-Encoding: gzip", *headers))
        status, _, body = await answer_of(reader)
        answers.append((status, json.loads(body)["error"] if body.startswith(b"{") else body))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    healthz = await answer_of(reader)
    spent = time.process_time() - cpu
    writer.close()
    assert spent < 1.0, f"the bot spent {spent:.1f} s of CPU on four requests it refused"
    assert answers == [
        (404, "unknown alert source 'nosuch': check sources: in app.yaml (the bot's log lists the known ones)"),
        (401, "invalid bearer token"),
        (415, "Content-Encoding 'gzip' is not taken on /slack/events: send the body uncompressed"),
        (401, "wrong or missing X-Telegram-Bot-Api-Secret-Token")]
    assert healthz[0] == 200


async def test_a_bearer_source_refuses_a_request_without_its_token_before_reading_its_body(h: Harness) -> None:
    """A bearer source read the whole body first: sixteen connections without a token held 1 MiB each, and one whose
    body trickled held the handler 30 s for a 408. The token is checked first: 401 at once, nothing read."""
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(post("/alerts/am", b'{"version": "4"', length=1048000))  # the rest of the body never comes
    started = time.monotonic()
    status, _, body = await answer_of(reader)
    assert (status, json.loads(body)["error"]) == (401, "missing Authorization header (expected: Bearer <token>)")
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_compressed_body_is_inflated_up_to_the_size_limit_and_no_further(h: Harness) -> None:
    """For a caller let in, a body that inflates past the source's max_body_bytes is a 413 that says so, found
    without inflating the rest (1000 MiB would take about 2 s)."""
    bomb = gzip_bomb(1000)
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    cpu = time.process_time()
    writer.write(post("/alerts/am", bomb, "Content-Encoding: gzip", "Authorization: Bearer am-secret-token"))
    status, _, body = await answer_of(reader)
    spent = time.process_time() - cpu
    writer.close()
    assert (status, json.loads(body)) == (413, {"error": "body larger than 1048576 bytes once inflated"})
    assert spent < 0.5, f"the bot spent {spent:.1f} s of CPU inflating"
    small = zlib.compress(json.dumps({**ALERT, "message": "x" * 3000}).encode())  # 2048 at most for `open`
    status, answer, _ = await h.post("open", small, {"Content-Encoding": "deflate"})
    assert (status, answer) == (413, {"error": "body larger than 2048 bytes once inflated"})
    assert await h.count(AlertRecord) == 0


async def test_alert_sources_take_gzip_and_deflate_and_refuse_other_encodings_with_a_415(h: Harness) -> None:
    """gzip and deflate (zlib's format, or the bare deflate stream some clients send) are read; an HMAC source's
    signature is over the inflated body, as before. Anything else (br, zstd, several codings) gets a JSON 415 that
    names what is taken, before the body is read (aiohttp said "Please install Brotli" in plain text)."""
    for n, (coding, encode) in enumerate([
            ("gzip", lambda b: zlib.compress(b, wbits=31)), ("deflate", zlib.compress),
            ("deflate", lambda b: zlib.compress(b, wbits=-15)), ("identity", lambda b: b),
            ("GZip", lambda b: zlib.compress(b, wbits=31))]):
        payload = json.dumps({**ALERT, "asset_name": f"web-{n}"}).encode()
        status, answer, _ = await h.post("open", encode(payload), {"Content-Encoding": coding})
        assert status == 200, (coding, answer)
    payload = json.dumps({**ALERT, "asset_name": "signed"}).encode()
    ts = str(int(h.clock.now().timestamp()))
    status, answer, _ = await h.post("generic", zlib.compress(payload, wbits=31), {
        "Content-Encoding": "gzip", "X-Signature": f"sha256={sign('generic-secret', payload, ts)}", "X-Timestamp": ts})
    assert status == 200, answer
    assert await h.count(AlertRecord) == 6
    for coding in ("br", "zstd", "gzip, gzip", "compress"):
        response = await h.client.post("/alerts/open", data=b"\x00" * 100, headers={"Content-Encoding": coding})
        assert response.status == 415 and response.headers["Accept-Encoding"] == "gzip, deflate"
        assert await response.json() == {"error": f"Content-Encoding {coding!r} is not taken on /alerts/open: send "
                                                  "the body uncompressed, or with Content-Encoding gzip or deflate"}
    assert await h.count(AlertRecord) == 6


# -- the platforms' endpoints read bodies as /alerts does -------------------------------------------------------------

# Before their bodies are read: Slack's signature is over the body, Telegram's secret is a header.
PLATFORMS = {"/slack/events": {}, "/telegram/webhook": {SECRET_HEADER: TG_SECRET}}


@pytest.mark.parametrize("path", PLATFORMS)
async def test_a_platform_s_endpoint_refuses_a_body_too_large_slow_or_compressed_in_json(
        h: Harness, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """/slack/events and /telegram/webhook read their bodies with no time limit (a connection held for as long as
    the sender liked), answered a body over server.max_body_bytes in aiohttp's plain text, and inflated a compressed
    one (neither platform compresses)."""
    monkeypatch.setattr(bot.bodies, "BODY_WAIT", 0.5)
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(post(path, b'{"update_id": 1', *(f"{k}: {v}" for k, v in PLATFORMS[path].items()), length=100))
    started = time.monotonic()
    status, _, body = await answer_of(reader)
    assert (status, json.loads(body)) == (408, {"error": "the body did not arrive within 0.5 s"})
    assert time.monotonic() - started < 3
    assert await asyncio.wait_for(reader.read(), 3) == b""  # and the connection is let go
    writer.close()

    response = await h.client.post(path, data=b"x" * 1048577, headers=PLATFORMS[path])
    assert (response.status, await response.json()) == (413, {"error": "body larger than 1048576 bytes"})
    body = b'{"update_id": 1}'
    response = await h.client.post(path, data=zlib.compress(body), headers={**PLATFORMS[path],
                                                                           "Content-Encoding": "deflate"})
    assert (response.status, await response.json()) == (
        415, {"error": f"Content-Encoding 'deflate' is not taken on {path}: send the body uncompressed"})
    assert response.headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("path", PLATFORMS)
async def test_a_client_hanging_up_mid_body_on_a_platform_s_endpoint_is_an_abort_not_a_500(
        h: Harness, caplog: pytest.LogCaptureFixture, path: str) -> None:
    """Half a body, then the connection closed (anyone can, on Slack's endpoint before any signature is checked):
    counted as 499, said at info without a traceback; it was an ERROR with a traceback, counted as a 500."""
    caplog.set_level(logging.INFO)
    async with as_served(h) as (host, port):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(post(path, b'{"update_id"', *(f"{k}: {v}" for k, v in PLATFORMS[path].items()), length=100))
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        for _ in range(100):
            if await http_count(h, path, 499):
                break
            await asyncio.sleep(0.05)
    assert await http_count(h, path, 499) == 1
    assert await http_count(h, path, 500) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text
    assert f"POST {path!r} from 127.0.0.1: the client closed the connection before its body arrived" in caplog.text


# -- request heads and idle connections -------------------------------------------------------------------------------

async def test_a_request_head_that_trickles_in_is_cut_off_after_idle_wait(h: Harness,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A head sent a line at a time, and a connection that sends nothing, each hold a file; aiohttp let them for an
    hour. They are closed IDLE_WAIT after the connection opened; one that sends its requests in time is served."""
    monkeypatch.setattr(bot.server, "IDLE_WAIT", 1.0)
    async with as_served(h) as (host, port):
        started = time.monotonic()
        trickle_reader, trickle = await asyncio.open_connection(host, port)
        silent_reader, silent = await asyncio.open_connection(host, port)
        busy_reader, busy = await asyncio.open_connection(host, port)
        trickle.write(b"POST /alerts/open HTTP/1.1\r\nHost: x\r\n")
        for n in range(6):  # a header every 0.3 s: more than IDLE_WAIT in all
            await asyncio.sleep(0.3)
            if trickle_reader.at_eof() or trickle.is_closing():
                break
            trickle.write(f"X-Header-{n}: y\r\n".encode())
            busy.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a request every 0.3 s: kept open
            assert (await answer_of(busy_reader))[0] == 200
        assert await asyncio.wait_for(trickle_reader.read(), 3) == b""  # closed, and no answer
        assert await asyncio.wait_for(silent_reader.read(), 3) == b""
        closed_after = time.monotonic() - started
        busy.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer_of(busy_reader))[0] == 200
        for writer in (trickle, silent, busy):
            writer.close()
    assert 0.9 < closed_after < 3, closed_after


def test_the_idle_wait_outlasts_a_proxy_s_idle_upstream_connections() -> None:
    """A proxy in front (nginx keeps an idle upstream connection 60 s) closes an idle connection before the bot does,
    so that it never sends a request on one the bot is closing; the server runs bodies as they were sent."""
    assert bot.server.IDLE_WAIT > 60
    assert bot.server.server_options() == {"auto_decompress": False, "keepalive_timeout": bot.server.IDLE_WAIT}


# -- files for connections --------------------------------------------------------------------------------------------

async def test_running_out_of_files_is_said_once_a_minute(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio says `socket.accept() out of system resource` at every try to take a connection while the files are
    used up (about 10,000 times a second on Python 3.11: 275 MB of log a minute); the bot's handler says it at most
    every ACCEPT_SAID_EVERY seconds, with how many went unsaid, and leaves anything else to asyncio."""
    monkeypatch.setattr(bot.server, "ACCEPT_SAID_EVERY", 0.5)
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    loop.set_exception_handler(AcceptErrors(loop))
    try:
        out_of_files = {"message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files")}
        for _ in range(1000):
            loop.call_exception_handler(out_of_files)
        await asyncio.sleep(0.6)
        loop.call_exception_handler(out_of_files)
        loop.call_exception_handler({"message": "something else went wrong"})
    finally:
        loop.set_exception_handler(before)
    said = [r.getMessage() for r in caplog.records if r.name == "chatops.server"]
    assert len(said) == 2, said
    assert said[0].startswith("cannot take new connections: [Errno 24] Too many open files (the limit on open files "
                              "is ")
    assert said[1].endswith("(said at most once a minute; 999 more since)")
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else went wrong"]


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one() -> None:
    """1024 open files, a common soft limit, is 1024 connections; the bot raises it to the hard limit at start."""
    code = ("import json, resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
            "from bot.server import raise_file_limit\n"
            "print(json.dumps([raise_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    (before, now), (soft, hard) = json.loads(done.stdout)
    assert (before, now) == (64, soft) and soft == (hard if hard != resource.RLIM_INFINITY else 65536), done.stdout


async def test_a_gzip_body_of_several_members_is_read_whole_and_bytes_after_it_are_refused(h: Harness) -> None:
    """RFC 1952: a gzip file may be several members one after the other (what `cat a.gz b.gz` makes); only the first
    was read, and its JSON, cut short, refused with a 400. Bytes after the last member were dropped unsaid. The size
    limit holds across the members: a bomb split in parts still gets a 413."""
    import gzip

    payload = json.dumps([{**ALERT, "asset_name": "web-1"}, {**ALERT, "asset_name": "web-2"}]).encode()
    half = len(payload) // 2
    status, answer, _ = await h.post("open", gzip.compress(payload[:half]) + gzip.compress(payload[half:]),
                                     {"Content-Encoding": "gzip"})
    assert (status, answer.get("alerts")) == (200, 2), answer
    assert await h.count(AlertRecord) == 2
    for junk in (b"junk", b"\x00\x00\x00\x00"):
        status, answer, _ = await h.post("open", gzip.compress(json.dumps(ALERT).encode()) + junk,
                                         {"Content-Encoding": "gzip"})
        assert (status, answer) == (400, {"error": "the body cannot be read (bytes after the last gzip member); send "
                                                   "it as its Content-Encoding and Content-Length say"})
    status, answer, _ = await h.post("open", zlib.compress(json.dumps(ALERT).encode()) + b"junk",
                                     {"Content-Encoding": "deflate"})  # (deflate has no members: its end is the end)
    assert (status, answer["error"]) == (400, "the body cannot be read (bytes after the end of the deflate stream); "
                                              "send it as its Content-Encoding and Content-Length say")
    member = gzip.compress(b" " * 1500)  # the open source takes 2048 bytes: two of these inflate past it
    status, answer, _ = await h.post("open", member + member + gzip.compress(json.dumps(ALERT).encode()),
                                     {"Content-Encoding": "gzip"})
    assert (status, answer) == (413, {"error": "body larger than 2048 bytes once inflated"})
    assert await h.count(AlertRecord) == 2


async def test_a_chat_platform_s_body_that_is_not_json_is_a_400_saying_why(h: Harness) -> None:
    """Telegram's and Teams' endpoints read their JSON the same way (bot.bodies.read_json): not JSON, or nested past
    what Python parses, is a 400 that says so."""
    headers = {**PLATFORMS["/telegram/webhook"], "Content-Type": "application/json"}
    response = await h.client.post("/telegram/webhook", data=b'{"update_id": 1,', headers=headers)
    assert response.status == 400
    assert (await response.json())["error"].startswith("malformed JSON: Expecting property name")
    response = await h.client.post("/telegram/webhook", data=b"[" * 100_000 + b"]" * 100_000, headers=headers)
    assert (response.status, await response.json()) == (400, {"error": "malformed JSON: nested too deeply"})
