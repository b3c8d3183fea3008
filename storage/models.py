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
