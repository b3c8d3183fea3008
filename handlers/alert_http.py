"""`POST /alerts/{source}`: size, auth, rate limit, JSON, shape; then intake. Never a 500 for bad input.

A compressed body (gzip, deflate) is inflated here, up to the source's size limit: after the bearer token is checked,
or, for an HMAC source, whose signature is over the inflated body, before the signature is.

JSON and shape are read here (bot.alerts.read_body), or, with a writer process, there: the body travels as it
came and the writer process answers a bad one with the same 400/422 (Intake.reads_bodies)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from sqlmodel import select

from bot.alerts import BodyError, read_body
from bot.auth import AuthError, ReplayGuard, replay_message, signature_of, verify, verify_bearer
from bot.bodies import COMPRESSED, content_coding, inflate, read_limited, refused
from bot.clock import Clock
from bot.config import BearerAuth, HmacAuth, Loaded
from bot.metrics import Metrics
from bot.ratelimit import TokenBucket
from handlers.intake import Intake, body_digest
from storage.db import Database
from storage.models import AlertSignature
from storage.rows import fast_encoder

_dumps = fast_encoder(json.JSONEncoder())  # json.dumps, aiohttp's default for json_response

MAX_DELIVERY_ID = 200
UNKNOWN_SAID_EVERY = timedelta(minutes=1)  # the log names the known sources at most this often (scanners try names)
log = logging.getLogger("chatops.intake")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = extra.pop("headers", {})
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


class AlertEndpoint:
    def __init__(self, *, loaded: Loaded, intake: Intake, clock: Clock, metrics: Metrics):
        self.config = loaded.config
        self.sources = {s.id: s for s in loaded.config.sources}
        self.sources_off = loaded.sources_off
        self.intake, self.clock, self.metrics = intake, clock, metrics
        self.replays = ReplayGuard()
        self._unknown_said: datetime | None = None  # when the log last named the known sources (unknown_source)
        self._unknown_since = 0  # requests for unknown sources not logged since
        self._in_flight: dict[str, list[str | None]] = {}  # signature -> the X-Delivery-IDs of its requests on the way
        self.buckets = {s.id: TokenBucket(s.rate_limit.per_minute, s.rate_limit.burst)
                        for s in loaded.config.sources if s.rate_limit}

    async def restore(self, db: Database) -> int:
        """SQLite: the signatures taken within their windows (logged by intake, see Intake._claim_signatures) back
        in the ReplayGuard after a restart; how many. PostgreSQL claims them in the store (storage/replays.py)."""
        if db.is_postgres:
            return 0
        now = self.clock.now()
        async with db.sessions() as session:
            rows = (await session.execute(select(AlertSignature.signature, AlertSignature.delivery_id,
                                                 AlertSignature.expires_at)
                                          .where(AlertSignature.expires_at > now).order_by(AlertSignature.id))).all()
        stamp = now.timestamp()
        for signature, delivery_id, until in rows:
            self.replays.remember(signature, until.timestamp(), delivery_id, now=stamp)
        return len(rows)

    def unknown_source(self, request: web.Request) -> None:
        """Logs the known sources for a request to an unknown one (also a wrong path under /alerts/): for the
        operator who set up a sender, not for the caller, who may be anyone. At most once a minute, so that a
        scanner trying names cannot flood the log; the next line says how many went unsaid. The path as a repr: the
        caller chose it, and it is decoded (%0a is a newline)."""
        now = self.clock.now()
        if self._unknown_said is not None and now - self._unknown_said < UNKNOWN_SAID_EVERY:
            self._unknown_since += 1
            return
        known = ", ".join(sorted(self.sources)) or "none configured"
        more = f"; {self._unknown_since} more since" if self._unknown_since else ""
        self._unknown_said, self._unknown_since = now, 0
        log.warning("%s %r from %s: no such alert source; the known ones are %s (said at most once a minute%s)",
                    request.method, request.path[:200], request.remote, known, more)

    def _reject(self, source: str, reason: str, response: web.Response) -> web.Response:
        self.metrics.alert_rejected.labels(source, reason).inc()
        return response

    def _unauthorized(self, source_id: str, exc: AuthError) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="chatops"'} if exc.reason.endswith("credentials") else {}
        return self._reject(source_id, exc.reason, _error(401, str(exc), headers=headers))

    def _bad_body(self, source_id: str, exc: BodyError) -> web.Response:
        return self._reject(source_id, exc.reason, refused(exc))

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Exception:  # a fault of the bot's (answered 500 and logged by the server): counted as intake's too
            source_id = request.match_info.get("source", "")
            self.metrics.alert_rejected.labels(source_id if source_id in self.sources else "unknown", "internal").inc()
            raise

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        source_id = request.match_info["source"]
        source = self.sources.get(source_id)
        if source is None:  # the known ones are in the log, not told to a caller without credentials
            self.unknown_source(request)
            return self._reject("unknown", "unknown_source", _error(
                404, f"unknown alert source {source_id[:80]!r}: check sources: in app.yaml (the bot's log lists the "
                     "known ones)"))
        if source_id in self.sources_off:
            return self._reject(source_id, "source_off", _error(
                503, f"source {source_id!r} is off: {self.sources_off[source_id]}; set it and restart the bot",
                headers={"Retry-After": "60"}))
        limit = source.max_body_bytes or self.config.server.max_body_bytes
        if isinstance(source.auth, BearerAuth):  # (checked before a byte of the body is read: no token, no memory)
            try:
                verify_bearer(request.headers, source.auth.bearer)
            except AuthError as exc:
                return self._unauthorized(source_id, exc)
        try:
            coding = content_coding(request, COMPRESSED)
            body = await read_limited(request, limit)
            if coding is not None and isinstance(source.auth, HmacAuth):  # signed as it reads, inflated
                body = inflate(body, coding, limit)
        except BodyError as exc:
            return self._bad_body(source_id, exc)
        now = self.clock.now()
        try:
            if not isinstance(source.auth, BearerAuth):  # (a bearer was checked before the body was read)
                verify(source, request.headers, body, now)
        except AuthError as exc:
            return self._unauthorized(source_id, exc)
        if coding is not None and not isinstance(source.auth, HmacAuth):  # inflated only for a caller let in
            try:
                body = inflate(body, coding, limit)
            except BodyError as exc:
                return self._bad_body(source_id, exc)
        signature = signature_of(source, request.headers)
        delivery_id = request.headers.get("X-Delivery-ID") or None
        if delivery_id and len(request.headers.getall("X-Delivery-ID")) > 1:
            return self._reject(source_id, "bad_delivery_id", _error(400, "X-Delivery-ID sent more than once"))
        if signature and self.replays.seen(signature, now.timestamp(), delivery_id):
            return self._reject(source_id, "replayed", _error(401, replay_message(delivery_id)))
        if delivery_id and len(delivery_id) > MAX_DELIVERY_ID:
            return self._reject(source_id, "bad_delivery_id",
                                _error(400, f"X-Delivery-ID is longer than {MAX_DELIVERY_ID} characters"))
        if delivery_id and not (delivery_id.isascii() and delivery_id.isprintable()):
            return self._reject(source_id, "bad_delivery_id",
                                _error(400, "X-Delivery-ID must be printable ASCII (a UUID, say)"))
        # Another body under a stored X-Delivery-ID is no retry: told by the digest of the body (inflated), taken only
        # for a delivery that has an id.
        digest = body_digest(body) if delivery_id else None
        bucket = self.buckets.get(source_id)
        if bucket is not None:
            wait = bucket.take(now.timestamp())
            if wait:
                assert source.rate_limit is not None
                # A retry of a delivery already stored gets its answer, as it would under the limit: the
                # sender only asks what became of it.
                stored = await self.intake.stored_answer(source_id, delivery_id, now, digest) if delivery_id else None
                if stored is not None and stored.rejected is not None:  # another body under its id
                    return self._reject(source_id, stored.rejected, web.json_response(stored.body, status=stored.status))
                if stored is not None:
                    return web.json_response(stored.body, status=stored.status, headers={"X-Idempotent-Replay": "true"})
                return self._reject(source_id, "rate_limited", _error(
                    429, f"rate limit of {source.rate_limit.per_minute}/min (burst {source.rate_limit.burst}) exceeded",
                    headers={"Retry-After": TokenBucket.retry_after_header(wait),
                             "X-RateLimit-Limit": str(source.rate_limit.per_minute)}))
        raw: bytes | None = None
        if self.intake.reads_bodies:  # the writer process reads it: this process's core is the scarcer one
            alerts, truncated, raw = [], 0, body
        else:
            try:
                alerts, truncated = read_body(source.kind, source.id, body)
            except BodyError as exc:
                return self._bad_body(source_id, exc)
        if signature:
            # The same signed request already on its way to the store: a copy is not a second alert, but it is not
            # refused for good either (the first may fail); under its own X-Delivery-ID intake answers it as a retry.
            going = self._in_flight.get(signature)
            if going is not None and (delivery_id is None or delivery_id not in going):
                if raw is not None:  # unread (the writer process reads bodies): a bad one gets its 4xx, not "retry"
                    try:
                        read_body(source.kind, source.id, raw)
                    except BodyError as exc:
                        return self._bad_body(source_id, exc)
                return self._reject(source_id, "in_flight", _error(
                    503, "the same signed request is being stored right now; retry in a moment",
                    headers={"Retry-After": "1"}))
            self._in_flight.setdefault(signature, []).append(delivery_id)
            try:
                outcome = await self.intake.submit(source, alerts, delivery_id, truncated, body=raw, signature=signature,
                                                   digest=digest)
            finally:
                going = self._in_flight[signature]
                going.remove(delivery_id)
                if not going:
                    del self._in_flight[signature]
        else:
            outcome = await self.intake.submit(source, alerts, delivery_id, truncated, body=raw, digest=digest)
        # The writer process found it is no payload of this kind (see read_body), or (PostgreSQL) another replica
        # took its signature already: a replay.
        if outcome.rejected is not None:
            return self._reject(source_id, outcome.rejected, web.Response(
                body=outcome.encoded, status=outcome.status, content_type="application/json", charset="utf-8")
                if outcome.encoded is not None else web.json_response(outcome.body, status=outcome.status))
        if raw is not None:
            truncated = outcome.truncated
        headers = {"X-Idempotent-Replay": "true"} if outcome.replayed else {}
        if outcome.status == 503:
            headers["Retry-After"] = "5"
        if outcome.status < 300:
            if signature:  # committed: from now on a copy is a replay
                assert isinstance(source.auth, HmacAuth)
                # until its timestamp, which may be max_skew ahead of now, is max_skew old
                stamp = now.timestamp()
                self.replays.remember(signature, stamp + 2 * source.auth.max_skew.total_seconds(), delivery_id, now=stamp)
            if truncated and not outcome.replayed:
                self.metrics.alerts_truncated.labels(source_id).inc(truncated)
            self.metrics.observe_intake(source_id, time.perf_counter() - started)
        elif outcome.status >= 500:  # nothing was stored: the database unavailable (503), or a fault (500)
            self.metrics.alert_rejected.labels(source_id, "unavailable" if outcome.status == 503 else "internal").inc()
        if outcome.encoded is not None:  # the writer process encoded it: what json_response would send
            return web.Response(body=outcome.encoded, status=outcome.status, headers=headers,
                                content_type="application/json", charset="utf-8")
        return web.json_response(outcome.body, status=outcome.status, headers=headers, dumps=_dumps)

