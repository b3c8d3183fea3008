"""Logging: readable on a terminal, or one JSON object per line (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from bot.tables import BIDI_CONTROLS

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# What a terminal or a log viewer acts on instead of showing: C0 and C1 controls and DEL (a newline starts a line
# that looks like the bot's own, ESC colours or rewrites the screen), the Unicode line and paragraph separators, and
# the bidi marks, embeddings, overrides and isolates (which reorder what is shown).
_CONTROLS = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029{BIDI_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with each control character written as its escape (`\\n`, `\\x1b`, `\\u202e`): what a request put in
    a log line (a path, a header, a name from chat) stays on that line and shows as it was sent."""
    if keep_newlines:
        return "\n".join(_CONTROLS.sub(_escaped, line) for line in text.split("\n"))
    return _CONTROLS.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """One line per record, whatever its message holds (escape_controls); a traceback after it keeps its own lines,
    but the message of each exception in it is one line too, so that an exception quoting a request cannot add
    lines that look like the bot's."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """UTC, marked `Z` (`2026-11-24T05:03:07.123Z`): local time without its zone could not be told apart from
        the config's `timezone`, which the CLI and chat show, nor be ordered across a change of daylight saving time."""
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        seen: set[int] = set()
        exc = ei[1]
        while exc is not None and id(exc) not in seen:  # the chain, as the traceback shows it
            seen.add(id(exc))
            said = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
            if said and said in text:
                text = text.replace(said, escape_controls(said))
            exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        return escape_controls(text, keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(stack_info, keep_newlines=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # (formatted elsewhere: the intake writer process's)
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


class MalformedRequests(logging.Filter):
    """aiohttp's server logs a request it cannot parse (a request line or header that is not HTTP, a body with no
    length on HTTP/1.0 read as the next request) at ERROR with a traceback, though it answers 400 and the fault is
    the client's: anyone who can reach the port could fill the log with tracebacks and page whoever watches for
    ERRORs. Said instead at INFO, on one line, at most once a minute (with how many went unsaid)."""

    EVERY = 60.0

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._said: float | None = None
        self._unsaid = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = self.clock()
        if self._said is not None and now - self._said < self.EVERY:
            self._unsaid += 1
            return False
        more = f"; {self._unsaid} more since" if self._unsaid else ""
        self._said, self._unsaid = now, 0
        said = escape_controls(str(getattr(exc, "message", "") or exc))[:200]
        record.msg, record.args = "%s: not HTTP the bot can read (%s); refused%s (said at most once a minute)", (
            record.getMessage(), said, more)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


def setup(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "sqlalchemy.engine", "apscheduler", "aiosqlite",  # (each statement, at DEBUG)
                  "httpx", "httpcore",  # python-telegram-bot's HTTP client logs each URL, the bot token in it
                  # Slack's and Bot Framework's SDKs log each call's body at DEBUG, a Slack response_url among them
                  # (which posts into the conversation for 30 minutes, for whoever has it)
                  "slack_sdk", "slack_bolt", "msrest", "msal", "urllib3", "botbuilder", "botframework",
                  "requests_oauthlib", "oauthlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [f for f in server.filters if not isinstance(f, MalformedRequests)]
    server.addFilter(MalformedRequests())
    # python-telegram-bot itself logs its API URL, the bot token in it, at DEBUG ("Set Bot API URL: .../bot<token>")
    logging.getLogger("telegram").setLevel(max(logging.INFO, root.level))
