"""`chatops`: the command line, a composition root like server.py."""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import logging
import math
import os
import pwd
import shutil
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, StatementError
from sqlmodel import SQLModel

from adapters import SETTINGS_MODELS
from bot import logs
from bot.actions import MAX_ID
from bot.config import (EXAMPLE_CONFIG, NO_SECTION, ConfigError, Loaded, check_templates, config_path,
                        load_config)
from bot.incidents import RESOLVED, SEVERITY_BASE, priority
from bot.rotations import first_instant
from bot.tables import ago, counted, printable, table
from bot.view import alert_values, who_did
from storage import queries, report
from storage.queries import LIST_FILTERS, list_status
from storage.audit import AuditLog, Damaged, KeyMismatch
from storage.db import (STORE_TABLE, Database, Leader, SchemaTooNew, SchemaTooOld, is_sqlite_file_url,
                        missing_sqlite_uri_file, sqlite_file, sqlite_tables)
from storage.models import AuditEvent, Incident

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + 13  # (128 + SIGPIPE) the reader of the output left before its end: `| head`


def _load(args: argparse.Namespace) -> Loaded:
    return load_config(_config_path(args), adapter_models=SETTINGS_MODELS)


class NoConfig(Exception):
    """The config named (with -c, in $CHATOPS_CONFIG, or ./app.yaml) is not there: said as where it was named, not
    as a configuration that is invalid."""


class UsageError(Exception):
    """A command's options cannot be acted on: said, exit 2."""


class StoreUrlError(UsageError):
    """storage.url names a store the driver cannot open with it (a port that is no number, an option it does not
    take): check-config refuses the ones known; one that gets past it is said on one line all the same."""

    def __init__(self, url: str, exc: BaseException):
        said = f"{type(exc).__name__}: {exc}"
        userinfo = url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]  # (user:password, as written)
        password = userinfo.partition(":")[2]
        for secret in (url, password, *password.split("@")):  # the driver's message may quote the URL, or its password
            if len(secret) >= 4:  # (or the piece of it it took for a host)
                said = said.replace(secret, "***")
        super().__init__(f"storage.url: the database cannot be opened with this URL ({said}): check storage.url in "
                         "app.yaml, its port and its query options")


def _config_path(args: argparse.Namespace) -> str:
    """The config to read; when it is the example shipped with the bot because none was named or found here, the log
    says so first (a bot on the example's people and channels is a demonstration, not the operator's setup)."""
    path = config_path(args.config)
    if not os.path.exists(path):
        here = "" if os.path.isabs(path) else f", from {os.getcwd()}"
        if args.config:
            raise NoConfig(f"{path}: file not found (named with -c{here}); give -c the path of your app.yaml")
        if os.environ.get("CHATOPS_CONFIG"):
            raise NoConfig(f"{path}: file not found ($CHATOPS_CONFIG names it{here}); set CHATOPS_CONFIG to the path "
                           "of your app.yaml, or pass -c PATH")
        if os.path.lexists(path):
            raise NoConfig(f"{path} in {os.getcwd()} is a link to a file that is not there; mend the link, or pass "
                           "-c PATH or set CHATOPS_CONFIG")
        raise NoConfig(f"{path}: file not found{here}; pass -c PATH or set CHATOPS_CONFIG")
    if path == str(EXAMPLE_CONFIG) and not args.config and not os.environ.get("CHATOPS_CONFIG"):
        logging.getLogger("chatops.config").warning(
            "no -c, no $CHATOPS_CONFIG and no ./app.yaml: using the example config shipped with the bot, %s "
            "(its people, channels and routes are examples); give your own with -c PATH or CHATOPS_CONFIG", path)
    return path


def _iso(value: str) -> datetime:
    """An ISO 8601 time; one without an offset stays naive until `_local` places it in the bot's time zone."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r} (e.g. 2026-11-25T09:00:00+01:00)") from None
    if not 1970 <= parsed.year <= 9000:
        raise argparse.ArgumentTypeError(f"{value!r} is out of range (years 1970 to 9000)")
    return parsed


def _local(value: datetime | None, loaded: Loaded) -> datetime | None:
    """A time typed without an offset is wall time in app.yaml's `timezone` (where the bot shows times)."""
    if value is None or value.tzinfo is not None:
        return value
    return first_instant(value, ZoneInfo(loaded.config.timezone))


def _count(low: int, high: int, *, marks: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (an id or a limit the database can hold), after any of
    the leading `marks` (an id as `incidents list` prints it, and chat commands take it: #5)."""
    def parse(value: str) -> int:
        try:
            number = int(value.lstrip(marks))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is out of range ({low} to {high})")
        return number
    return parse


_ID, _LIMIT = _count(1, MAX_ID, marks="#"), _count(1, 1_000_000)  # ids: what an INTEGER column holds on PostgreSQL


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    try:
        path = _config_path(args)
    except NoConfig as exc:  # where the problems of a config are said
        print(exc, file=out)
        return EXIT_USAGE
    try:
        loaded = load_config(path, adapter_models=SETTINGS_MODELS)
        check_templates(loaded)
    except ConfigError as exc:
        for where, problem in exc.problems:
            print(f"{where}: {problem}" if where else problem, file=out)
        return EXIT_USAGE
    _warn(loaded)
    try:
        missing = _missing_file(loaded)
    except StoreUrlError:  # (said when a command opens it)
        missing = None
    if missing is not None and not missing.parent.exists():  # (serve makes the file, not its folder)
        print(f"note: storage.url: the folder {missing.parent} does not exist here, so `chatops serve` started here "
              "would not start: create it, or give storage.url a file in a folder that exists", file=sys.stderr)
    for name, why in loaded.adapters_off.items():
        print(f"note: adapters.{name} is off: {why}", file=sys.stderr)
    for source, why in loaded.sources_off.items():
        print(f"note: source {source} is off: {why}", file=sys.stderr)
    print(loaded.summary(), file=out)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from bot.server import serve

    loaded = _load(args)
    check_templates(loaded)  # a broken one would fail every card it draws (the outbox gives them up)
    return asyncio.run(serve(loaded))


def _missing_file(loaded: Loaded) -> Path | None:
    """The SQLite file storage.url names, if it does not exist (a plain path, or a file: URI as SQLite reads it)."""
    url = loaded.config.storage.url
    try:
        if not is_sqlite_file_url(url):
            missing = missing_sqlite_uri_file(url)
            return None if missing is None else Path(missing)
        path = Path(make_url(url).database or "")
    except _URL_ERRORS as exc:
        raise StoreUrlError(url, exc) from None
    return None if path.exists() else path


# What a URL the driver cannot take raises, from parsing it to the first connection (an option passed to
# asyncpg.connect() it does not know is a TypeError; a port that is no number, a ValueError).
_URL_ERRORS = (ArgumentError, ValueError, TypeError, OverflowError)


async def _with_db(loaded: Loaded, work: Callable[[Database], Awaitable[int]],
                   without_store: Callable[[], Awaitable[int]] | None = None, *, no_store: int = EXIT_USAGE) -> int:
    """Run `work` on the configured store. A SQLite file that does not exist is refused (reading commands would
    otherwise make an empty one and report that nothing happened). `no_store`: the exit status when there is no store
    to work on (not there, not the bot's, cannot be opened)."""
    if (path := _missing_file(loaded)) is not None:
        folder = path.resolve().parent  # `chatops serve` makes a store only in a folder that is there
        if path.is_absolute() and not folder.is_dir():
            said = (f"no database at {path.resolve()}, and the folder {folder} does not exist: check storage.url in "
                    "app.yaml (or create the folder; starting the bot once, chatops serve, then makes a new, empty "
                    "store)")
        elif path.is_absolute():
            said = (f"no database at {path.resolve()}: check storage.url in app.yaml; starting the bot once (chatops "
                    "serve) makes a new, empty store")
        else:
            said = (f"no database at {path.resolve()} (a relative path starts at the current directory, "
                    f"{os.getcwd()}): run this where the bot runs, or give storage.url an absolute path in app.yaml; "
                    + ("starting the bot once (chatops serve) makes a new, empty store" if folder.is_dir() else
                       f"the folder {folder} does not exist either"))
        print(said, file=sys.stderr)
        return no_store
    try:
        db = Database(loaded.config.storage.url, schema=loaded.config.storage.schema_name)
    except _URL_ERRORS as exc:
        raise StoreUrlError(loaded.config.storage.url, exc) from None

    async def unavailable(said: str) -> int:  # said, and answered without the store where the command can
        if without_store is not None:
            print(f"{said}; overrides are not shown", file=sys.stderr)
            return await without_store()
        print(said, file=sys.stderr)
        return no_store

    try:
        try:
            if db.is_postgres and not await _has_store(db):  # start() would create it, empty, and all would look fine
                where = f"schema {db.schema!r}" if db.schema else "the server's search_path"
                return await unavailable(
                    f"no chatops store in {where} at {db.safe_url}: run this against the database the bot uses "
                    "(storage.url, storage.schema in app.yaml), or start the bot once (chatops serve) to create it")
            if not db.is_postgres and (tables := await asyncio.to_thread(sqlite_tables, db.url)) is not None \
                    and STORE_TABLE not in tables:  # the same for a SQLite file that is there: another's, or empty
                if tables:
                    held = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
                    said = (f"it holds other tables ({held}), not the bot's: check storage.url in app.yaml (this "
                            "looks like another program's database)")
                else:
                    said = ("it holds no tables: check storage.url in app.yaml; starting the bot once (chatops serve) "
                            "makes a new, empty store in it")
                return await unavailable(f"no chatops store in the SQLite file {sqlite_file(db.url)}: {said}")
            if (said := await _opened(db)) is not None:
                return await unavailable(said)
            if missing := await _missing_tables(db):  # every read of one would fail, said as SQLAlchemy says it
                return await unavailable(
                    f"the store at {db.safe_url} lacks the bot's table{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)}: it was damaged (a table dropped), or it is not the bot's store: check "
                    "storage.url in app.yaml, or restore the store from a backup")
        except (DBAPIError, OSError) as exc:  # not there, not a database, refused: say so, as `serve` does
            reason = getattr(exc, "orig", None) or exc
            return await unavailable(f"cannot open the database at {db.safe_url}: {reason}; check storage.url in "
                                     "app.yaml (and, for PostgreSQL, that the server is running)")
        except _URL_ERRORS as exc:  # the driver refused the URL itself, before any row was read
            raise StoreUrlError(db.url, exc) from None
        try:
            return await work(db)
        except DBAPIError as exc:  # the database failed a read (the server went away, say): one line, as at opening
            from bot.server import error_said

            return await unavailable(f"cannot read the database at {db.safe_url}: {error_said(exc)}; check that it "
                                     "is up and storage.url in app.yaml, and run this again")
        except (ValueError, TypeError, StatementError) as exc:  # a row the store hands back that cannot be decoded
            from bot.server import error_said

            print(f"a row in the store cannot be read ({error_said(exc)[:200]}): it was damaged; "
                  "`chatops audit verify` names a damaged audit event", file=sys.stderr)
            return EXIT_FAILED
    finally:
        await db.dispose()


async def _missing_tables(db: Database) -> list[str]:
    """The bot's tables that a store at this code's schema version lacks (its first start made every one): a table
    dropped, or a store damaged."""
    wanted = sorted(SQLModel.metadata.tables)
    if not db.is_postgres:
        tables = await asyncio.to_thread(sqlite_tables, db.url)
        return [] if tables is None else [name for name in wanted if name not in tables]
    async with db.engine.connect() as conn:  # (in storage.schema, else the search_path, as _has_store looks)
        return [name for name in wanted
                if (await conn.execute(text("SELECT to_regclass(:name)"), {"name": name})).scalar() is None]


async def _opened(db: Database) -> str | None:
    """Open the store without creating or upgrading it (only `chatops serve` does: see Database.start); SchemaTooOld,
    said by main(), for one at an older version. None once open; why not, for a SQLite store this user cannot write
    beside (what else fails goes to the caller, said as a storage.url to check)."""
    try:
        await db.start(upgrade=False)
    except (DBAPIError, OSError) as exc:
        if (said := _not_writable(db, exc)) is None:
            raise
        return said
    return None


def _not_writable(db: Database, exc: Exception) -> str | None:
    """SQLite writes beside its file even to read it (in WAL mode, the -shm index), so a store of the bot's user,
    opened by another, fails as "attempt to write a readonly database": what this user cannot write there, and as
    whom to run; None when that is not why."""
    path = sqlite_file(db.url)
    reason = str(getattr(exc, "orig", None) or exc)
    if path is None or not ("readonly database" in reason or "unable to open database file" in reason):
        return None
    folder = os.path.dirname(path)
    named = [f"the SQLite file {path}"] if os.path.exists(path) and not os.access(path, os.W_OK) else []
    if not os.access(folder, os.W_OK | os.X_OK):
        named.append(f"its folder {folder}" if named else f"the folder {folder} of the SQLite file {path}")
    named += [path + end for end in ("-wal", "-shm")
              if os.path.exists(path + end) and not os.access(path + end, os.W_OK)]
    if not named:
        return None

    def user(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"

    owner = user(os.stat(path).st_uid) if os.path.exists(path) else user(os.stat(folder).st_uid)
    things = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return (f"cannot open the database at {db.safe_url}: {things} {'is' if len(named) == 1 else 'are'} not writable by "
            f"this user ({user(os.geteuid())}, uid {os.geteuid()}), and SQLite writes beside the file even to read it: "
            f"run this as the bot's user ({owner}, who owns the {'file' if os.path.exists(path) else 'folder'})")


async def _has_store(db: Database) -> bool:
    """PostgreSQL: whether the bot's tables are there (in the configured schema, else the search_path)."""
    async with db.engine.connect() as conn:
        return (await conn.execute(text(f"SELECT to_regclass('{STORE_TABLE}')"))).scalar() is not None


def _old_keys(names: list[str] | None) -> dict[str, str]:
    """The keys named with --old-key-env, by the variable that holds each; UsageError for one not set."""
    keys = {}
    for name in names or []:
        key = os.environ.get(name)
        if not key:
            raise UsageError(f"--old-key-env {name}: the environment variable {name} is "
                             f"{'empty' if name in os.environ else 'not set'}; set it to the old audit key")
        keys[name] = key
    return keys


def _warn(loaded: Loaded) -> None:
    """The config's warnings, on stderr, as check-config prints them and serve logs them."""
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_audit_verify(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)
    audit = AuditLog(loaded.config.audit.hmac_key)
    old_keys = _old_keys(args.old_key_env)

    async def work(db: Database) -> int:
        async with db.sessions() as session:
            verdict = await audit.verify(session, old_keys=old_keys)
        if verdict.ok:
            partly = (f"; {verdict.unchecked} of them only for continuity, written with an earlier key not given "
                      "(below)" if verdict.unchecked else "")
            print(f"audit chain intact: {verdict.checked} events, head {verdict.head_hash}{partly}", file=out)
            for note in verdict.notes:
                print(f"  {note}", file=out)
            return EXIT_OK
        # The config's warnings with a chain that does not verify (an audit.hmac_key whose variable is not set here
        # is one), not at every run: a cron job mails what a command prints.
        _warn(loaded)
        # Checked with a key that is not the chain's: no finding either way. Said so when that is proven, or when
        # the key's variable is not set here (a cron job's environment); else no event verifying may as well be
        # every event modified, which is a finding (exit 1), said with the other possibility.
        unset = any(w.startswith("audit.hmac_key: ") and w.endswith((" is not set", " is empty"))
                    for w in loaded.warnings)
        if verdict.wrong_key is not None and (not verdict.key_unproven or unset):
            print(printable(f"audit chain not checked: {verdict.wrong_key}"), file=sys.stderr)
            return EXIT_USAGE
        also = f" ({verdict.wrong_key})" if verdict.wrong_key is not None else ""
        print(printable(f"audit chain broken after {verdict.checked} good events: {verdict.problem}{also}"), file=out)
        return EXIT_FAILED

    # Exit 1 says the chain is broken: a store that is not there or cannot be opened, or a chain checked with a key
    # that is not its own (a cron job without the key's variable), was not checked at all (2), so that a monitor can
    # tell tampering from a wrong path, a database that is down or a missing key.
    return asyncio.run(_with_db(loaded, work))


def cmd_audit_rekey(args: argparse.Namespace, out: TextIO) -> int:
    """Introduce or change the audit chain's key on purpose: verified with the old key, then an `audit.rekeyed`
    event hashed with the new one (audit.hmac_key), recording where the old key ended and a fingerprint of each."""
    import getpass

    from bot.model import Actor
    from bot.server import NotAStore, StoreInUse, hold_store

    loaded = _load(args)
    new_key = loaded.config.audit.hmac_key
    if not new_key:
        print("audit.hmac_key is not set: set it to the new key (in app.yaml, or the environment variable it reads) "
              "and run this again", file=sys.stderr)
        return EXIT_USAGE
    old_key = None if args.from_no_key else _old_keys([args.old_key_env])[args.old_key_env]
    new, old = AuditLog(new_key), AuditLog(old_key)
    if old.fingerprint == new.fingerprint:
        print(f"the key in {args.old_key_env} is audit.hmac_key itself: give the key the chain is written with now "
              "in --old-key-env, and the new one in audit.hmac_key", file=sys.stderr)
        return EXIT_USAGE
    old_said = f"the old key ({old.fingerprint}, fingerprint)" if old_key else "no key"

    async def work(db: Database) -> int:
        lock = Leader(db, "outbox")  # what a running replica holds, or one of them (PostgreSQL)
        try:
            if not await lock.taken_now():
                print("a bot is running on this store (a replica holds its outbox lock): stop every replica first; "
                      "the key changes only while the bot is stopped", file=sys.stderr)
                return EXIT_FAILED
            return await rekeyed(db)
        finally:
            await lock.close()

    async def rekeyed(db: Database) -> int:
        async with db.sessions() as session:
            verdict = await old.verify(session)
            if not verdict.ok and old_key and (await AuditLog(None).verify(session)).ok:
                print(f"the key was not changed: this chain was written without a key, not with the key in "
                      f"{args.old_key_env}: use --from-no-key", file=sys.stderr)
                return EXIT_USAGE
            if not verdict.ok and not old_key and (await new.verify(session)).ok:
                # (--from-no-key on a chain audit.hmac_key writes already: it read as an event modified, exit 1)
                print("the key was not changed: this chain is written with audit.hmac_key already (`chatops audit "
                      "verify` checks it); nothing to do", file=sys.stderr)
                return EXIT_USAGE
        if verdict.ok and not verdict.checked:
            print("the audit chain is empty: nothing to change; the bot writes it with audit.hmac_key from its first "
                  "event", file=out)
            return EXIT_OK
        user = getpass.getuser()
        try:
            async with db.transaction() as session:
                row = await new.rekey(session, old, Actor("cli", user, user), datetime.now(UTC), verdict)
        except KeyMismatch as exc:
            print(printable(f"the key was not changed: {exc}"), file=sys.stderr)
            return EXIT_FAILED
        seq = row["seq"]
        before = ("as plain SHA-256, as they were written" if not old_key else
                  f"only when given the old key (--old-key-env {args.old_key_env}); without it, only for continuity")
        if len(verdict.notes) > 1:  # the key changed before: the events before this change, stretch by stretch
            written = "the events before it, as checked now with the old key:\n" + "".join(
                f"  {note}\n" for note in verdict.notes)
            before = f"written with {old_said} " + before
        else:
            written = f"events #1-#{seq - 1} were written with {old_said} and verify with it, "
        print(f"the audit key changed at event #{seq} (audit.rekeyed): {written}those from #{seq} on are hashed "
              f"with audit.hmac_key ({new.fingerprint}, fingerprint). Start every replica of the bot, and run chatops "
              f"from every shell, with the new key. `chatops audit verify` checks the events before #{seq} {before}",
              file=out)
        return EXIT_OK

    held = None
    if _missing_file(loaded) is None:  # a SQLite store: the running bot holds it, and must be stopped first
        try:
            held = hold_store(loaded.config.storage.url)
        except StoreInUse as exc:
            print(f"{exc}: the key changes only while the bot is stopped", file=sys.stderr)
            return EXIT_FAILED
        except NotAStore as exc:  # (another program's file: nothing made beside it)
            print(exc, file=sys.stderr)
            return EXIT_FAILED
    try:
        return asyncio.run(_with_db(loaded, work))
    finally:
        if held is not None:
            held.close()


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: one that starts like a formula (=, +, -, @, a tab or CR) gets a leading
    quote, as OWASP advises for CSV injection; alert text, which anyone who can send alerts writes, lands here."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


CSV_COLUMNS = ["seq", "at", "actor_person", "actor_platform", "actor_user_id", "action",
               "subject_type", "subject_id", "incident_id", "details", "prev_hash", "hash", "damaged"]
DAMAGE_SAID = 10  # damaged events named one by one on stderr; past these, a count at the end


def _event_dict(event: AuditEvent, damaged: str | None) -> dict[str, Any]:
    """An event as export writes it in JSON lines; a damaged one with what could be read (a column that could not
    as stored) and a `damaged` key that says which."""
    said = event.as_dict() if damaged is None else {
        "seq": event.seq, "at": event.at.isoformat() if isinstance(event.at, datetime) else event.at,
        "actor": {"person": event.actor_person, "platform": event.actor_platform, "user_id": event.actor_user_id},
        "action": event.action, "subject": {"type": event.subject_type, "id": event.subject_id},
        "incident_id": event.incident_id, "details": event.details, "prev_hash": event.prev_hash, "hash": event.hash,
        "damaged": damaged}
    return said


def cmd_audit_export(args: argparse.Namespace, out: TextIO) -> int:
    """Every event that can be read; a damaged one (the moment to export is right after `audit verify` named it)
    with what can be read of it, marked, said on stderr, and exit 1 at the end."""
    loaded = _load(args)

    async def work(db: Database) -> int:
        writer = csv.writer(out) if args.format == "csv" else None
        damaged = written = 0
        async with db.sessions() as session:
            async for item in AuditLog.events(session, since=_local(args.since, loaded), incident_id=args.incident):
                if writer and not written:
                    writer.writerow(CSV_COLUMNS)
                written += 1
                event, problem = (item.event, item.problem) if isinstance(item, Damaged) else (item, None)
                if problem is not None:
                    damaged += 1
                    if damaged <= DAMAGE_SAID:
                        print(printable(f"audit event #{event.seq} is damaged, {problem}: exported with what can be "
                                        "read of it, marked damaged"), file=sys.stderr)
                if writer:
                    row: dict[str, Any] = {column: getattr(event, column) for column in CSV_COLUMNS[:-1]}
                    row["at"] = event.at.isoformat() if isinstance(event.at, datetime) else event.at
                    row["details"] = (json.dumps(event.details, sort_keys=True, ensure_ascii=False)
                                      if problem is None or isinstance(event.details, dict) else event.details)
                    row["damaged"] = problem or ""
                    writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
                else:
                    out.write(json.dumps(_event_dict(event, problem), ensure_ascii=False, default=str) + "\n")
            # No events of an incident that is not there: a mistyped id (exit 1, as `incidents show` says it, and
            # nothing on stdout), where an empty export read as "nothing happened to it".
            if not written and args.incident is not None and await queries.get_incident(session, args.incident) is None:
                print(f"no incident #{args.incident}; `chatops incidents list` shows the ones there are",
                      file=sys.stderr)
                return EXIT_FAILED
        if writer and not written:
            writer.writerow(CSV_COLUMNS)
        if damaged:
            print(f"{counted(damaged, 'damaged audit event')} exported with what can be read of them (marked damaged); "
                  "`chatops audit verify` checks the chain", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return asyncio.run(_with_db(loaded, work))


def _incident_json(inc: Incident, prio: int | None) -> dict[str, Any]:
    said = _damage(inc)
    return {
        "id": inc.id, "status": inc.status, "severity": inc.severity, "priority": prio, "title": inc.title,
        "alert_count": inc.alert_count, "firing": inc.firing_count, "sources": inc.sources, "channels": inc.channels,
        "silenced": inc.silenced, "opened_at": inc.opened_at.isoformat(), "last_seen": inc.last_seen.isoformat(),
        "acknowledged_by": inc.acknowledged_by,
        "acknowledged_at": inc.acknowledged_at.isoformat() if inc.acknowledged_at else None,
        "resolved_at": inc.resolved_at.isoformat() if inc.resolved_at else None,
        "resolved_by": inc.resolved_by, "previous_id": inc.previous_id, "labels": inc.labels, "links": inc.links,
    } | ({"damaged": said} if said else {})


def _damage(inc: Incident) -> str | None:
    """What is wrong with an incident's row that the listings show it all the same (marked, named on stderr, exit 1),
    as they do a damaged audit event: a severity the bot does not know (only SQLite lets one in)."""
    if inc.severity in SEVERITY_BASE:
        return None
    return printable(f"incident #{inc.id} is damaged: its severity {inc.severity!r} is not one the bot knows "
                     f"({', '.join(SEVERITY_BASE)}), so it has no priority; its row was changed outside the bot, or "
                     "the store was damaged")


def _current_priority(inc: Incident, now: datetime) -> int | None:
    """None for a damaged row (see _damage)."""
    if _damage(inc) is not None:
        return None
    return priority(severity=inc.severity, duplicates=inc.notifications - 1, source_count=len(inc.sources),
                    critical_asset=inc.critical_asset, opened_at=inc.opened_at, now=now)


def _fit(args: argparse.Namespace, out: TextIO) -> int | None:
    """The width tables fit: the terminal's (COLUMNS when set, as shutil reads it), so that a row is one line of it;
    none with --wide, or when the output is not a terminal and COLUMNS is not set (a file, grep: whole values, as
    `ps` and `systemctl` write them there)."""
    if getattr(args, "wide", False):
        return None
    try:
        terminal = out.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return shutil.get_terminal_size().columns if terminal or os.environ.get("COLUMNS") else None


def cmd_incidents_list(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)

    async def work(db: Database) -> int:
        now = datetime.now(UTC)
        async with db.sessions() as session:
            incidents = await queries.list_incidents(session, status=args.status, limit=args.limit, by_priority=True)
            total = (await queries.count_incidents(session, status=args.status)
                     if len(incidents) == args.limit else len(incidents))
        # The open ones first (what someone may have to act on), then the resolved; each highest priority first.
        # (a damaged one, of no priority, first among its kind: its severity might be the highest)
        ranked = sorted(((_current_priority(i, now), i) for i in incidents),
                        key=lambda p: (p[1].status == RESOLVED, -p[0] if p[0] is not None else -math.inf,
                                       -(p[1].id or 0)))
        damaged = [said for _, i in ranked if (said := _damage(i)) is not None]
        for said in damaged:
            print(said, file=sys.stderr)
        done = EXIT_FAILED if damaged else EXIT_OK
        every = args.status in (None, "all")
        which = ("incidents" if every else "open incidents" if args.status == "open" else
                 f"incidents with status {args.status}")
        if args.format == "json":
            out.write(json.dumps([_incident_json(i, p) for p, i in ranked], indent=2) + "\n")
            if total > len(ranked):  # (on stderr: what a script reads stays the JSON; it was cut without a word)
                print(f"the first {len(ranked)} of {total:,} {which}; --limit {min(total, 100_000)} "
                      f"{'shows them all' if total <= 100_000 else 'shows more'}", file=sys.stderr)
            return done
        if not ranked:
            print(f"no {which}", file=out)
            return EXIT_OK
        rows = [(f"#{i.id}", list_status(i),
                 i.severity if p is not None else f"{i.severity} (damaged)", "?" if p is None else p, i.title,
                 i.alert_count, ",".join(i.sources), ago(now - i.opened_at)) for p, i in ranked]
        print(table(["ID", "STATUS", "SEVERITY", "PRIO", "TITLE", "ALERTS", "SOURCES", "OPENED"], rows, max_width=None,
                    fit=_fit(args, out), shrink=("TITLE", "SOURCES"), below="TITLE"), file=out)
        if total > len(ranked):
            hint = ", --status open only those still open" if every else ""  # (a status asked for is what it lists)
            more = "shows them all" if total <= 100_000 else "shows more"
            print(f"the first {len(ranked)} of {total:,} {which}, by that order; --limit {min(total, 100_000)} "
                  f"{more}{hint}", file=out)
        return done

    return asyncio.run(_with_db(loaded, work))


def cmd_incidents_show(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)

    async def work(db: Database) -> int:
        now = datetime.now(UTC)
        async with db.sessions() as session:
            inc = await queries.get_incident(session, args.id)
            if inc is None:
                print(f"no incident #{args.id}; `chatops incidents list` shows the ones there are", file=sys.stderr)
                return EXIT_FAILED
            alerts = await queries.incident_alerts(session, args.id)
            timeline = await queries.incident_timeline(session, args.id)
        p = _current_priority(inc, now)
        tz = ZoneInfo(loaded.config.timezone)
        names = {person.id: person.name for person in loaded.config.people}

        def at(moment: datetime) -> str:  # in the bot's time zone, to the second
            return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")

        print(f"#{inc.id} {printable(' '.join(inc.title.split()))}", file=out)  # (on one line, as in the tables)
        facts = [("status", list_status(inc)),
                 ("severity", inc.severity if p is not None else f"{inc.severity} (damaged)"),
                 ("priority", "unknown" if p is None else p),
                 ("opened", f"{at(inc.opened_at)} ({ago(now - inc.opened_at)})"),
                 ("alerts", f"{inc.alert_count} ({inc.firing_count} firing) from {', '.join(inc.sources)}"),
                 ("channels", ", ".join(inc.channels) or "none"), ("escalation", inc.escalation or "none")]
        if inc.acknowledged_by:
            when = f" at {at(inc.acknowledged_at)}" if inc.acknowledged_at else ""
            facts.append(("acknowledged", f"by {who_did(inc.acknowledged_by, names)}{when}"))
        if inc.resolved_at:
            facts.append(("resolved", f"by {who_did(inc.resolved_by, names)} at {at(inc.resolved_at)}"))
        if inc.previous_id:
            facts.append(("follows", f"#{inc.previous_id}"))
        facts += [(f"link: {k}", v) for k, v in inc.links.items()]
        for key, value in facts:
            print(printable(f"  {key + ':':<13} {value}"), file=out)  # a longer name (a link's) still gets its space
        shown = None if args.all else SHOW_ROWS
        print("\nAlerts", file=out)
        listed = alerts[:shown]
        # What each alert's query evaluated to (Grafana's values): for a rule without a summary, the news. A column
        # only when an alert has them, as Alertmanager's mostly do not.
        values = [alert_values(a.annotations) for a in listed]
        print(table(["SOURCE", "INSTANCE", "FINGERPRINT", "STATUS", "SEVERITY", "SUMMARY", "TIMES"]
                    + (["VALUES"] if any(values) else []),
                    [(a.source, _instance(a.labels), a.fingerprint, a.status, a.severity, a.summary, a.received_count)
                     + ((v,) if any(values) else ()) for a, v in zip(listed, values)],
                    max_width=None, fit=_fit(args, out), shrink=("INSTANCE", "SUMMARY", "VALUES", "FINGERPRINT")),
              file=out)  # (a sender's dedup_key may be a long fingerprint)
        _more(out, len(alerts), shown, "alerts")
        print("\nTimeline", file=out)
        runs = _runs(timeline)
        kept = runs if shown is None or len(runs) <= shown else runs[-shown:]
        rows = []
        for run in kept:
            first, last = run[0], run[-1]
            e, damaged_one = (first.event, True) if isinstance(first, Damaged) else (first, False)
            end = last.at if isinstance(last, AuditEvent) else None
            when = at(e.at) if isinstance(e.at, datetime) else str(e.at)
            if isinstance(e.at, datetime) and end is not None and at(end) != when:  # a run: from its first to its last
                local, until = e.at.astimezone(tz), end.astimezone(tz)
                when = (f"{local:%Y-%m-%d %H:%M:%S}-{until:%H:%M:%S %Z}" if local.date() == until.date()
                        else f"{when} to {at(end)}")
            rows.append((when, _run_action(run) + (" (damaged)" if damaged_one else ""),
                         who_did(e.actor_person, names) if e.actor_person else f"{e.actor_platform}:{e.actor_user_id}",
                         _run_detail(run, names, at)))
        print(table(["AT", "ACTION", "BY", "DETAIL"], rows, max_width=None, fit=_fit(args, out), shrink=("DETAIL",),
                    below="DETAIL", keep_end=("DETAIL",)), file=out)
        if left := len(timeline) - sum(len(run) for run in kept):  # (counted in events, as the lines hold them)
            print(f"... and {left:,} more events before these (--all shows every one)", file=out)
        if (said := _damage(inc)) is not None:
            print(said, file=sys.stderr)
        damaged = [item for item in timeline if isinstance(item, Damaged)]
        for item in damaged:  # (shown or not: the store needs looking at either way)
            print(printable(f"audit event #{item.event.seq} is damaged, {item.problem}; `chatops audit verify` "
                            "checks the chain"), file=sys.stderr)
        return EXIT_FAILED if damaged or said is not None else EXIT_OK

    return asyncio.run(_with_db(loaded, work))


SHOW_ROWS = 50  # alerts (the first) and timeline lines (the latest) `incidents show` prints without --all


# An alert joining an incident is said twice, `incident.grouped` and then its `alert.received`: one line with them.
_LINE_OF = {"incident.grouped": "alert.received"}


def _runs(timeline: list[AuditEvent | Damaged]) -> list[list[Any]]:
    """The timeline in runs: consecutive events of one action by one actor are one line. Alertmanager and Grafana
    send every alert of a group again at each repeat interval, and each is an `alert.received`: one by one, a few
    re-sends of a large group pushed the opening and the escalation out of the latest lines. A damaged event is a
    line of its own, and so is each runbook event (a person's requests of different runbooks are not one line)."""
    runs: list[list[Any]] = []
    for item in timeline:
        last = runs[-1][-1] if runs else None
        if (isinstance(item, AuditEvent) and isinstance(last, AuditEvent) and not item.action.startswith("runbook.")
                and _LINE_OF.get(item.action, item.action) == _LINE_OF.get(last.action, last.action)
                and (item.actor_person, item.actor_platform, item.actor_user_id)
                == (last.actor_person, last.actor_platform, last.actor_user_id)):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _run_action(run: list[Any]) -> str:
    """`alert.received ×50`; a line of several actions (an alert grouped and received) counts each."""
    counts: dict[str, int] = {}
    for item in run:
        action = (item.event if isinstance(item, Damaged) else item).action
        counts[action] = counts.get(action, 0) + 1
    return ", ".join(action + (f" \u00d7{n}" if n > 1 else "") for action, n in counts.items())


def _run_detail(run: list[Any], names: dict[str, str], at: Callable[[datetime], str] | None = None) -> str:
    """What a line of the timeline was about, from its events' audit details: the alert, the channels, the step."""
    events = [item.event if isinstance(item, Damaged) else item for item in run]
    said = list(dict.fromkeys(_event_detail(e.action, e.subject_id, e.details, names, at) for e in events))
    if len(said) == 1:
        return said[0]
    alerts = [e for e in events if e.subject_type == "alert"]
    ids = {e.subject_id for e in alerts}
    if len(ids) == 1:  # one alert, grouped and received, or received again and again
        return _event_detail(alerts[-1].action, alerts[-1].subject_id, alerts[-1].details, names, at)
    if ids:  # a group's alerts: how many, and what they are when they all say the same
        summaries = {str(e.details.get("summary") or "") if isinstance(e.details, dict) else "" for e in alerts}
        return f"{len(ids)} alerts" + (f": {summaries.pop()}" if len(summaries) == 1 and "" not in summaries else "")
    return "; ".join(d for d in said if d)


def _event_detail(action: str, subject: str | None, details: Any, names: dict[str, str],
                  at: Callable[[datetime], str] | None = None) -> str:
    """One event's audit details in a few words (`audit export` has them all); `at` words a time in them as the
    timeline's own are (else as stored)."""
    d = details if isinstance(details, dict) else {}

    def said(key: str) -> str:
        value = d.get(key)
        return "" if value is None else str(value)

    def person(key: str) -> str:
        return names.get(said(key), said(key))

    if action.startswith("alert."):
        what = ": ".join(p for p in (subject or said("fingerprint"), said("summary")) if p)
        if action == "alert.silenced":
            return f"{subject}: silenced by " + (f"silence {said('silence')}" if d.get("silence") else
                                                 said("comment") or "a silence")
        return what + (f" ({said('note')})" if d.get("note") else "")
    if action == "access.refused":  # who tried what they may not (the actor's column says who)
        return f"{said('what')}: needs {said('needs')}"
    if action == "outbox.retried":  # which deliveries went back in the queue (it said nothing)
        ids = d.get("ids") if isinstance(d.get("ids"), list) else []
        return (f"{'delivery' if len(ids) == 1 else 'deliveries'} {', '.join(f'#{i}' for i in ids)} queued again"
                if ids else subject or "")
    if action == "incident.opened":
        channels = ", ".join(map(str, d.get("channels") or [])) if isinstance(d.get("channels"), list) else ""
        return ", ".join(p for p in (said("severity"), f"to {channels}" if channels else "",
                                     f"follows #{said('previous_id')}" if d.get("previous_id") else "") if p)
    if action in ("incident.grouped", "incident.unsilenced"):
        return said("fingerprint") or said("reason")  # (unsilenced by an alert, or as its window ended)
    if action == "incident.rerouted":
        channels = ", ".join(map(str, d.get("channels") or [])) if isinstance(d.get("channels"), list) else ""
        return ", ".join(p for p in (f"{said('severity')} alert {said('fingerprint')}".strip(),
                                     f"to {channels}" if channels else "",
                                     f"escalation {said('escalation')}" if d.get("escalation") else "") if p)
    if action == "alerts.truncated":
        left = d.get("count")
        return (f"{counted(left, 'alert') if type(left) is int else said('count') + ' alerts'} left out, "
                f"{said('received')} received")
    if action == "escalation.step":
        people = ", ".join(names.get(str(p), str(p)) for p in d.get("people") or []) \
            if isinstance(d.get("people"), list) else ""
        targets = ", ".join(p for p in (people, f"channel {said('channel')}" if d.get("channel") else "") if p)
        return f"step {said('step')} of {said('of')}" + (f": {targets}" if targets else ": nobody")
    if action == "incident.paged":  # and what the platforms before it said, if they failed it
        tried = "; ".join(map(str, d.get("tried") or [])) if isinstance(d.get("tried"), list) else ""
        return (f"{person('person')} on {said('platform')}" + (f" (step {said('step')})" if d.get("step") else "")
                + (f"; tried first: {tried}" if tried else ""))
    if action in ("incident.page_failed", "escalation.page_failed"):
        return f"{person('person')}: {said('problem')}" if d.get("person") else said("problem")
    if action == "incident.page_delayed":  # a platform holds the page back (Telegram's flood control), none other
        step = f" (step {said('step')})" if d.get("step") else ""
        return f"{person('person')}{step}: {said('problem')}"
    if action == "escalation.deferred":
        until = said("until")
        try:
            until = at(datetime.fromisoformat(until)) if at is not None and until else until
        except ValueError:  # (as stored, then)
            pass
        return f"step {said('step')} until {until}"
    if action == "escalation.exhausted":
        steps = d.get("steps")
        return f"policy {said('policy')}, " + (counted(steps, "step") if type(steps) is int else f"{said('steps')} steps")
    if action == "escalation.resumed":
        return f"step {said('step')}"
    if action.startswith("runbook."):
        return _runbook_detail(action, subject, d)
    if action == "incident.resolved" and d.get("by") == "source":
        return f"every alert stopped firing ({said('source')})"
    return said("note")


def _runbook_detail(action: str, subject: str | None, d: dict[str, Any]) -> str:
    """`restart-nginx, run 3, high risk`; a run's end with its status and each step's exit (or why it did not
    start); a cancellation's or rejection's reason."""
    said = f"{d.get('runbook') or '?'}, run {subject}"
    if action == "runbook.requested" and d.get("risk"):
        return f"{said}, {d['risk']} risk"
    if action != "runbook.finished":
        return said + (f": {d['reason']}" if d.get("reason") else "")
    ended = [str(d.get("status") or "?")] + ([f"was {d['was']}"] if d.get("was") else [])  # (interrupted: was running)
    for step in d["steps"] if isinstance(d.get("steps"), list) else []:
        if isinstance(step, dict):
            ended.append(f"step {step.get('step')} " + (
                "timed out" if step.get("timed_out") else f"could not start ({step['error']})" if step.get("error")
                else f"exit {step.get('exit')}"))
    return f"{said}: " + ", ".join(ended)


def _instance(labels: Any) -> str:
    """The host an alert is about, from its labels, for telling apart the alerts of one incident."""
    if not isinstance(labels, dict):
        return ""
    return str(labels.get("instance") or labels.get("asset") or labels.get("host") or "")


def _more(out: TextIO, total: int, shown: int | None, what: str) -> None:
    if shown is not None and total > shown:
        print(f"... and {total - shown:,} more {what} (--all shows every one)", file=out)


def cmd_outbox_list(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)

    async def work(db: Database) -> int:
        now = datetime.now(UTC)
        async with db.sessions() as session:
            rows = await queries.list_outbox(session, status=None if args.status == "all" else args.status,
                                             limit=args.limit)
            counts = await queries.outbox_counts(session)
        if not rows:
            print(f"no {args.status} deliveries" if args.status != "all" else "the outbox is empty", file=out)
        else:
            print(table(["ID", "INCIDENT", "CHANNEL", "KIND", "EVENT", "STATUS", "ATTEMPTS", "QUEUED", "LAST ERROR"],
                        [(r.id, "-" if r.incident_id is None else f"#{r.incident_id}", r.channel, r.kind, r.event,
                          r.status, r.attempts, ago(now - r.created_at), r.last_error or "") for r in rows],
                        max_width=None, fit=_fit(args, out), shrink=("LAST ERROR", "CHANNEL"), below="LAST ERROR",
                        keep_end=("LAST ERROR",)), file=out)
            listed = sum(counts.values()) if args.status == "all" else counts.get(args.status, 0)
            if len(rows) == args.limit and listed > len(rows):  # (the totals below count them all, not this table)
                what = "deliveries" if args.status == "all" else f"{args.status} deliveries"
                more = "shows them all" if listed <= 1_000_000 else "shows more"
                print(f"the newest {len(rows):,} of {listed:,} {what}; --limit {min(listed, 1_000_000)} {more}",
                      file=out)
        print("totals: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"), file=out)
        dead = counts.get("dead", 0)
        them = "it" if dead == 1 else "them"
        resend = (f"`chatops outbox retry ID...` (or --dead: each it is safe to send again) sends {them} again once the "
                  "cause is fixed")
        if dead and args.status in ("dead", "all"):
            print(f"dead deliveries were given up after repeated or permanent failures; LAST ERROR says why, and "
                  f"{resend}", file=out)
        elif dead:  # not in this table: where they are
            print(f"{dead:,} dead {'delivery was' if dead == 1 else 'deliveries were'} given up after repeated or "
                  f"permanent failures: `chatops outbox list --status dead` lists {them} with the error that says "
                  f"why, and {resend}", file=out)
        return EXIT_OK

    return asyncio.run(_with_db(loaded, work))


async def _other_key(audit: AuditLog, session: Any) -> int | None:
    """Before a command appends to the audit chain (first in its write transaction, so that nothing is appended in
    between): EXIT_USAGE, said, if the chain was written with another key than this shell's (or none, or with one),
    since one event hashed with it would break the chain for good; None to go on."""
    problem = await audit.key_problem(session, lock=True)
    if problem is None:
        return None
    print(printable(f"refused, nothing was changed: {problem}"), file=sys.stderr)
    return EXIT_USAGE


def _by_the_bot(loaded: Loaded, running: str, later: str) -> str:
    """What the running bot does next with what a command queued (`running`), or, on a SQLite store no chatops serve
    holds, that `later` happens once one starts: nothing is sent meanwhile."""
    from bot.server import store_held

    if store_held(loaded.config.storage.url) is False:
        return f"no chatops serve is running on this store: {later} once it starts"
    return running


def cmd_incidents_act(args: argparse.Namespace, out: TextIO) -> int:
    """`incidents ack|escalate|resolve|reopen ID`: as the chat's buttons do (the escalation stops, moves on or starts
    again, by a timer the running bot's timers take within a beat; the cards are redrawn and the thread says who, by
    the running bot's outbox), for whoever has the store at hand; audited as the chat's are, by `cli:<user>` or the
    person `--as` names."""
    import getpass

    from bot.model import Actor
    from handlers.escalation import Escalations
    from handlers.incident_actions import perform

    loaded = _load(args)
    people = {p.id: p for p in loaded.config.people}
    if args.as_person is not None and args.as_person not in people:
        known = ", ".join(sorted(people)) or "none"
        print(f"--as {args.as_person!r}: no such person under people: in app.yaml (known: {known})", file=sys.stderr)
        return EXIT_USAGE
    verb = {"ack": "acknowledge", "escalate": "escalate", "resolve": "resolve", "reopen": "reopen"}[args.incidents]

    async def work(db: Database) -> int:
        user = getpass.getuser()
        person = people.get(args.as_person or "")
        actor = Actor("cli", user, person.name if person else user, person.id if person else None)
        audit = AuditLog(loaded.config.audit.hmac_key)
        async with db.transaction() as session:  # (a chain written with another key is refused before anything)
            if (refused := await _other_key(audit, session)) is not None:
                return refused
        result = await perform(db=db, audit=audit, incident_id=args.id, action=verb, actor=actor,
                               now=datetime.now(UTC), note=args.note or "",
                               escalations=Escalations(audit=audit, config=loaded.config),
                               names={p.id: p.name for p in loaded.config.people}, counted_later=True)
        message = result.message
        if not result.changed:  # (the words chat gets: paging by hand is a chat command, the command line has none)
            message = message.replace(f"`/incident page {args.id} PERSON`",
                                      f"`/incident page {args.id} PERSON` in chat")
        print(printable(message), file=out if result.changed else sys.stderr)
        if result.changed and not loaded.adapters and set(loaded.adapters_off.values()) <= {NO_SECTION}:
            # (no card to redraw nor thread to tell: it said there were)
            print("no chat platform is on in app.yaml (adapters:), so no card or thread says so; `chatops incidents "
                  f"show {args.id}` shows it", file=out)
            return EXIT_OK
        if result.changed:
            print(_by_the_bot(loaded, "the running bot redraws its cards and says so in the thread within seconds, or "
                                      "after the new incidents' cards when a storm has queued many (`chatops outbox "
                                      "list` shows them)", "its cards are redrawn, the thread told and anyone paged"),
                  file=out)
            return EXIT_OK
        return EXIT_FAILED

    return asyncio.run(_with_db(loaded, work))


def cmd_outbox_retry(args: argparse.Namespace, out: TextIO) -> int:
    """Dead letters back into the queue (the bot sends them on its next round), audited as outbox.retried."""
    import getpass

    from sqlalchemy import func, select

    from bot.model import Actor
    from storage.audit import Entry
    from storage.models import OutboxItem

    loaded = _load(args)
    if not args.ids and not args.dead:
        print("name the deliveries to send again (IDs from `chatops outbox list --status dead`), or --dead for "
              "every dead one", file=sys.stderr)
        return EXIT_USAGE

    async def work(db: Database) -> int:
        now = datetime.now(UTC)
        user = getpass.getuser()
        audit = AuditLog(loaded.config.audit.hmac_key)
        async with db.transaction() as session:
            if (refused := await _other_key(audit, session)) is not None:
                return refused
            chosen = await queries.retry_dead(session, now, args.ids or None)
            pages = 0 if args.ids else (await session.execute(  # (dead pages --dead leaves: a page is sent again by id)
                select(func.count()).select_from(OutboxItem).where(OutboxItem.status == "dead",
                                                                    OutboxItem.kind == "page"))).scalar_one()
            if chosen:  # one event per incident whose deliveries go again, in its timeline (and one for the rest)
                by_incident: dict[int | None, list[int]] = {}
                for item_id, incident_id in (await session.execute(
                        select(OutboxItem.id, OutboxItem.incident_id).where(OutboxItem.id.in_(chosen))
                        .order_by(OutboxItem.id))).all():
                    by_incident.setdefault(incident_id, []).append(item_id)
                await audit.append_many(session, [Entry(
                    "outbox.retried", Actor("cli", user, user), "outbox", ",".join(map(str, ids)), now,
                    {"ids": ids}, incident_id) for incident_id, ids in by_incident.items()])
            skipped = sorted(set(args.ids) - set(chosen))
            states = dict((await session.execute(select(OutboxItem.id, OutboxItem.status).where(
                OutboxItem.id.in_(skipped)))).all()) if skipped else {}
        if skipped:  # each, what it is instead ("not dead, or no such delivery" left the person to find out)
            said = [f"#{i} is {states[i]}" if i in states else f"there is no delivery #{i}" for i in skipped]
            print(f"{'; '.join(said)}: only dead deliveries are sent again (`chatops outbox list --status all` shows "
                  "them)", file=sys.stderr if chosen else out)
        if not chosen:
            if pages:
                print(f"no dead deliveries but {counted(pages, 'page')}, which --dead leaves (a page given up on was followed "
                      "by the escalation's next step): `chatops outbox list --status dead` lists them, `chatops outbox "
                      "retry ID` sends one again", file=out)
            elif not args.ids:
                print("no dead deliveries (pages are retried only by id)", file=out)
            return EXIT_FAILED if args.ids else EXIT_OK
        print(f"{counted(len(chosen), 'delivery', 'deliveries')} queued again: {', '.join(map(str, chosen))}; " + _by_the_bot(
            loaded, "the running bot sends them within seconds (`chatops outbox list` shows how they fare)",
            "they are sent"), file=out)
        return EXIT_OK

    return asyncio.run(_with_db(loaded, work))


def cmd_oncall(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)
    from handlers.oncall import Oncall

    view = Oncall(loaded.config)
    if not view.schedules:
        print("no rotations are configured; add them under rotations: in app.yaml", file=sys.stderr)
        return EXIT_USAGE
    schedule = view.find(args.rotation) if args.rotation else None  # case does not matter, as for /oncall
    if args.rotation and schedule is None:
        print(f"unknown rotation {args.rotation!r} (known: {', '.join(sorted(view.schedules))})", file=sys.stderr)
        return EXIT_USAGE
    today = datetime.now(UTC)  # (a date of another year than this one is shown with its year, --at or not)
    at = _local(args.at, loaded) or today

    async def work(db: Database | None) -> int:
        if schedule is None:
            rows = await view.around(db, at)
            print(table(["ROTATION", "ON CALL", "SINCE", "UNTIL", "NEXT"],
                        view.now_rows(rows, at, lambda s: s.tz, today=today)), file=out)
            return EXIT_OK
        rows, shifts = await view.upcoming(db, schedule, at, 5)
        print(f"{schedule.id}: {schedule.describe()}; times in {schedule.tz.key}", file=out)
        print(table(["WHO", "FROM", "UNTIL", "NOTE"], view.upcoming_rows(shifts, rows, at, schedule.tz, today=today,
                                                                     current="at --at" if args.at else "now")),
              file=out)
        return EXIT_OK

    if (path := _missing_file(loaded)) is not None:  # the rotations answer without a store (and make none)
        print(f"no database at {path.resolve()}: overrides are not shown", file=sys.stderr)
        return asyncio.run(work(None))
    return asyncio.run(_with_db(loaded, work, without_store=lambda: work(None)))


def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)
    until: datetime = _local(args.until, loaded) or datetime.now(UTC)
    since: datetime = _local(args.since, loaded) or until - report.DEFAULT_WINDOW
    zone = ZoneInfo(loaded.config.timezone)  # a time given without an offset (or none given) is shown in it
    until = until if args.until is not None and args.until.tzinfo is not None else until.astimezone(zone)
    since = since if args.since is not None and args.since.tzinfo is not None else since.astimezone(zone)
    if until <= since and args.until is None:  # --since after now: an empty window, reported as such
        until = since
        print(f"--since ({since.isoformat()}) is after now: nothing can have happened in it yet (a mistyped year?)",
              file=sys.stderr)
    elif until <= since:
        print(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})", file=sys.stderr)
        return EXIT_USAGE

    async def work(db: Database) -> int:
        async with db.sessions() as session:
            measures = await report.build(session, since, until)
        if args.format == "json":
            out.write(json.dumps(report.as_json(measures), indent=2) + "\n")
        else:
            print(report.render_text(measures), file=out)
        return EXIT_OK

    return asyncio.run(_with_db(loaded, work))


def cmd_slack_manifest(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)
    from adapters.slack import manifest

    made = manifest(public_url=loaded.config.server.public_url, bot_name=args.name)
    print(json.dumps(made, indent=2), file=out)
    url = made["settings"]["interactivity"]["request_url"]
    problem = _unreachable_for_slack(url)
    if problem:  # printed all the same (exit 0), to edit before pasting; as set-webhook refuses, with the fix
        print(f"warning: the manifest's request URLs are {url}: {problem}; set server.public_url in app.yaml to the "
              "bot's public HTTPS address (or edit the URLs before pasting the manifest)", file=sys.stderr)
    return EXIT_OK


def _unreachable_for_slack(url: str) -> str | None:
    """Why Slack would refuse a request URL (it posts only to public https:// addresses), or None."""
    if not url.lower().startswith("https://"):
        return "Slack takes only public https:// URLs"
    host = (urlsplit(url).hostname or "").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        local = host == "localhost" or host.endswith((".localhost", ".local", ".internal"))
    else:
        local = not address.is_global
    return f"Slack cannot reach {host}, an address of this machine or its network" if local else None


def _https_with_host(url: str) -> bool:
    """An https:// URL naming a host: what Telegram posts to (one without a host failed only when connecting)."""
    try:
        parts = urlsplit(url)
        return parts.scheme.lower() == "https" and bool(parts.hostname) and not any(c.isspace() for c in url)
    except ValueError:  # (an unclosed [ of an IPv6 address)
        return False


def cmd_telegram_set_webhook(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load(args)
    settings = loaded.adapters.get("telegram")
    if settings is None:
        why = loaded.adapters_off.get("telegram", NO_SECTION)
        if why == NO_SECTION:
            print(f"telegram is off ({why}); configure adapters.telegram in app.yaml first", file=sys.stderr)
        else:  # the section is there, and a variable it reads is not (said as "VAR is not set" or "VAR is empty")
            print(f"telegram is off ({why}): adapters.telegram in app.yaml reads it; set it in this command's "
                  "environment, as for the bot, and run this again", file=sys.stderr)
        return EXIT_USAGE  # (a problem of the setup, as its other refusals are: 1 is Telegram's refusal)
    if settings.mode == "polling":  # (mode: webhook cannot go without a webhook_secret: the config says so)
        print("adapters.telegram.mode is polling: the bot fetches its updates with getUpdates, which Telegram refuses "
              "(409 Conflict) while a webhook is set, and it drops the webhook only when it starts; to take updates "
              "by webhook, switch to mode: webhook (with a webhook_secret) in app.yaml first, then run this and "
              "restart the bot", file=sys.stderr)
        return EXIT_USAGE
    url = args.url or loaded.config.server.public_url.rstrip("/") + "/telegram/webhook"
    if not _https_with_host(url):
        if args.url:
            print(f"--url {url!r}: Telegram only posts to https:// URLs with a host; give the bot's public address "
                  "of its webhook, https://HOST/telegram/webhook", file=sys.stderr)
        else:
            print(f"{url}: Telegram only posts to https:// URLs with a host; set server.public_url to the bot's "
                  "public HTTPS address (or give it with --url https://HOST/telegram/webhook), or use "
                  "adapters.telegram.mode: polling", file=sys.stderr)
        return EXIT_USAGE
    parts = urlsplit(url)
    if parts.query or parts.fragment or not parts.path.rstrip("/").endswith("/telegram/webhook"):
        # (the bot answers 404 anywhere else: every update Telegram posted there would be lost, unsaid)
        path = parts.path.rstrip("/")
        path = path if path.endswith("/telegram/webhook") else path + "/telegram/webhook"
        meant = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        print(f"--url {url!r}: the bot takes Telegram's updates at /telegram/webhook, and answers 404 elsewhere; give "
              f"the whole address, such as {meant} (a proxy's prefix before it is fine), or leave --url out to use "
              "server.public_url", file=sys.stderr)
        return EXIT_USAGE
    from adapters.telegram import TelegramAdapter
    from bot.chat import DeliveryError
    from bot.dispatch import Dispatcher
    from bot.render import Renderer

    def said(exc: BaseException) -> str:  # one line, without the token (an answer that is no JSON came whole)
        text = " ".join(str(exc).replace(settings.bot_token, "<token>").split())
        return text if len(text) <= 200 else text[:199] + "\u2026"

    async def work() -> int:
        adapter = TelegramAdapter(settings, renderer=Renderer(), dispatcher=Dispatcher(loaded.config))
        try:
            await adapter.initialize()  # a refused token: said, never shown
            await adapter.set_webhook(url)
        except DeliveryError as exc:
            if exc.permanent or exc.token_refused:  # (a refused token says which setting to check)
                print(f"Telegram refused: {said(exc)}", file=sys.stderr)
            else:  # (the adapter words a connection that failed or timed out as a passing failure)
                print(f"cannot reach Telegram at {settings.api_url}: {said(exc)}; check the network (or "
                      "adapters.telegram.api_url) and run this again", file=sys.stderr)
            return EXIT_FAILED
        except Exception as exc:  # an answer that is not the Bot API's (no JSON, or not its shape): a wrong api_url?
            print(f"{settings.api_url} did not answer as Telegram's Bot API does ({type(exc).__name__}: {said(exc)}); "
                  "check adapters.telegram.api_url and run this again", file=sys.stderr)
            return EXIT_FAILED
        finally:
            await adapter.application.shutdown()
        print(f"Telegram will post updates to {url} (with the webhook secret; messages and button clicks)", file=out)
        return EXIT_OK

    # python-telegram-bot logs an answer it cannot read with its traceback, before raising what is said above
    library = logging.getLogger("telegram")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(work())
    finally:
        library.setLevel(level)


WIDE = ("whole values, the table as wide as they make it (without it, on a terminal, the table is cut to fit the "
        "terminal's width)")


def build_parser() -> argparse.ArgumentParser:
    def options(default: Any) -> argparse.ArgumentParser:
        shared = argparse.ArgumentParser(add_help=False)
        shared.add_argument("-c", "--config", default=default(None),
                            help="path to app.yaml (default: $CHATOPS_CONFIG, then ./app.yaml, then the example "
                                 "shipped with the bot)")
        shared.add_argument("--log-format", choices=["text", "json"], default=default("text"))
        shared.add_argument("--log-level", default=default("INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        return shared

    # The options may come before the command, between its words or after it; later they must not reset what came
    # before (each parser below the top has them with no default).
    common = options(lambda _: argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="chatops", description="ChatOps incident bot",
                                     parents=[options(lambda value: value)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the HTTP server, adapters and workers").set_defaults(func=cmd_serve)
    sub.add_parser("check-config", parents=[common], help="validate app.yaml").set_defaults(func=cmd_check_config)
    audit = sub.add_parser("audit", parents=[common], help="verify, export or rekey the audit log").add_subparsers(dest="audit", required=True, metavar="ACTION")
    verify = audit.add_parser("verify", parents=[common], help="exit 0 if the chain is intact, 1 naming the first bad event")
    verify.add_argument("--old-key-env", action="append", metavar="VAR",
                        help="an environment variable holding a key the chain was written with before a rekey: the "
                             "events written with it are then checked fully, not only for continuity (repeatable)")
    verify.set_defaults(func=cmd_audit_verify)
    rekey = audit.add_parser("rekey", parents=[common], help="introduce or change the chain's key (audit.hmac_key) "
                             "on purpose, with the bot stopped")
    old_key = rekey.add_mutually_exclusive_group(required=True)
    old_key.add_argument("--old-key-env", metavar="VAR",
                         help="the environment variable holding the key the chain is written with now")
    old_key.add_argument("--from-no-key", action="store_true", help="the chain was written without a key until now")
    rekey.set_defaults(func=cmd_audit_rekey)
    export = audit.add_parser("export", parents=[common], help="write audit events to stdout")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--since", type=_iso, help="only events at or after this ISO 8601 time (no offset: app.yaml's timezone)")
    export.add_argument("--incident", type=_ID, help="only events about this incident id")
    export.set_defaults(func=cmd_audit_export)
    incidents = sub.add_parser("incidents", parents=[common], help="list, show, acknowledge, escalate, resolve or reopen incidents").add_subparsers(dest="incidents", required=True, metavar="ACTION")
    listing = incidents.add_parser("list", parents=[common], help="a table of incidents: the open ones first, then the resolved, each "
                               "highest priority first")
    listing.add_argument("--status", choices=LIST_FILTERS,
                         help="open: triggered or acknowledged; firing: triggered and not silenced; silenced: muted by a "
                              "maintenance window, not resolved (default: all)")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    listing.add_argument("--limit", type=_LIMIT, default=200,
                         help="show at most this many, the first in the order above (default: 200)")
    listing.add_argument("--wide", action="store_true", help=WIDE)
    listing.set_defaults(func=cmd_incidents_list)
    show = incidents.add_parser("show", parents=[common], help="one incident with its alerts and timeline")
    show.add_argument("id", type=_ID)
    show.add_argument("--all", action="store_true",
                      help=f"every alert and timeline line (default: the first {SHOW_ROWS} alerts, the latest "
                           f"{SHOW_ROWS} lines)")
    show.add_argument("--wide", action="store_true", help=WIDE)
    show.set_defaults(func=cmd_incidents_show)
    for action, what in (("ack", "acknowledge an incident (its escalation stops)"),
                         ("escalate", "page the next step of an incident's escalation policy now"),
                         ("resolve", "resolve an incident (its escalation stops)"),
                         ("reopen", "reopen a resolved incident (its escalation starts again)")):
        act = incidents.add_parser(action, parents=[common], help=what + ", as chat's buttons do; audited")
        act.add_argument("id", type=_ID)
        act.add_argument("--as", dest="as_person", metavar="PERSON",
                         help="the person (an id under people: in app.yaml) it is done as (default: cli:<your user>)")
        act.add_argument("--note", help="a note kept with the audit event")
        act.set_defaults(func=cmd_incidents_act)
    outbox = sub.add_parser("outbox", parents=[common], help="chat deliveries waiting, sent or given up").add_subparsers(dest="outbox", required=True, metavar="ACTION")
    olist = outbox.add_parser("list", parents=[common], help="a table of deliveries, newest first")
    olist.add_argument("--status", choices=["pending", "sending", "sent", "dead", "cancelled", "all"], default="pending",
                       help="which deliveries (default: pending)")
    olist.add_argument("--limit", type=_LIMIT, default=100, help="show at most this many, the newest (default: 100)")
    olist.add_argument("--wide", action="store_true", help=WIDE)
    olist.set_defaults(func=cmd_outbox_list)
    oretry = outbox.add_parser("retry", parents=[common], help="send dead deliveries again (after fixing the cause)")
    oretry.add_argument("ids", nargs="*", type=_ID, metavar="ID", help="the deliveries (from outbox list --status dead)")
    oretry.add_argument("--dead", action="store_true", help="every dead delivery but pages and those a platform took without confirming")
    oretry.set_defaults(func=cmd_outbox_retry)
    telegram = sub.add_parser("telegram", parents=[common], help="Telegram setup").add_subparsers(dest="telegram", required=True, metavar="ACTION")
    hook = telegram.add_parser("set-webhook", parents=[common], help="register {public_url}/telegram/webhook with Telegram")
    hook.add_argument("--url", help="the HTTPS URL Telegram should post to (default: server.public_url + /telegram/webhook)")
    hook.set_defaults(func=cmd_telegram_set_webhook)
    oncall = sub.add_parser("oncall", parents=[common], help="who is on call: every rotation, or one rotation's next shifts")
    oncall.add_argument("rotation", nargs="?", help="a rotations[].id; without it, every rotation now")
    oncall.add_argument("--at", type=_iso, help="at this ISO 8601 time instead of now (no offset: app.yaml's timezone)")
    oncall.set_defaults(func=cmd_oncall)
    rep = sub.add_parser("report", parents=[common], help="MTTA, MTTR, escalation rate, noise reduction and pages "
                         "for the incidents opened in a window")
    rep.add_argument("--since", type=_iso, help="incidents opened at or after this ISO 8601 time (default: --until - 30 days)")
    rep.add_argument("--until", type=_iso, help="incidents opened before this ISO 8601 time (default: now)")
    rep.add_argument("--format", choices=["table", "json"], default="table")
    rep.set_defaults(func=cmd_report)
    slack = sub.add_parser("slack-manifest", parents=[common], help="print the Slack app manifest to paste at api.slack.com/apps")
    slack.add_argument("--name", default="chatops", type=_app_name, help="the app's display name (1 to 35 characters)")
    slack.set_defaults(func=cmd_slack_manifest)
    for actions in (audit, incidents, outbox, telegram):  # (a bare `chatops incidents` names them when it refuses)
        actions.metavar = "{" + ",".join(actions.choices) + "}"
    return parser


def _app_name(value: str) -> str:
    """An argparse type: a Slack app's name, as its manifest takes it (1 to 35 characters; it was cut, or empty)."""
    name = value.strip()
    if not 1 <= len(name) <= 35:
        raise argparse.ArgumentTypeError(f"a Slack app's name is 1 to 35 characters; {value!r} has {len(name)}")
    return name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_format, args.log_level)
    try:
        done = args.func(args, sys.stdout)
        sys.stdout.flush()  # (a reader gone by now is caught here, not as an error at exit)
        return done
    except (NoConfig, UsageError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for where, problem in exc.problems:
            print(f"{where}: {problem}" if where else problem, file=sys.stderr)
        print("the configuration is invalid; fix the lines above, then `chatops check-config` checks it again", file=sys.stderr)
        return EXIT_USAGE
    except SchemaTooNew as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SchemaTooOld as exc:  # upgraded only by the bot that starts on it (chatops serve), never by a command
        print(f"this store is at schema version {exc.found}; this chatops needs {exc.needed}: start the new bot "
              "(chatops serve) to upgrade it, or use the chatops of the running version" if exc.found is not None else
              "this store has no schema version: the bot's first start on it stopped before the end; start the bot "
              "(chatops serve) to finish it", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `chatops audit export | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit, and no second error
        # As a command killed by SIGPIPE ends, in every command: not 1, which says a damaged event was found
        # (audit export, incidents list), and was what a script with pipefail read.
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
