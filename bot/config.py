"""app.yaml: load, substitute `${VAR}`, validate, and check cross-references.

Every problem is reported as `path: problem`, where path is the config path
(`routes[1].channels[0]`), so `chatops check-config` can print one line each.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bot import envsubst
from bot.chat import echoed
from bot.durations import format_duration, parse_clock, parse_setting, parse_weekday
from bot.logs import escape_controls
from bot.render import Renderer, sample_contexts

PLATFORMS = ("slack", "telegram", "teams")


NO_SECTION = "no section under adapters"  # why an adapter app.yaml does not name is off


class ConfigError(Exception):
    """The config is invalid; `problems` holds `(path, problem)` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        # One line each, whatever a key or value holds: a newline or ESC in a key was printed as it was.
        self.problems = [(escape_controls(p), escape_controls(m)) for p, m in problems]
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in problems))


def _tz(value: str) -> str:
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (expected an IANA name such as Europe/Berlin)") from None
    return str(value)


def _weekday(value: str) -> str:
    parse_weekday(value)
    return str(value).strip().lower()[:3]


Duration = Annotated[timedelta, BeforeValidator(parse_setting)]
ClockTime = Annotated[time, BeforeValidator(parse_clock)]
TimeZone = Annotated[str, BeforeValidator(_tz)]
Weekday = Annotated[str, BeforeValidator(_weekday)]
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=40)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


ENDPOINT_TOKEN_MIN = 16  # characters of server.metrics_token and server.calendar_token
_ENDPOINT_TOKEN = re.compile(r"^[A-Za-z0-9._~-]+$")  # a URL's unreserved characters: written in one as they are


def listening_url(host: str, port: int) -> str:
    """`http://host:port` for the address the bot listens on; all addresses (0.0.0.0, ::) are reached at 127.0.0.1
    from the machine itself, and an IPv6 address goes in brackets."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


# A host name: labels of letters, digits, `-` (and `_`, which container names hold) of at most 63 characters, that
# neither start nor end with `-`, joined by dots, with a dot at the end allowed.
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def _ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Where platforms reach the bot (slack-manifest, telegram set-webhook, feed links). Left out or empty
    # (`${CHATOPS_PUBLIC_URL:-}`): the address the bot listens on, so that another port is not announced as 8080.
    public_url: str = ""
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Secrets for the two endpoints that are open without them (scrapers and calendar apps must reach them, and the
    # bot cannot tell who may): GET /metrics then wants `Authorization: Bearer <metrics_token>`, and
    # GET /oncall/{rotation}.ics `?token=<calendar_token>` (calendar apps cannot send headers). Empty is off, so that
    # `${METRICS_TOKEN:-}` leaves an endpoint open until the variable is set.
    metrics_token: str | None = None
    calendar_token: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        """An IP address or a host name, judged as written (nothing is looked up: check-config runs where the bot may
        not): `""` and `not a host!` passed, and serve then stopped on `Name or service not known`."""
        if not v:
            raise ValueError("empty: give the address to listen on, such as 127.0.0.1 (this machine only), 0.0.0.0 "
                             "(every IPv4 address) or :: (every IPv6 address)")
        if v.startswith("[") and v.endswith("]") and _ip_address(v[1:-1]):
            raise ValueError(f"{v!r} is an IPv6 address in brackets: write it without them, {v[1:-1]} (brackets "
                             "belong in a URL)")
        name, colon, port = v.rpartition(":")
        if colon and port.isascii() and port.isdigit() and _HOST_NAME.match(name) and not _ip_address(v):
            raise ValueError(f"{v!r} holds a port: give the port as server.port, and the host alone here")
        if not (_ip_address(v) or (len(v.removesuffix(".")) <= 253 and _HOST_NAME.match(v))):
            raise ValueError(f"{v!r} is not a host name or an IP address: give one such as 127.0.0.1, 0.0.0.0, :: or "
                             "bot.internal")
        return v

    @field_validator("metrics_token", "calendar_token", mode="before")
    @classmethod
    def _empty_is_off(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("port", mode="before")
    @classmethod
    def _port_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # (pydantic takes true as 1: the bot listened on port 1)
            raise ValueError(f"{str(v).lower()} is not a port: give a whole number from 1 to 65535")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        if not v:
            return v
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises for a port that is no number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host (such as "
                             "https://chatops.example.com)")
        if parts.query or parts.fragment or v.endswith(("?", "#")):  # the bot adds its paths (/slack/events) to it
            raise ValueError(f"{v!r} has a query or a fragment: give the address the bot is reached at, such as "
                             "https://chatops.example.com (the bot adds its paths to it)")
        return v

    @model_validator(mode="after")
    def _listening_url(self) -> "ServerConfig":
        if not self.public_url:
            object.__setattr__(self, "public_url", listening_url(self.host, self.port))
        return self

    @field_validator("metrics_token", "calendar_token")
    @classmethod
    def _endpoint_token(cls, v: str | None) -> str | None:
        # The messages never hold the value: it is a secret (SECRET_KEYS covers pydantic's own errors about it).
        if v is None:
            return v
        if v != v.strip():
            raise ValueError("(a secret, not shown) begins or ends with a space or a line break; strip it")
        if len(v) < ENDPOINT_TOKEN_MIN:
            raise ValueError(f"(a secret, not shown) is shorter than {ENDPOINT_TOKEN_MIN} characters: give a longer "
                             "one, such as the output of `openssl rand -hex 32` (or leave it empty for no token)")
        if not _ENDPOINT_TOKEN.match(v):
            raise ValueError("(a secret, not shown) may hold only letters, digits, `-`, `.`, `_` and `~`, which go "
                             "into a URL and a header as they are; `openssl rand -hex 32` gives such a token")
        return v


class StorageConfig(Section):
    url: str = "sqlite+aiosqlite:///./chatops.db"
    schema_name: str | None = Field(None, alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")
    writer: Literal["thread", "process"] = "thread"  # where alert intake's SQLite transactions run (handlers/intake.py)

    @field_validator("url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not re.match(r"^(sqlite\+aiosqlite|postgresql\+asyncpg)://", v):
            raise ValueError(
                f"unsupported database URL {v.split('://')[0] + '://...'!r} "
                "(expected sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db)"
            )
        if v.startswith("sqlite"):
            path = v.split("://", 1)[1].split("?", 1)[0]
            if path in ("", "/", "/:memory:") or "mode=memory" in v:
                raise ValueError("an in-memory SQLite database keeps nothing (an accepted alert would be lost at the "
                                 "next restart): give a file, e.g. sqlite+aiosqlite:///./chatops.db")
        problem = database_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("schema_name")
    @classmethod
    def _postgres_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and str(info.data.get("url", "")).startswith("sqlite"):
            raise ValueError("PostgreSQL only (SQLite has no schemas): remove it, or point storage.url at PostgreSQL")
        return v


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# What asyncpg takes in the URL's query, and the values it takes there (None: any text). Any other key is passed to
# asyncpg.connect() as it is, and every command failed on it (`sslmode` is libpq's, `timeout` a string).
_ASYNCPG_QUERY: dict[str, tuple[str, ...] | None] = {
    "ssl": _SSL_MODES,
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "host": None,  # several: ?host=db1:5432&host=db2:5432; a socket's folder: ?host=/var/run/postgresql
    "passfile": None,
    "prepared_statement_cache_size": None,
    "command_timeout": None,  # seconds (asyncpg reads the text as a number)
    "krbsrvname": None,
    "gsslib": ("gssapi", "sspi"),
}


def _positive(value: str) -> bool:
    try:
        return math.isfinite(seconds := float(value)) and seconds > 0
    except ValueError:
        return False


def _either(values: Sequence[str]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


def database_url_problem(url: str) -> str | None:
    """What in a database URL the driver would fail on, when opening the store (a traceback from every command):
    its host and port, and the options in its query. The password is never part of what is said."""
    after = url.split("://", 1)[1].split("?", 1)[0] if "://" in url else ""
    if url.startswith("sqlite") or "@" not in after:
        netloc = after.split("/", 1)[0]
    else:  # (up to the last `@`: a password may hold a `/`)
        userinfo, _, hostpart = after.rpartition("@")
        netloc = f"{userinfo}@{hostpart.split('/', 1)[0]}"
    if "@" in netloc.rpartition("@")[0].partition(":")[2]:  # (the driver ends a password at its first `@`, and took
        # the rest of it for the host; an `@` in the user name, as Azure's user@server, it reads as written)
        return ("the password holds an `@`: write it as %40 there (percent-encoded), or the driver takes what "
                "follows it for the host")
    host = netloc.rpartition("@")[2]
    if not host.startswith("[") and host.count(":") > 1 and "," not in host:
        return (f"the host `{host}` looks like an IPv6 address: write it in brackets, such as [::1]:5432 (a port "
                "after the closing `]`)")
    if host.startswith("["):
        if "]" not in host:
            return (f"the host `{host}` has no closing `]` (an IPv6 address is written in brackets, such as "
                    "[::1]:5432)")
        host, port = host[1:].split("]", 1)
        port = port.removeprefix(":") if port.startswith(":") else None if not port else port
    else:
        host, colon, port = host.partition(":")
        port = port if colon else None
    if port == "":
        return f"the port after `{host}:` is empty: give one (PostgreSQL's is 5432), or leave out the `:`"
    if port is not None and not (port.isascii() and port.isdigit()):
        return f"the port {port!r} is not a number (expected 1 to 65535; PostgreSQL's is 5432)"
    if port is not None and not 1 <= int(port) <= 65535:
        return f"the port {port} is out of range (expected 1 to 65535; PostgreSQL's is 5432)"
    query = parse_qsl(url.partition("?")[2], keep_blank_values=True)
    for key, value in query:
        if url.startswith("postgresql"):
            if key == "sslmode":
                return (f"sslmode is libpq's name: asyncpg takes ssl={value or 'require'} "
                        f"(ssl: {_either(_SSL_MODES)})")
            if key not in _ASYNCPG_QUERY:
                return f"unknown query parameter {key!r} (asyncpg takes: {', '.join(_ASYNCPG_QUERY)})"
            allowed = _ASYNCPG_QUERY[key]
            if allowed is not None and value not in allowed:
                return f"{key}={value!r} is not allowed ({key}: {_either(allowed)})"
            if key == "prepared_statement_cache_size" and not (value.isascii() and value.isdigit()):
                return f"{key}={value!r} is not a whole number"
            if key == "command_timeout" and not _positive(value):
                return f"{key}={value!r} is not a number of seconds above 0"
        elif key == "timeout":
            try:
                float(value)
            except ValueError:
                return f"timeout={value!r} is not a number of seconds"
        elif key in ("cached_statements", "detect_types") and not (value.isascii() and value.isdigit()):
            return f"{key}={value!r} is not a whole number"
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        return ("cannot be read as a database URL (expected sqlite+aiosqlite:///path.db or "
                "postgresql+asyncpg://user@host/db)")
    return None


class BusinessHours(Section):
    days: list[Weekday] = Field(["mon", "tue", "wed", "thu", "fri"], min_length=1)
    start: ClockTime = time(9, 0)
    end: ClockTime = time(18, 0)
    timezone: TimeZone | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "BusinessHours":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end:%H:%M}) must be after start ({self.start:%H:%M}) on the same day")
        return self


class Paging(Section):
    """How people are paged: after business hours only incidents at least this severe page anyone."""

    after_hours_min_severity: Literal["critical", "high", "medium", "low", "info"] = "high"


class AuditConfig(Section):
    hmac_key: str | None = None  # (a short one is a warning, see doubts: a chain written with it goes on with it)


class TemplatesConfig(Section):
    """`dir`: templates here win over the built-in ones of the same name (relative to the config file)."""

    dir: str | None = None


class Person(Section):
    id: Ident
    name: str
    roles: list[str] = []
    slack: str | None = Field(None, pattern=r"^[UW][A-Z0-9]{2,}$")
    telegram: int | None = Field(None, gt=0)
    teams: str | None = Field(None, pattern=r"^(29:\S+|[0-9a-fA-F-]{36})$")
    timezone: TimeZone | None = None
    page_via: list[Literal["slack", "telegram", "teams"]] = []

    @field_validator("name")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():  # chat shows it in every answer, card and page
            raise ValueError("empty: give the name chat shows for the person")
        return v


_SLACK_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")


def find_person(people: Sequence[Person], text: str) -> Person | None:
    """A person as someone names them in chat: app.yaml id or name, a Slack mention (`<@U123|name>`,
    `<@U123>`), or a platform id (Slack `U123`, Telegram's number, Teams' id), with or without a leading `@`."""
    raw = text.strip()
    m = _SLACK_MENTION.match(raw)
    if m is not None:
        raw = m.group(1)
    raw = raw.lstrip("@")
    wanted = raw.casefold()
    for p in people:  # an id is exact: it wins over another person's name
        if wanted == p.id.casefold():
            return p
    for p in people:
        if raw in (p.slack, str(p.telegram) if p.telegram else None, p.teams):
            return p
    named = _named(people, raw)
    return named[0] if len(named) == 1 else None  # two people of one name: neither, on a guess


def _named(people: Sequence[Person], name: str) -> list[Person]:
    wanted = name.strip().lstrip("@").casefold()
    return [p for p in people if wanted == p.name.casefold()]


def unknown_person(people: Sequence[Person], text: str) -> str:
    """What to say when `find_person` found nobody: the people a shared name could mean, or who there is."""
    named = _named(people, text)
    if len(named) > 1:
        return (f"{echoed(text)!r} could be {' or '.join(f'`{p.id}`' for p in named)} (the same name): "
                "name them by id.")
    return f"I don't know {echoed(text)!r} (people in app.yaml: {', '.join(p.id for p in people) or 'nobody'})."


_CHAT_PATTERNS = {
    "slack": (r"^[CGD][A-Z0-9]{2,}$", "a Slack channel id such as C0123ABCD"),
    "telegram": (r"^(-?\d+|@[A-Za-z][A-Za-z0-9_]{4,})$", "a Telegram chat id such as -1001234567890 or @channelname"),
    "teams": (r"^\d+:\S+$", "a Teams conversation id such as 19:abc@thread.tacv2"),
}


class Channel(Section):
    id: Ident
    platform: Literal["slack", "telegram", "teams"]
    chat: str

    @field_validator("chat", mode="before")
    @classmethod
    def _chat_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


GRAFANA_SIGNATURE_HEADER = "X-Grafana-Alerting-Signature"


def _auth_kind(value: Any) -> str | None:
    """Which `auth:` form a source wrote, so errors speak about that form only."""
    if isinstance(value, str):
        return "auth-none"
    if isinstance(value, Mapping):
        if "bearer" in value and "hmac_secret" in value:  # (said as hmac_secret being an unknown key of bearer's)
            return None
        if "bearer" in value:
            return "auth-bearer"
        if "hmac_secret" in value:
            return "auth-hmac"
    elif isinstance(value, (BearerAuth, HmacAuth)):
        return "auth-bearer" if isinstance(value, BearerAuth) else "auth-hmac"
    return None


class BearerAuth(Section):
    bearer: str = Field(min_length=8)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")  # an HTTP field name (RFC 9110's token)


class HmacAuth(Section):
    hmac_secret: str = Field(min_length=8)
    header: str = "X-Signature"
    timestamp_header: str | None = "X-Timestamp"  # null: the signature covers the body alone (Grafana)
    max_skew: Duration = timedelta(minutes=5)

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not an HTTP header name (such as X-Signature)")
        return value

    @field_validator("timestamp_header")
    @classmethod
    def _timestamp_header(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not an HTTP header name (such as X-Timestamp); set it to null for a "
                             "signature over the body alone, with no timestamp")
        if value is not None and value.lower() == str(info.data.get("header", "")).lower():
            # (HTTP header names are one whatever their case: every request would be refused, its signature read
            # as its time)
            raise ValueError(f"{value!r} is the signature's header too: the signature and its timestamp come in two "
                             "headers (such as X-Signature and X-Timestamp)")
        return value

    @field_validator("max_skew")
    @classmethod
    def _skew(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(hours=12):
            raise ValueError("must be between 1s and 12h (a signed request stays valid, and is remembered against "
                             "replays, this long before and after its timestamp)")
        return value


class RateLimit(Section):
    per_minute: int = Field(gt=0)
    burst: int = Field(gt=0)


class Source(Section):
    """An alert sender; `dedup_key` is `groupKey` (the sender's own grouping) or a label name."""

    id: Ident
    kind: Literal["alertmanager", "grafana", "generic"]
    auth: Annotated[
        Annotated[Literal["none"], Tag("auth-none")] | Annotated[BearerAuth, Tag("auth-bearer")] | Annotated[HmacAuth, Tag("auth-hmac")],
        Discriminator(_auth_kind, custom_error_type="auth_kind",
                      custom_error_message="expected `none`, `{bearer: TOKEN}` or `{hmac_secret: SECRET, ...}`"),
    ]
    rate_limit: RateLimit | None = None
    dedup_key: str | None = None
    max_body_bytes: int | None = Field(None, ge=1024)

    @model_validator(mode="after")
    def _sender_defaults(self) -> "Source":
        # Grafana signs the body alone unless its contact point names a timestamp header, and its
        # UI suggests X-Grafana-Alerting-Signature: match that when the config does not say.
        if self.kind == "grafana" and isinstance(self.auth, HmacAuth):
            given = self.auth.model_fields_set
            update = {k: v for k, v in (("header", GRAFANA_SIGNATURE_HEADER), ("timestamp_header", None))
                      if k not in given}
            if update:
                object.__setattr__(self, "auth", self.auth.model_copy(update=update))
        return self


class Grouping(Section):
    by: list[str] = ["alertname", "instance"]
    window: Duration = timedelta(minutes=15)

    @field_validator("by")
    @classmethod
    def _some_labels(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("empty: give at least one label name (alerts with the same values of these labels form "
                             "one incident)")
        return v


@dataclass(frozen=True)
class WrittenBoolean:
    """A label matcher's value that YAML reads as a boolean (`true`, `yes`, `NO`), with its text as app.yaml wrote it:
    refused all the same (see matchers_as_text), but the fix it names is that text in quotes, not `"true"`."""

    value: bool
    written: str


def matchers_as_text(v: Any) -> Any:
    """Label matchers as text. From app.yaml a value is already the text as written (`version: 1.10` is "1.10", not
    the number 1.1: see _matchers_as_written); a number given otherwise is its text (`code: 500`). A boolean is
    refused: `yes`, `on`, `NO` unquoted are booleans to every other YAML reader, so the label meant is said in
    quotes."""
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(k, str) and not k.strip():  # (no alert has a label of no name: it matched nothing, unsaid)
                raise ValueError(f"{k!r}: an empty label name; give the label's name (such as team: dba)")
            if isinstance(x, (bool, WrittenBoolean)):
                value = str(x.value if isinstance(x, WrittenBoolean) else x).lower()
                fix = (f": {k}: \"{x.written}\"" if isinstance(x, WrittenBoolean) else
                       f" (e.g. {k}: \"true\"; YAML reads true, false, yes, no, on and off, in any case, as booleans)")
                raise ValueError(f"{k}: YAML reads this value as a boolean ({value}), and labels are text: write it in "
                                 f"quotes as the label has it{fix}")
        return {k: str(x) if isinstance(x, (int, float)) else x for k, x in v.items()}
    return v


class Route(Section):
    name: str | None = Field(None, max_length=80)  # shown in `chatops report`; default: its matchers
    match: dict[str, str] = {}
    channels: list[str] = []
    escalation: str | None = None
    runbooks: list[str] = []
    continue_: bool = Field(False, alias="continue")

    @property
    def label(self) -> str:
        """What reports call this route: its name, else its matchers (`team=dba`), else `catch-all`."""
        if self.name:
            return self.name
        return ", ".join(f"{k}={v}" for k, v in sorted(self.match.items())) or "catch-all"

    @field_validator("match", mode="before")
    @classmethod
    def _match_values_as_text(cls, v: Any) -> Any:
        return matchers_as_text(v)


class Rotation(Section):
    id: Ident
    members: list[str] = Field(min_length=1)
    shift: Duration
    handoff: str = "mon 09:00"
    start: date
    timezone: TimeZone | None = None
    swap_approval: str | None = None  # a role: an accepted swap waits for someone with it to approve
    swap_expiry: Duration = timedelta(hours=24)  # an unanswered swap request (or approval) expires after this
    channel: str | None = None  # a channels[].id: handoff notices and taken swaps are posted there
    reminder: Duration = timedelta(hours=1)  # the incoming person's direct reminder before a handoff; 0s: none

    @field_validator("shift")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v < timedelta(hours=1):
            raise ValueError("a shift must last at least 1h")
        return v

    @field_validator("start")
    @classmethod
    def _start(cls, v: date) -> date:
        if not 1970 <= v.year <= 2199:  # (9999-12-01 passed, and every /oncall then failed on a date past year 9999)
            raise ValueError(f"start {v.isoformat()} is out of range: give the date the rotation starts, "
                             "between 1970 and 2199")
        return v

    @field_validator("swap_expiry")
    @classmethod
    def _expiry(cls, v: timedelta) -> timedelta:
        if not timedelta(minutes=1) <= v <= timedelta(days=30):
            raise ValueError("a swap request must expire after between 1m and 30d")
        return v

    @field_validator("reminder")
    @classmethod
    def _reminder(cls, v: timedelta) -> timedelta:
        if v > timedelta(days=7):
            raise ValueError("a handoff reminder can come at most 7d before the handoff (0s: no reminder)")
        return v

    @field_validator("handoff")
    @classmethod
    def _handoff(cls, v: str) -> str:
        parts = str(v).split()
        if len(parts) == 2:
            parse_weekday(parts[0])
            parse_clock(parts[1])
        elif len(parts) == 1:
            parse_clock(parts[0])
        else:
            raise ValueError(f"invalid handoff {v!r} (expected 'mon 09:00' or '09:00')")
        return str(v)


MIN_REPEAT_PASS = timedelta(minutes=1)  # the shortest pass of a repeating escalation policy


class Notify(Section):
    rotation: str | None = None
    people: list[str] = []
    channel: str | None = None


class EscalationStep(Section):
    notify: Notify
    wait: Duration = timedelta(minutes=5)


class EscalationPolicy(Section):
    id: Ident
    steps: list[EscalationStep] = Field(min_length=1)
    repeat: int = Field(0, ge=0, le=20)

    @model_validator(mode="after")
    def _repeat_waits(self) -> EscalationPolicy:
        # A pass of the policy lasts as long as its steps' waits; repeated with no wait, every pass pages at once
        # (repeat: 20 with wait: 0s sent 21 pages in the same instant).
        if self.repeat and sum((step.wait for step in self.steps), timedelta()) < MIN_REPEAT_PASS:
            total = format_duration(sum((step.wait for step in self.steps), timedelta()))
            raise ValueError(f"with repeat: {self.repeat}, the steps' waits add up to {total}, so the repeats would "
                             f"page at once; make them add up to at least {format_duration(MIN_REPEAT_PASS)}")
        return self


class RunbookStep(Section):
    run: list[str] = Field(min_length=1)
    timeout: Duration = timedelta(seconds=30)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):  # (`0s` passed, and killed the step as it started)
            raise ValueError("a step's timeout must be at least 1s (the step is killed when it passes)")
        return value


class Runbook(Section):
    id: Ident
    title: str
    match: dict[str, str] = {}
    risk: Literal["low", "medium", "high"] = "low"
    steps: list[RunbookStep] = Field(min_length=1)

    @field_validator("match", mode="before")
    @classmethod
    def _match_values_as_text(cls, v: Any) -> Any:
        return matchers_as_text(v)  # (as a route's: `code: 500` was refused here, taken there)


class WeeklyWindow(Section):
    days: list[Weekday] = Field(min_length=1)
    start: ClockTime
    end: ClockTime
    timezone: TimeZone | None = None


class Silence(Section):
    """A maintenance window: matching alerts are recorded but page nobody."""

    id: Ident | None = None
    matchers: dict[str, str] = Field(min_length=1)
    starts: datetime | None = None
    ends: datetime | None = None
    weekly: WeeklyWindow | None = None
    comment: str = ""

    @field_validator("matchers", mode="before")
    @classmethod
    def _matchers_as_text(cls, v: Any) -> Any:
        return matchers_as_text(v)  # (as a route's: `code: 500` was refused here, taken there)

    @field_validator("starts", "ends")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.utcoffset() is None:
            raise ValueError("give the time with a UTC offset, e.g. 2026-11-25T22:00:00+01:00")
        return v

    @model_validator(mode="after")
    def _window(self) -> "Silence":
        if self.weekly is None and self.starts is None and self.ends is None:
            raise ValueError("give starts/ends or a weekly window")
        if self.weekly is not None and (self.starts or self.ends):
            raise ValueError("give either starts/ends or a weekly window, not both")
        if self.starts and self.ends and self.ends <= self.starts:
            raise ValueError("ends must be after starts")
        return self


class Config(Section):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    timezone: TimeZone = "UTC"
    business_hours: BusinessHours = BusinessHours()
    paging: Paging = Paging()
    audit: AuditConfig = AuditConfig()
    templates: TemplatesConfig = TemplatesConfig()
    adapters: dict[str, Any] = {}
    people: list[Person] = []
    channels: list[Channel] = []
    sources: list[Source] = []
    grouping: Grouping = Grouping()
    routes: list[Route] = Field(default_factory=lambda: [Route()])
    rotations: list[Rotation] = []
    escalation_policies: list[EscalationPolicy] = []
    runbooks: list[Runbook] = []
    silences: list[Silence] = []
    critical_assets: list[str] = []


@dataclass
class Loaded:
    """A validated config plus what was switched off because a variable is unset."""

    config: Config
    path: str
    adapters: dict[str, BaseModel] = field(default_factory=dict)
    adapters_off: dict[str, str] = field(default_factory=dict)
    sources_off: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    built: frozenset[str] = frozenset()  # the platforms this version has an adapter for (their settings say)

    def summary(self) -> str:
        """One line: what the file holds, and which adapters are on (of those this version has)."""
        c = self.config

        def n(items: list[Any], word: str) -> str:
            return f"{len(items)} {word}{'' if len(items) == 1 else 's'}"

        on = ", ".join(sorted(a for a in self.adapters if a in self.built)) or "none"
        missing = sorted(a for a in self.adapters if a not in self.built)
        return (
            f"{self.path}: valid: {n(c.people, 'person').replace('persons', 'people')}, "
            f"{n(c.channels, 'channel')}, {n(c.sources, 'source')}, {n(c.routes, 'route')}, "
            f"{n(c.rotations, 'rotation')}, {n(c.escalation_policies, 'escalation policy').replace('policys', 'policies')}, "
            f"{n(c.runbooks, 'runbook')}; adapters on: {on}"
            + (f"; configured but not in this version: {', '.join(missing)}" if missing else "")
        )


# The example config, beside the code as templates/ is: the embedded default, read when no config is named and there
# is no ./app.yaml (`chatops serve` in an empty folder runs on it, and says so).
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "app.yaml"


def config_path(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """`-c PATH`, then `$CHATOPS_CONFIG`, then `./app.yaml`, then the example config shipped with the bot. A config
    named is read or refused, never swapped for the example."""
    env = os.environ if env is None else env
    if explicit or env.get("CHATOPS_CONFIG"):
        return explicit or env["CHATOPS_CONFIG"]
    if os.path.lexists("app.yaml") or not EXAMPLE_CONFIG.is_file():
        return "app.yaml"
    return str(EXAMPLE_CONFIG)


def load_config(
    path: str | Path,
    *,
    adapter_models: Mapping[str, type[BaseModel]],
    env: Mapping[str, str] | None = None,
) -> Loaded:
    """Read and validate app.yaml; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, [("", f"{name}: file not found (pass -c PATH or set CHATOPS_CONFIG)")]) from None
    except IsADirectoryError:
        raise ConfigError(name, [("", f"{name}: cannot read: it is a folder, not a file: give -c (or CHATOPS_CONFIG) "
                                      "the path of the YAML config file, such as app.yaml in it")]) from None
    except OSError as exc:
        raise ConfigError(name, [("", f"{name}: cannot read: {exc.strerror}: the config must be a YAML file the bot's "
                                      "user can read; let that user read it (chmod, chown), or pass -c PATH of one it "
                                      "can read")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [("", f"{name}: not UTF-8 text (byte {exc.start} cannot be read); save it as "
                                      "UTF-8")]) from None
    loaded = parse_config(text, name=name, adapter_models=adapter_models, env=env)
    if loaded.config.templates.dir is not None:
        folder = template_dir(loaded)
        if folder is None or not folder.is_dir():
            raise ConfigError(name, [("templates.dir", f"no such directory: {loaded.config.templates.dir} "
                                      f"(relative paths start at the folder of {name})")])
    return loaded


def check_templates(loaded: "Loaded") -> None:
    """Raise ConfigError naming each override template in templates.dir that does not compile, or that renders a
    sample message (bot.render.sample_contexts) to something its platform would refuse: `chatops check-config` and
    `chatops serve` run this, so that such a template stops the bot at start rather than every card it sends."""
    folder = template_dir(loaded)
    if folder is None:
        return
    problems = Renderer(folder).check(sample_contexts(datetime.now(UTC)))
    if problems:
        raise ConfigError(loaded.path, [("templates.dir", str(problem)) for problem in problems])


def template_dir(loaded: "Loaded") -> Path | None:
    """The override template folder, relative to the config file's folder."""
    raw = loaded.config.templates.dir
    if raw is None:
        return None
    folder = Path(raw).expanduser()
    return folder if folder.is_absolute() else Path(loaded.path).resolve().parent / folder


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error, not a silent overwrite."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if key is None:  # (was said as `None: keys should be strings`, with no line to look at)
            raise yaml.constructor.ConstructorError(
                None, None, "a key that is null (`~`, `null` or nothing before the colon): give the key its name",
                key_node.start_mark)
        if isinstance(key, (list, dict)):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key that is a list or a mapping (unhashable type: {type(key).__name__!r})",
                key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is written twice in one mapping (the second would silently replace the first)",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)  # type: ignore[no-untyped-call]


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _construct_with_line(loader: _StrictLoader, node: yaml.Node, deep: bool = False) -> Any:
    """What PyYAML's constructors raise besides YAMLError (`2026-13-02`, `!!int "abc"`, a list as a key), as a
    YAML error at the node it is about, so that its line is named."""
    try:
        return yaml.SafeLoader.construct_object(loader, node, deep)
    except (ValueError, TypeError) as exc:
        problem = f"a key that is a list or a mapping ({exc})" if isinstance(exc, TypeError) else (
            f"{exc} (quote the value if it is meant as text)")
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


_StrictLoader.construct_object = _construct_with_line  # type: ignore[method-assign,assignment]
# YAML 1.1 reads an unquoted 18:00 as the number 1080 (base 60), so `handoff: 18:00` was refused and `shift: 168:00`
# became 10,080 seconds without a word. Read such scalars as the text they are, as YAML 1.2 does: a clock time is
# then a clock time, and a duration written so is refused by name (see parse_duration).
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_StrictLoader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:str", _SEXAGESIMAL)] if first in "+-0123456789" else []) + resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_STR, _BOOL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:bool"
_AS_WRITTEN = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"})
_WRITTEN_BOOLEAN = "tag:chatops,2026:written-boolean"  # (a tag of the loader's own: no app.yaml can write it)
_MATCHERS = {"routes": "match", "silences": "matchers", "runbooks": "match"}  # section: its items' label matchers

_StrictLoader.add_constructor(
    _WRITTEN_BOOLEAN, lambda loader, node: WrittenBoolean(loader.construct_yaml_bool(node), node.value))


def _matchers_as_written(root: yaml.Node) -> None:
    """Label matchers' values as the text app.yaml wrote: YAML 1.1 reads an unquoted `1.10` as the number 1.1, `010`
    as 8 and `0x1F` as 31, and a label is text, so `version: 1.10` was kept as "1.1" without a word and the alert
    labelled 1.10 went to the catch-all route. The scalars a route's or a runbook's `match`, or a silence's
    `matchers`, maps to are read before they are made values, and each number (or date) is given its text as written;
    a boolean keeps the text it was written as, for the fix its refusal names."""
    if not isinstance(root, yaml.MappingNode):
        return
    for key, section in root.value:
        field = _MATCHERS.get(key.value) if isinstance(key, yaml.ScalarNode) else None
        if field is None or not isinstance(section, yaml.SequenceNode):
            continue
        for item in section.value:
            for name, matchers in item.value if isinstance(item, yaml.MappingNode) else ():
                if isinstance(name, yaml.ScalarNode) and name.value == field:
                    _values_as_written(matchers)


def _values_as_written(node: yaml.Node) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for i, (key, value) in enumerate(node.value):
        if isinstance(value, yaml.ScalarNode) and value.tag in (*_AS_WRITTEN, _BOOL):
            # A copy, retagged: the node itself may be an anchor another field uses too (`continue: &t true`), which
            # stays what YAML reads there.
            tag = _WRITTEN_BOOLEAN if value.tag == _BOOL else _STR
            node.value[i] = (key, yaml.ScalarNode(tag, value.value, value.start_mark, value.end_mark,
                                                  style=value.style))


def _read_yaml(text: str) -> Any:
    """The document as _StrictLoader reads it (as yaml.load does), its label matchers' values as written."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _matchers_as_written(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_config(
    text: str,
    *,
    name: str = "app.yaml",
    adapter_models: Mapping[str, type[BaseModel]],
    env: Mapping[str, str],
) -> Loaded:
    protected, refs = envsubst.protect(text)
    try:
        raw = _read_yaml(protected)  # a SafeLoader that refuses repeated keys
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if "'\\t'" in problem:
            problem += " (indent with spaces: YAML takes no tabs there)"
        raise ConfigError(name, [("", f"{name}: {where}invalid YAML: {problem}")]) from None
    if raw is None:  # an empty file, or comments only: a bot with no sources, channels or routes
        raise ConfigError(name, [("", f"{name} is empty: give it at least sources, channels and routes (the example "
                                      "app.yaml shipped with the bot shows each)")])
    if not isinstance(raw, dict):
        raise ConfigError(name, [("", f"{name}: expected a mapping of sections at the top level")])
    origins: dict[str, tuple[list[str], str]] = {}
    raw = envsubst.resolve(raw, refs, env, secret=SECRET_KEYS.__contains__, origins=origins)
    loaded_adapters, adapters_off, sources_off, warnings, problems = {}, {}, {}, [], []
    problems += [(path, str(bad)) for path, bad in envsubst.find_malformed(raw)]

    def invalid(found: list[tuple[str, str]]) -> ConfigError:
        return ConfigError(name, _with_origins(_unique(found), origins))

    # Features that switch off when their secret is unset, rather than failing. What they hold besides is
    # still checked: a misspelt key or a value not allowed would otherwise wait to surface until the day the
    # secret is set.
    for key, section in list((raw.get("adapters") or {}).items()) if isinstance(raw.get("adapters"), dict) else []:
        unset = envsubst.find_unset(section, f"adapters.{key}")
        if unset:
            adapters_off[key] = str(unset[0][1])
            if key in adapter_models:
                problems += _shape_problems(adapter_models[key], section, ("adapters", key))
            else:
                problems.append((f"adapters.{key}", f"unknown adapter (known: {', '.join(sorted(adapter_models))})"))
            del raw["adapters"][key]
    if isinstance(raw.get("sources"), list):
        for i, s in enumerate(raw["sources"]):
            if isinstance(s, dict):
                unset = envsubst.find_unset(s.get("auth"))
                if unset:
                    sources_off[str(s.get("id"))] = str(unset[0][1])
                    problems += [p for p in _shape_problems(Source, s, ("sources", i)) if ".auth" in p[0]]
                    s["auth"] = "none"
    if isinstance(raw.get("audit"), dict) and isinstance(raw["audit"].get("hmac_key"), envsubst.Unset):
        warnings.append(f"audit.hmac_key: {raw['audit']['hmac_key']}")
        raw["audit"]["hmac_key"] = None
    for path, unset in envsubst.find_unset(raw):
        problems.append((path, f"environment variable {unset} (set it, or write ${{{unset.variable}:-default}})"))
    if problems:  # and what else is wrong, judged as if the variables were set (their values are not judged)
        try:
            filled = Config.model_validate(filled_raw := envsubst.fill(raw, _PLACEHOLDER))
        except ValidationError as exc:
            problems += [(_loc(e["loc"]), _message(e, given=filled_raw)) for e in exc.errors()
                         if e.get("input") != _PLACEHOLDER and _PLACEHOLDER not in map(str, e["loc"])]
            problems += [(where, what) for where, what in _within_sound_sections(filled_raw, exc)
                         if _PLACEHOLDER not in what]
        else:  # a reference that is a variable is not judged either
            problems += [(where, what) for where, what in cross_check(filled) if _PLACEHOLDER not in what]
        raise invalid(problems)

    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise invalid([(_loc(e["loc"]), _message(e, given=raw)) for e in exc.errors()]
                      + _within_sound_sections(raw, exc)) from None

    for key, section in config.adapters.items():
        model = adapter_models.get(key)
        if model is None:
            problems.append((f"adapters.{key}", f"unknown adapter (known: {', '.join(sorted(adapter_models))})"))
            continue
        try:
            loaded_adapters[key] = model.model_validate(section or {})
        except ValidationError as exc:
            problems += [(_loc(("adapters", key, *e["loc"])), _message(e, ("adapters", key), model, section))
                         for e in exc.errors()]
    problems += cross_check(config)
    if problems:
        raise invalid(problems)
    found = doubts(config)
    for key, settings in loaded_adapters.items():  # (an adapter's settings may have their own, as Slack's token)
        found += [(f"adapters.{key}.{where}", what) for where, what in getattr(settings, "doubts", list)()]
    warnings += [escape_controls(f"{where}: {what}") for where, what in _with_origins(found, origins)]
    config = _paged_people_respond(config)
    if not config.sources:
        warnings.append("sources: none, so no alert can arrive (POST /alerts/{source} knows no source); add one under "
                        "sources")
    if not config.audit.hmac_key:
        warnings.append("audit: no hmac_key, so the chain is plain SHA-256 and only tamper-evident against "
                        "accidents; to detect deliberate edits, set audit.hmac_key before the bot's first start, or "
                        "add it later with `chatops audit rekey --from-no-key` (a key only set on a chain written "
                        "without one makes the bot refuse to start)")
    for key in adapter_models:
        if key not in loaded_adapters and key not in adapters_off:
            adapters_off[key] = NO_SECTION
    # What is sent to each channel: a channel whose platform is off keeps it in the outbox, unseen.
    uses: dict[str, list[str]] = {}
    for ch_id in dict.fromkeys(ch for route in config.routes for ch in route.channels):
        uses.setdefault(ch_id, []).append("incidents routed there")
    for rotation in config.rotations:
        if rotation.channel:
            uses.setdefault(rotation.channel, []).append(f"handoff notices of rotation {rotation.id}")
    for policy in config.escalation_policies:
        for ch_id in dict.fromkeys(step.notify.channel for step in policy.steps if step.notify.channel):
            uses.setdefault(ch_id, []).append(f"the escalation notices of policy {policy.id}")
    built = frozenset(name for name, model in adapter_models.items() if getattr(model, "built", True))
    for i, ch in enumerate(config.channels):
        if ch.id not in uses or (ch.platform in loaded_adapters and ch.platform in built):
            continue
        why = ("configured, but this version has no adapter for it" if ch.platform in loaded_adapters
               else f"off ({adapters_off.get(ch.platform, 'not configured')})")
        warnings.append(f"channels[{i}] ({ch.id}): {ch.platform} is {why}, so {' and '.join(uses[ch.id])} wait in "
                        "the outbox until it is on")
    return Loaded(config, name, loaded_adapters, adapters_off, sources_off, warnings, built)


RESPONDER = "responder"  # the role that acts on incidents
MANAGER = "manager"  # the role that puts anyone on call (/override)
APPROVER = "approver"  # approves a medium or high risk runbook someone else asked to run (handlers/runbooks.py)
# The roles the bot knows; a rotation's swap_approval names one more. Any other in `roles` is a typo that would
# leave its person unable to do what it was meant for, without a word.
ROLES = (RESPONDER, MANAGER, APPROVER)


def paged_rotations(config: Config) -> set[str]:
    """The rotations an escalation step pages (whoever is on call there is paged)."""
    return {step.notify.rotation for policy in config.escalation_policies for step in policy.steps
            if step.notify.rotation}


def _paged_people_respond(config: Config) -> Config:
    """Everyone an escalation step pages (its people, its rotation's members) has the `responder` role, as anyone on
    an escalation policy can acknowledge in PagerDuty: a page whose Acknowledge its reader may not press would let
    the escalation run on while they are on it."""
    rotations = {r.id: r for r in config.rotations}
    paged = {person for policy in config.escalation_policies for step in policy.steps for person in step.notify.people}
    paged |= {member for rotation in paged_rotations(config) for member in rotations[rotation].members}
    return config.model_copy(update={"people": [
        p.model_copy(update={"roles": [*p.roles, RESPONDER]}) if p.id in paged and RESPONDER not in p.roles else p
        for p in config.people]})


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))


def _with_origins(problems: list[tuple[str, str]],
                  origins: Mapping[str, tuple[list[str], str]]) -> list[tuple[str, str]]:
    """A problem with a value that came from the environment names the variable (`CHATOPS_PORT=abc` was said as
    `server.port: input should be a valid integer`, with nothing in app.yaml to look at), and the value unless it
    is a secret."""
    out = []
    for where, what in problems:
        if where in origins and "environment variable" not in what:
            variables, value = origins[where]
            secret = any(part in SECRET_KEYS for part in re.split(r"[.\[\]]", where))
            shown = "" if secret else f" {value!r}"
            if not value:  # (`${VAR:-}` with VAR unset or empty: nothing, where the value is needed)
                what += f" ({' and '.join(variables)} {'is' if len(variables) == 1 else 'are'} not set, or empty)"
            else:
                what += (f" (the value{shown} is from the environment variable {variables[0]})" if len(variables) == 1
                         else f" (the value{shown} is made of the environment variables {', '.join(variables)})")
        out.append((where, what))
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in {"BearerAuth", "HmacAuth", "literal['none']", "auth-none", "auth-bearer", "auth-hmac"} or str(part).startswith("function-"):
            continue  # pydantic's names for union branches, not config keys
        else:
            out += f".{part}" if out else str(part)
    return out


_PLACEHOLDER = "placeholder-for-an-unset-variable"


def _shape_problems(model: type[BaseModel], section: Any, where: tuple[Any, ...]) -> list[tuple[str, str]]:
    """A section that is off (a variable in it is unset): its unknown keys, missing keys and values that are not
    among those allowed, as if its variables were set (what their values would have to be is not judged)."""
    try:
        model.model_validate(filled := envsubst.fill(section, _PLACEHOLDER))
    except ValidationError as exc:
        return [(_loc((*where, *e["loc"])), _message(e, where, model, filled)) for e in exc.errors()
                if e["type"] == "extra_forbidden"  # a misspelt key, whatever it holds
                or (e["type"] in ("missing", "required_when", "literal_error", "auth_kind")
                    and e.get("input") != _PLACEHOLDER)]
    return []


# Keys whose values are secrets: an error about one never shows the value (a terminal, a CI log), only its shape.
SECRET_KEYS = frozenset({"bot_token", "signing_secret", "webhook_secret", "app_password", "bearer", "hmac_secret",
                         "hmac_key", "auth", "password", "token", "secret", "metrics_token", "calendar_token"})


_NO_SECRET = frozenset({"none", "null"})  # a source's `auth: none` misspelt, which is said as written


def _shown(err: Mapping[str, Any]) -> str:
    """The rejected value as an error message shows it: `repr`, or for a secret what is wrong with its shape."""
    value = err.get("input")
    if not any(isinstance(part, str) and part in SECRET_KEYS for part in err.get("loc", ())):
        return repr(value)
    if isinstance(value, str) and value.lower() in _NO_SECRET:  # (`auth: None`: the fix is in its case, to be seen)
        return repr(value)
    if isinstance(value, str) and value != value.strip():
        return "(a secret, not shown: it begins or ends with a space or a line break; strip it)"
    return "(a secret, not shown)"


# What a value checked against a pattern must look like, said as a malformed chat id says it: the rule, and an example.
# Keyed by the pattern (these models' and the adapters' settings: a test checks that each has one), or by the field's
# path where one pattern serves fields that want different examples.
EXPECTED_PATTERNS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$": "an id of letters, digits, `_`, `.` and `-` that starts with a letter or digit, "
                                     "such as db-primary",
    r"^[a-z_][a-z0-9_]*$": "a PostgreSQL schema name of lower-case letters, digits and `_` that does not start with a "
                           "digit, such as chatops",
    r"^[UW][A-Z0-9]{2,}$": "a Slack member id: U or W, then capital letters and digits, such as U0123ABCD",
    r"^(29:\S+|[0-9a-fA-F-]{36})$": "a Teams user id such as 29:1AbCd... or an Azure AD object id such as "
                                    "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b",
    r"^xox[bpa]-\S+$": "a Slack bot token, which starts with xoxb-: the Bot User OAuth Token on the app's OAuth & "
                       "Permissions page",
    r"^\d+:\S+$": "a Telegram bot token as @BotFather gives it: digits, a colon, then the rest, such as 123456789:AA...",
    r"^[A-Za-z0-9_-]{1,256}$": "8 to 256 letters, digits, `_` and `-` (the characters Telegram takes in a "
                               "secret_token), such as the output of `openssl rand -hex 32`",
    r"^https?://": "a URL that starts with http:// or https://",
}
EXPECTED_AT = {
    "adapters.slack.api_url": "a URL that starts with http:// or https://, such as https://slack.com/api/, the default",
    "adapters.telegram.api_url": "a URL that starts with http:// or https://, such as https://api.telegram.org/bot, "
                                 "the default",
}


def _expected(err: Mapping[str, Any], where: tuple[Any, ...]) -> str:
    """What a value that does not match its pattern should have been (see EXPECTED_PATTERNS)."""
    path = re.sub(r"\[\d+\]", "", _loc((*where, *err["loc"])))
    pattern = str((err.get("ctx") or {}).get("pattern", ""))
    return EXPECTED_AT.get(path) or EXPECTED_PATTERNS.get(pattern) or f"text that matches the pattern {pattern}"


def _members(annotation: Any, tag: str | None = None) -> list[tuple[Any, str | None]]:
    """The types a value of `annotation` may be, each with its union branch's tag (`auth-bearer`) where it has one."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        return _members(inner, next((m.tag for m in meta if isinstance(m, Tag)), tag))
    if origin in (Union, UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg, tag)]
    return [(annotation, tag)]


def _keys_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys allowed in the mapping at `loc` (a pydantic error's, relative to `model`), as app.yaml spells them:
    those of every section the value there may be (of the union branch the loc names, when it names one)."""
    kinds: list[tuple[Any, str | None]] = [(model, None)]
    for part in loc:
        if isinstance(part, int):  # an item of a list
            kinds = [m for kind, _ in kinds if get_origin(kind) is list for m in _members(get_args(kind)[0])]
            continue
        fields = [f for kind, _ in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)
                  for name, f in kind.model_fields.items() if part in (name, f.alias)]
        if fields:
            kinds = [m for f in fields for m in _members(f.annotation)]
        elif any(tag == part for _, tag in kinds):  # pydantic names the union branch it tried
            kinds = [(kind, tag) for kind, tag in kinds if tag == part]
        else:  # a mapping's key (`adapters.slack`), or a branch's name pydantic made up: the value there
            kinds = [m for kind, _ in kinds if get_origin(kind) is dict for m in _members(get_args(kind)[1])] or kinds
    keys = [f.alias or name for kind, _ in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)
            for name, f in kind.model_fields.items()]
    return list(dict.fromkeys(keys))


def _unknown_key(err: Mapping[str, Any], model: type[BaseModel], given: Any) -> str:
    """`unknown key`, and the key meant by its spelling (one not written there already), else the keys allowed there."""
    *parent, key = err["loc"] or ("",)
    allowed = _keys_at(model, parent)
    for part in parent:  # the mapping the key is in, as written (a part that is not a key names a union branch)
        if isinstance(given, Mapping) and part in given or isinstance(given, list) and isinstance(part, int):
            given = given[part]
    written = set(given) if isinstance(given, Mapping) else set()
    close = difflib.get_close_matches(str(key), [k for k in allowed if k not in written], n=1)
    if close:
        return f"unknown key (did you mean `{close[0]}`?)"
    return f"unknown key (allowed here: {', '.join(allowed)})" if allowed else "unknown key"


_AUTH_KEYS = frozenset(BearerAuth.model_fields) | frozenset(HmacAuth.model_fields)


def _message(err: Mapping[str, Any], where: tuple[Any, ...] = (), model: type[BaseModel] | None = None,
             given: Any = None) -> str:
    """What is wrong, as check-config says it; `err` comes from validating `given` as `model` (Config when not
    given), the section at config path `where`."""
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        loc = (*where, *err.get("loc", ()))
        if len(loc) == 3 and loc[0] == "sources" and loc[2] == "auth":  # (never open unless it says so)
            return ("required: `none` (anyone may send), `{bearer: TOKEN}` or `{hmac_secret: SECRET}` (see Alert "
                    "intake in the README)")
        return "required"
    if kind == "required_when":  # required by another key's value (adapters/settings.py says which)
        return msg
    if kind == "model_type":  # `server:` with nothing under it, or a value where keys belong
        return ("empty: give it keys, or remove it" if err.get("input") is None
                else f"expected a mapping of keys, got {_shown(err)}")
    if kind == "extra_forbidden":
        return _unknown_key(err, model or Config, given)
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        return f"malformed value {_shown(err)} (expected {_expected(err, where)})"
    if kind == "auth_kind" and isinstance(err.get("input"), Mapping) and {"bearer", "hmac_secret"} <= set(err["input"]):
        return "give `bearer` or `hmac_secret`, not both: a source checks one kind of credential"
    unknown = [str(k) for k in err.get("input") or () if k not in _AUTH_KEYS] if kind == "auth_kind" and isinstance(
        err.get("input"), Mapping) else []
    if unknown:  # neither bearer nor hmac_secret, and a key not of auth's: misspelt, most likely
        said = "; ".join(f"unknown key `{k}`" + (f" (did you mean `{m[0]}`?)" if m else "") for k, m in (
            (k, difflib.get_close_matches(k, ["bearer", "hmac_secret"], n=1)) for k in unknown))
        return f"{said}: expected `{{bearer: TOKEN}}` or `{{hmac_secret: SECRET, ...}}`"
    if kind == "literal_error":
        value = err.get("input")
        if "auth" in (*where, *err.get("loc", ())) and not (isinstance(value, str) and value.lower() in _NO_SECRET):
            # (a token written in place of the mapping: the fix is its key)
            return (f"{_shown(err)} is not allowed: expected `none` (anyone may send), or the token written as "
                    "`{bearer: TOKEN}` or `{hmac_secret: SECRET}`")
        return f"{_shown(err)} is not allowed: {msg[0].lower() + msg[1:]}"
    last = err.get("loc", ())[-1:] or where[-1:]
    key = last[0] if last and isinstance(last[0], str) else ""
    if kind in ("dict_type", "dict_attributes_type"):
        labels = key in ("match", "matchers")  # (routes', runbooks' and silences': label to value)
        kinds = "labels to values, such as `{team: db}`" if labels else "keys to values"
        return f"expected a mapping of {kinds}, got {_shown(err)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_shown(err)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        if key == "telegram":  # (`@bob`: a username cannot be paged)
            return (f"expected the person's numeric Telegram user id, such as 123456789, got {_shown(err)} (the bot "
                    "answers /start with it)")
        return f"expected a whole number{' of bytes, such as 1048576' if key.endswith('bytes') else ''}, got {_shown(err)}"
    if kind == "list_type":
        if key == "run":  # a runbook step: an argv, never a shell line
            return (f"expected the command as a list of words, the program first, such as `[systemctl, restart, "
                    f"nginx]` (no shell runs it), got {_shown(err)}")
        return f"expected a list, such as `[a, b]`, got {_shown(err)}"
    if kind == "too_short" and (err.get("ctx") or {}).get("min_length") == 1:
        return "must not be empty: give at least one"
    if kind in ("date_parsing", "date_from_datetime_parsing", "date_type"):
        return f"expected a date such as 2026-11-02, got {_shown(err)}"
    if kind in ("datetime_parsing", "datetime_from_date_parsing", "datetime_type"):
        return f"expected a time with its offset, such as 2026-11-25T22:00:00+01:00, got {_shown(err)}"
    return msg[0].lower() + msg[1:]


def doubts(c: Config) -> list[tuple[str, str]]:
    """What is most likely a mistake, but which earlier versions took and configs written for them hold (code outside
    the project starts the bot with its own app.yaml): warnings, as `path: problem`, and the bot starts."""
    found: list[tuple[str, str]] = []
    if c.audit.hmac_key and len(c.audit.hmac_key) < ENDPOINT_TOKEN_MIN:  # (empty: no key, as an unset variable)
        found.append(("audit.hmac_key", f"(a secret, not shown) is shorter than {ENDPOINT_TOKEN_MIN} characters, so it "
                      "is weak: give a longer one, such as the output of `openssl rand -hex 32`, and change to it with "
                      "`chatops audit rekey --old-key-env VAR` (VAR holding this key; see the README, The audit log)"))
    known_roles = set(ROLES) | {r.swap_approval for r in c.rotations if r.swap_approval}
    for i, person in enumerate(c.people):  # (a rotation's swap_approval names a role too)
        for j, role in enumerate(person.roles):
            if role not in known_roles:
                close = difflib.get_close_matches(role, sorted(known_roles), n=1)
                meant = f"did you mean `{close[0]}`? " if close else ""
                found.append((f"people[{i}].roles[{j}]", f"unknown role {role!r} ({meant}known roles: "
                              f"{', '.join(sorted(known_roles))})"))
    for i, source in enumerate(c.sources):
        if isinstance(source.auth, HmacAuth) and source.auth.timestamp_header is None:
            grafana = (" (Grafana: the contact point's HMAC Timestamp Header, such as X-Grafana-Alerting-Timestamp, "
                       "named here too)" if source.kind == "grafana" else "")
            found.append((f"sources[{i}].auth.timestamp_header", f"none, so the signature covers the body alone and a "
                          f"copy of a request {source.id} sent is taken again at any time (a captured \"resolved\" "
                          f"resolves a later incident of that alert): name the header the sender puts its time in"
                          f"{grafana}, and copies are refused as replays"))
        dedup = source.dedup_key
        if dedup and dedup != "groupKey" and dedup.replace("_", "").lower() == "groupkey":
            found.append((f"sources[{i}].dedup_key", f"{dedup!r} is read as a label of that name, which alerts rarely "
                          "have: did you mean `groupKey` (the sender's own group, spelt so)?"))
        elif dedup == "groupKey" and source.kind == "generic":
            found.append((f"sources[{i}].dedup_key", "`groupKey` is Alertmanager's and Grafana's group: a generic "
                          "payload has none, so its alerts group by grouping.by (a generic alert's own `dedup_key` "
                          "field groups it)"))
    if not any(APPROVER in p.roles for p in c.people):
        for i, runbook in enumerate(c.runbooks):
            if runbook.risk != "low":
                found.append((f"runbooks[{i}].risk", f"{runbook.risk}, so a person with the `{APPROVER}` role must "
                              f"approve each request to run {runbook.id}, and nobody has it: every request is refused; "
                              "give the role to someone under people (not the one who asks: nobody approves their own)"))
    if c.grouping.window <= timedelta(0):
        found.append(("grouping.window", "0, so an alert joins an open incident of its key only when they arrive in "
                      "the same instant (repeats of one alert still join theirs): give a window, such as 15m"))
    found += _unreachable(c)
    last = c.routes[-1] if c.routes else None
    if "routes" not in c.model_fields_set and c.sources:  # (the default: one catch-all that tells nobody)
        found.append(("routes", "not set, so every alert goes to the default catch-all route, which has neither "
                      "channels nor escalation: its incidents are opened and nobody is told of them; add routes, "
                      "ending with a catch-all such as `- {match: {}, channels: [CHANNEL]}`"))
    elif "routes" in c.model_fields_set and last and not (last.match or last.channels or last.escalation):
        # (a route before it that tells nobody keeps what it matches quiet, on purpose; the catch-all is what is left)
        found.append((f"routes[{len(c.routes) - 1}]", "the catch-all route has neither channels nor escalation, so "
                      "an alert no other route takes opens an incident nobody is told of: give it channels or an "
                      "escalation policy"))
    return found


def _unreachable(c: Config) -> list[tuple[str, str]]:
    """People an escalation step pages (by name, or as a member of its rotation) who have no Slack, Telegram or
    Teams id: each of their pages fails at once, and the policy runs through its steps in the same second."""
    people = {p.id: p for p in c.people}
    rotations = {r.id: r for r in c.rotations}
    found: list[tuple[str, str]] = []
    said: set[str] = set()
    for i, policy in enumerate(c.escalation_policies):
        for j, step in enumerate(policy.steps):
            named = list(step.notify.people)
            rotation = rotations.get(step.notify.rotation or "")
            if rotation is not None:
                named += rotation.members
            for person_id in named:
                person = people.get(person_id)
                if person is None or person_id in said or person.slack or person.telegram or person.teams:
                    continue
                said.add(person_id)
                found.append((f"escalation_policies[{i}].steps[{j}]", f"pages {person.id}, who has no slack, telegram "
                              "or teams id: that page fails at once and the escalation moves on (give them one under "
                              "people:)"))
    return found


def cross_check(c: Config, *, references: bool = True) -> list[tuple[str, str]]:
    """References between sections, ids that must be unique, platform id shapes, matchers. Without `references`,
    only what each section says of itself (see _within_sound_sections)."""
    problems: list[tuple[str, str]] = []
    people = {p.id for p in c.people}
    channels = {ch.id for ch in c.channels}
    rotations = {r.id for r in c.rotations}
    policies = {p.id for p in c.escalation_policies}
    runbooks = {r.id for r in c.runbooks}

    def known(kind: str, ids: set[str]) -> str:
        return f"(known: {', '.join(sorted(ids))})" if ids else f"(no {kind} are defined)"

    for section in ("people", "channels", "sources", "rotations", "escalation_policies", "runbooks"):
        seen: set[str] = set()
        for i, item in enumerate(getattr(c, section)):
            if item.id in seen:
                problems.append((f"{section}[{i}].id", f"duplicate id {item.id!r}"))
            seen.add(item.id)
    for platform in ("slack", "telegram", "teams"):  # a chat account is one person: who clicked decides roles
        owner: dict[Any, str] = {}
        for i, person in enumerate(c.people):
            account = getattr(person, platform)
            if account is None:
                continue
            if account in owner:
                problems.append((f"people[{i}].{platform}", f"{platform} id {account!r} is already {owner[account]!r}'s; "
                                 "each chat account belongs to one person"))
            else:
                owner[account] = person.id
    for i, ch in enumerate(c.channels):
        pattern, example = _CHAT_PATTERNS[ch.platform]
        if not re.match(pattern, ch.chat):
            problems.append((f"channels[{i}].chat", f"malformed {ch.platform} chat {ch.chat!r} (expected {example})"))
    for i, route in enumerate(c.routes):
        for j, ch in enumerate(route.channels if references else ()):
            if ch not in channels:
                problems.append((f"routes[{i}].channels[{j}]", f"unknown channel {ch!r} {known('channels', channels)}"))
        if references and route.escalation and route.escalation not in policies:
            problems.append((f"routes[{i}].escalation", f"unknown escalation policy {route.escalation!r} {known('escalation policies', policies)}"))
        for j, rb in enumerate(route.runbooks if references else ()):
            if rb not in runbooks:
                problems.append((f"routes[{i}].runbooks[{j}]", f"unknown runbook {rb!r} {known('runbooks', runbooks)}"))
        for key, value in route.match.items():
            problem = match_value_problem(value)
            if problem:
                problems.append((f"routes[{i}].match.{key}", problem))
    for i, silence in enumerate(c.silences):
        for key, value in silence.matchers.items():
            problem = match_value_problem(value)
            if problem:
                problems.append((f"silences[{i}].matchers.{key}", problem))
    if not c.routes or c.routes[-1].match:
        problems.append(("routes", "the last route must be a catch-all with `match: {}` so no alert goes unrouted"))
    roles = {role for p in c.people for role in p.roles}
    for i, rot in enumerate(c.rotations if references else ()):
        for j, member in enumerate(rot.members):
            if member not in people:
                problems.append((f"rotations[{i}].members[{j}]", f"unknown person {member!r} {known('people', people)}"))
        if rot.channel is not None and rot.channel not in channels:
            problems.append((f"rotations[{i}].channel", f"unknown channel {rot.channel!r} {known('channels', channels)}"))
        if rot.swap_approval is not None and rot.swap_approval not in roles:
            problems.append((f"rotations[{i}].swap_approval",
                             f"nobody has the role {rot.swap_approval!r}, so an accepted swap would wait for an "
                             f"approval nobody can give {known('roles', roles)}"))
    for i, pol in enumerate(c.escalation_policies):
        for j, step in enumerate(pol.steps):
            where = f"escalation_policies[{i}].steps[{j}].notify"
            n = step.notify
            if not (n.rotation or n.people or n.channel):
                problems.append((where, "says nobody to notify (give rotation, people or channel)"))
            if not references:
                continue
            if n.rotation and n.rotation not in rotations:
                problems.append((f"{where}.rotation", f"unknown rotation {n.rotation!r} {known('rotations', rotations)}"))
            for k, person in enumerate(n.people):
                if person not in people:
                    problems.append((f"{where}.people[{k}]", f"unknown person {person!r} {known('people', people)}"))
            if n.channel and n.channel not in channels:
                problems.append((f"{where}.channel", f"unknown channel {n.channel!r} {known('channels', channels)}"))
    return problems


def _within_sound_sections(raw: Mapping[str, Any], exc: ValidationError) -> list[tuple[str, str]]:
    """Some sections are misshapen: the checks of what each other section says of itself (a route's regular
    expression, the catch-all route last, a chat id's shape, a repeated id) run all the same, so that one run of
    check-config names every problem. References between sections wait until every section has its shape: one
    into a misshapen section cannot be judged."""
    broken = {e["loc"][0] for e in exc.errors() if e["loc"]}
    sound = {key: value for key, value in raw.items() if key not in broken}
    try:
        partial = Config.model_validate(sound)
    except ValidationError:  # (a section judged alone the same as with the others: not expected)
        return []
    return [(where, what) for where, what in cross_check(partial, references=False)
            if re.split(r"[.\[]", where, maxsplit=1)[0] in sound]


def match_value_problem(value: str) -> str | None:
    """A route matcher is `value`, `=~regex` or `!=value`; check the regex compiles."""
    if value.startswith("=~") or value.startswith("!~"):
        try:
            re.compile(value[2:])
        except re.error as exc:
            return f"invalid regular expression {value[2:]!r}: {exc}"
    return None
