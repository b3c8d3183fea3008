"""Shared fixtures: databases (SQLite always, PostgreSQL when CI provides one)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from storage.db import Database

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PG_ENV = "CHATOPS_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def logging_left_as_it_was() -> Iterator[None]:
    """The command line sets up the bot's logging (bot.logs.setup): a handler on the stderr a test captures, closed
    once it ends. Left on the root logger, every record of every later test failed to write and printed a "Logging
    error" with its whole stack: the suite ran slower after the first command-line test, and timed waits ran out."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler) is logging.StreamHandler:  # (not pytest's own, its subclasses)
            root.removeHandler(handler)
    root.setLevel(level)


def postgres_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests skipped: {PG_ENV} is not set (.ci/run sets it when a server answers on 127.0.0.1:5432)")
    return url


async def drop_schema(url: str, schema: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
def pg_schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Database]:
    """A started, empty store on each backend."""
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
        await database.start()
        yield database
        await database.dispose()
    else:
        url = postgres_url()
        database = Database(url, schema=pg_schema)
        await database.start()
        yield database
        await database.dispose()
        await drop_schema(url, pg_schema)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
