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


def loud_writer() -> object:
    """A writer process's handler (storage/writer.py imports it by name) that logs a warning of its own for each
    message, as the WAL checkpointer in a writer process logs, and answers each message with its number."""
    import logging

    def handle(messages: list[int]) -> list[int]:
        for n in messages:
            logging.getLogger("chatops.storage").warning("child line %d", n)
        return messages
    return handle
