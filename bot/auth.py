"""Alert source authentication: bearer tokens and HMAC signatures, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime

from bot.config import BearerAuth, HmacAuth, Source

# What joins the timestamp to the body in the signed message, by source kind. Our own scheme (generic
# senders) signs `{timestamp}.{body}`; Grafana's webhook signs `{timestamp}:{body}` (grafana/alerting
# http/hmac.go, `timestampSeparator = ":"`). Without a timestamp header both sign the body alone.
TIMESTAMP_SEPARATOR: dict[str, str] = {"grafana": ":"}


class AuthError(Exception):
    """Why a request was refused; `reason` is a short label for /metrics."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def verify(source: Source, headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    """Raise AuthError unless the request proves it comes from this source."""
    auth = source.auth
    if auth == "none":
        return
    if isinstance(auth, BearerAuth):
        given = headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if not given:
            raise AuthError("missing_credentials", "missing Authorization header (expected: Bearer <token>)")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("bad_credentials", "Authorization header is not a Bearer token")
        if not hmac.compare_digest(token.strip().encode(), auth.bearer.encode()):
            raise AuthError("bad_credentials", "invalid bearer token")
        return
    _verify_hmac(auth, headers, body, now, TIMESTAMP_SEPARATOR.get(source.kind, "."))


def sign(secret: str, body: bytes, timestamp: str | None = None, *, separator: str = ".") -> str:
    """The signature a sender puts in the header: hex HMAC-SHA256 over `{timestamp}{separator}{body}` or the body."""
    message = f"{timestamp}{separator}".encode() + body if timestamp is not None else body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _verify_hmac(auth: HmacAuth, headers: Mapping[str, str], body: bytes, now: datetime, separator: str = ".") -> None:
    given = headers.get(auth.header, "")
    if not given:
        raise AuthError("missing_signature", f"missing {auth.header} header")
    given = given.strip().removeprefix("sha256=")
    timestamp = None
    if auth.timestamp_header:
        timestamp = headers.get(auth.timestamp_header, "").strip()
        if not timestamp:
            raise AuthError("missing_timestamp", f"missing {auth.timestamp_header} header")
        try:
            sent = float(timestamp)
        except ValueError:
            raise AuthError("bad_timestamp", f"{auth.timestamp_header} is not a Unix time in seconds") from None
        skew = abs(now.timestamp() - sent)
        if skew > auth.max_skew.total_seconds():
            raise AuthError("stale_timestamp", f"{auth.timestamp_header} is {int(skew)}s away from now "
                            f"(allowed: {int(auth.max_skew.total_seconds())}s); check the sender's clock or replay")
    expected = sign(auth.hmac_secret, body, timestamp, separator=separator)
    if not hmac.compare_digest(given.lower().encode(), expected.encode()):
        raise AuthError("bad_signature", f"invalid {auth.header} signature")


class ReplayGuard:
    """Signatures already accepted, kept for the timestamp window: a replay inside it is refused."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def seen(self, signature: str, now: float) -> bool:
        expires = self._seen.get(signature)
        return expires is not None and expires > now

    def remember(self, signature: str, until: float) -> None:
        if len(self._seen) > 100_000:
            now = until - 3600
            self._seen = {s: t for s, t in self._seen.items() if t > now}
        self._seen[signature] = until


def signature_of(source: Source, headers: Mapping[str, str]) -> str | None:
    """The request's signature when its source signs with a timestamp (replays are then detectable)."""
    if isinstance(source.auth, HmacAuth) and source.auth.timestamp_header:
        return headers.get(source.auth.header, "").strip().removeprefix("sha256=").lower() or None
    return None
