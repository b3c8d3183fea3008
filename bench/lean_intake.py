"""A lean two-process intake, a reference for bench/ingest.py (`--lean`): what the bot's design can reach here.

    python bench/lean_intake.py PORT SQLITE_FILE

Not the bot. The least a durable two-process intake of the bot's shape does, written for speed and nothing else:
an aiohttp front that checks each request's HMAC signature (and its timestamp's 5-minute window) and hands the raw
body to a writer process over a socket pair (a request id and a length before each body), and a writer process
that takes whatever has arrived, reads each generic alert (its four fields checked), fingerprints it, keeps open
incidents and alert records in memory, updates the alert and incident rows, appends an HMAC-chained audit event
and the signature to their tables, queues one outbox row per incident touched, commits (SQLite, WAL,
synchronous=NORMAL), and only then answers each request with the bot's kind of JSON body. Left out, which the bot
does: replay and rate checks, X-Delivery-ID, routes and silences, reopening and resolving, escalations, priority
beyond severity and duplicates, metrics, error handling (a bad body is a 422 here, anything worse ends it).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from typing import Any

from aiohttp import web

SECRET = b"bench-secret-0123456789"  # bench/ingest.py signs with it
AUDIT_KEY = b"bench-audit-key-0001"
HDR = struct.Struct(">II")  # before each body and each answer: the request id, the length
STATUS = struct.Struct(">H")  # then, in an answer, its HTTP status
SEVERITY = {"critical": 90, "high": 60, "medium": 30, "low": 10, "info": 0}
SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (id INTEGER PRIMARY KEY, group_key TEXT, status TEXT, severity TEXT, title TEXT,
  alert_count INT, firing_count INT, notifications INT, priority INT, opened_at REAL, last_seen REAL, sources TEXT);
CREATE INDEX IF NOT EXISTS incidents_key ON incidents (group_key, status);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, incident_id INT, source TEXT, fingerprint TEXT,
  status TEXT, severity TEXT, summary TEXT, labels TEXT, first_received REAL, last_received REAL, received_count INT);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_identity ON alerts (source, fingerprint, incident_id);
CREATE TABLE IF NOT EXISTS audit_events (id INTEGER PRIMARY KEY, at REAL, actor TEXT, action TEXT, incident_id INT,
  details TEXT, prev_hash TEXT, hash TEXT);
CREATE TABLE IF NOT EXISTS alert_signatures (id INTEGER PRIMARY KEY, signature TEXT, expires_at REAL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, incident_id INT, kind TEXT, details TEXT, due REAL);
"""


def front(port: int, path: str) -> None:
    parent, child = socket.socketpair()
    subprocess.Popen([sys.executable, __file__, "writer", str(child.fileno()), path], pass_fds=(child.fileno(),))
    child.close()
    pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
    frames: list[bytes] = []
    state: dict[str, Any] = {"last": 0, "soon": False, "transport": None}

    class Answers(asyncio.Protocol):
        def __init__(self) -> None:
            self.buffer = bytearray()

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer
            buffer += data
            at, n = 0, len(buffer)
            while n - at >= HDR.size + STATUS.size:
                rid, size = HDR.unpack_from(buffer, at)
                start = at + HDR.size + STATUS.size
                if start + size > n:
                    break
                (status,) = STATUS.unpack_from(buffer, at + HDR.size)
                pending.pop(rid).set_result((status, bytes(buffer[start:start + size])))
                at = start + size
            del buffer[:at]

    def send() -> None:
        state["soon"] = False
        state["transport"].write(b"".join(frames))
        frames.clear()

    async def alerts(request: web.Request) -> web.Response:
        body = await request.read()
        stamp, signature = request.headers.get("X-Timestamp", ""), request.headers.get("X-Signature", "")
        mac = "sha256=" + hmac.new(SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not (hmac.compare_digest(mac, signature) and stamp.isdigit() and abs(time.time() - int(stamp)) <= 300):
            return web.json_response({"error": "bad signature"}, status=401)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        state["last"] = rid = state["last"] + 1
        pending[rid] = future
        frame = signature.encode() + b"\n" + body
        frames.append(HDR.pack(rid, len(frame)) + frame)
        if not state["soon"]:
            state["soon"] = True
            loop.call_soon(send)
        status, answer = await future
        return web.Response(body=answer, status=status, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def connect(_app: web.Application) -> None:
        state["transport"], _ = await asyncio.get_running_loop().create_unix_connection(Answers, sock=parent)

    app = web.Application()
    app.on_startup.append(connect)
    app.router.add_post("/alerts", alerts)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def answer(rid: int, body: bytes, status: int = 200) -> bytes:
    return HDR.pack(rid, len(body)) + STATUS.pack(status) + body


def writer(fd: int, path: str) -> None:
    sock = socket.socket(fileno=fd)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    incidents: dict[str, list[Any]] = {}  # group key -> [id, alert_count, firing_count, notifications, opened_at]
    records: dict[str, list[Any]] = {}  # fingerprint -> [id, received_count]
    last = db.execute("SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1").fetchone()
    prev = last[0] if last else ""
    dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
    buffer = bytearray()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        buffer += data
        while True:  # everything that has arrived
            try:
                more = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not more:
                break
            buffer += more
        items, at, n = [], 0, len(buffer)
        while n - at >= HDR.size:
            rid, size = HDR.unpack_from(buffer, at)
            if at + HDR.size + size > n:
                break
            items.append((rid, bytes(buffer[at + HDR.size:at + HDR.size + size])))
            at += HDR.size + size
        del buffer[:at]
        if not items:
            continue
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        alert_rows, incident_rows, events, signatures, answers = [], {}, [], [], []
        for rid, frame in items:
            signature, _, body = frame.partition(b"\n")
            d = json.loads(body)
            asset, name, severity, message = d.get("asset_name"), d.get("signature"), d.get("severity"), d.get("message")
            if not (isinstance(asset, str) and isinstance(name, str) and severity in SEVERITY
                    and isinstance(message, str)):
                answers.append(answer(rid, b'{"error": "not a generic alert"}', 422))
                continue
            labels = {"alertname": name, "instance": asset, "severity": severity, "tool": d.get("tool_source", "")}
            fingerprint = hashlib.sha256(f"{asset}\x1f{name}".encode()).hexdigest()[:16]
            key = f"{name}\x1f{asset}"
            incident = incidents.get(key)
            if incident is None:
                row = db.execute("SELECT id, alert_count, firing_count, notifications, opened_at FROM incidents "
                                 "WHERE group_key = ? AND status != 'resolved' ORDER BY id DESC LIMIT 1",
                                 (key,)).fetchone()
                if row is None:
                    cursor = db.execute(
                        "INSERT INTO incidents (group_key, status, severity, title, alert_count, firing_count, "
                        "notifications, priority, opened_at, last_seen, sources) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (key, "triggered", severity, message, 0, 0, 0, SEVERITY[severity], now, now, '["bench"]'))
                    row = (cursor.lastrowid, 0, 0, 0, now)
                incident = incidents[key] = list(row)
            record = records.get(fingerprint)
            change = "duplicate"
            if record is None:
                row = db.execute("SELECT id, received_count FROM alerts WHERE source = 'bench' AND fingerprint = ? "
                                 "AND incident_id = ?", (fingerprint, incident[0])).fetchone()
                if row is None:
                    cursor = db.execute(
                        "INSERT INTO alerts (incident_id, source, fingerprint, status, severity, summary, labels, "
                        "first_received, last_received, received_count) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (incident[0], "bench", fingerprint, "firing", severity, message, dumps(labels), now, now, 0))
                    row = (cursor.lastrowid, 0)
                    incident[1] += 1
                    incident[2] += 1
                    change = "grouped"
                record = records[fingerprint] = list(row)
            record[1] += 1
            incident[3] += 1
            alert_rows.append((now, message, dumps(labels), record[1], record[0]))
            priority = SEVERITY[severity] + min(20, 2 * (incident[3] - 1)) - min(10, int((now - incident[4]) / 3600))
            incident_rows[incident[0]] = (incident[1], incident[2], incident[3], priority, now, incident[0])
            details = dumps({"fingerprint": fingerprint, "status": "firing", "severity": severity, "labels": labels,
                             "summary": message})
            digest = hmac.new(AUDIT_KEY, f"{prev}|{now}|source:bench|alert.received|{incident[0]}|{details}".encode(),
                              hashlib.sha256).hexdigest()
            events.append((now, "source:bench", "alert.received", incident[0], details, prev, digest))
            prev = digest
            signatures.append((signature.decode(), now + 600))
            answers.append(answer(rid, dumps({"status": "ok", "alerts": 1, "results": [
                {"fingerprint": fingerprint, "incident": incident[0], "change": change}]}).encode()))
        db.executemany("UPDATE alerts SET last_received = ?, summary = ?, labels = ?, received_count = ? WHERE id = ?",
                       alert_rows)
        db.executemany("UPDATE incidents SET alert_count = ?, firing_count = ?, notifications = ?, priority = ?, "
                       "last_seen = ? WHERE id = ?", list(incident_rows.values()))
        db.executemany("INSERT INTO audit_events (at, actor, action, incident_id, details, prev_hash, hash) "
                       "VALUES (?,?,?,?,?,?,?)", events)
        db.executemany("INSERT INTO alert_signatures (signature, expires_at) VALUES (?,?)", signatures)
        db.executemany("INSERT INTO outbox (incident_id, kind, details, due) VALUES (?,?,?,?)",
                       [(iid, "alerts.changed", "{}", now + 30) for iid in incident_rows])
        db.execute("COMMIT")
        sock.sendall(b"".join(answers))


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(int(sys.argv[2]), sys.argv[3])
    else:
        front(int(sys.argv[1]), sys.argv[2])
