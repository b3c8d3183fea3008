"""Alert intake: group concurrent submissions into one transaction, answer each after commit.

A request hands its parsed alerts to `Intake.submit` and waits. One writer task
takes everything queued, applies it in arrival order in a single transaction
(alerts, incidents, audit events, outbox rows, delivery ids) and commits; only
then does each request get its answer. If the transaction fails, every
request in it gets the error (503), and nothing of it was written.

Where the transaction runs (`storage.writer`): on PostgreSQL on the event loop;
on a SQLite file in the dedicated writer thread (`thread`, the default) or in a
writer process (`process`, see storage/writer.py): the same `Intake._apply`, on
an interpreter lock of its own. The process gets each batch with the `now` to use
(the clock stays here) and answers with the outcomes and what `_answer` needs
(fresh submissions, audit events, time-to-resolve observations, escalations
started); metrics and the commit hooks run here. If it dies, what it had not
answered gets 503 and the next batch starts another.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import pickle
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, text

from bot.alerts import Alert, BodyError, read_body
from bot.clock import Clock
from bot.auth import replay_message
from bot.config import Config, HmacAuth, Silence, Source
from bot.incidents import RESOLVED, TRIGGERED, priority, worst
from bot.metrics import Metrics
from bot.model import Actor
from bot.routing import group_key, select_routes, silence_ends, silenced_by
from handlers.notify import page_redraw_row
from handlers.silences import schedule_silence_ends
from storage.audit import _SQLITE_HEAD, AuditLog, Entry, KeyMismatch
from storage.db import Database, explain_failure, out_of_space, store_unavailable
from storage.models import AlertRecord, AlertSignature, AuditEvent, Delivery, Escalation, Incident, OutboxItem
from storage.replays import claim_in
from storage.rows import Json, Rows, _encode_datetime, fast_encoder, json_text
from storage.writer import WriterGone, WriterProcess, wire_time

log = logging.getLogger("chatops.intake")
THREAD_LINE_DELAY = timedelta(seconds=30)
MAX_REPORTERS = 10  # sources (and generic tools) an incident lists: past two they change nothing in its priority
RESENDING_KINDS = ("alertmanager", "grafana")  # senders that repeat a whole group's alerts in each notification
IDEMPOTENCY_WINDOW = timedelta(hours=24)
UNKNOWN_SEVERITY_SAID_EVERY = timedelta(minutes=1)  # the log names a source's unknown severities at most this often
WRITERS = ("thread", "process")
WRITER_WAIT = 30.0  # seconds a batch's answer from the writer process is waited for, at most (Intake.writer_wait)
UNAVAILABLE_SAID = "intake: the database is unavailable "  # how the log says the store refused a batch (either writer)
UNAVAILABLE_SAID_EVERY = 60.0  # seconds: that line at most this often, with how many went unsaid
_dumps = fast_encoder(json.JSONEncoder())  # json.dumps: what the HTTP answer's body is
_UNAVAILABLE = "the database is unavailable; nothing was stored, retry later"
_INTERNAL = "internal error; nothing was stored"


class Outcome:
    """A submission's answer: HTTP status and JSON body. From the writer process the body comes already encoded
    (`encoded`, what json.dumps writes), and is decoded only if someone reads `body`."""

    __slots__ = ("status", "_body", "replayed", "encoded", "rejected", "truncated")

    def __init__(self, status: int, body: dict[str, Any] | None = None, replayed: bool = False, *,
                 encoded: bytes | None = None, rejected: str | None = None, truncated: int = 0):
        self.status, self._body, self.replayed, self.encoded = status, body, replayed, encoded
        # For a body the writer process read (Submission.body): why it refused it (BodyError.reason), or None;
        # and how many alerts the sender left out of it.
        self.rejected, self.truncated = rejected, truncated

    @property
    def body(self) -> dict[str, Any]:
        if self._body is None:
            self._body = json.loads(self.encoded) if self.encoded is not None else {}
        return self._body

    def __repr__(self) -> str:
        return f"Outcome({self.status}, {self.body!r}, replayed={self.replayed})"


@dataclass
class Submission:
    source: Source
    alerts: list[Alert]
    delivery_id: str | None
    future: asyncio.Future[Outcome] | None  # None in the writer process
    truncated: int = 0  # alerts the sender left out of this notification (truncatedAlerts)
    # The request's body, when the writer process reads it (Intake.reads_bodies): `alerts` stays empty here,
    # and the answer says how many of each status it held (`counts`) and the severities it did not know (`unknown`).
    body: bytes | None = None
    counts: dict[str, int] | None = None
    unknown: dict[str, int] | None = None
    # Its signature (signed with a timestamp): claimed in the store with the alerts, so that a copy sent to another
    # replica, or after a restart, is refused as a replay (storage/replays.py).
    signature: str | None = None
    # With an X-Delivery-ID: the body's digest (body_digest), stored with the id, so that another body under it is
    # told apart from a retry. None: any body is taken for the same (as one stored before digests were).
    digest: str | None = None

    def received(self) -> dict[str, int]:
        """Alerts by status (firing, resolved)."""
        if self.counts is not None:
            return self.counts
        out: dict[str, int] = {}
        for alert in self.alerts:
            out[alert.status] = out.get(alert.status, 0) + 1
        return out

    def unknown_severities(self) -> dict[str, int]:
        """Severity label values the bot did not know (the alerts are medium), each with how many alerts said it."""
        if self.counts is not None:
            return self.unknown or {}
        return unknown_severities(self.alerts)


def body_digest(body: bytes) -> str:
    """What tells a retry of a delivery from another body under its X-Delivery-ID: a digest of the body as read
    (inflated: a gzip retry of the same JSON is the same delivery). Taken only for a delivery with an id."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def _same_body(stored: str | None, digest: str | None) -> bool:
    """Whether a delivery with `digest` repeats the one stored with `stored`: a missing digest (a delivery stored
    before they were kept, or a submission without one) matches any, as before."""
    return stored is None or digest is None or stored == digest


def _reused(delivery_id: str) -> Outcome:
    """The answer to a body other than the one first sent under `delivery_id` (IETF Idempotency-Key draft: a key
    reused with another payload is a 422): never the first answer, which would drop its alerts unseen."""
    hours = IDEMPOTENCY_WINDOW.total_seconds() / 3600
    return Outcome(422, {"error": f"X-Delivery-ID {delivery_id!r} was used within the last {hours:g} h for a "
                                  "different body: give each delivery its own id"}, rejected="delivery_id_reused")


def unknown_severities(alerts: Sequence[Alert]) -> dict[str, int]:
    """The alerts' severity label values the bot did not know, each with how many said it."""
    out: dict[str, int] = {}
    for alert in alerts:
        if alert.unknown_severity is not None:
            out[alert.unknown_severity] = out.get(alert.unknown_severity, 0) + 1
    return out


class _Row:
    """A row read (or about to be inserted) in this batch: its columns as attributes.

    Intake works on plain values and writes only the columns that changed (see
    storage/rows.py): building and flushing ORM objects cost more than
    everything else a request does (bench/ingest.py). Columns are plain
    instance attributes (cheap to read and set); `changes()` compares them with
    what was read. On the raw SQLite path JSON columns arrive undecoded (`Json`):
    one is decoded when first read, and one that is only assigned is compared
    (and written) as JSON text.
    """

    __slots__ = ("__dict__", "_orig", "_raw", "new")

    def __init__(self, values: Mapping[str, Any], *, new: bool = False, json_columns: tuple[str, ...] = ()):
        d = self.__dict__
        d.update(values)
        raw = {}
        for name in json_columns:
            value = d.get(name)
            if type(value) is Json:
                raw[name] = value
                del d[name]
        self._raw = raw
        self._orig = {} if new else dict(d)
        self.new = new

    def __getattr__(self, name: str) -> Any:
        if name[0] == "_":
            raise AttributeError(name)
        text = self._raw.pop(name, None)
        if text is None:
            raise AttributeError(name)
        value = self.__dict__[name] = self._orig[name] = text.decode()
        return value

    def changes(self) -> dict[str, Any]:
        """The columns whose value differs from what was read (or that were not read)."""
        orig, raw = self._orig, self._raw
        out = {}
        for name, value in self.__dict__.items():
            if name in orig:
                if orig[name] == value:
                    continue
            elif name in raw:
                encoded = json_text(value)
                if encoded.text == raw[name].text:
                    continue
                value = encoded  # written as is, not encoded again
            out[name] = value
        return out

    def values(self, *, without: str | None = None) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != without}


_INCIDENTS = Incident.__table__
_ALERTS = AlertRecord.__table__
_OUTBOX = OutboxItem.__table__
_DELIVERIES = Delivery.__table__
_SIGNATURES = AlertSignature.__table__
_AUDIT = AuditEvent.__table__
_ESCALATIONS = Escalation.__table__
# What intake reads of an existing incident and alert (it writes only what changed).
_INCIDENT_COLUMNS = ("id", "group_key", "status", "severity", "sources", "channels", "links", "alert_count",
                     "firing_count", "notifications", "critical_asset", "silenced", "opened_at", "last_seen",
                     "escalation")
# An alert's summary, labels and annotations are not read: a repeat sets them anyway, and its row is written
# anyway (received_count, last_received), so they are written as they come instead of compared first. Its links
# are (on the raw SQLite path decoded only when looked at): a repeat updates the incident's links it brought.
_ALERT_COLUMNS = ("id", "incident_id", "source", "fingerprint", "status", "received_count", "ends_at", "links")
_ALERT_JSON = ("links",)
# The incident's JSON columns: on the raw SQLite path read as text, decoded only when read (see _Row).
_INCIDENT_JSON = ("sources", "channels", "links")


# What a committed batch reports: each request's outcome, the fresh submissions, the audit events written,
# (severity, seconds from open) of each incident its source resolved, how many escalations it started, and how
# many outbox rows (chat work) it queued.
_Result = tuple[list[Outcome], list[Submission], int, list[tuple[str, float]], int, int]


@dataclass
class _Touched:
    """What one batch did to one incident, to queue its chat work once."""

    incident: _Row
    opened: bool = False
    grouped: int = 0
    resolved_alerts: int = 0
    resolved: bool = False
    refired: int = 0
    unsilenced: bool = False  # silenced until an alert no silence covers came: posted now, as if it opened
    resolved_by: str | None = None  # the source whose "resolved" it heard last (its thread line names it)
    new_channels: list[str] = field(default_factory=list)  # a more severe alert's route added them: posted there


@dataclass
class _Batch:
    now: datetime
    incidents_by_key: dict[str, _Row]
    latest_by_identity: dict[tuple[str, str], tuple[_Row, _Row]]
    previous_by_key: dict[str, int] | None
    # (source, fingerprint) -> its other records still firing, with their incidents: one a person resolved while the
    # alert fired (the alert's next notification opened another), reopened since or not. The alert's end ends
    # them too (_end_elsewhere).
    elsewhere: dict[tuple[str, str], list[tuple[_Row, _Row]]] = field(default_factory=dict)
    loaded: list[_Row] = field(default_factory=list)
    loaded_records: list[_Row] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    rows: Rows | None = None
    entries: list[Entry] = field(default_factory=list)
    touched: dict[int, _Touched] = field(default_factory=dict)
    new_incidents: list[_Row] = field(default_factory=list)
    new_records: list[tuple[_Row, _Row]] = field(default_factory=list)
    resolved_after: list[tuple[str, float]] = field(default_factory=list)  # (severity, seconds): first resolutions
    resolutions: list[tuple[_Row, float]] = field(default_factory=list)  # incidents the source resolved, when
    quiet: dict[int, _Row] = field(default_factory=dict)  # id(incident) -> no alert firing: resolved after the notification
    resolved_here: list[_Row] = field(default_factory=list)  # incidents the notification being read resolved
    ended_here: set[int] = field(default_factory=set)  # id(record): alerts the notification being read resolved
    escalations: int = 0  # escalations started (on_open) or brought forward (on_raise): steps due now
    queued: int = 0  # outbox rows written
    raised: dict[int, _Row] = field(default_factory=dict)  # id(incident) -> stored incidents whose severity rose
    unsilenced: list[_Row] = field(default_factory=list)  # stored incidents an unsilenced alert reached
    adopted: list[_Row] = field(default_factory=list)  # stored incidents that took a more severe alert's policy
    truncated: dict[int, int | None] = field(default_factory=dict)  # id(incident) -> the truncatedAlerts last said
    opened_by_key: dict[str, _Row] = field(default_factory=dict)  # the newest incident this batch opened, by key
    links: list[tuple[_Row, _Row]] = field(default_factory=list)  # (new incident, the one before it, also new)
    # id(incident) -> (a silenced incident, when the silences of its alerts end): timers that may unsilence it then
    muted: dict[int, tuple[_Row, dict[datetime, Silence]]] = field(default_factory=dict)
    ends_of: dict[int, datetime | None] = field(default_factory=dict)  # id(silence) -> its end after `now`

    def previous(self, key: str) -> int | _Row | None:
        """The newest earlier incident of this key (asked only when one opens): one this batch opened (a row
        with no id yet), else the newest stored one."""
        opened = self.opened_by_key.get(key)
        if opened is not None:
            return opened
        if self.previous_by_key is None:
            assert self.rows is not None
            self.previous_by_key = self.rows.max_id_by(_INCIDENTS, "group_key", self.keys)
        return self.previous_by_key.get(key)

    def touch(self, incident: _Row) -> _Touched:
        if id(incident) not in self.touched:
            self.touched[id(incident)] = _Touched(incident)
        return self.touched[id(incident)]


_INCIDENT_TIMES = ("opened_at", "last_seen")  # the datetime columns of _INCIDENT_COLUMNS (_ALERT_COLUMNS: ends_at)


def _as_read(value: Any) -> Any:
    """A JSON column's value as a read gives it (json_text=True): its text, compared as text by the next batch, as a
    cold read's is (a dict compared with == would not see its keys change order, where the text does)."""
    return value if value is None or type(value) is Json else json_text(value)


def _utc(value: datetime | None) -> datetime | None:
    """A time as a fresh read gives it: in UTC (the store keeps it so)."""
    return value if value is None or value.tzinfo is UTC else value.astimezone(UTC)


class _Warm:
    """The open incidents and alert records of the group keys and alerts a SQLite writer connection read or wrote
    lately, as that connection left them, so that the next batch need not read them again (intake's reads were a
    fifth of its writer's work). Kept by what they are read by: for a group key, the ids of its open incidents
    (all of them); for an alert (source, fingerprint), its records (all of them); each incident's columns by id.

    Trusted only while nothing else can have changed them: the same connection, no commit by any other connection
    since (SQLite's `PRAGMA data_version`, read once the transaction holds the write lock), and the batch it last
    saw committed (the audit chain's head is where that batch left it: every batch that changes an incident or
    an alert appends events, and a batch rolled back leaves the head behind). Anything else, and it is forgotten
    and read again. Raw SQLite path only (the writer thread and the writer process)."""

    LIMIT = 5_000  # incidents, alerts or group keys kept at most (about 6 MB); past it, all forgotten and read again

    def __init__(self) -> None:
        self.conn: Any = None
        self.version: Any = None
        self.head: Any = None  # the audit head the last batch left, once committed
        self.found_head: Any = None  # the audit head the transaction running now found (check)
        self.open_by_key: dict[str, list[int]] = {}
        self.incidents: dict[int, dict[str, Any]] = {}
        self.records: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def forget(self) -> None:
        self.conn = self.version = self.head = self.found_head = None
        self.open_by_key, self.incidents, self.records = {}, {}, {}

    def check(self, raw: Any) -> bool:
        """Whether what is kept is what the store holds (see the class); if not, it is forgotten."""
        version = raw.execute("PRAGMA data_version").fetchone()[0]
        head = raw.execute(_SQLITE_HEAD).fetchone()
        kept = raw is self.conn and version == self.version and head == self.head and self.head is not None
        if not kept:
            self.forget()
            self.conn, self.version = raw, version
        self.found_head = head  # where this transaction found the chain: still its head if it appends nothing
        return kept

    def load(self, keys: Sequence[str], identities: set[tuple[str, str]]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, dict[str, Any]]] | None:
        """What _load would read (open incidents of `keys` by id, records of `identities` by id, the records'
        incidents), if all of it is kept; else None."""
        open_by_key, incidents, kept = self.open_by_key, self.incidents, self.records
        try:
            open_ids = sorted({iid for key in keys for iid in open_by_key[key]})
            records = sorted((r for identity in identities for r in kept[identity]), key=lambda r: r["id"])
            others = {iid: incidents[iid] for iid in {r["incident_id"] for r in records}}
            return [incidents[iid] for iid in open_ids], records, others
        except KeyError:
            return None

    def read(self, keys: Sequence[str], identities: set[tuple[str, str]], open_rows: list[dict[str, Any]],
             records: list[dict[str, Any]], others: list[dict[str, Any]]) -> None:
        """What _load read from the store, kept (as read: JSON columns undecoded)."""
        if max(len(self.incidents), len(self.records), len(self.open_by_key)) > self.LIMIT:
            conn, version = self.conn, self.version
            self.forget()
            self.conn, self.version = conn, version
        for row in (*open_rows, *others):
            self.incidents[row["id"]] = row
        by_key: dict[str, list[int]] = {key: [] for key in keys}
        for row in open_rows:
            by_key[row["group_key"]].append(row["id"])
        self.open_by_key.update(by_key)
        by_identity: dict[tuple[str, str], list[dict[str, Any]]] = {identity: [] for identity in identities}
        for row in records:
            by_identity[(row["source"], row["fingerprint"])].append(row)
        self.records.update(by_identity)

    def wrote(self, st: _Batch, appended: Sequence[Mapping[str, Any]]) -> None:
        """The batch's incidents and records as it wrote them, and the audit events it `appended` (called after its
        statements, in its transaction): where the chain's head is once it commits."""
        incidents, open_by_key = self.incidents, self.open_by_key
        for inc in (*st.loaded, *st.new_incidents):
            d, undecoded = inc.__dict__, inc._raw
            values = {name: d[name] if name in d else undecoded[name] for name in _INCIDENT_COLUMNS}
            for name in _INCIDENT_TIMES:
                values[name] = _utc(values[name])
            for name in _INCIDENT_JSON:
                values[name] = _as_read(values[name])
            iid = values["id"]
            incidents[iid] = values
            ids = open_by_key.get(values["group_key"])
            if ids is not None:
                if values["status"] == RESOLVED:
                    if iid in ids:
                        ids.remove(iid)
                elif iid not in ids:
                    ids.append(iid)
                    ids.sort()
        records = self.records
        for rec, _ in st.new_records:  # inserted without asking their ids: read again when next needed
            records.pop((rec.source, rec.fingerprint), None)
        for rec in st.loaded_records:
            d, undecoded = rec.__dict__, rec._raw
            values = {name: d[name] if name in d else undecoded[name] for name in _ALERT_COLUMNS}
            values["ends_at"] = _utc(values["ends_at"])
            values["links"] = _as_read(values["links"])
            kept = records.get((values["source"], values["fingerprint"]))
            if kept is not None:
                for i, old in enumerate(kept):
                    if old["id"] == values["id"]:
                        kept[i] = values
                        break
        self.head = (appended[-1]["seq"], appended[-1]["hash"]) if appended else self.found_head


class Intake:
    def __init__(self, *, db: Database | None, audit: AuditLog, config: Config, clock: Clock | None,
                 metrics: Metrics | None, max_batch: int = 1000, after_commit: Callable[[], None] | None = None,
                 timers_due: Callable[[], None] | None = None,
                 on_open: Callable[[Connection, list[tuple[int, str]], datetime], None] | None = None,
                 on_raise: Callable[[Connection, list[int], datetime], list[Entry]] | None = None,
                 writer: str = "thread"):
        """`after_commit` runs after a commit that queued chat work (outbox rows: wake the outbox worker);
        `timers_due` after a commit that started escalations (their first steps are timers due now: wake the timer
        tick). `writer`: where a SQLite file's transactions run, "thread" or "process" (see the module's
        docstring); elsewhere ignored.
        `db`, `clock` and `metrics` are None only in the writer process, which runs `_apply` alone."""
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {WRITERS}, not {writer!r}")
        self.db, self.audit, self.config, self.clock, self.metrics = db, audit, config, clock, metrics
        self.after_commit = after_commit
        self.timers_due = timers_due
        self.on_open = on_open  # starts the escalations of new incidents, in the batch's transaction
        # Stored incidents whose severity rose, in the batch's transaction: a step deferred until the business
        # morning fires now when the new severity pages after hours (Escalations.reconsider); its audit events.
        self.on_raise = on_raise
        self.max_batch = max_batch
        self.writer = writer
        self._process: WriterProcess | None = None
        # A batch's answer from the writer process is waited for this long at most (a SQLite lock held by another
        # process is waited for 10 s there, the busy timeout): then the process is given up (_overdue)
        self.writer_wait = WRITER_WAIT
        self._process_url: str | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._send_soon = False  # a call to _send_queued is scheduled
        self._sent: set[asyncio.Future[Any]] = set()  # batches the writer process has not answered yet
        # Submissions in arrival order. Appended on the event loop; a transaction takes what is here when it
        # starts (in the SQLite writer thread, see _flush), so deque: its append and popleft are thread-safe.
        self._inbox: deque[Submission] = deque()
        self._running = False
        self._flushes: set[asyncio.Task[None]] = set()
        # Transactions launched (counted on the event loop) and begun (counted where they run): the difference
        # is the one waiting to take the next batch, if any.
        self._launched = 0
        self._begun = 0
        self._hold = False  # set when a transaction failed: later ones wait until its submissions are answered
        self._unavailable_said: float | None = None  # (monotonic) when the log last said the store refused a batch
        self._unavailable_unsaid = 0
        self._actors: dict[str, Actor] = {}
        self._warm = _Warm()  # incidents and alerts as the writer connection left them (_Warm)
        # source id -> when the log last named a severity of it the bot does not know, and how many alerts with one
        # came since (unsaid)
        self._unknown_said: dict[str, tuple[datetime, int]] = {}

    def start(self) -> None:
        self._running = True
        if self._in_process():
            self._writer_process().start()
        self._kick()

    async def ready(self) -> None:
        """Wait until the writer process (if any) has started: the bot answers its first request without
        waiting for it. If it could not start, the log says why; the next batch starts another."""
        if self._process is not None:
            await self._process.start()

    async def stop(self) -> None:
        """Finish what is queued (every waiting request gets its answer), then stop the writer."""
        if not self._running:
            return
        while self._flushes or self._inbox or self._sent:
            self._kick()
            if self._in_process():
                self._send_queued()
            await asyncio.gather(*self._flushes, *self._sent, return_exceptions=True)
            await asyncio.sleep(0)  # the answers' callbacks run
        self._running = False
        if self._process is not None:
            process, self._process = self._process, None
            await process.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def stored_answer(self, source_id: str, delivery_id: str, now: datetime,
                            digest: str | None = None) -> Outcome | None:
        """The answer this delivery id got within the idempotency window, read from the store (or, for a body
        other than its `digest`, the 422 that says so); None if it got none (or the store cannot say now)."""
        assert self.db is not None
        try:
            async with self.db.sessions() as session:
                row = await session.get(Delivery, (source_id, delivery_id))
        except Exception as exc:
            if not _is_db_unavailable(exc):
                raise
            return None
        if row is None or now - row.received_at >= IDEMPOTENCY_WINDOW:
            return None
        if not _same_body(row.digest, digest):
            return _reused(delivery_id)
        return Outcome(row.status_code, row.response, replayed=True)

    @property
    def reads_bodies(self) -> bool:
        """Whether `submit` takes the request's body and the writer process reads it (bot.alerts.read_body):
        with a writer process, the HTTP front's core is the busier of the two."""
        return self._in_process()

    async def submit(self, source: Source, alerts: list[Alert], delivery_id: str | None,
                     truncated: int = 0, *, body: bytes | None = None, signature: str | None = None,
                     digest: str | None = None) -> Outcome:
        """Store `alerts` (or, if `reads_bodies`, the alerts of `body`) and answer after the commit. For a body
        that is no payload of the source's kind, a `signature` taken already (by another replica, or before a
        restart), or a `delivery_id` used for a body other than this one's `digest` (body_digest), the outcome
        says why (`Outcome.rejected`)."""
        if body is not None and not self.reads_bodies:
            raise ValueError("this intake reads no bodies (no writer process): submit the parsed alerts")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inbox.append(Submission(source, alerts, delivery_id, future, truncated, body, signature=signature,
                                      digest=digest))
        self._kick()
        return await future

    def _kick(self) -> None:
        """Start a transaction for what is queued, unless one that has not taken its submissions yet is waiting.

        With SQLite's writer thread, up to two are in flight: the one running there and the next, queued
        behind it, which takes everything that arrived meanwhile the moment the first has committed: the
        writer goes from one transaction to the next without waiting for the event loop. Elsewhere
        (PostgreSQL, aiosqlite) one at a time. Either way transactions run one after the other, in order.
        With the writer process, what is queued is sent at once (see _send_queued).
        """
        assert self.db is not None
        if self._in_process():
            if self._running and self._inbox and not self._send_soon:
                self._send_soon = True  # after the handlers running now: what they queue goes in one message
                asyncio.get_running_loop().call_soon(self._send_queued)
            return
        depth = 2 if self.db.writes_in_thread else 1
        if (self._running and self._inbox and not self._hold and len(self._flushes) < depth
                and self._launched <= self._begun):
            self._launched += 1
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _take(self) -> list[Submission]:
        """The next batch, in arrival order (called where the transaction runs)."""
        batch: list[Submission] = []
        inbox = self._inbox
        try:
            while len(batch) < self.max_batch:
                batch.append(inbox.popleft())
        except IndexError:  # empty
            pass
        return batch

    async def _flush(self) -> None:
        taken: list[Submission] = []
        begun = False

        def work(conn: Connection) -> _Result | None:
            nonlocal begun
            begun = True
            self._begun += 1
            if self._hold:  # an earlier transaction failed: its submissions are retried first
                return None
            taken.extend(self._take())
            if not taken:
                return None
            try:
                assert self.clock is not None
                return self._apply(conn, taken, self.clock.now())
            except BaseException:
                self._hold = True
                raise

        try:
            result = await self.db.run_transaction(work)
        except Exception as exc:
            if not begun:  # it failed before it began (e.g. BEGIN): answer what it would have taken
                taken.extend(self._take())
            await self._failed(taken, exc)
            self._hold = False
        else:
            if result is not None:
                self._answer(taken, result)
        finally:
            if not begun:
                self._launched -= 1
            # This flush is over: uncount it before kicking, or with one flush at a time (PostgreSQL) what was
            # queued during its commit would wait for the next request.
            self._flushes.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._kick()

    async def _commit(self, batch: list[Submission]) -> None:
        """Apply exactly `batch` in one transaction and answer it (used to retry a failed batch one by one)."""
        assert self.db is not None and self.clock is not None
        clock = self.clock
        try:
            result = await self.db.run_transaction(lambda conn: self._apply(conn, batch, clock.now()))
        except Exception as exc:
            await self._failed(batch, exc)
        else:
            self._answer(batch, result)

    async def _failed(self, batch: list[Submission], exc: Exception) -> None:
        if len(batch) > 1 and not _is_db_unavailable(exc):
            # Isolate the submission that broke the batch; the others still land.
            for one in batch:
                await self._commit([one])
            return
        status = 503 if _is_db_unavailable(exc) else 500
        if not batch:
            return
        if status == 500:
            log.error("intake failed for a delivery from %s", batch[0].source.id, exc_info=exc)
        elif isinstance(exc, KeyMismatch):
            log.error("intake: nothing stored: %s; answering 503 so senders retry", exc)
        else:
            why = explain_failure(exc, self.db.wait if self.db is not None else None)
            self._space(why)
            self._say_unavailable(f"{UNAVAILABLE_SAID}({why}); answering 503 so senders retry")
        for s in batch:
            if s.future is not None and not s.future.done():
                s.future.set_result(Outcome(status, {"error": _UNAVAILABLE if status == 503 else _INTERNAL}))

    def _space(self, said: str) -> None:
        """A write failed: for want of disk space? (/readyz says so: Database.check_room)"""
        if self.db is not None and out_of_space(said):
            self.db.out_of_space = True

    def _say_unavailable(self, said: str) -> None:
        """The store could not take a batch: logged at most once every UNAVAILABLE_SAID_EVERY seconds, with how many
        went unsaid (a full disk logged a line for each request refused, and the log is often on that disk)."""
        now = time.monotonic()
        if self._unavailable_said is not None and now - self._unavailable_said < UNAVAILABLE_SAID_EVERY:
            self._unavailable_unsaid += 1
            return
        more = f" ({self._unavailable_unsaid} more such since the last line)" if self._unavailable_unsaid else ""
        self._unavailable_said, self._unavailable_unsaid = now, 0
        log.error("%s%s", said, more)

    def _answer(self, batch: list[Submission], result: _Result) -> None:
        outcomes, fresh, events, resolved_after, escalations, queued = result
        if self.db is not None:
            self.db.out_of_space = False  # (written: there is room)
        assert self.metrics is not None
        for severity, seconds in resolved_after:
            self.metrics.time_to_resolve.labels(severity).observe(seconds)
        received: dict[tuple[str, str], int] = {}
        for s in fresh:
            for status, n in s.received().items():
                key = (s.source.id, status)
                received[key] = received.get(key, 0) + n
        for (source_id, status), n in received.items():  # no await in between: nobody sees a partial count
            self.metrics.count_received(source_id, status, n)
        for s in fresh:
            unknown = s.unknown_severities()
            if unknown:
                self._unknown_severity(s.source.id, unknown)
        self.metrics.audit_events.inc(events)
        for s, outcome in zip(batch, outcomes):
            if s.future is not None and not s.future.done():
                s.future.set_result(outcome)
        if queued and self.after_commit is not None:
            self.after_commit()
        if escalations and self.timers_due is not None:
            self.timers_due()

    def _unknown_severity(self, source_id: str, unknown: dict[str, int]) -> None:
        """Alerts stored from `source_id` with severity label values the bot does not know (taken as medium): counted
        in chatops_alerts_unknown_severity_total, and named in the log at most once a minute per source (a sender
        repeats its alerts), with how many more came since."""
        assert self.metrics is not None and self.clock is not None
        n = sum(unknown.values())
        self.metrics.alerts_unknown_severity.labels(source_id).inc(n)
        now = self.clock.now()
        said = self._unknown_said.get(source_id)
        if said is not None and now - said[0] < UNKNOWN_SEVERITY_SAID_EVERY:
            self._unknown_said[source_id] = (said[0], said[1] + n)
            return
        values = ", ".join(repr(value[:80]) for value in list(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
        more = f"; {said[1]} more since" if said is not None and said[1] else ""
        self._unknown_said[source_id] = (now, 0)
        log.warning("source %s sent %d alert(s) with a severity the bot does not know (%s): taken as medium; "
                    "say critical, high, medium, low or info, or a synonym (README, Alert intake), in their severity "
                    "label (said at most once a minute%s)", source_id, n, values, more)

    # -- the writer process (writer="process" on a SQLite file) ------------------------------------------

    def _in_process(self) -> bool:
        return self.writer == "process" and self.db is not None and self.db.is_sqlite_file

    def _writer_process(self) -> WriterProcess:
        """The writer process for the current database: the running one, or a new one (after one died)."""
        assert self.db is not None
        process = self._process
        if process is not None and process.alive and self._process_url == self.db.url:
            return process
        if process is not None:  # gone, or another database: let it finish and exit on its own
            closing = asyncio.create_task(process.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._process = process = WriterProcess("handlers.intake_child:writer_process_handler", {
            "url": self.db.url, "config": self.config, "on_open": self._hook_for_process(self.on_open, "start_all"),
            "on_raise": self._hook_for_process(self.on_raise, "reconsider"), "max_batch": self.max_batch},
            name="intake writer")
        self._process_url = self.db.url
        process.start()
        return process

    def _hook_for_process(self, hook: Any, method: str) -> Any:
        """What the writer process runs for a hook (`on_open`, `on_raise`): "escalations" for that method of
        Escalations (rebuilt there from the config), else the hook itself (it must pickle)."""
        if hook is None:
            return None
        from handlers.escalation import Escalations

        owner = getattr(hook, "__self__", None)
        if isinstance(owner, Escalations) and getattr(hook, "__func__", None) is getattr(Escalations, method):
            if owner.config is not self.config:
                raise ValueError("the escalations' config is not intake's: the writer process cannot rebuild them")
            return "escalations"
        pickle.dumps(hook)  # fails here, at start, if it cannot travel
        return hook

    def _send_queued(self) -> None:
        """Send what is queued to the writer process, with `now`, as soon as it is queued: the process applies
        everything that arrived while it was busy in one transaction, so it never waits for a round trip."""
        self._send_soon = False
        if not self._running:
            return
        assert self.clock is not None and self.db is not None
        while self._inbox:
            batch = self._take()
            try:
                self.db.check_file()  # (the writer process opened it at start, and would write on into a lost file)
                future = self._writer_process().call((wire_time(self.clock.now()), [
                    (s.source.id, s.body if s.body is not None else [_alert_fields(a) for a in s.alerts],
                     s.delivery_id, s.truncated, s.signature, s.digest) for s in batch]))
            except Exception as exc:
                self._failed_whole(batch, exc)
                continue
            self._sent.add(future)
            future.add_done_callback(functools.partial(self._answered_by_process, batch))
            # A process that stops answering (hung, stopped with SIGSTOP) held these requests, and the bot's stop,
            # for as long as it did, with nothing in the log: past WRITER_WAIT it is given up and killed.
            overdue = asyncio.get_running_loop().call_later(self.writer_wait, self._overdue, future)
            future.add_done_callback(lambda _f, handle=overdue: handle.cancel())

    def _overdue(self, future: asyncio.Future[Any]) -> None:
        process = self._process
        if not future.done() and process is not None and process.alive:
            process.abandon(f"has not answered a batch for {self.writer_wait:g} s")

    def _answered_by_process(self, batch: list[Submission], future: asyncio.Future[Any]) -> None:
        self._sent.discard(future)
        try:
            if future.cancelled():
                self._failed_whole(batch, WriterGone("the writer process was closed"))
            elif (exc := future.exception()) is not None:  # WriterGone: it died (or did not start) with this in flight
                self._failed_whole(batch, exc)  # type: ignore[arg-type]
            else:
                self._answer_from_process(batch, future.result())
        except Exception as exc:  # never leave a request waiting
            self._failed_whole(batch, exc)

    def _failed_whole(self, batch: list[Submission], exc: BaseException) -> None:
        """No answer from the writer process for the batch: each submission not answered yet gets 503 (500 for a
        fault here), and none is retried: a sender retries a 503."""
        status = 503 if _is_db_unavailable(exc) else 500
        if status == 503:
            log.error("intake: %s; answering 503 so senders retry", exc)
        else:
            log.error("intake failed for a delivery from %s", batch[0].source.id if batch else "?", exc_info=exc)
        for s in batch:
            if s.future is not None and not s.future.done():
                s.future.set_result(_refused(s) or Outcome(status, {"error": _UNAVAILABLE if status == 503 else _INTERNAL}))

    def _answer_from_process(self, batch: list[Submission], answer: Any) -> None:
        """The writer process's answer to one batch (see _ProcessWriter)."""
        outcomes, fresh, events, resolved_after, escalations, logs, read, queued = answer
        if len(outcomes) != len(batch):
            raise ValueError(f"the writer process answered {len(outcomes)} submissions of {len(batch)}")
        for level, message, trace in logs:
            if message.startswith(UNAVAILABLE_SAID):
                self._space(message)
                self._say_unavailable(message)
            elif trace is None:
                log.log(level, "%s", message)
            elif log.isEnabledFor(level):  # its traceback as the writer process formatted it, its lines kept
                record = log.makeRecord(log.name, level, "(writer process)", 0, "%s", (message,), None)
                record.exc_text = trace
                log.handle(record)
        answered = []
        for s, (status, body, replayed, rejected), what in zip(batch, outcomes, read):
            # (refused: the answer says why, as _apply did; or reading s.body did, with what it held)
            if what is not None:  # it read s.body: (refused because, truncated, firing, resolved, unknown severities)
                unread, s.truncated, firing, resolved, s.unknown = what
                rejected = unread or rejected
                s.counts = {k: n for k, n in (("firing", firing), ("resolved", resolved)) if n}
            answered.append(Outcome(status, None, replayed, encoded=body, rejected=rejected, truncated=s.truncated))
        result: _Result = (answered, [batch[i] for i in fresh], events, resolved_after, escalations, queued)
        if fresh or events or escalations or resolved_after or any(o[0] < 300 for o in outcomes):  # something committed
            self._answer(batch, result)
            return
        for s, outcome in zip(batch, result[0]):  # nothing did: answer without the commit hooks
            if s.future is not None and not s.future.done():
                s.future.set_result(outcome)

    def _apply(self, conn: Connection, batch: list[Submission], now: datetime) -> _Result:
        """The whole batch, inside one transaction (synchronous: see Database.run_transaction)."""
        try:
            return self._apply_batch(conn, batch, now)
        except BaseException:
            self._warm.forget()  # rolled back: what it kept of the batch was never stored
            raise

    def _apply_batch(self, conn: Connection, batch: list[Submission], now: datetime) -> _Result:
        replays = self._known_deliveries(conn, batch, now)
        fresh = [s for s in batch if (s.source.id, s.delivery_id) not in replays]
        taken = self._claim_signatures(conn, fresh, now)
        if taken:
            fresh = [s for s in fresh if id(s) not in taken]
        state = self._load(conn, fresh, now)
        applied: list[tuple[Submission, list[tuple[str, _Row | None, str]]] | Outcome | tuple[str, str]] = []
        seen_here: dict[tuple[str, str], str | None] = {}  # (source, X-Delivery-ID) applied here -> its digest
        stored: list[Submission] = []  # the fresh ones, without the repeats of an X-Delivery-ID inside this batch
        for s in batch:
            key = (s.source.id, s.delivery_id or "")
            if s.delivery_id and key in replays:
                answer, digest = replays[key]
                applied.append(answer if _same_body(digest, s.digest) else _reused(s.delivery_id))
            elif id(s) in taken:
                applied.append(taken[id(s)])
            elif s.delivery_id and key in seen_here:  # a repeat inside this batch, or another body under its id
                applied.append(key if _same_body(seen_here[key], s.digest) else _reused(s.delivery_id))
            else:
                seen_here[key] = s.digest
                stored.append(s)
                if len(s.alerts) > 1:
                    _heard(s.alerts, state)
                results = [self._apply_alert(s.source, a, state) for a in s.alerts]
                if state.quiet or state.resolved_here:
                    self._quiet_resolve(s.source, results, state)
                state.ended_here.clear()
                if s.truncated:
                    self._truncated(conn, s, results, state)
                applied.append((s, results))
        self._write(conn, state)
        outcomes: list[Outcome] = []
        first: dict[tuple[str, str], Outcome] = {}
        deliveries = []
        for item in applied:
            if isinstance(item, Outcome):
                outcomes.append(item)
            elif isinstance(item[0], Submission):
                s, results = item  # type: ignore[misc]
                body = {"status": "ok", "alerts": len(s.alerts), "results": [
                    {"fingerprint": fp, "incident": inc.id if inc else None, "change": change}
                    for fp, inc, change in results]}
                if s.truncated:
                    body["truncated"] = s.truncated
                outcome = first[(s.source.id, s.delivery_id or "")] = Outcome(200, body)
                outcomes.append(outcome)
                if s.delivery_id:
                    deliveries.append({"source": s.source.id, "delivery_id": s.delivery_id, "received_at": now,
                                       "status_code": 200, "response": body, "digest": s.digest})
            else:
                outcomes.append(Outcome(first[item].status, first[item].body, replayed=True))  # type: ignore[index]
        if deliveries:
            conn.execute(_DELIVERIES.insert(), deliveries)
        return outcomes, stored, len(state.entries), state.resolved_after, state.escalations, state.queued

    def _write(self, conn: Connection, st: _Batch) -> None:
        """Everything the batch changed, in a handful of executemany statements."""
        rows = st.rows if st.rows is not None else Rows(conn)
        if st.new_incidents:
            ids = rows.insert_returning_ids(_INCIDENTS, [inc.values(without="id") for inc in st.new_incidents])
            for inc, new_id in zip(st.new_incidents, ids):
                inc.id = new_id
            if st.links:
                for inc, previous in st.links:
                    inc.previous_id = previous.id
                rows.update_by_id(_INCIDENTS, [(inc.id, {"previous_id": inc.previous_id}) for inc, _ in st.links])
        rows.update_by_id(_INCIDENTS, [(inc.id, changes) for inc in st.loaded if (changes := inc.changes())])
        rows.update_by_id(_ALERTS, [(rec.id, changes) for rec in st.loaded_records if (changes := rec.changes())])
        for record, incident in st.new_records:
            record.incident_id = incident.id
        rows.insert(_ALERTS, [record.values(without="id") for record, _ in st.new_records])
        chat = self._chat_work(st)
        rows.insert(_OUTBOX, chat)
        st.queued = len(chat)
        if st.muted:
            schedule_silence_ends(conn, [(inc.id, ends) for inc, ends in st.muted.values()
                                         if inc.silenced and inc.status != RESOLVED], st.now)
        if self.on_open is not None:
            escalating = [(inc.id, inc.escalation) for inc in st.new_incidents
                          if inc.escalation and not inc.silenced and inc.status != RESOLVED]
            # muted since they opened, or without a policy until a more severe alert's route gave one: no escalation
            # yet (unless a reopen started one); acknowledged: someone is on it
            waking = list(dict.fromkeys(inc.id for inc in (*st.unsilenced, *st.adopted)
                                        if inc.status == TRIGGERED and not inc.silenced))
            if waking:
                started = set(conn.execute(select(_ESCALATIONS.c.incident_id)
                                           .where(_ESCALATIONS.c.incident_id.in_(waking))).scalars())
                escalating += [(iid, policy) for iid, policy in conn.execute(
                    select(_INCIDENTS.c.id, _INCIDENTS.c.escalation).where(_INCIDENTS.c.id.in_(waking)))
                    if policy and iid not in started]
            if escalating:
                self.on_open(conn, escalating, st.now)
                st.escalations = len(escalating)
        if self.on_raise is not None and st.raised:
            adopted = {id(inc) for inc in st.adopted}  # (their escalation starts now, at the new severity)
            raised = sorted(inc.id for inc in st.raised.values()
                            if inc.status != RESOLVED and not inc.silenced and id(inc) not in adopted)
            resumed = self.on_raise(conn, raised, st.now) if raised else []
            st.entries.extend(resumed)
            st.escalations += len(resumed)
        if st.resolutions:
            _first_resolutions(conn, st)
        _assign_incident_ids(st)
        appended = self.audit.append_rows(conn, st.entries)
        if rows.raw is not None and st.keys:  # (read through the cache, or into it)
            self._warm.wrote(st, appended)

    def _known_deliveries(self, conn: Connection, batch: Sequence[Submission], now: datetime
                          ) -> dict[tuple[str, str], tuple[Outcome, str | None]]:
        """The batch's X-Delivery-IDs stored within the idempotency window: (source, id) -> (the answer it got, the
        digest of its body). Expired ones are deleted (the id may be used again)."""
        ids = {(s.source.id, s.delivery_id) for s in batch if s.delivery_id}
        if not ids:
            return {}
        if self.db is not None and self.db.is_postgres:
            # A replica storing the same delivery now is waited for, and its row read: else both miss it, and the
            # second insert breaks its batch. (Before the group keys' locks, in one order: no deadlock.)
            _lock_keys(conn, [f"delivery\x1f{src}\x1f{did}" for src, did in ids])
        known = {}
        for row in Rows(conn).select_in(_DELIVERIES, "delivery_id", sorted({d for _, d in ids}),
                                        also_in=("source", sorted({src for src, _ in ids}))):
            if (row["source"], row["delivery_id"]) not in ids:
                continue
            if now - row["received_at"] < IDEMPOTENCY_WINDOW:
                known[(row["source"], row["delivery_id"])] = (
                    Outcome(row["status_code"], row["response"], replayed=True), row["digest"])
            else:  # expired: this id may be used again
                conn.execute(_DELIVERIES.delete().where(_DELIVERIES.c.source == row["source"],
                                                        _DELIVERIES.c.delivery_id == row["delivery_id"]))
        return known

    def _claim_signatures(self, conn: Connection, batch: Sequence[Submission], now: datetime) -> dict[int, Outcome]:
        """PostgreSQL: claim the signatures of `batch` in the store (after the delivery ids' locks, before the group
        keys'); a signature a committed request took already, at any replica, before a restart, and for any source
        (as the process's ReplayGuard keys them), is a replay: id(submission) -> its 401. The same request twice in
        the batch, under its X-Delivery-ID, is a sender's retry, answered as a repeat. SQLite: the signatures are
        logged, for the ReplayGuard to start with after a restart (see AlertEndpoint.restore)."""
        windows: dict[str, datetime] = {}
        ends: dict[timedelta, datetime] = {}  # max_skew -> one end for the signatures of its sources (encoded once)
        signed = []
        for s in batch:
            if s.signature and isinstance(s.source.auth, HmacAuth):
                signed.append(s)
                # A signature stays valid while its timestamp is within max_skew of now, behind or ahead.
                skew = s.source.auth.max_skew
                until = ends.get(skew)
                if until is None:
                    until = ends[skew] = now + 2 * skew
                windows[s.signature] = max(until, windows.get(s.signature, until))
        if not signed:
            return {}
        if conn.dialect.name == "sqlite":  # one bot serves the store: its ReplayGuard refused copies already
            _log_signatures(conn, signed, windows)
            return {}
        won = claim_in(conn, "alert", windows, now)
        takers: dict[str, tuple[str, str | None]] = {}  # signature -> (source, X-Delivery-ID) of the one that took it
        refused: dict[int, Outcome] = {}
        for s in signed:
            assert s.signature is not None
            taker = takers.get(s.signature)
            if taker is None and s.signature in won:
                takers[s.signature] = (s.source.id, s.delivery_id)
            elif not (s.delivery_id and taker == (s.source.id, s.delivery_id)):
                refused[id(s)] = Outcome(401, {"error": replay_message(s.delivery_id)}, rejected="replayed")
        return refused

    def _load(self, conn: Connection, batch: Sequence[Submission], now: datetime) -> _Batch:
        keys = sorted({group_key(self.config.grouping.by, s.source.dedup_key, a) for s in batch for a in s.alerts})
        identities = {(a.source, a.fingerprint) for s in batch for a in s.alerts}
        if not keys:
            return _Batch(now, {}, {}, {})
        if self.db is not None and self.db.is_postgres:
            # Replicas serialize on the group keys they touch, and on the alerts: one alert may come under two keys
            # at once (two Alertmanager groups; a generic sender's labels), and each would find no record of it and
            # open an incident for it. (One call, one order: no deadlock.)
            _lock_keys(conn, [*keys, *(f"alert\x1f{src}\x1f{fp}" for src, fp in sorted(identities))])
        rows = Rows(conn)
        warm = self._warm if rows.raw is not None else None
        kept = warm.load(keys, identities) if warm is not None and warm.check(rows.raw) else None
        if kept is not None:
            open_rows, record_rows, other_rows = kept
        else:
            # Locked (PostgreSQL): a person resolving one of them now is waited for, and the resolve seen; else an
            # alert would join the incident as it was read, and write over it after the resolve.
            open_rows = rows.select_in(_INCIDENTS, "group_key", keys, exclude=("status", RESOLVED), order_by="id",
                                       columns=_INCIDENT_COLUMNS, json_text=True, lock=True)
            record_rows = [row for row in rows.select_in(
                _ALERTS, "fingerprint", sorted({fp for _, fp in identities}),
                also_in=("source", sorted({src for src, _ in identities})), order_by="id", columns=_ALERT_COLUMNS,
                json_text=True) if (row["source"], row["fingerprint"]) in identities]
            other_rows = {row["id"]: row for row in rows.select_in(
                _INCIDENTS, "id", sorted({r["incident_id"] for r in record_rows} - {r["id"] for r in open_rows}),
                columns=_INCIDENT_COLUMNS, json_text=True, lock=True)}
            if warm is not None:
                warm.read(keys, identities, open_rows, record_rows, list(other_rows.values()))
        by_id: dict[int, _Row] = {}
        incidents_by_key: dict[str, _Row] = {}
        for row in open_rows:
            inc = by_id[row["id"]] = _Row(row, json_columns=_INCIDENT_JSON)
            # The newest open incident of the key is the current one: an older one still open went quiet for
            # longer than grouping.window (which is why the newer one opened), and new alerts join the newer.
            incidents_by_key[inc.group_key] = inc
        records = [_Row(row, json_columns=_ALERT_JSON) for row in record_rows]
        for iid, row in sorted(other_rows.items()):
            if iid not in by_id:
                by_id[iid] = _Row(row, json_columns=_INCIDENT_JSON)
        # An alert's current record, the one its notifications reach: the newest in an open incident, else the newest
        # (records come ordered by id). Two incidents hold one alert when a person resolved the first while it fired
        # (its next notification opened the second) and reopened it later: once the second is resolved, the alert
        # fires in the reopened one (taken for new, it was grouped into it a second time, against the alerts' unique
        # key, and the whole notification failed). Its other records still firing end with it (_end_elsewhere).
        latest: dict[tuple[str, str], tuple[_Row, _Row]] = {}
        elsewhere: dict[tuple[str, str], list[tuple[_Row, _Row]]] = {}
        for r in records:
            identity, incident = (r.source, r.fingerprint), by_id[r.incident_id]
            known = latest.get(identity)
            other: tuple[_Row, _Row] | None = (r, incident)
            if known is None or incident.status != RESOLVED or known[1].status == RESOLVED:
                latest[identity], other = (r, incident), known
            if other is not None and other[0].status == "firing":
                elsewhere.setdefault(identity, []).append(other)
        for _, incident in latest.values():
            if incident.status != RESOLVED:
                incidents_by_key.setdefault(incident.group_key, incident)
        return _Batch(now, incidents_by_key, latest, None, elsewhere=elsewhere, loaded=list(by_id.values()),
                      loaded_records=records, keys=keys, rows=rows)

    def _apply_alert(self, source: Source, alert: Alert, st: _Batch) -> tuple[str, _Row | None, str]:
        now, cfg = st.now, self.config
        actor = self._actor(source)
        details = {"fingerprint": alert.fingerprint, "status": alert.status, "severity": alert.severity,
                   "labels": alert.labels, "summary": alert.summary}
        known = st.latest_by_identity.get((alert.source, alert.fingerprint))
        if alert.status == "resolved":
            ended = self._end_elsewhere(source, alert, known, details, st) if st.elsewhere else None
            if known is None or known[0].status == "resolved":
                if ended is not None:  # over where it was heard last already; still counted firing in another
                    return alert.fingerprint, ended, "alert_resolved"
                st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now,
                                        {**details, "note": "no open incident has this alert firing"}))
                return alert.fingerprint, (known[1] if known else None), "none"
            record, incident = known
            if incident.status == RESOLVED:  # a person resolved it first: the alert is over all the same, so that
                # a reopen does not wait for a "resolved" the source will never send again
                record.status, record.ends_at, record.last_received = "resolved", alert.ends_at or now, now
                record.annotations = alert.annotations  # (Grafana's values as they were when it ended)
                record.received_count += 1
                incident.firing_count = max(0, incident.firing_count - 1)
                st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now,
                                        {**details, "note": "the incident was resolved already"}, _id(incident)))
                return alert.fingerprint, incident, "alert_resolved"
            record.status, record.ends_at, record.last_received = "resolved", alert.ends_at or now, now
            record.annotations = alert.annotations  # (Grafana's values as they were when it ended)
            record.received_count += 1
            st.ended_here.add(id(record))
            incident.last_seen = now
            st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now, details, _id(incident)))
            t = st.touch(incident)
            t.resolved_alerts += 1
            t.resolved_by = source.id
            incident.firing_count = max(0, incident.firing_count - 1)
            if incident.firing_count == 0:
                # Resolved once the whole notification is read (_quiet_resolve), if nothing in it fires for the
                # incident by then: Alertmanager sorts a group's alerts by labels, so one resolving may come before
                # another of the group that starts firing, and the group is not over.
                st.quiet[id(incident)] = incident
            return alert.fingerprint, incident, "alert_resolved"

        silence = silenced_by(cfg.silences, alert.labels, now, cfg.timezone)
        if known is not None and id(known[1]) in st.quiet and id(known[0]) in st.ended_here:
            # The alert that ended its incident fires again later in the same delivery (a generic sender's events in
            # order): the incident ended there, and this opens the next one, linked to it. (Not one that ended in
            # an earlier delivery: that one fires again in the incident, which is not over.)
            self._resolve_by_source(known[1], source, st)
        if known is not None and known[1].status != RESOLVED:
            record, incident = known
            refire = record.status == "resolved"
            record.status, record.last_received = "firing", now
            record.received_count += 1
            record.labels, record.annotations, record.summary = alert.labels, alert.annotations, alert.summary
            record.severity = alert.severity  # (as the incident's rises with it: `incidents show` listed the first)
            record.ends_at = None
            if refire:
                incident.firing_count += 1
                if silence is None:  # a silenced alert is recorded, and is no news in the chat
                    st.touch(incident).refired += 1
            # Alertmanager and Grafana send every alert of a group again whenever the group changes
            # and at each repeat interval: an alert that is still firing is not a new occurrence ("resent").
            resent = not refire and source.kind in RESENDING_KINDS
            change = "refired" if refire else "resent" if resent else "duplicate"
        else:
            key = group_key(cfg.grouping.by, source.dedup_key, alert)
            incident = st.incidents_by_key.get(key)
            if incident is not None and incident.last_seen < now - cfg.grouping.window:
                incident = None  # too long since it last heard anything: a fresh incident
            if incident is None:
                # An alert the bot knew (its incident resolved by a person while it fired, or by its source) follows
                # the incident it was last in; a new one, the key's newest.
                incident = self._open(key, alert, st, silenced=silence is not None,
                                      previous=known[1] if known is not None else None)
                change = "opened"
                st.entries.append(Entry("incident.opened", actor, "incident", "", now,
                                        {"title": incident.title, "severity": incident.severity,
                                         "channels": incident.channels,
                                         "previous_id": next((_id(p) for i, p in st.links if i is incident),
                                                             incident.previous_id)},
                                        _id(incident)))
            else:
                change = "grouped"
                if silence is None:
                    st.touch(incident).grouped += 1
                st.entries.append(Entry("incident.grouped", actor, "incident", "", now,
                                        {"fingerprint": alert.fingerprint}, _id(incident)))
            record = _Row(dict(
                id=None, incident_id=incident.id, source=alert.source, fingerprint=alert.fingerprint, status="firing",
                severity=alert.severity, summary=alert.summary, labels=alert.labels, annotations=alert.annotations,
                links=alert.links, starts_at=alert.starts_at, ends_at=None, first_received=now, last_received=now,
                received_count=1,
            ), new=True)
            st.new_records.append((record, incident))
            if known is not None and known[0].status == "firing":  # in an incident a person resolved: it ends with this
                st.elsewhere.setdefault((alert.source, alert.fingerprint), []).append(known)
            st.latest_by_identity[(alert.source, alert.fingerprint)] = (record, incident)
            incident.alert_count += 1
            incident.firing_count += 1
            resent = False
        if not resent:
            incident.notifications += 1
        incident.last_seen = now
        severity = worst(incident.severity, alert.severity)
        # A silenced alert does not raise an incident people see (it would reroute it and page, a window's muted
        # alert waking someone at night); within an incident muted as well it does, for when the window ends.
        if severity != incident.severity and (silence is None or incident.silenced):
            if incident.id is not None:  # stored before this batch: its escalation may wait for the morning
                st.raised[id(incident)] = incident
            st.touch(incident)  # its card says the new severity at once (a repeat of an alert touched it nowhere else)
            incident.severity = severity
            self._reroute(incident, alert, actor, st)
        # Who reported it: the source, and for a generic one the tool that sent through it (its tool_source), so that
        # Datadog and Zabbix on one generic endpoint are two tools (+10 priority), as two sources are.
        tool = alert.labels.get("tool") if source.kind == "generic" else None
        reporter = f"{source.id}/{tool}" if tool else source.id
        if reporter not in incident.sources and len(incident.sources) < MAX_REPORTERS:
            # (an incident stored before tools were told apart lists the bare source: this tool replaces it)
            incident.sources = [*(s for s in incident.sources if s != source.id or not tool), reporter]
        incident.critical_asset = incident.critical_asset or alert.asset in cfg.critical_assets
        if alert.links:
            repeat = change in ("duplicate", "resent", "refired")  # the same alert again: its links are the newest word on them
            for name, url in alert.links.items():
                # (an empty link, stored before parsing dropped them, is none) A repeat changes only a link it brought
                # itself: another alert of the incident with another link would make it follow whichever came last.
                current = incident.links.get(name)
                if not current or (repeat and current != url and (record.links or {}).get(name) == current):
                    incident.links = {**incident.links, name: url}
            if repeat:
                record.links = alert.links
        incident.priority = priority(severity=incident.severity, duplicates=incident.notifications - 1,
                                     source_count=len(incident.sources), critical_asset=incident.critical_asset,
                                     opened_at=incident.opened_at, now=now)
        st.entries.append(Entry("alert.received", actor, "alert", alert.fingerprint, now, details, _id(incident)))
        if silence is not None:
            st.entries.append(Entry("alert.silenced", actor, "alert", alert.fingerprint, now,
                                    {"silence": silence.id, "comment": silence.comment}, _id(incident)))
            if incident.silenced:
                self._muted(incident, silence, st)
        elif incident.silenced:
            # An alert no silence covers (its window ended, or it matches none): the incident is not muted any
            # more, as Alertmanager notifies a group once one of its alerts is not silenced. It is posted, and its
            # escalation starts.
            incident.silenced = False
            st.touch(incident).unsilenced = True
            if incident.id is not None:
                st.unsilenced.append(incident)
            st.entries.append(Entry("incident.unsilenced", actor, "incident", "", now,
                                    {"fingerprint": alert.fingerprint, "note": "an alert no silence covers"},
                                    _id(incident)))
        return alert.fingerprint, incident, change

    def _muted(self, incident: _Row, silence: Silence, st: _Batch) -> None:
        """A silence mutes `incident`: a timer at its end (handlers/silences.py) unsilences the incident then if its
        alerts still fire, rather than wait for the source to send one again (Alertmanager only does after its
        repeat_interval, a generic sender perhaps never). An open-ended silence needs none."""
        if id(silence) not in st.ends_of:
            st.ends_of[id(silence)] = silence_ends(silence, st.now, self.config.timezone)
        ends = st.ends_of[id(silence)]
        if ends is not None:
            st.muted.setdefault(id(incident), (incident, {}))[1].setdefault(ends, silence)

    def _end_elsewhere(self, source: Source, alert: Alert, known: tuple[_Row, _Row] | None, details: dict[str, Any],
                       st: _Batch) -> _Row | None:
        """`alert` is over: so it is in every other incident still counting it firing. A person resolved one while
        it fired, its next notification opened another (where the source's word goes since), and the first was
        reopened: without this, the first waited for good for a "resolved" only the other heard. An open one whose
        alerts have all ended is resolved by the source, as any is (st.quiet). The first incident it ended in."""
        others = st.elsewhere.pop((alert.source, alert.fingerprint), None)
        if not others or known is None:
            return None
        now, actor = st.now, self._actor(source)
        note = {**details, "current_incident": _id(known[1]),
                "note": "ended in current_incident, where it fired last; still counted firing here"}
        for record, incident in others:
            record.status, record.ends_at, record.last_received = "resolved", alert.ends_at or now, now
            record.received_count += 1
            incident.firing_count = max(0, incident.firing_count - 1)
            if incident.status != RESOLVED:
                incident.last_seen = now
                t = st.touch(incident)
                t.resolved_alerts += 1
                t.resolved_by = source.id
                if incident.firing_count == 0:
                    st.quiet[id(incident)] = incident
            st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now, note, _id(incident)))
        return others[0][1]

    def _actor(self, source: Source) -> Actor:
        """Who the audit says acted for `source` (immutable: one per source)."""
        actor = self._actors.get(source.id)
        if actor is None:
            actor = self._actors[source.id] = Actor.source(source.id)
        return actor

    def _reroute(self, incident: _Row, alert: Alert, actor: Actor, st: _Batch) -> None:
        """A more severe alert joined `incident`: where its own route sends it counts too (Prometheus' warning and
        critical rules share an alertname, so the critical one was grouped into the warning's incident and never
        reached the critical route's channels or policy). Its channels are added, and its escalation policy is
        taken if the incident has none; a policy the incident has stays (its escalation may be under way)."""
        routes = select_routes(self.config.routes, alert.labels)
        channels = [ch for ch in dict.fromkeys(ch for r in routes for ch in r.channels) if ch not in incident.channels]
        escalation = next((r.escalation for r in routes if r.escalation), None)
        adopt = escalation if escalation and not incident.escalation else None
        if not channels and not adopt:
            return
        if channels:
            incident.channels = [*incident.channels, *channels]
            if incident.id is not None:  # (a new incident is posted to all its channels anyway)
                st.touch(incident).new_channels.extend(channels)
        if adopt:
            incident.escalation = adopt
            if incident.id is not None:
                st.adopted.append(incident)
        st.entries.append(Entry("incident.rerouted", actor, "incident", "", st.now,
                                {"fingerprint": alert.fingerprint, "severity": alert.severity, "channels": channels,
                                 "escalation": adopt}, _id(incident)))

    def _quiet_resolve(self, source: Source, results: list[tuple[str, _Row | None, str]], st: _Batch) -> None:
        """After a notification: each incident whose alerts it left all resolved is resolved by its source (the
        last of its alerts that resolved says "resolved" in the answer)."""
        for incident in list(st.quiet.values()):
            if not incident.firing_count:  # nothing in the notification fires for it
                self._resolve_by_source(incident, source, st)
        for incident in st.resolved_here:
            # (one that counted an alert of the notification only as an older record of it has no answer of its own)
            last = max((i for i, (_, inc, change) in enumerate(results)
                        if inc is incident and change == "alert_resolved"), default=None)
            if last is not None:
                results[last] = (results[last][0], incident, "resolved")
        st.quiet.clear()
        st.resolved_here.clear()

    def _resolve_by_source(self, incident: _Row, source: Source, st: _Batch) -> None:
        """Every alert of `incident` is resolved: its source resolves it."""
        now = st.now
        actor = self._actor(source)
        incident.status, incident.resolved_at, incident.resolved_by = RESOLVED, now, f"source:{source.id}"
        st.touch(incident).resolved = True
        st.resolutions.append((incident, max(0.0, (now - incident.opened_at).total_seconds())))
        st.entries.append(Entry("incident.resolved", actor, "incident", "", now,
                                {"by": "source", "source": source.id}, _id(incident)))
        if st.incidents_by_key.get(incident.group_key) is incident:  # not a newer one of the key
            del st.incidents_by_key[incident.group_key]
        del st.quiet[id(incident)]
        st.resolved_here.append(incident)

    def _truncated(self, conn: Connection, s: Submission, results: list[tuple[str, _Row | None, str]],
                   st: _Batch) -> None:
        """The sender left `s.truncated` alerts out (its max_alerts): say so on each incident the rest reached,
        since those incidents may have more alerts firing (or resolved) than the bot was told of. Said again
        only when the number changes: Alertmanager repeats a group's notification at every interval."""
        actor = self._actor(s.source)
        details = {"count": s.truncated, "received": len(s.alerts), "group_key": s.alerts[0].group_key if s.alerts else None,
                   "note": f"{s.source.id} left {s.truncated} alert(s) out of this notification; "
                           "raise max_alerts on its receiver to see them all"}
        incidents = list({id(inc): inc for _, inc, _ in results if inc is not None}.values())
        if not incidents:
            st.entries.append(Entry("alerts.truncated", actor, "source", s.source.id, st.now, details))
            return
        stored = {inc.id: inc for inc in incidents if inc.id is not None and id(inc) not in st.truncated}
        if stored:  # what was said on them before this batch (the newest wins)
            for incident_id, said in conn.execute(
                    select(_AUDIT.c.incident_id, _AUDIT.c.details).where(
                        _AUDIT.c.action == "alerts.truncated", _AUDIT.c.incident_id.in_(list(stored)))
                    .order_by(_AUDIT.c.seq)):
                st.truncated[id(stored[incident_id])] = (said or {}).get("count")
        for incident in incidents:
            if st.truncated.get(id(incident)) == s.truncated:
                continue
            st.truncated[id(incident)] = s.truncated
            st.entries.append(Entry("alerts.truncated", actor, "incident", "", st.now, details, _id(incident)))

    def _open(self, key: str, alert: Alert, st: _Batch, *, silenced: bool, previous: _Row | None = None) -> _Row:
        """A new incident of `key` for `alert`, linked to `previous` (the incident a known alert was last in), else
        to the key's newest."""
        routes = select_routes(self.config.routes, alert.labels)
        channels = list(dict.fromkeys(ch for r in routes for ch in r.channels))
        escalation = next((r.escalation for r in routes if r.escalation), None)
        runbooks = list(dict.fromkeys(rb for r in routes for rb in r.runbooks))
        incident = _Row(dict(
            id=None, group_key=key, title=alert.summary[:300], status=TRIGGERED, severity=alert.severity, priority=0,
            labels=alert.labels, links={}, sources=[], channels=channels, escalation=escalation,
            route=routes[0].label if routes else None, runbooks=runbooks,
            alert_count=0, firing_count=0, notifications=0, critical_asset=False, silenced=silenced,
            opened_at=st.now, first_seen=st.now, last_seen=st.now, acknowledged_at=None, acknowledged_by=None,
            resolved_at=None, resolved_by=None, previous_id=None,
        ), new=True)
        before = st.previous(key) if previous is None else previous.id or previous
        if isinstance(before, _Row):  # opened (and resolved) earlier in this batch: linked once it has an id
            st.links.append((incident, before))
        else:
            incident.previous_id = before
        st.opened_by_key[key] = incident
        st.new_incidents.append(incident)
        st.incidents_by_key[key] = incident
        st.touch(incident).opened = True
        return incident

    def _chat_work(self, st: _Batch) -> list[dict[str, Any]]:
        """Outbox rows: one post per new incident and channel; one update (+ thread lines) per changed one."""
        rows: list[dict[str, Any]] = []
        for t in st.touched.values():
            incident = t.incident
            for channel in [] if incident.silenced else incident.channels:  # (silenced: never posted there)
                def add(kind: str, event: str, details: dict[str, Any] | None = None) -> None:
                    # "N new alerts" lines wait a little so that a burst becomes one line.
                    due = st.now + THREAD_LINE_DELAY if event in ("alerts.grouped", "alerts.resolved") else st.now
                    rows.append({"created_at": st.now, "due_at": due, "incident_id": incident.id, "channel": channel,
                                 "kind": kind, "event": event, "details": details or {}, "status": "pending",
                                 "attempts": 0, "last_error": None})
                if t.opened or t.unsilenced or channel in t.new_channels:  # never posted there: now it is
                    add("post", "incident.opened")
                    continue
                # A redraw for alert traffic (routine: redrawn at most every 30 s, handlers/outbox.py REFRESH); one
                # that shows the source resolving it, or its severity rising, goes at once.
                add("update", "incident.changed" if t.resolved or id(incident) in st.raised else "alerts.changed")
                if t.grouped or t.refired:
                    add("reply", "alerts.grouped", {"count": t.grouped + t.refired})
                if t.resolved:
                    add("reply", "incident.resolved", {"by": "source", "source": t.resolved_by})
                elif t.resolved_alerts:
                    add("reply", "alerts.resolved", {"count": t.resolved_alerts, "source": t.resolved_by})
            if (t.resolved or t.unsilenced) and incident.id is not None:  # its pages say Resolved now, not Firing,
                rows.append(page_redraw_row(incident.id, st.now))  # or Firing, not Silenced, and offer Escalate again
        return rows


def _refused(s: Submission) -> Outcome | None:
    """A body the writer process did not get to read, read here: the 400/422 it would have answered, if any (a
    retry of a bad body cannot succeed, so it gets no 503)."""
    if s.body is None:
        return None
    try:
        read_body(s.source.kind, s.source.id, s.body)
    except BodyError as exc:
        return Outcome(exc.status, exc.body(), rejected=exc.reason)
    return None


def _heard(alerts: Sequence[Alert], st: _Batch) -> None:
    """A notification that repeats an incident's alert still firing is news from that incident, wherever the alert
    sits in it: Alertmanager sorts a group's alerts by labels, so a new alert may come before the old one, and must
    still find the incident heard from within grouping.window."""
    for alert in alerts:
        if alert.status == "firing":
            known = st.latest_by_identity.get((alert.source, alert.fingerprint))
            if known is not None and known[0].status == "firing" and known[1].status != RESOLVED:
                known[1].last_seen = st.now


def _first_resolutions(conn: Connection, st: _Batch) -> None:
    """The time-to-resolve of the incidents resolved for the first time (before this batch's audit events are
    written): a reopened incident resolved again is measured once, as `chatops report` measures it."""
    before = {inc.id for inc, _ in st.resolutions if inc.id is not None}
    if before:
        before = set(conn.execute(select(_AUDIT.c.incident_id).where(
            _AUDIT.c.action == "incident.resolved", _AUDIT.c.incident_id.in_(sorted(before))).distinct()).scalars())
    st.resolved_after = [(inc.severity, seconds) for inc, seconds in st.resolutions if inc.id not in before]


def _id(incident: _Row) -> Any:
    """The incident id, or the object itself until the flush gives it one."""
    return incident.id if incident.id is not None else incident


def _assign_incident_ids(st: _Batch) -> None:
    """After the flush: fill in ids that were still objects, and answer with ids."""
    fixed = []
    for e in st.entries:
        if e.details and isinstance(e.details.get("previous_id"), _Row):  # incident.opened after one this batch opened
            e = Entry(e.action, e.actor, e.subject_type, e.subject_id, e.at,
                      {**e.details, "previous_id": e.details["previous_id"].id}, e.incident_id)
        elif e.details and isinstance(e.details.get("current_incident"), _Row):  # _end_elsewhere, for one just opened
            e = Entry(e.action, e.actor, e.subject_type, e.subject_id, e.at,
                      {**e.details, "current_incident": e.details["current_incident"].id}, e.incident_id)
        if isinstance(e.incident_id, _Row):
            inc = e.incident_id
            e = Entry(e.action, e.actor, e.subject_type, str(inc.id) if e.subject_type == "incident" else e.subject_id,
                      e.at, e.details, inc.id)
        elif e.subject_type == "incident" and not e.subject_id:
            e = Entry(e.action, e.actor, e.subject_type, str(e.incident_id), e.at, e.details, e.incident_id)
        fixed.append(e)
    st.entries[:] = fixed


def _log_signatures(conn: Connection, signed: Sequence[Submission], windows: Mapping[str, datetime]) -> None:
    """SQLite: append the signatures taken to alert_signatures (appends touch the table's last page only; a claim
    table with a unique key on random signatures cost a fifth of intake's throughput)."""
    rows = Rows(conn)
    if rows.raw is not None:
        rows.insert_values(_SIGNATURES, ("signature", "delivery_id", "expires_at"), [
            (s.signature, s.delivery_id, _encode_datetime(windows[s.signature or ""])) for s in signed])
    else:
        conn.execute(_SIGNATURES.insert(), [{"signature": s.signature, "delivery_id": s.delivery_id,
                                             "expires_at": windows[s.signature or ""]} for s in signed])


def _lock_keys(conn: Connection, keys: Sequence[str]) -> None:
    """PostgreSQL: this transaction's advisory locks on `keys`, taken in one order (of their hashes), so that two
    transactions locking some of the same keys never deadlock."""
    conn.execute(text(
        "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h "
        "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"), {"keys": list(keys)})


def _is_db_unavailable(exc: BaseException) -> bool:
    """storage.db.store_unavailable (down, a lock held too long by another replica, this one paused: nothing
    stored), or the chain's key changed under this bot (stored after its restart, on a retry): senders get 503."""
    return store_unavailable(exc) or isinstance(exc, KeyMismatch)


# -- what travels to the writer process (handlers/intake_child.py applies it there) -------------------------


def _alert_fields(a: Alert) -> tuple[Any, ...]:
    """An alert as it travels to the writer process (Alert(*fields) there): a tuple pickles faster."""
    return (a.source, a.fingerprint, a.status, a.labels, a.annotations, a.severity, a.summary, a.starts_at,
            a.ends_at, a.links, a.group_key, a.dedup_key)
