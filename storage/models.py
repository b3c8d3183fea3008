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
    __table_args__ = (Index("ix_alerts_identity", "source", "fingerprint", "incident_id", unique=True),)

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
