"""SQLModel tables. No platform-specific column lives in a domain table."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Column, Index
from sqlmodel import Field, SQLModel


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(primary_key=True)
    version: int


class AuditEvent(SQLModel, table=True):
    """One link of the tamper-evident chain; `seq` is dense, starting at 1."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_incident", "incident_id"), Index("ix_audit_at", "at"))

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime
    actor_person: str | None = None
    actor_platform: str
    actor_user_id: str
    action: str
    subject_type: str
    subject_id: str
    incident_id: int | None = None
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": {"person": self.actor_person, "platform": self.actor_platform, "user_id": self.actor_user_id},
            "action": self.action,
            "subject": {"type": self.subject_type, "id": self.subject_id},
            "incident_id": self.incident_id,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class AuditHead(SQLModel, table=True):
    """The newest link of the chain. Its row lock serializes appends on PostgreSQL."""

    __tablename__ = "audit_head"
    GENESIS: ClassVar[str] = "0" * 64

    id: int = Field(primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str


class Incident(SQLModel, table=True):
    """An incident: alerts that share a group key. Platform-neutral by design."""

    __tablename__ = "incidents"
    __table_args__ = (Index("ix_incidents_key_status", "group_key", "status"), Index("ix_incidents_status", "status"))

    id: int | None = Field(default=None, primary_key=True)
    group_key: str
    title: str
    status: str = "triggered"
    severity: str
    priority: int = 0
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    links: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    sources: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    channels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    escalation: str | None = None
    route: str | None = None
    runbooks: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    alert_count: int = 0
    firing_count: int = 0
    notifications: int = 0
    critical_asset: bool = False
    silenced: bool = False
    opened_at: datetime
    first_seen: datetime
    last_seen: datetime
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    previous_id: int | None = None


class AlertRecord(SQLModel, table=True):
    """One alert (source + fingerprint) within one incident."""

    __tablename__ = "alerts"
    # ix_alerts_incident: an incident's alerts (incidents show, the reopen check), without reading the whole table
    __table_args__ = (Index("ix_alerts_identity", "source", "fingerprint", "incident_id", unique=True),
                      Index("ix_alerts_incident", "incident_id"))

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(foreign_key="incidents.id")
    source: str
    fingerprint: str
    status: str
    severity: str
    summary: str
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    annotations: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    links: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    first_received: datetime
    last_received: datetime
    received_count: int = 1


class OutboxItem(SQLModel, table=True):
    """A chat delivery queued in the transaction of the change that implies it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "status", "due_at"),)

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime
    due_at: datetime
    incident_id: int | None = Field(default=None, foreign_key="incidents.id")
    channel: str
    kind: str  # post (the incident's parent message) | update (re-draw it) | reply (a thread line)
    event: str
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "pending"
    attempts: int = 0
    last_error: str | None = None


class Delivery(SQLModel, table=True):
    """A webhook delivery id seen from a source, with the answer it got (idempotency)."""

    __tablename__ = "deliveries"

    source: str = Field(primary_key=True)
    delivery_id: str = Field(primary_key=True)
    received_at: datetime = Field(index=True)
    status_code: int
    response: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # A digest of the body it brought (inflated): the same id with another body is no retry. None for a delivery
    # stored before version 6, which any body under its id repeats, as then.
    digest: str | None = None


class SeenRequest(SQLModel, table=True):
    """A request one replica took (a signed alert, a Slack command or click, a Slack event, a Telegram update),
    kept until its replay window ends, so that a copy sent to another replica, or after a restart, is refused too
    (storage/replays.py)."""

    __tablename__ = "seen_requests"

    scope: str = Field(primary_key=True)  # what kind of request: "alert", "slack", "slack-event", "telegram"
    key: str = Field(primary_key=True)  # its signature or id
    expires_at: datetime = Field(index=True)


class AlertSignature(SQLModel, table=True):
    """A signed alert request taken, kept until its signature's window ends, on SQLite: the process's ReplayGuard
    is filled from these at start, so a copy sent after a restart is refused too. Rows are only appended (no index
    but the id), which costs intake little; replicas on PostgreSQL claim signatures in `seen_requests` instead."""

    __tablename__ = "alert_signatures"

    id: int | None = Field(default=None, primary_key=True)
    signature: str
    delivery_id: str | None = None  # the X-Delivery-ID it came with: a retry under it is answered, not refused
    expires_at: datetime


class IncidentMessage(SQLModel, table=True):
    """A message the bot posted for an incident: one parent per incident and routed channel.

    `channel` is the `channels[].id` of app.yaml; `chat_id`, `message_id` and
    `thread_id` are the platform's own (Slack channel and ts, Telegram chat and
    message id, Teams conversation and activity id).
    """

    __tablename__ = "incident_messages"
    __table_args__ = (Index("ix_incident_messages_channel", "incident_id", "channel", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(foreign_key="incidents.id")
    channel: str
    platform: str
    chat_id: str
    message_id: str
    thread_id: str | None = None
    posted_at: datetime
    updated_at: datetime


class Override(SQLModel, table=True):
    """`person` covers `rotation` over [starts_at, ends_at); among overlapping ones the latest created wins.

    A swap is a pair of overrides, a cover one. A cancelled override keeps its row (`cancelled_at`).
    """

    __tablename__ = "overrides"
    __table_args__ = (Index("ix_overrides_rotation_window", "rotation", "starts_at", "ends_at"),)

    id: int | None = Field(default=None, primary_key=True)
    rotation: str
    person: str
    starts_at: datetime
    ends_at: datetime
    created_at: datetime
    created_by: str
    reason: str = ""
    cancelled_at: datetime | None = None


class Timer(SQLModel, table=True):
    """Something to do at `due_at` (an escalation step, a swap's expiry, a handoff notice).

    The tick claims due rows for `lease_until` (claimed_by names the replica) and runs
    each in a transaction of its own that also marks it done, so its effect and its
    completion commit together. `key`, when set, is unique: a timer that must exist
    at most once (a handoff notice for one shift).
    """

    __tablename__ = "timers"
    __table_args__ = (Index("ix_timers_due", "status", "due_at"), Index("ix_timers_key", "key", unique=True),
                      Index("ix_timers_subject", "kind", "subject"))

    id: int | None = Field(default=None, primary_key=True)
    kind: str
    subject: str
    key: str | None = None
    due_at: datetime
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "pending"  # pending | done | cancelled | failed
    attempt: int = 0
    claimed_by: str | None = None
    lease_until: datetime | None = None
    created_at: datetime
    fired_at: datetime | None = None
    last_error: str | None = None


class Escalation(SQLModel, table=True):
    """An incident's escalation: a snapshot of its policy taken when it opened, and where it is in it.

    `next_step` counts steps across repeats (pass * len(steps) + step). Only the timer
    named by `timer_id` may fire the next step: acknowledging stops the escalation,
    Escalate schedules a new timer now, and a superseded timer does nothing when it fires.
    """

    __tablename__ = "escalations"

    incident_id: int = Field(primary_key=True, foreign_key="incidents.id")
    policy: str
    snapshot: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = "active"  # active | stopped | exhausted
    next_step: int = 0
    timer_id: int | None = None
    note: str = ""  # what happens next, in words, for the incident's message ("Carol in 10 min if ...")
    # Which run of the policy this is: a reopen starts it again as the next run. A page names the run it belongs
    # to, so that one left over from an earlier run neither goes out nor counts for this one.
    run: int = 0
    started_at: datetime
    updated_at: datetime


class SwapRequest(SQLModel, table=True):
    """`requester` asks `counterpart` to cover `rotation` over [starts_at, ends_at) (handlers/swaps.py).

    status: pending -> accepted (the override is written) | awaiting_approval (rotations[].swap_approval)
    -> approved; or declined, expired, cancelled; a taken swap can become undone before it starts.
    `decided_*` is the counterpart's answer (or the requester's cancel, or the expiry), `approval_*` the
    approver's; `override_ids` the overrides written when the swap was taken (cancelled by an undo).
    """

    __tablename__ = "swap_requests"
    __table_args__ = (Index("ix_swap_requests_rotation", "rotation", "status"),
                      Index("ix_swap_requests_requester", "requester", "status"),
                      Index("ix_swap_requests_counterpart", "counterpart", "status"))

    id: int | None = Field(default=None, primary_key=True)
    rotation: str
    requester: str
    counterpart: str
    starts_at: datetime
    ends_at: datetime
    status: str = "pending"  # pending | accepted | awaiting_approval | approved | declined | expired | cancelled | undone
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    approval_at: datetime | None = None
    approval_by: str | None = None
    undone_at: datetime | None = None
    undone_by: str | None = None
    override_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    requested_on: str = ""  # the platform the request came from: direct messages about it go there first


class RunbookRun(SQLModel, table=True):
    """One request to run a runbook on an incident, from the click to its end: requested (waiting for an approver,
    medium and high risk), approved (low risk: at once), rejected, running, then succeeded, failed or interrupted
    (the bot stopped while it ran: never run again on its own). `steps` is what app.yaml said when it was asked
    for, so what runs is what the approver saw; `results` holds each step's exit code and duration."""

    __tablename__ = "runbook_runs"
    __table_args__ = (Index("ix_runbook_runs_incident", "incident_id"), Index("ix_runbook_runs_status", "status"))

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(foreign_key="incidents.id")
    runbook_id: str
    title: str
    risk: str
    steps: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = "requested"
    requested_by: str
    requested_at: datetime
    approved_by: str | None = None
    approved_at: datetime | None = None
    rejected_by: str | None = None
    rejected_at: datetime | None = None
    reason: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    results: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    output: str = ""
