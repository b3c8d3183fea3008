"""The async engine: SQLite (one replica) or PostgreSQL (several), same models.

SQLite connections get WAL, synchronous=NORMAL, busy_timeout and foreign keys,
and every transaction starts with BEGIN IMMEDIATE so writers queue on the
database lock instead of failing half-way. Tables are created or upgraded when
the bot starts (the command line only checks the version); a schema newer than
this code is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, text
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool, SingletonThreadPool
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel, select

from storage.models import AuditHead, SchemaVersion

log = logging.getLogger("chatops.storage")
T = TypeVar("T")

SCHEMA_VERSION = 6
# version -> the columns (table, column, SQL type) that bring the previous version up to it. Tables new in a
# version are created by create_all, already whole: a column is added only where it is missing (a store of
# version 1 gets escalations, new in 2, with version 3's `run` already in it).
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("incidents", "route", "VARCHAR")],  # timers and escalations are new tables
    3: [("escalations", "run", "INTEGER NOT NULL DEFAULT 0")],
    6: [("deliveries", "digest", "VARCHAR")],  # NULL for the deliveries stored before: repeated by any body
}
_PG_INIT_LOCK = 727_001  # advisory lock id: one process initialises the schema at a time
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary result codes of a lock another one holds
# PostgreSQL, for the running bot (Database(wait=...)): a replica that stops inside a transaction (SIGSTOP, a paused
# VM, an event loop stuck) keeps every row it locked, the audit log's head among them, and with it the intake and the
# escalations of every other replica. The server ends a transaction left idle this long (seconds): far above any
# pause between the statements of one of ours (milliseconds), far below the leader lock's takeover (Leader). A
# replica waiting for a lock gives up after LOCK_WAIT, with an error that names the lock, long enough to outlast a
# frozen holder being ended, and before the statement's own limit (`wait`) cuts it off with no reason.
IDLE_IN_TRANSACTION = 5.0
LOCK_WAIT = 10.0
LOCK_NOT_AVAILABLE, IDLE_IN_TRANSACTION_ENDED = "55P03", "25P03"  # PostgreSQL's SQLSTATEs for the two


def _bound_long_keys(conn: Connection) -> None:
    """Version 4: group keys and fingerprints over bot.alerts.MAX_KEY characters, stored as they came before, become
    what intake now makes of them (bounded_key), so that the next alert of such a key finds its open incident."""
    from bot.alerts import MAX_KEY, bounded_key
    from storage.models import AlertRecord, Incident

    for table, column in ((Incident.__table__, "group_key"), (AlertRecord.__table__, "fingerprint")):
        col = table.c[column]
        rows = conn.execute(select(table.c.id, col).where(func.length(col) > MAX_KEY)).all()
        for row_id, key in rows:
            conn.execute(table.update().where(table.c.id == row_id).values({column: bounded_key(key)}))
        if rows:
            log.info("upgrade: %d long %s value(s) in %s shortened as intake now keeps them", len(rows), column,
                     table.name)


def _index_alerts_by_incident(conn: Connection) -> None:
    """Version 5: an index of alerts by incident. Without it, listing an incident's alerts, and the check a reopen
    makes for its alerts firing in a later incident, read the whole alerts table (create_all makes it only with the
    table, for a new store)."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_alerts_incident ON alerts (incident_id)"))


# version -> what rewrites the rows (or adds the indexes) for it (after its columns)
DATA_MIGRATIONS: dict[int, Callable[[Connection], None]] = {4: _bound_long_keys, 5: _index_alerts_by_incident}


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a driver error (wrapped by SQLAlchemy or not); None for anything else."""
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def lock_not_granted(exc: BaseException) -> bool:
    """Another transaction held what the work needed for longer than it may wait: a lock not granted within LOCK_WAIT
    (PostgreSQL), the database still locked by another connection's write transaction after the busy timeout (SQLite,
    "database is locked"). The work's transaction was rolled back: nothing of it was stored."""
    if sqlstate(exc) == LOCK_NOT_AVAILABLE:
        return True
    orig = getattr(exc, "orig", exc)  # (the driver's error, under SQLAlchemy's)
    return isinstance(orig, sqlite3.Error) and (getattr(orig, "sqlite_errorcode", 0) & 0xFF) in SQLITE_BUSY_CODES


def waited_in_vain(exc: BaseException) -> bool:
    """The database did not let the work through in time: a lock not granted (lock_not_granted), or the transaction
    ended for being left idle (this process paused). Like an outage, nothing was stored: senders get 503."""
    return lock_not_granted(exc) or sqlstate(exc) == IDLE_IN_TRANSACTION_ENDED or (
        "idle-in-transaction timeout" in str(exc))


def store_unavailable(exc: BaseException) -> bool:
    """The database could not do the work now (down, unreachable, locked past its wait, full): nothing of it was
    stored, and the same work may well go through later. Not a fault of the work itself."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout  # no connection free in the pool within its wait

    if isinstance(exc, (OperationalError, InterfaceError, ConnectionError, OSError, asyncio.TimeoutError, PoolTimeout)):
        return True
    return waited_in_vain(exc) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def busy_store(exc: BaseException) -> str | None:
    """Why the store turned work away for being busy (lock_not_granted), in explain_failure's words for the log; None
    for any other failure. A person's click or command that met it is told so, and that nothing was changed."""
    return explain_failure(exc) if lock_not_granted(exc) else None


def explain_failure(exc: BaseException, wait: float | None = None) -> str:
    """A database failure as a log line or a row's last_error says it: its type, and what it likely means when the
    driver says nothing (asyncpg's statement limit raises a bare TimeoutError) or only the server's words."""
    cause = getattr(getattr(exc, "orig", None), "__cause__", None)  # the driver's own error, under SQLAlchemy's
    name = type(cause if isinstance(cause, Exception) else exc).__name__
    code = sqlstate(exc)
    if code == LOCK_NOT_AVAILABLE:
        return (f"{name}: a lock was not granted within {LOCK_WAIT:g} s (held by another replica's transaction: is "
                "one stuck or very slow?)")
    if lock_not_granted(exc):  # (SQLite's: PostgreSQL's has its SQLSTATE)
        return (f"{name}: the database stayed locked for {SQLITE_BUSY_TIMEOUT_MS / 1000:g} s (another process's write "
                "transaction: a chatops command, or one stuck?)")
    if code == IDLE_IN_TRANSACTION_ENDED or "idle-in-transaction timeout" in str(exc):
        return (f"{name}: the database ended this replica's transaction, left idle in a transaction for over "
                f"{IDLE_IN_TRANSACTION:g} s (was this process paused or its event loop stuck?)")
    if "connection is closed" in str(exc) or "ConnectionDoesNotExist" in str(exc):  # (its reason went with it)
        return (f"{name}: the database connection was closed (the database restarted, or it ended this replica's "
                f"transaction for being left idle over {IDLE_IN_TRANSACTION:g} s: was this process paused?)")
    if isinstance(exc, TimeoutError):
        within = f" within {wait:g} s" if wait is not None else ""
        return f"{name}: no answer from the database{within} (down, overloaded, or a lock held by another replica?)"
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # (the first line: not the SQL)
    return f"{name}: {said}" if said else name


SESSION_LIMITS = {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION, "lock_timeout": LOCK_WAIT}


async def session_limits_missing(conn: AsyncConnection) -> tuple[str, list[str]]:
    """The server-side limits (SESSION_LIMITS) this PostgreSQL connection runs without (set to 0, off), and the role
    it runs as.

    They travel as startup parameters (asyncpg's server_settings). A pooler in between may drop them: PgBouncer
    refuses a startup parameter it does not know, unless `ignore_startup_parameters` lists it, and then it ignores
    it. The bot still works without them, but a replica frozen inside a transaction stalls the others again."""
    role = (await conn.execute(text("SELECT current_user"))).scalar_one()
    off = (await conn.execute(text("SELECT name FROM pg_settings WHERE name = ANY(:names) AND setting = '0' "
                                   "ORDER BY name"), {"names": list(SESSION_LIMITS)})).scalars().all()
    return role, list(off)


def limits_missing_message(role: str, off: list[str]) -> str:
    """What to do about connections without the bot's limits: set them on the bot's role, which any pooler keeps."""
    quoted = role.replace('"', '""')
    wanted = "; ".join(f"ALTER ROLE \"{quoted}\" SET {name} = '{int(SESSION_LIMITS[name] * 1000)}ms'" for name in off)
    return (f"PostgreSQL: the bot's connections run with {' and '.join(off)} off: a pooler between the bot and the "
            "server (PgBouncer's ignore_startup_parameters, say) dropped the values the bot asks for, so a replica "
            f"frozen inside a transaction would stall the others until it runs again. Set them on the bot's role: "
            f"{wanted}")


class SchemaTooNew(RuntimeError):
    pass


class SchemaTooOld(RuntimeError):
    """The store is at an older schema version than this code's, and was left so (start(upgrade=False)): upgrading it
    is for the bot that starts on it, not for a command run beside an older bot still using it."""

    def __init__(self, url: str, found: int | None, needed: int):
        self.found, self.needed = found, needed
        super().__init__(f"the database at {url} has schema version {found}; this chatops needs {needed}")


class StoreReplaced(OSError):
    """The SQLite file the bot opened is no longer at its path: the store is unavailable (senders get 503)."""


class DiskFull(OSError):
    """The disk holding the SQLite file has no room left for a write: intake answers 503, nothing is recorded."""


DISK_LOW = 1 << 20  # bytes: less free than this on a SQLite file's disk, and the store is not ready


def out_of_space(said: str) -> bool:
    """Whether a failure's words (the driver's, as logged) say the disk is full."""
    return any(words in said for words in ("database or disk is full", "No space left on device", "SQLITE_FULL"))


def room_problem(path: str) -> str | None:
    """"the disk holding PATH is full (N bytes free)" when less than DISK_LOW is free where the SQLite file `path` is
    (or would be), else None. Root may use the blocks kept for root, as SQLite running as root does."""
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:  # (the file's own checks say what is wrong with its path)
        return None
    free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
    return f"the disk holding {path} is full ({free:,} bytes free)" if free < DISK_LOW else None


class Database:
    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False, wait: float | None = None):
        """`wait` (PostgreSQL): seconds a connection, a statement or a free connection of the pool may take before
        the work fails as the database being unavailable (the bot answers senders 503), and the server ends a
        transaction left idle (IDLE_IN_TRANSACTION) and a lock wait (LOCK_WAIT); None: the drivers' own limits (60 s
        to connect, none for a statement), for the command line's long reads."""
        self.url = url
        self.schema = schema
        self.wait = wait
        self.dialect = make_url(url).get_backend_name()
        self._start_connect: dict[str, Any] | None = None
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "postgresql":
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            kwargs["pool_pre_ping"] = True
            connect: dict[str, Any] = {}
            if schema:
                connect["server_settings"] = {"search_path": schema}
            if wait is not None:
                # start() waits its turn behind other replicas (the init lock, a migration): no limit on its
                # statements there; connecting is limited as everywhere (a server that takes the connection and never
                # answers is tried again at start, see bot.server, rather than waited for asyncpg's whole minute)
                self._start_connect = {**connect, "timeout": wait}
                connect.update(timeout=wait, command_timeout=wait)
                kwargs["pool_timeout"] = wait
                # Server-side: a frozen replica's transaction is ended, and what it locked freed (see
                # IDLE_IN_TRANSACTION). The leader lock's connection idles outside any transaction: not ended.
                connect["server_settings"] = {
                    **connect.get("server_settings", {}),
                    "idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION * 1000)),
                    "lock_timeout": str(int(min(LOCK_WAIT, wait) * 1000)),
                }
            if connect:
                kwargs["connect_args"] = connect
        elif self.dialect == "sqlite":
            kwargs["pool_size"] = 5
            kwargs["max_overflow"] = 10
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._read_engine: AsyncEngine | None = None
        if self.dialect == "sqlite":
            _sqlite_hooks(self.engine)
            # Reads begin deferred: they see a snapshot and never queue behind (or block) the writers,
            # whose transactions begin IMMEDIATE. Write only through transaction() / run_transaction().
            self._read_engine = create_async_engine(url, **kwargs)
            _sqlite_hooks(self._read_engine, begin="BEGIN")
        self._write_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.sessions = async_sessionmaker(self._read_engine or self.engine, expire_on_commit=False)
        self._writer: tuple[Engine, ThreadPoolExecutor] | None = None
        self._writer_conn: Connection | None = None  # the writer thread's connection, kept between transactions
        if is_sqlite_file_url(url):
            self._writer = (sqlite_writer_engine(url),
                            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer"))
        self._reader: tuple[Engine, ThreadPoolExecutor] | None = None  # read_row's, made when first used
        self._file_id: tuple[int, int] | None = None  # a SQLite file's (device, inode) once started (see ping)
        self._file_path = ""
        self._replaced_said = False
        self.out_of_space = False  # a write failed for want of disk space since the last one that worked (intake's)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def is_sqlite_file(self) -> bool:
        """A SQLite database in a file (not in memory): the one kind a writer process can share."""
        return self._writer is not None

    @property
    def writes_in_thread(self) -> bool:
        """run_transaction() runs in the dedicated SQLite writer thread (not on the event loop)."""
        return self._writer is not None

    async def lock_for_transaction(self, session: AsyncSession, name: str) -> None:
        """Queue behind any other transaction that took the lock `name`, until this one ends (PostgreSQL: an
        advisory transaction lock; SQLite's write transactions run one at a time already)."""
        if self.is_postgres:  # per schema: bots sharing a server in schemas of their own do not queue on each other
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:n, 0))"),
                                  {"n": f"{self.schema or 'public'}:{name}"})

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on success, roll back on any error. StoreReplaced before it begins if the SQLite
        file is not the one opened (check_file): what it wrote would be lost."""
        self.check_file()
        async with self._write_sessions() as session, session.begin():
            yield session

    async def run_transaction(self, work: Callable[[Connection], T]) -> T:
        """Run `work(connection)` as one transaction of Core statements: commit on success, roll back on error.

        On PostgreSQL it runs on the event loop through asyncpg. On a SQLite file it
        runs whole in one dedicated writer thread with the synchronous driver: the
        async driver hands every statement (and every cursor call) to its own
        thread and back, about 0.4 ms of overhead a statement, which is most of a
        batch's cost. One thread and one connection (kept open between transactions; a new one after a
        transaction that failed) keep writes in order. StoreReplaced as transaction() says.
        """
        self.check_file()
        if self._writer is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)
        return await asyncio.get_running_loop().run_in_executor(self._writer[1], self._run_sync, work)

    def _run_sync(self, work: Callable[[Connection], T]) -> T:
        assert self._writer is not None
        conn = self._writer_conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._writer_conn = self._writer[0].connect()
        try:
            with conn.begin():
                return work(conn)
        except BaseException:
            self._writer_conn = None  # the next transaction gets a fresh connection
            conn.close()
            raise

    async def start(self, *, upgrade: bool = True) -> None:
        """Create or upgrade the tables; refuse a schema newer than this code.

        upgrade=False (the command line): write nothing, only check that the store is at this code's schema version;
        SchemaTooOld if it is older. A newer chatops run beside an older bot would otherwise upgrade the store under
        it (the older bot then refuses to restart on it, so there is no rolling back), and a read would need the
        rights to alter tables."""
        if not upgrade:
            await self._check_version()
            self._remember_file()
            return
        engine = self.engine
        if self._start_connect is not None:  # the pool's statement limit would cut the wait for another replica short
            engine = create_async_engine(self.url, poolclass=NullPool, connect_args=self._start_connect)
        try:
            await self._start(engine)
        finally:
            if engine is not self.engine:
                await engine.dispose()
        if self._start_connect is not None:
            async with self.engine.connect() as conn:
                role, off = await session_limits_missing(conn)
            if off:
                log.warning("%s", limits_missing_message(role, off))
        self._remember_file()

    async def _start(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            if self.is_postgres:
                # The lock first: CREATE SCHEMA IF NOT EXISTS is not safe against itself (two replicas starting
                # together on a new schema both try to create it, and one fails on a unique violation).
                await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_INIT_LOCK})
            try:
                if self.is_postgres and self.schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                    await conn.commit()
                await self._create_or_upgrade(conn)
            finally:
                if self.is_postgres:
                    await conn.rollback()  # a failed step leaves the transaction aborted: the unlock needs a new one
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_INIT_LOCK})
                    await conn.commit()

    def _remember_file(self) -> None:
        if self.is_sqlite_file:
            self._file_path = make_url(self.url).database or ""
            stat = os.stat(self._file_path)
            self._file_id = (stat.st_dev, stat.st_ino)

    async def _create_or_upgrade(self, conn: AsyncConnection) -> None:
        await conn.run_sync(SQLModel.metadata.create_all)
        await conn.commit()
        row = (await conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1))).first()
        current = row[0] if row else None
        if current is None:
            await conn.execute(SchemaVersion.__table__.insert().values(id=1, version=SCHEMA_VERSION))
        elif current > SCHEMA_VERSION:
            raise self._too_new(current)
        elif current < SCHEMA_VERSION:
            for version in range(current + 1, SCHEMA_VERSION + 1):
                log.info("upgrading the database schema to version %d", version)
                for table, column, sql_type in MIGRATIONS.get(version, []):
                    present = await conn.run_sync(
                        lambda sync, table=table: {c["name"] for c in inspect(sync).get_columns(table)})
                    if column not in present:
                        await conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
                if version in DATA_MIGRATIONS:
                    await conn.run_sync(DATA_MIGRATIONS[version])
            await conn.execute(
                SchemaVersion.__table__.update().where(SchemaVersion.id == 1).values(version=SCHEMA_VERSION)
            )
        head = (await conn.execute(select(AuditHead.id).where(AuditHead.id == 1))).first()
        if head is None:
            await conn.execute(AuditHead.__table__.insert().values(id=1, seq=0, hash=AuditHead.GENESIS))
        await conn.commit()

    def _too_new(self, current: int) -> SchemaTooNew:
        return SchemaTooNew(f"the database at {self.safe_url} has schema version {current}, but this chatops "
                            f"understands up to version {SCHEMA_VERSION}: upgrade chatops, or point storage.url at "
                            "another database")

    async def _check_version(self) -> None:
        """start(upgrade=False): the schema version read in a read transaction (SQLite: deferred, so it queues behind
        no writer), without the lock that orders the replicas' upgrades on PostgreSQL: a read takes no part in them."""
        async with (self._read_engine or self.engine).connect() as conn:
            row = (await conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1))).first()
        current = row[0] if row else None  # none: the first start made the tables and stopped before numbering them
        if current is not None and current > SCHEMA_VERSION:
            raise self._too_new(current)
        if current is None or current < SCHEMA_VERSION:
            raise SchemaTooOld(self.safe_url, current, SCHEMA_VERSION)

    async def ping(self) -> None:
        """Reach the store (raise if it cannot be), check_file() and check_room()."""
        self.check_file()
        self.check_room()
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def check_file(self) -> None:
        """A SQLite file must still be the one opened at start: deleted or replaced under the running bot, its
        connections go on writing into a file nobody else can open. StoreReplaced says so (and the log, once)."""
        if self._file_id is None:
            return
        path = self._file_path
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            problem = (f"the SQLite file {path} was deleted while the bot runs: what it writes now is lost when it "
                       "stops; restore the file from a backup or restart the bot")
        else:
            if (stat.st_dev, stat.st_ino) == self._file_id:
                self._replaced_said = False
                return
            problem = (f"the SQLite file {path} was replaced while the bot runs (it still writes to the one it "
                       "opened); restart the bot to use the new one")
        if not self._replaced_said:
            self._replaced_said = True
            log.error("%s; until then alerts get 503, and nothing is delivered or recorded", problem)
        raise StoreReplaced(problem)

    def check_room(self) -> None:
        """A SQLite file's disk must have room for the next commit: full, every write fails (intake answers 503)
        while a read, and so a ping, still works. DiskFull says so, with what is free, once a write failed for want
        of space (`out_of_space`) while little is free: SQLite still writes in its log's space on a disk with little
        or none left, and intake still took alerts while this said it did not. Freed, it no longer says so, written
        to or not (the failure that set it may be the last write tried: a probe taken out of service gets none)."""
        if self._file_id is None:
            return
        problem = room_problem(self._file_path)
        if problem is not None and self.out_of_space:
            raise DiskFull(f"{problem}: alerts get 503 and nothing is recorded until space is freed there")
        if problem is None:
            self.out_of_space = False

    async def read_row(self, statement: Any) -> Any:
        """The one row of a single read statement (an aggregate: `SELECT min(...)`), for checks that run every
        fraction of a second while nothing happens (the timer beat, the outbox's look).

        On a SQLite file it runs on the synchronous driver in a reader thread of its own: one hop to that thread,
        instead of a session's several hops through the async driver's thread. Elsewhere in a session."""
        if self._writer is None:  # PostgreSQL, or SQLite in memory
            async with self.sessions() as session:
                return (await session.execute(statement)).one()
        if self._reader is None:
            reader = _sync_sqlite_engine(self.url)
            _sqlite_hooks(reader, begin="BEGIN")
            self._reader = (reader, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader"))
        engine = self._reader[0]

        def read() -> Any:
            with engine.connect() as conn:  # the thread's one connection (SingletonThreadPool); rolled back after
                return conn.execute(statement).one()

        return await asyncio.get_running_loop().run_in_executor(self._reader[1], read)

    async def dispose(self) -> None:
        if self._reader is not None:
            reader, reader_thread = self._reader
            self._reader = None
            await asyncio.get_running_loop().run_in_executor(reader_thread, reader.dispose)
            reader_thread.shutdown(wait=False)
        if self._writer is not None:
            writer, thread = self._writer

            def close() -> None:
                if self._writer_conn is not None:
                    self._writer_conn.close()
                    self._writer_conn = None
                close_writer_engine(writer)

            await asyncio.get_running_loop().run_in_executor(thread, close)
        if self._read_engine is not None:
            await self._read_engine.dispose()
        await self.engine.dispose()

    @property
    def safe_url(self) -> str:
        """The URL to show: its password as ***, all of it (what precedes the netloc's last `@`: a password with an
        `@` of its own, not percent-encoded, was cut there by the URL parser, and the rest shown as the host)."""
        scheme, sep, rest = self.url.partition("://")
        rest, mark, query = rest.partition("?")  # (a query may hold an `@`; a password a `/`)
        userinfo, at, host = rest.rpartition("@")
        if not sep or not at:
            return make_url(self.url).render_as_string(hide_password=True)
        user, colon, _ = userinfo.partition(":")
        return f"{scheme}://{user}{':***' if colon else ''}@{host}{mark}{query}"


class Leader:
    """One replica at a time does a job (Telegram polling, chat delivery): a PostgreSQL session advisory lock on a
    connection of its own, held while the process lives; one lock per job and `storage.schema`, so bots that
    share a server in separate schemas do not wait for each other. On SQLite there is a single replica.

    A leader shows it lives by a query on the lock's connection at least every `heartbeat` seconds (its jobs ask
    more often; a beat of its own covers a job waiting on a slow platform). A replica that stopped without
    losing its connection (SIGSTOP, a stalled VM, an event loop stuck) would keep the lock, and the job, for
    good: a follower that finds the holder's connection silent for `takeover_after` seconds ends that
    connection (pg_terminate_backend, allowed between sessions of one role) and takes the lock at its next ask.
    The stopped replica, when it runs again, finds its connection gone and stops leading."""

    heartbeat = 10.0  # seconds
    takeover_after = 60.0  # seconds of silence on the holder's connection before a follower ends it

    def __init__(self, db: Database, name: str):
        self.db, self.name = db, name
        self._conn: AsyncConnection | None = None
        self._asking = asyncio.Lock()  # one question at a time on the lock's connection (the outbox has two loops)
        self._leading = False  # (what to say when asking fails: lost the lock, or could not ask)
        self._unasked = False  # asking failed, and it was said once
        self._beat: asyncio.Task[None] | None = None
        self._looked = -1e9  # (monotonic) when this follower last looked at the holder's connection

    @property
    def _key(self) -> str:
        return f"chatops:{self.db.schema or ''}:{self.name}"

    @property
    def leading(self) -> bool:
        """Whether this process held the lock when it last asked (on SQLite, the single replica, always)."""
        return not self.db.is_postgres or self._leading

    async def held(self) -> bool:
        """True while this process holds the lock (taking it when free)."""
        if not self.db.is_postgres:
            return True
        async with self._asking:
            return await self._held()

    async def _held(self) -> bool:
        kept = self._conn is not None and not self._leading  # a follower's connection, kept from its last question
        try:
            try:
                return await self._ask()
            except Exception:
                if not kept:
                    raise
                # it went between questions (the database restarted, an idle timeout): asked again on a new one, so
                # that a lock free now is taken now
                await self._release()
                return await self._ask()
        except Exception as exc:  # the connection died: the lock went with it
            said = explain_failure(exc, self.db.wait)  # (not its SQL)
            if self._leading:
                log.warning("lost the %s lock (%s); another replica may take it", self.name, said)
            elif not self._unasked:  # said once an outage, not at every question (several a second)
                log.warning("cannot ask for the %s lock (%s); asking again until the database answers", self.name,
                            said)
            self._leading, self._unasked = False, True
            await self._release()
            return False

    async def _ask(self) -> bool:
        """One question on the lock's connection. A follower keeps its connection between questions (its outbox
        loops ask a few times a second: a connection opened for each made hundreds of sessions a minute, and as many
        sockets left in TIME-WAIT) and asks for the lock again on it; the leader's holds the lock."""
        if self._conn is None:
            self._conn = await self.db.engine.connect()
        if self._leading:
            await self._conn.execute(text("SELECT 1"))  # still connected, so still holding it
            await self._conn.commit()
            return True
        got = (await self._conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:n, 0))"),
                                        {"n": self._key})).scalar_one()
        await self._conn.commit()
        if not got:
            self._unasked = False
            await self._take_over_if_silent(self._conn)
            return False
        log.info("this replica leads %s", self.name)
        self._leading, self._unasked = True, False
        if self._beat is None or self._beat.done():
            self._beat = asyncio.create_task(self._beating())
        return True

    async def taken_now(self) -> bool:
        """Take the lock if it is free, once: no wait, no taking it over from a silent holder, no beat. For a
        command that must not run beside any replica (`chatops audit rekey`): False while one leads the job. Held
        until close()."""
        if not self.db.is_postgres:
            return True
        async with self._asking:
            if self._conn is None:
                self._conn = await self.db.engine.connect()
            got = (await self._conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:n, 0))"),
                                            {"n": self._key})).scalar_one()
            await self._conn.commit()
            return bool(got)

    async def _beating(self) -> None:
        """While leading: a sign of life on the lock's connection at least every `heartbeat` seconds."""
        while True:
            await asyncio.sleep(self.heartbeat)
            if not await self.held():
                return

    async def _take_over_if_silent(self, conn: AsyncConnection) -> None:
        """Asked as a follower (at most every `heartbeat` seconds): if the holder's connection has been idle for
        `takeover_after` seconds, its replica is not running; end that connection, so the lock is free at the next
        ask. (pg_locks shows a one-key advisory lock as its two 32-bit halves, objsubid 1.)"""
        if time.monotonic() - self._looked < self.heartbeat:
            return
        self._looked = time.monotonic()
        holder = (await conn.execute(text(
            "SELECT a.pid, EXTRACT(EPOCH FROM clock_timestamp() - a.state_change) "
            "FROM (SELECT hashtextextended(:n, 0) AS k) AS key "
            "JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            " AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid "
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            # (stopped between a question and its commit, it is idle in a transaction: silent all the same)
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')"),
            {"n": self._key})).first()
        await conn.commit()
        if holder is None or holder[1] is None or float(holder[1]) < self.takeover_after:
            return
        pid, silent = holder[0], float(holder[1])
        ended = (await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})).scalar_one()
        await conn.commit()
        if ended:
            log.warning("the replica leading %s has been silent for %.0f s (its database connection, backend %s, "
                        "still holds the lock): ended that connection so that this replica takes over", self.name,
                        silent, pid)

    async def _release(self) -> None:
        self._leading = False  # (a new connection holds nothing until it is granted the lock)
        if self._beat is not None and self._beat is not asyncio.current_task():
            self._beat.cancel()
            self._beat = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.invalidate()  # really close it: back in the pool it would keep the lock
                await conn.close()
            except Exception:  # already broken
                log.debug("closing a broken leader connection failed", exc_info=True)

    async def close(self) -> None:
        await self._release()


def is_sqlite_file_url(url: str) -> bool:
    parsed = make_url(url)
    database = parsed.database
    return (parsed.get_backend_name() == "sqlite" and bool(database) and database != ":memory:"
            and not database.startswith("file:"))


def missing_sqlite_uri_file(url: str) -> str | None:
    """The file a SQLite `file:` URI (`sqlite+aiosqlite:///file:chatops.db?uri=true`) names, if no database is there;
    None if one is, or for any other URL. SQLite itself is asked, reading the URI its own way: it opens the URI in
    mode=rw, which opens a file that is there and never makes one (`mode=rwc`, or none, would make it empty)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not (parsed.database or "").startswith("file:"):
        return None
    (filename, *_), options = SQLiteDialect_pysqlite().create_connect_args(parsed)  # as the engine will open it
    if not options.get("uri"):
        return None
    probe = _uri_in_mode(filename, "rw")
    if probe is None or dict(parse_qsl(urlsplit(filename).query)).get("mode") == "ro":
        return None  # SQLite makes no file for these
    try:
        sqlite3.connect(probe, uri=True).close()
    except sqlite3.Error:
        path = unquote(urlsplit(filename).path)  # (only to name it: one there that cannot be opened is not "missing")
        return None if os.path.exists(path) else path
    return None


def _uri_in_mode(uri: str, mode: str) -> str | None:
    """A SQLite `file:` URI with its mode set to `mode`; None for a database in memory (no file)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if dict(query).get("mode") == "memory" or unquote(parts.path) in ("", ":memory:"):
        return None
    return urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "mode"] + [("mode", mode)])))


STORE_TABLE = "audit_head"  # a database holds the bot's store if it holds this table (made with the rest at start)


def sqlite_file(url: str) -> str | None:
    """The absolute path of the file a SQLite URL names (a plain path or a `file:` URI, read as the engine will open
    it); None for any other URL or a database in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    (filename, *_), options = SQLiteDialect_pysqlite().create_connect_args(parsed)
    if options.get("uri"):
        if _uri_in_mode(filename, "ro") is None:
            return None
        filename = unquote(urlsplit(filename).path)
    return None if filename in ("", ":memory:") else os.path.abspath(filename)


def sqlite_tables(url: str) -> list[str] | None:
    """The tables of the SQLite file `url` names (SQLite's own sqlite_* left out), sorted; read without writing: the
    file is opened read-only (mode=ro), so no journal mode is set, no table made, and a file not there is not made.
    None for any other URL, a database in memory, or a file SQLite cannot read as a database (opening it for real
    says why)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    (filename, *_), options = SQLiteDialect_pysqlite().create_connect_args(parsed)  # as the engine will open it
    if options.get("uri"):  # (its other options, a vfs say, kept)
        probe = _uri_in_mode(filename, "ro")
    else:
        probe = None if filename in ("", ":memory:") else "file:" + quote(filename) + "?mode=ro"
    if probe is None:
        return None
    try:
        conn = sqlite3.connect(probe, uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            names = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
                                 "ESCAPE '\\' ORDER BY name").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return [name for (name,) in names]


def sqlite_writer_engine(url: str) -> Engine:
    """The synchronous (pysqlite) engine that writes a SQLite file: one connection, kept for the engine's life.

    Used by the dedicated writer thread, and by the intake writer process (storage/writer.py), with the same
    pragmas as every other connection and transactions that begin IMMEDIATE."""
    writer = _sync_sqlite_engine(url)
    _sqlite_hooks(writer, autocheckpoint=WAL_BACKSTOP_PAGES)
    checkpointer = WalCheckpointer(writer.url.database or "")
    event.listen(writer, "commit", lambda _conn: checkpointer.committed())
    writer.checkpointer = checkpointer  # type: ignore[attr-defined]  # closed by close_writer_engine
    return writer


def _sync_sqlite_engine(url: str) -> Engine:
    """A SQLite file on the synchronous driver, one connection per thread (its own thread uses it)."""
    return create_engine(make_url(url).set(drivername="sqlite+pysqlite"), poolclass=SingletonThreadPool,
                         connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})


def close_writer_engine(writer: Engine) -> None:
    checkpointer = getattr(writer, "checkpointer", None)
    if checkpointer is not None:
        checkpointer.close()
    writer.dispose()


WAL_BACKSTOP_PAGES = 10_000  # the writer checkpoints inline only if the checkpointer thread falls this far behind


class WalCheckpointer:
    """Checkpoints a SQLite file's write-ahead log from a thread of its own, off the writer's path.

    By default the connection whose commit takes the log past 1,000 pages copies them into the database
    file and syncs it, inside that commit: a hot writer's commit then stalls. The hot writers (the writer
    thread, the intake writer process) checkpoint inline only as a backstop (WAL_BACKSTOP_PAGES); after
    their commits this thread, at most every INTERVAL seconds, runs a PASSIVE checkpoint on a connection
    of its own: it never blocks a writer or a reader, and the sqlite3 module releases the interpreter lock
    while it runs, so it runs on another core. The thread starts with the first commit and sleeps when
    nothing commits.
    """

    INTERVAL = 0.2

    def __init__(self, path: str):
        self.path = path
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.checkpoints = 0  # checkpoints run (for tests and the curious)

    def committed(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
                    self._thread.start()
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        try:
            while True:
                self._wake.wait()
                if self._closed:
                    return
                time.sleep(self.INTERVAL)  # commits in the meantime join this checkpoint
                self._wake.clear()
                if self._closed:  # closed during the sleep: its wake-up was just cleared
                    return
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                               check_same_thread=False)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # the backstop still checkpoints; say why this one did not
                    log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()


def _sqlite_hooks(engine: AsyncEngine | Engine, *, begin: str = "BEGIN IMMEDIATE", autocheckpoint: int | None = None) -> None:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE is ours to issue.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            "PRAGMA foreign_keys=ON",
            *([f"PRAGMA wal_autocheckpoint={autocheckpoint}"] if autocheckpoint is not None else []),
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        driver = conn.connection.dbapi_connection
        if isinstance(driver, sqlite3.Connection):  # the synchronous driver (the hot writers): straight to it
            try:
                driver.execute(begin)
            except sqlite3.Error as exc:  # what exec_driver_sql would raise: callers tell "unavailable" by it
                raise (OperationalError if isinstance(exc, sqlite3.OperationalError) else DBAPIError)(
                    begin, None, exc) from exc
        else:
            conn.exec_driver_sql(begin)

