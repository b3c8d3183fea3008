"""Request bodies, read the same way on every endpoint that reads one: up to a size, within a time, as they were sent.

The server does not inflate compressed bodies (see bot.server.server_options): aiohttp would do it on the event loop,
to any size, and go on inflating the unread rest of a body after the answer, for any caller on any route. An endpoint
that takes compressed bodies (alert intake) inflates one itself with `inflate`, after its checks where it can, and
only up to its size limit; the others refuse a Content-Encoding with a 415.

Every refusal is a BodyError (bot.alerts): its status, the reason counted in /metrics and the message, answered in
JSON by `refused`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from aiohttp import EofStream, web

from bot.alerts import BodyError

BODY_WAIT = 30.0  # seconds a request's body may take to arrive once its headers have
CLIENT_ABORTED = 499  # the status counted for a request whose client hung up before its body arrived (nginx's)
COMPRESSED = ("gzip", "deflate")  # the Content-Encodings `inflate` reads
log = logging.getLogger("chatops.http")


class EncodingRefused(BodyError):
    """A Content-Encoding the endpoint does not take (415); `accepted` are those it takes."""

    def __init__(self, message: str, accepted: Sequence[str]):
        super().__init__(415, "unsupported_encoding", message)
        self.accepted = tuple(accepted)


def content_coding(request: web.Request, accepted: Sequence[str] = ()) -> str | None:
    """The body's Content-Encoding in lower case, None when it is not compressed (no header, or `identity`).
    EncodingRefused for one not in `accepted`, before anything is read (several codings, one after the other, are
    not taken either)."""
    coding = ", ".join(request.headers.getall("Content-Encoding", [])).strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in accepted:
        return coding
    takes = f"uncompressed, or with Content-Encoding {' or '.join(accepted)}" if accepted else "uncompressed"
    raise EncodingRefused(f"Content-Encoding {coding[:40]!r} is not taken on {request.path[:200]}: send the body "
                          f"{takes}", accepted)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, as it was sent. BodyError: 413 once it passes `limit` bytes (the rest is not read), 408 when it
    does not arrive within BODY_WAIT, 499 when the client hangs up before it has (logged here, at info: the client's
    doing, not the bot's), 400 when it cannot be read (cut off, a broken chunked encoding)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    try:
        if content.is_eof():  # all here already (the usual case): no timer needed
            return await _read_chunks(content, limit)
        try:
            async with asyncio.timeout(BODY_WAIT):
                return await _read_chunks(content, limit)
        except TimeoutError:
            raise BodyError(408, "slow_body", f"the body did not arrive within {BODY_WAIT:g} s") from None
    except BodyError as exc:
        if exc.status != 413:
            content.feed_eof()  # read no further (aiohttp would, after the answer, and fail the same way again)
        if exc.reason == "client_aborted":  # nobody left to answer
            log.info("%s %r from %s: %s; the request is dropped", request.method, request.path[:200],  # decoded
                     request.remote, exc.message)
        raise


# Gzip members a body may hold one after the other. A sender that joins compressed pieces (`cat a.gz b.gz`) makes a
# few; a megabyte of empty members (20 bytes each) would have inflate copy what follows each one, a second of CPU on
# the event loop before any credential is checked (HMAC sources sign the inflated body).
MAX_MEMBERS = 64


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """`body` inflated as its Content-Encoding (one of COMPRESSED) says, never past `limit` bytes: BodyError 413 once
    it would pass them (a small body can inflate to gigabytes; no more than limit + 1 bytes are made, whatever the
    number of members), 400 when it is not what its Content-Encoding says, is cut short, or has bytes after its end.
    A gzip body may be several members one after the other (RFC 1952, 2.2: what `cat a.gz b.gz` makes), up to
    MAX_MEMBERS: each is read, and the body is what they hold together."""
    if not body:
        return body
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:  # deflate: zlib's format (RFC 9110), or the bare deflate stream some clients send under that name
        wbits = zlib.MAX_WBITS if body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        if len(parts) >= MAX_MEMBERS:  # each member leaves zlib a copy of the rest: many tiny ones cost n squared
            raise _unreadable(f"more than {MAX_MEMBERS} gzip members one after the other")
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)  # (never 0, which would mean no limit)
        except zlib.error:
            raise _unreadable(f"Can not decode content-encoding: {coding}") from None
        size += len(part)
        if size > limit:
            raise _too_large(limit, " once inflated")
        if not inflater.eof:
            raise _unreadable(f"the {coding} stream is cut short")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if coding != "gzip" or not rest.startswith(b"\x1f\x8b"):  # another member starts with gzip's magic number
            what = "the last gzip member" if coding == "gzip" else f"the end of the {coding} stream"
            raise _unreadable(f"bytes after {what}")


async def read_json(request: web.Request) -> Any:
    """A chat platform's JSON body, read as every endpoint reads one (uncompressed, up to the app's client_max_size,
    within a time: read_limited). BodyError for any body it cannot take, 400 for one that is not JSON."""
    content_coding(request)
    body = await read_limited(request, request.client_max_size)
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BodyError(400, "malformed_json", f"malformed JSON: {exc}"[:300]) from None
    except RecursionError:
        raise BodyError(400, "malformed_json", "malformed JSON: nested too deeply") from None


def refused(exc: BodyError) -> web.Response:
    """The JSON answer to a body refused. The connection is closed after it when the body was left half read (what is
    left of it cannot be told from a next request); after a 413 or 415 aiohttp reads the rest of the body, as it was
    sent, for up to 10 s, so that the client gets the answer before the connection closes."""
    headers = {}
    if isinstance(exc, EncodingRefused):  # RFC 9110, 15.5.16: which codings would have been taken
        headers["Accept-Encoding"] = ", ".join(exc.accepted) or "identity"
    answer = web.json_response(exc.body(), status=exc.status, headers=headers)
    if exc.status not in (413, 415):
        answer.force_close()
    return answer


def _too_large(limit: int, how: str = "") -> BodyError:
    return BodyError(413, "too_large", f"body larger than {limit} bytes{how}")


def _unreadable(said: str) -> BodyError:
    return BodyError(400, "malformed", f"the body cannot be read ({said}); send it as its Content-Encoding and "
                                       "Content-Length say")


async def _read_chunks(content: Any, limit: int) -> bytes:
    chunks, size = [], 0
    try:  # what `async for chunk in content.iter_any()` does, without the iterator object
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except EofStream:
        pass
    except ConnectionResetError:  # the client hung up mid-body (aiohttp's ClientConnectionResetError is one too)
        raise BodyError(CLIENT_ABORTED, "client_aborted", "the client closed the connection before its body "
                                                          "arrived") from None
    except web.RequestPayloadError as exc:  # aiohttp's word for a body that was cut off or badly framed
        cause = exc.__cause__ or exc
        said = str(getattr(cause, "message", "") or cause).strip()  # aiohttp's errors carry their words in .message
        raise _unreadable(said) from None
    return b"".join(chunks)
