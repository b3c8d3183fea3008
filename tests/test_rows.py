"""storage/rows.py writes rows the ORM reads back unchanged, and reads what the ORM wrote, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlmodel import select

from bot.actions import MAX_ID
from storage.db import Database
from storage.models import Incident
from storage.rows import Rows

T0 = datetime(2026, 3, 29, 0, 59, 59, 999999, tzinfo=UTC)
CET = timezone(timedelta(hours=2))


def incident(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = dict(
        group_key="alertname=Disk", title="Disk <full> & \"quoted\" ünïcode", status="triggered", severity="high",
        priority=3, labels={"alertname": "Disk", "nested": {"a": [1, 2.5, None, True]}}, links={}, sources=["am"],
        channels=["ops"], escalation=None, runbooks=[], alert_count=1, firing_count=1, notifications=1,
        critical_asset=True, silenced=False, opened_at=T0, first_seen=T0, last_seen=T0.astimezone(CET),
        acknowledged_at=None, acknowledged_by=None, resolved_at=None, resolved_by=None, previous_id=None,
    )
    values.update(overrides)
    return values


async def test_rows_written_here_read_back_through_the_orm(db: Database) -> None:
    ids = await db.run_transaction(lambda conn: Rows(conn).insert_returning_ids(
        Incident.__table__, [incident(), incident(group_key="k2", silenced=True)]))
    assert len(ids) == 2 and ids[1] == ids[0] + 1
    async with db.sessions() as session:
        first, second = (await session.execute(select(Incident).order_by(Incident.id))).scalars().all()
    assert first.id == ids[0] and first.title == "Disk <full> & \"quoted\" ünïcode"
    assert first.labels == {"alertname": "Disk", "nested": {"a": [1, 2.5, None, True]}}
    assert first.opened_at == T0 and first.opened_at.tzinfo is not None
    assert first.last_seen == T0  # written in +02:00, read back as the same instant in UTC
    assert first.critical_asset is True and first.silenced is False and second.silenced is True
    assert first.acknowledged_at is None and first.escalation is None


async def test_rows_read_what_the_orm_wrote_and_update_only_named_columns(db: Database) -> None:
    async with db.transaction() as session:
        session.add(Incident(**incident()))  # type: ignore[arg-type]
    rows = await db.run_transaction(lambda conn: Rows(conn).select_in(Incident.__table__, "group_key", ["alertname=Disk"]))
    assert len(rows) == 1
    row = rows[0]
    assert row["opened_at"] == T0 and row["labels"]["nested"] == {"a": [1, 2.5, None, True]}
    assert row["critical_asset"] is True and row["resolved_at"] is None
    later = T0 + timedelta(hours=1)
    await db.run_transaction(lambda conn: Rows(conn).update_by_id(Incident.__table__, [
        (row["id"], {"status": "resolved", "resolved_at": later, "sources": ["am", "grafana"]})]))
    async with db.sessions() as session:
        (got,) = (await session.execute(select(Incident))).scalars().all()
    assert (got.status, got.resolved_at, got.sources) == ("resolved", later, ["am", "grafana"])
    assert got.title == row["title"] and got.priority == 3  # untouched columns stay
    subset = await db.run_transaction(lambda conn: Rows(conn).select_in(
        Incident.__table__, "group_key", ["alertname=Disk", "none"], exclude=("status", "triggered"), columns=("id", "status")))
    assert subset == [{"id": row["id"], "status": "resolved"}]
    previous = await db.run_transaction(lambda conn: Rows(conn).max_id_by(Incident.__table__, "group_key", ["alertname=Disk", "x"]))
    assert previous == {"alertname=Disk": row["id"]}


async def test_the_largest_id_a_command_or_button_may_name_is_one_the_store_holds(db: Database) -> None:
    # commands and buttons answer "no such incident" past MAX_ID without asking the store, so it must hold MAX_ID
    async with db.transaction() as session:
        session.add(Incident(**incident(), id=MAX_ID))  # type: ignore[arg-type]
    async with db.sessions() as session:
        got = await session.get(Incident, MAX_ID)
    assert got is not None and got.id == MAX_ID
