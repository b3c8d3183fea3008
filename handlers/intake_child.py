"""The writer process's end of alert intake (`storage.writer: process`): batches applied with Intake._apply.

storage/writer.py runs it in a process of its own and carries the batches and answers; handlers/intake.py
is the bot's end.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from bot.alerts import Alert, BodyError, read_body
from bot.config import Config
from bot.logs import TextFormatter
from handlers.escalation import Escalations
from handlers.intake import (_INTERNAL, _UNAVAILABLE, UNAVAILABLE_SAID, Intake, Submission, _dumps, _is_db_unavailable,
                             unknown_severities)
from storage.audit import AuditLog
from storage.db import sqlite_writer_engine
from storage.writer import from_wire_time

# A submission's answer as it travels back: status, the body encoded, whether it repeats a stored answer, and why it
# was refused (Outcome.rejected: counted in /metrics) or None.
_Answer = tuple[int, bytes, bool, str | None]
_UNAVAILABLE_ANSWER: _Answer = (503, _dumps({"error": _UNAVAILABLE}).encode(), False, None)
_INTERNAL_ANSWER: _Answer = (500, _dumps({"error": _INTERNAL}).encode(), False, None)


class _ProcessWriter:
    """Runs in the writer process: applies batches with Intake._apply, as the writer thread does.

    It gets every message (batch) that arrived while it was busy and applies them together, in order, in one
    transaction (of at most `max_batch` submissions), with the `now` of the newest: as the writer thread
    takes everything queued when its transaction begins and reads the clock then. A transaction that fails
    is retried one submission at a time, in order, before anything later (as Intake._failed does), unless
    the database is unavailable: then all of it gets 503. A submission may come as the request's body
    (Intake.reads_bodies): it is read here first (bot.alerts.read_body), and one that is no payload of its
    source's kind is answered 400/422 and not applied. Each message's answer carries its submissions'
    outcomes (_Answer) and which were fresh, and for each body it read: why it refused it (or None), how many alerts
    the sender left out, how many firing and resolved, the severity label values it did not know (and how many
    alerts said each: counted and logged by the parent); the last one also what the transactions did for
    `_answer` (audit events written, time-to-resolve observations, escalations started, outbox rows queued)
    and what to log (the parent logs it).
    """

    def __init__(self, url: str, config: Config, on_open: Any, on_raise: Any, max_batch: int):
        if "escalations" in (on_open, on_raise):
            escalations = Escalations(audit=AuditLog(config.audit.hmac_key), config=config)
            on_open = escalations.start_all if on_open == "escalations" else on_open
            on_raise = escalations.reconsider if on_raise == "escalations" else on_raise
        self.engine = sqlite_writer_engine(url)
        self.conn: Connection | None = None  # one connection for the process's life (reopened after an error)
        self.intake = Intake(db=None, audit=AuditLog(config.audit.hmac_key), config=config, clock=None, metrics=None,
                             on_open=on_open, on_raise=on_raise)
        self.sources = {s.id: s for s in config.sources}
        self.max_batch = max_batch

    def __call__(self, messages: list[tuple[datetime | int, list[tuple[str, list[tuple[Any, ...]] | bytes, str | None,
                                                                        int, str | None, str | None]]]]) -> list[Any]:
        logs: list[tuple[int, str, str | None]] = []
        outcomes: list[list[_Answer]] = []
        fresh: list[list[int]] = [[] for _ in messages]
        where: dict[int, tuple[int, int]] = {}  # id(submission) -> (message, index in it)
        groups: list[tuple[datetime, list[Submission]]] = []
        read: list[list[tuple[str | None, int, int, int, dict[str, int] | None] | None]] = []  # per body it read
        for m, (moment, items) in enumerate(messages):
            now = from_wire_time(moment)
            answers: list[_Answer] = []
            read.append([])
            batch = []
            for i, item in enumerate(items):
                answer, what, s = self._submission(item, logs)
                answers.append(answer)
                read[m].append(what)
                if s is not None:
                    where[id(s)] = (m, i)
                    batch.append(s)
            outcomes.append(answers)
            if not batch:
                continue
            if groups and len(groups[-1][1]) + len(batch) <= self.max_batch:
                groups[-1] = (now, groups[-1][1] + batch)
            else:
                groups.append((now, batch))
        events, escalations, queued = 0, 0, 0
        resolved_after: list[tuple[str, float]] = []
        for now, group in groups:
            parts = [group]
            while parts:
                part = parts.pop(0)
                try:
                    conn = self.conn
                    if conn is None or conn.invalidated or conn.closed:
                        conn = self.conn = self.engine.connect()
                    with conn.begin():
                        done, new, n, resolved, started, chat = self.intake._apply(conn, part, now)
                except Exception as exc:
                    if self.conn is not None:
                        self.conn.close()  # a fresh one for the next transaction
                        self.conn = None
                    unavailable = _is_db_unavailable(exc)
                    if len(part) > 1 and not unavailable:
                        parts[:0] = [[one] for one in part]  # isolate the submission that broke it; the others land
                        continue
                    if unavailable:
                        logs.append((logging.ERROR, f"{UNAVAILABLE_SAID}({exc}); answering 503 "
                                                    "so senders retry", None))
                        answer = _UNAVAILABLE_ANSWER
                    else:
                        logs.append((logging.ERROR, f"intake failed for a delivery from {part[0].source.id}",
                                     _traceback(exc)))
                        answer = _INTERNAL_ANSWER
                    for s in part:
                        m, i = where[id(s)]
                        outcomes[m][i] = answer
                    continue
                for s, outcome in zip(part, done):
                    m, i = where[id(s)]
                    outcomes[m][i] = (outcome.status, _dumps(outcome.body).encode(), outcome.replayed, outcome.rejected)
                for s in new:
                    m, i = where[id(s)]
                    fresh[m].append(i)
                events += n
                resolved_after.extend(resolved)
                escalations += started
                queued += chat
        answers: list[Any] = [(o, f, 0, [], 0, [], r, 0) for o, f, r in zip(outcomes, fresh, read)]
        if answers:
            answers[-1] = (outcomes[-1], fresh[-1], events, resolved_after, escalations, logs, read[-1], queued)
        return answers

    def _submission(self, item: Any, logs: list[tuple[int, str, str | None]]
                    ) -> tuple[_Answer, tuple[str | None, int, int, int, dict[str, int] | None] | None, Submission | None]:
        """One submission as the parent sent it: its answer until applied (503), what reading its body found
        (None if it came parsed), and the Submission to apply (None if it is refused already)."""
        try:
            source_id, alerts, delivery_id, truncated, signature, digest = item
            source = self.sources[source_id]
            if not isinstance(alerts, bytes):
                return _UNAVAILABLE_ANSWER, None, Submission(
                    source, [Alert(*fields) for fields in alerts], delivery_id, None, truncated, signature=signature,
                    digest=digest)
            try:
                parsed, truncated = read_body(source.kind, source.id, alerts)
            except BodyError as exc:
                return (exc.status, _dumps(exc.body()).encode(), False, None), (exc.reason, 0, 0, 0, None), None
            firing = sum(1 for a in parsed if a.status == "firing")
            unknown = unknown_severities(parsed) or None
            return (_UNAVAILABLE_ANSWER, (None, truncated, firing, len(parsed) - firing, unknown),
                    Submission(source, parsed, delivery_id, None, truncated, signature=signature, digest=digest))
        except Exception as exc:  # not what the parent sends, or a fault reading it: this one gets 500
            logs.append((logging.ERROR, "intake writer: a submission it cannot read", _traceback(exc)))
            return _INTERNAL_ANSWER, None, None


def _traceback(exc: BaseException) -> str:
    """`exc`'s traceback as the parent's log prints one (bot.logs.TextFormatter: its lines kept, each exception's
    message on one line)."""
    return TextFormatter().formatException((type(exc), exc, exc.__traceback__))


def writer_process_handler(*, url: str, config: Config, on_open: Any, on_raise: Any = None,
                           max_batch: int) -> _ProcessWriter:
    """The factory storage.writer calls in the writer process."""
    return _ProcessWriter(url, config, on_open, on_raise, max_batch)
