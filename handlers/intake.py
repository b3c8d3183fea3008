"""Alert intake: group concurrent submissions into one transaction, answer each after commit.

A request hands its parsed alerts to `Intake.submit` and waits. One writer task
takes everything queued, applies it in arrival order in a single transaction
(alerts, incidents, audit events, outbox rows, delivery ids) and commits; only
then does each request get its answer. If the transaction fails, every
request in it gets the error (503), and nothing of it was written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from bot.alerts import Alert
from bot.clock import Clock
from bot.config import Config, Source
from bot.incidents import RESOLVED, TRIGGERED, priority, worst
from bot.metrics import Metrics
from bot.model import Actor
from bot.routing import group_key, select_routes, silenced_by
from storage.audit import AuditLog, Entry
from storage.db import Database
from storage.models import AlertRecord, Delivery, Incident, OutboxItem
from storage.rows import Rows

log = logging.getLogger("chatops.intake")
THREAD_LINE_DELAY = timedelta(seconds=30)
RESENDING_KINDS = ("alertmanager", "grafana")  # senders that repeat a whole group's alerts in each notification
IDEMPOTENCY_WINDOW = timedelta(hours=24)


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass
class Submission:
    source: Source
    alerts: list[Alert]
    delivery_id: str | None
    future: asyncio.Future[Outcome]


class _Row:
    """A row read (or about to be inserted) in this batch: its columns as attributes, changes noted.

    Intake works on plain values and writes only the columns that changed (see
    storage/rows.py): building and flushing ORM objects cost more than
    everything else a request does (bench/ingest.py).
    """

    __slots__ = ("_values", "changes", "new")

    def __init__(self, values: Mapping[str, Any], *, new: bool = False):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "changes", {})
        object.__setattr__(self, "new", new)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if self._values.get(name) != value or name not in self._values:
            self._values[name] = value
            self.changes[name] = value

    def values(self, *, without: str | None = None) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k != without}


_INCIDENTS = Incident.__table__
_ALERTS = AlertRecord.__table__
_OUTBOX = OutboxItem.__table__
_DELIVERIES = Delivery.__table__
# What intake reads of an existing incident and alert (it writes only what changed).
_INCIDENT_COLUMNS = ("id", "group_key", "status", "severity", "sources", "channels", "links", "alert_count",
                     "firing_count", "notifications", "critical_asset", "silenced", "opened_at", "last_seen")
_ALERT_COLUMNS = ("id", "incident_id", "source", "fingerprint", "status", "summary", "labels", "annotations",
                  "received_count", "ends_at")


@dataclass
class _Touched:
    """What one batch did to one incident, to queue its chat work once."""

    incident: _Row
    opened: bool = False
    grouped: int = 0
    resolved_alerts: int = 0
    resolved: bool = False
    refired: int = 0


@dataclass
class _Batch:
    now: datetime
    incidents_by_key: dict[str, _Row]
    latest_by_identity: dict[tuple[str, str], tuple[_Row, _Row]]
    previous_by_key: dict[str, int] | None
    loaded: list[_Row] = field(default_factory=list)
    loaded_records: list[_Row] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    rows: Rows | None = None
    entries: list[Entry] = field(default_factory=list)
    touched: dict[int, _Touched] = field(default_factory=dict)
    new_incidents: list[_Row] = field(default_factory=list)
    new_records: list[tuple[_Row, _Row]] = field(default_factory=list)

    def previous(self, key: str) -> int | None:
        """The newest earlier incident of this key (asked only when one opens, once a batch)."""
        if self.previous_by_key is None:
            assert self.rows is not None
            self.previous_by_key = self.rows.max_id_by(_INCIDENTS, "group_key", self.keys)
        return self.previous_by_key.get(key)

    def touch(self, incident: _Row) -> _Touched:
        if id(incident) not in self.touched:
            self.touched[id(incident)] = _Touched(incident)
        return self.touched[id(incident)]


class Intake:
    def __init__(self, *, db: Database, audit: AuditLog, config: Config, clock: Clock, metrics: Metrics,
                 max_batch: int = 1000, after_commit: Callable[[], None] | None = None):
        self.db, self.audit, self.config, self.clock, self.metrics = db, audit, config, clock, metrics
        self.after_commit = after_commit  # e.g. wake the outbox worker
        self.max_batch = max_batch
        self._queue: asyncio.Queue[Submission | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake-writer")

    async def stop(self) -> None:
        """Finish what is queued (every waiting request gets its answer), then stop the writer."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None

    async def submit(self, source: Source, alerts: list[Alert], delivery_id: str | None) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        await self._queue.put(Submission(source, alerts, delivery_id, future))
        return await future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            batch = [] if first is None else [first]
            stopping = first is None
            while not self._queue.empty() and len(batch) < self.max_batch:
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[Submission]) -> None:
        try:
            outcomes = await self._apply_in_transaction(batch)
        except Exception as exc:
            if len(batch) > 1 and not _is_db_unavailable(exc):
                # Isolate the submission that broke the batch; the others still land.
                for one in batch:
                    await self._commit([one])
                return
            status = 503 if _is_db_unavailable(exc) else 500
            if status == 500:
                log.exception("intake failed for a delivery from %s", batch[0].source.id)
            else:
                log.error("intake: the database is unavailable (%s); answering 503 so senders retry", exc)
            for s in batch:
                if not s.future.done():
                    s.future.set_result(Outcome(status, {"error": "the database is unavailable; nothing was stored, retry later"
                                                         if status == 503 else "internal error; nothing was stored"}))
            return
        for s, outcome in zip(batch, outcomes):
            if not s.future.done():
                s.future.set_result(outcome)
        if self.after_commit is not None:
            self.after_commit()

    async def _apply_in_transaction(self, batch: list[Submission]) -> list[Outcome]:
        now = self.clock.now()
        outcomes, fresh, events = await self.db.run_transaction(lambda conn: self._apply(conn, batch, now))
        for s in fresh:
            for alert in s.alerts:
                self.metrics.alerts_received.labels(s.source.id, alert.status).inc()
        self.metrics.audit_events.inc(events)
        return outcomes

    def _apply(self, conn: Connection, batch: list[Submission], now: datetime) -> tuple[list[Outcome], list[Submission], int]:
        """The whole batch, inside one transaction (synchronous: see Database.run_transaction)."""
        replays = self._known_deliveries(conn, batch, now)
        fresh = [s for s in batch if (s.source.id, s.delivery_id) not in replays]
        state = self._load(conn, fresh, now)
        applied: list[tuple[Submission, list[tuple[str, _Row | None, str]]] | Outcome | tuple[str, str]] = []
        seen_here: set[tuple[str, str]] = set()
        for s in batch:
            key = (s.source.id, s.delivery_id or "")
            if s.delivery_id and key in replays:
                applied.append(replays[key])
            elif s.delivery_id and key in seen_here:
                applied.append(key)  # a repeat inside this batch
            else:
                seen_here.add(key)
                applied.append((s, [self._apply_alert(s.source, a, state) for a in s.alerts]))
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
                outcome = first[(s.source.id, s.delivery_id or "")] = Outcome(200, body)
                outcomes.append(outcome)
                if s.delivery_id:
                    deliveries.append({"source": s.source.id, "delivery_id": s.delivery_id, "received_at": now,
                                       "status_code": 200, "response": body})
            else:
                outcomes.append(Outcome(first[item].status, first[item].body, replayed=True))  # type: ignore[index]
        if deliveries:
            conn.execute(_DELIVERIES.insert(), deliveries)
        return outcomes, fresh, len(state.entries)

    def _write(self, conn: Connection, st: _Batch) -> None:
        """Everything the batch changed, in a handful of executemany statements."""
        rows = Rows(conn)
        if st.new_incidents:
            ids = rows.insert_returning_ids(_INCIDENTS, [inc.values(without="id") for inc in st.new_incidents])
            for inc, new_id in zip(st.new_incidents, ids):
                inc._values["id"] = new_id
        rows.update_by_id(_INCIDENTS, [(inc.id, inc.changes) for inc in st.loaded if inc.changes])
        rows.update_by_id(_ALERTS, [(rec.id, rec.changes) for rec in st.loaded_records if rec.changes])
        for record, incident in st.new_records:
            record._values["incident_id"] = incident.id
        rows.insert(_ALERTS, [record.values(without="id") for record, _ in st.new_records])
        rows.insert(_OUTBOX, self._chat_work(st))
        _assign_incident_ids(st)
        self.audit.append_rows(conn, st.entries)

    def _known_deliveries(self, conn: Connection, batch: Sequence[Submission], now: datetime) -> dict[tuple[str, str], Outcome]:
        ids = {(s.source.id, s.delivery_id) for s in batch if s.delivery_id}
        if not ids:
            return {}
        known = {}
        for row in Rows(conn).select_in(_DELIVERIES, "delivery_id", sorted({d for _, d in ids})):
            if (row["source"], row["delivery_id"]) not in ids:
                continue
            if now - row["received_at"] < IDEMPOTENCY_WINDOW:
                known[(row["source"], row["delivery_id"])] = Outcome(row["status_code"], row["response"], replayed=True)
            else:  # expired: this id may be used again
                conn.execute(_DELIVERIES.delete().where(_DELIVERIES.c.source == row["source"],
                                                        _DELIVERIES.c.delivery_id == row["delivery_id"]))
        return known

    def _load(self, conn: Connection, batch: Sequence[Submission], now: datetime) -> _Batch:
        keys = sorted({group_key(self.config.grouping.by, s.source.dedup_key, a) for s in batch for a in s.alerts})
        identities = {(a.source, a.fingerprint) for s in batch for a in s.alerts}
        if not keys:
            return _Batch(now, {}, {}, {})
        if self.db.is_postgres:
            # Replicas serialize on the group keys they touch, in one order, so no deadlock.
            conn.execute(text(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h "
                "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"), {"keys": keys})
        rows = Rows(conn)
        by_id: dict[int, _Row] = {}
        incidents_by_key: dict[str, _Row] = {}
        for row in rows.select_in(_INCIDENTS, "group_key", keys, exclude=("status", RESOLVED), order_by="id",
                                  columns=_INCIDENT_COLUMNS):
            inc = by_id[row["id"]] = _Row(row)
            incidents_by_key.setdefault(inc.group_key, inc)
        records = [_Row(row) for row in rows.select_in(_ALERTS, "fingerprint", sorted({fp for _, fp in identities}),
                                                          order_by="id", columns=_ALERT_COLUMNS)
                   if (row["source"], row["fingerprint"]) in identities]
        for row in rows.select_in(_INCIDENTS, "id", sorted({r.incident_id for r in records} - by_id.keys()),
                                  columns=_INCIDENT_COLUMNS):
            by_id[row["id"]] = _Row(row)
        latest = {(r.source, r.fingerprint): (r, by_id[r.incident_id]) for r in records}  # ordered by id: the newest wins
        for _, incident in latest.values():
            if incident.status != RESOLVED:
                incidents_by_key.setdefault(incident.group_key, incident)
        return _Batch(now, incidents_by_key, latest, None, loaded=list(by_id.values()),
                      loaded_records=records, keys=keys, rows=rows)

    def _apply_alert(self, source: Source, alert: Alert, st: _Batch) -> tuple[str, _Row | None, str]:
        now, cfg = st.now, self.config
        actor = Actor.source(source.id)
        details = {"fingerprint": alert.fingerprint, "status": alert.status, "severity": alert.severity,
                   "labels": alert.labels, "summary": alert.summary}
        known = st.latest_by_identity.get((alert.source, alert.fingerprint))
        if alert.status == "resolved":
            if known is None or known[0].status == "resolved" or known[1].status == RESOLVED:
                st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now,
                                        {**details, "note": "no open incident has this alert firing"}))
                return alert.fingerprint, (known[1] if known else None), "none"
            record, incident = known
            record.status, record.ends_at, record.last_received = "resolved", alert.ends_at or now, now
            record.received_count += 1
            incident.last_seen = now
            st.entries.append(Entry("alert.resolved", actor, "alert", alert.fingerprint, now, details, _id(incident)))
            t = st.touch(incident)
            t.resolved_alerts += 1
            incident.firing_count = max(0, incident.firing_count - 1)
            if incident.firing_count == 0:
                incident.status, incident.resolved_at, incident.resolved_by = RESOLVED, now, f"source:{source.id}"
                t.resolved = True
                st.entries.append(Entry("incident.resolved", actor, "incident", "", now,
                                        {"by": "source", "source": source.id}, _id(incident)))
                st.incidents_by_key.pop(incident.group_key, None)
                return alert.fingerprint, incident, "resolved"
            return alert.fingerprint, incident, "alert_resolved"

        silence = silenced_by(cfg.silences, alert.labels, now, cfg.timezone)
        if known is not None and known[1].status != RESOLVED:
            record, incident = known
            refire = record.status == "resolved"
            record.status, record.last_received = "firing", now
            record.received_count += 1
            record.labels, record.annotations, record.summary = alert.labels, alert.annotations, alert.summary
            record.ends_at = None
            if refire:
                incident.firing_count += 1
                st.touch(incident).refired += 1
            change = "refired" if refire else "duplicate"
            # Alertmanager and Grafana send every alert of a group again whenever the group changes
            # and at each repeat interval: an alert that is still firing is not a new occurrence.
            resent = not refire and source.kind in RESENDING_KINDS
        else:
            key = group_key(cfg.grouping.by, source.dedup_key, alert)
            incident = st.incidents_by_key.get(key)
            if incident is not None and incident.last_seen < now - cfg.grouping.window:
                incident = None  # too long since it last heard anything: a fresh incident
            if incident is None:
                incident = self._open(key, alert, st, silenced=silence is not None)
                change = "opened"
                st.entries.append(Entry("incident.opened", actor, "incident", "", now,
                                        {"title": incident.title, "severity": incident.severity,
                                         "channels": incident.channels, "previous_id": incident.previous_id},
                                        _id(incident)))
            else:
                change = "grouped"
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
            st.latest_by_identity[(alert.source, alert.fingerprint)] = (record, incident)
            incident.alert_count += 1
            incident.firing_count += 1
            resent = False
        if not resent:
            incident.notifications += 1
        incident.last_seen = now
        incident.severity = worst(incident.severity, alert.severity)
        if source.id not in incident.sources:
            incident.sources = [*incident.sources, source.id]
        incident.critical_asset = incident.critical_asset or alert.asset in cfg.critical_assets
        for name, url in alert.links.items():
            if name not in incident.links:
                incident.links = {**incident.links, name: url}
        incident.priority = priority(severity=incident.severity, duplicates=incident.notifications - 1,
                                     source_count=len(incident.sources), critical_asset=incident.critical_asset,
                                     opened_at=incident.opened_at, now=now)
        st.entries.append(Entry("alert.received", actor, "alert", alert.fingerprint, now, details, _id(incident)))
        if silence is not None:
            st.entries.append(Entry("alert.silenced", actor, "alert", alert.fingerprint, now,
                                    {"silence": silence.id, "comment": silence.comment}, _id(incident)))
        return alert.fingerprint, incident, change

    def _open(self, key: str, alert: Alert, st: _Batch, *, silenced: bool) -> _Row:
        routes = select_routes(self.config.routes, alert.labels)
        channels = list(dict.fromkeys(ch for r in routes for ch in r.channels))
        escalation = next((r.escalation for r in routes if r.escalation), None)
        runbooks = list(dict.fromkeys(rb for r in routes for rb in r.runbooks))
        incident = _Row(dict(
            id=None, group_key=key, title=alert.summary[:300], status=TRIGGERED, severity=alert.severity, priority=0,
            labels=alert.labels, links={}, sources=[], channels=channels, escalation=escalation, runbooks=runbooks,
            alert_count=0, firing_count=0, notifications=0, critical_asset=False, silenced=silenced,
            opened_at=st.now, first_seen=st.now, last_seen=st.now, acknowledged_at=None, acknowledged_by=None,
            resolved_at=None, resolved_by=None, previous_id=st.previous(key),
        ), new=True)
        st.new_incidents.append(incident)
        st.incidents_by_key[key] = incident
        st.touch(incident).opened = True
        return incident

    def _chat_work(self, st: _Batch) -> list[dict[str, Any]]:
        """Outbox rows: one post per new incident and channel; one update (+ thread lines) per changed one."""
        rows: list[dict[str, Any]] = []
        for t in st.touched.values():
            incident = t.incident
            if incident.silenced:
                continue
            for channel in incident.channels:
                def add(kind: str, event: str, details: dict[str, Any] | None = None) -> None:
                    # "N new alerts" lines wait a little so that a burst becomes one line.
                    due = st.now + THREAD_LINE_DELAY if event in ("alerts.grouped", "alerts.resolved") else st.now
                    rows.append({"created_at": st.now, "due_at": due, "incident_id": incident.id, "channel": channel,
                                 "kind": kind, "event": event, "details": details or {}, "status": "pending",
                                 "attempts": 0, "last_error": None})
                if t.opened:
                    add("post", "incident.opened")
                    continue
                add("update", "incident.changed")
                if t.grouped or t.refired:
                    add("reply", "alerts.grouped", {"count": t.grouped + t.refired})
                if t.resolved:
                    add("reply", "incident.resolved", {"by": "source"})
                elif t.resolved_alerts:
                    add("reply", "alerts.resolved", {"count": t.resolved_alerts})
        return rows


def _id(incident: _Row) -> Any:
    """The incident id, or the object itself until the flush gives it one."""
    return incident.id if incident.id is not None else incident


def _assign_incident_ids(st: _Batch) -> None:
    """After the flush: fill in ids that were still objects, and answer with ids."""
    fixed = []
    for e in st.entries:
        if isinstance(e.incident_id, _Row):
            inc = e.incident_id
            e = Entry(e.action, e.actor, e.subject_type, str(inc.id) if e.subject_type == "incident" else e.subject_id,
                      e.at, e.details, inc.id)
        elif e.subject_type == "incident" and not e.subject_id:
            e = Entry(e.action, e.actor, e.subject_type, str(e.incident_id), e.at, e.details, e.incident_id)
        fixed.append(e)
    st.entries[:] = fixed


def _is_db_unavailable(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError, ConnectionError, OSError, asyncio.TimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
