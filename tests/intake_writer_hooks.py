"""An `on_open` hook for tests/test_intake_writer.py that the intake writer process imports by name (a function
defined in a test could not travel to it): it fails the transaction of any incident titled "boom"."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from storage.models import Incident

TRIGGER = "boom"


def explode_on_boom(conn: Connection, incidents: list[tuple[int, str]], now: datetime) -> None:
    titles = conn.execute(select(Incident.title).where(Incident.id.in_([i for i, _ in incidents]))).scalars().all()
    if TRIGGER in titles:
        raise RuntimeError("boom (tests/intake_writer_hooks.py)")
