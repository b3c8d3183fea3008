"""Request authentication, compared in constant time: alert sources' bearer tokens and HMAC signatures, and the
secrets of /metrics and the on-call feed."""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

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
        verify_bearer(headers, auth.bearer)
        return
    _verify_hmac(auth, headers, body, now, TIMESTAMP_SEPARATOR.get(source.kind, "."))


def verify_bearer(headers: Mapping[str, str], expected: str) -> None:
    """Raise AuthError unless `Authorization: Bearer <expected>` came, once (an alert source's bearer, /metrics)."""
    _once(headers, "Authorization")
    given = headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise AuthError("missing_credentials", "missing Authorization header (expected: Bearer <token>)")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("bad_credentials", "Authorization header is not a Bearer token")
    if not hmac.compare_digest(raw_bytes(token.strip()), expected.encode()):
        raise AuthError("bad_credentials", "invalid bearer token")


def verify_query_token(given: Sequence[str], expected: str) -> None:
    """Raise AuthError unless `given` (every `token=` of the URL's query, percent-decoded) is `[expected]`: the
    secret of a link a calendar app subscribes to, since it cannot send a header."""
    if not given:
        raise AuthError("missing_credentials", "missing ?token= in the URL")
    if len(given) > 1:
        raise AuthError("bad_credentials", "token sent more than once in the URL")
    if not hmac.compare_digest(raw_bytes(given[0]), expected.encode()):
        raise AuthError("bad_credentials", "invalid token")


def raw_bytes(header: str) -> bytes:
    """A header value as the bytes that came in: aiohttp decodes header bytes as UTF-8 and keeps those that are
    not as surrogates, which a strict encode() refuses (a 500 where a wrong credential must be a 401)."""
    return header.encode("utf-8", "surrogateescape")


def sign(secret: str, body: bytes, timestamp: str | None = None, *, separator: str = ".") -> str:
    """The signature a sender puts in the header: hex HMAC-SHA256 over `{timestamp}{separator}{body}` or the body."""
    mac = _mac(secret)
    if timestamp is not None:
        mac.update(f"{timestamp}{separator}".encode())
    mac.update(body)
    return mac.hexdigest()


_MACS: dict[str, Any] = {}  # secret -> HMAC-SHA256 keyed with it and fed nothing, to copy (cheaper than keying anew)


def _mac(secret: str) -> Any:
    base = _MACS.get(secret)
    if base is None:
        if len(_MACS) >= 64:
            _MACS.clear()
        base = _MACS[secret] = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        try:  # OpenSSL's own HMAC object: its copy() is C; hmac.HMAC's wraps it in Python
            base = _MACS[secret] = base._hmac or base  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return base.copy()


def _once(headers: Mapping[str, str], name: str, reason: str = "bad_credentials") -> None:
    """A credential header sent twice is refused (`reason`, as a wrong one is): which one counts would be the
    server's guess (aiohttp's `get` takes the first, a proxy in front may take the last)."""
    getall = getattr(headers, "getall", None)
    if getall is not None and len(getall(name, ())) > 1:
        raise AuthError(reason, f"{name} header sent more than once")


def _hex(signature: str) -> str:
    """A signature header's hex digest: `sha256=` before it is optional, in any case, as the hex is."""
    signature = signature.strip()
    return signature[7:] if signature[:7].lower() == "sha256=" else signature


def _verify_hmac(auth: HmacAuth, headers: Mapping[str, str], body: bytes, now: datetime, separator: str = ".") -> None:
    _once(headers, auth.header, "bad_signature")
    if auth.timestamp_header:
        _once(headers, auth.timestamp_header, "bad_timestamp")
    given = headers.get(auth.header, "")
    if not given:
        raise AuthError("missing_signature", f"missing {auth.header} header")
    given = _hex(given)
    timestamp = None
    if auth.timestamp_header:
        timestamp = headers.get(auth.timestamp_header, "").strip()
        if not timestamp:
            raise AuthError("missing_timestamp", f"missing {auth.timestamp_header} header")
        try:
            sent = float(timestamp)
        except ValueError:
            sent = math.nan
        if not math.isfinite(sent):  # nan and inf would pass any comparison with the window
            raise AuthError("bad_timestamp", f"{auth.timestamp_header} is not a Unix time in seconds")
        skew = abs(now.timestamp() - sent)
        if skew > auth.max_skew.total_seconds():
            raise AuthError("stale_timestamp", f"{auth.timestamp_header} is {int(skew)}s away from now "
                            f"(allowed: {int(auth.max_skew.total_seconds())}s); check the sender's clock or replay")
    expected = sign(auth.hmac_secret, body, timestamp, separator=separator)
    if not hmac.compare_digest(raw_bytes(given.lower()), expected.encode()):
        raise AuthError("bad_signature", f"invalid {auth.header} signature")


LONGEST_WINDOW = 24 * 3600.0  # seconds a signature may stay valid: twice the largest max_skew config allows


class ReplayGuard:
    """Signatures already accepted, kept for the timestamp window: a replay inside it is refused.

    A signature can carry a tag (the request's X-Delivery-ID, which the signature does not cover): the same
    signature with the same tag is a sender's retry (intake answers it from its idempotency record); with
    another tag, or none, it is a replay."""

    limit = 100_000  # signatures kept before old ones are dropped

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        # (until, signature) for every remember(), soonest first: once past `limit` signatures, each call
        # drops those that ended LONGEST_WINDOW before `until` by popping from here, not by rebuilding the dict
        # (a full rebuild on every request while the window holds more than `limit` of them).
        self._expiries: list[tuple[float, str]] = []
        self._tags: dict[str, str] = {}  # signature -> the X-Delivery-ID it was accepted with

    def seen(self, signature: str, now: float, tag: str | None = None) -> bool:
        """Accepted before, within its window, and not the same request retried under the same tag."""
        expires = self._seen.get(signature)
        if expires is None or not expires > now:
            return False
        return tag is None or self._tags.get(signature) != tag

    def remember(self, signature: str, until: float, tag: str | None = None, *, now: float | None = None) -> None:
        """Accepted: refused as a replay until `until`. With `now`, the signatures whose window has ended by then are
        dropped first (soonest first, from a heap), so the guard holds only what is still valid, a window's worth. Without it, only
        once past `limit` signatures, and only what ended LONGEST_WINDOW before `until` (which is at most that far
        ahead of now), which at a steady 10 signed requests a second kept a day's worth: 864,000, 220 MB."""
        if now is None and len(self._seen) > self.limit:
            # `until` is at most the longest window ahead of now (2 x max_skew, 24 h at most): what ended that long
            # before it has surely ended. (An hour dropped signatures still valid with a max_skew over 30 min.)
            now = until - LONGEST_WINDOW
        if now is not None and self._expiries and not self._expiries[0][0] > now:
            seen, expiries = self._seen, self._expiries
            while expiries and not expiries[0][0] > now:  # what {s: t ... if t > now} leaves out
                t, s = heapq.heappop(expiries)
                if seen.get(s) == t:  # not remembered again (for longer) since
                    del seen[s]
                    self._tags.pop(s, None)
        self._seen[signature] = until
        if tag is None:
            self._tags.pop(signature, None)
        else:
            self._tags[signature] = tag
        heapq.heappush(self._expiries, (until, signature))

    def forget(self, signature: str) -> None:
        """Not accepted after all (its handling failed before it acted): the same request again is taken."""
        self._seen.pop(signature, None)  # (its entry in _expiries no longer matches, and is dropped when due)
        self._tags.pop(signature, None)


def replay_message(delivery_id: str | None) -> str:
    """The 401's words for a signed alert request accepted before (under another X-Delivery-ID, or none)."""
    if not delivery_id:
        return ("replayed request: this signature was already accepted; sign the request again (a new timestamp) "
                "to send it again, or give each request an X-Delivery-ID, whose retries get the first answer")
    return ("replayed request: this signature was already accepted with another X-Delivery-ID, or none (a retry repeats "
            "the first one)")


def signature_of(source: Source, headers: Mapping[str, str]) -> str | None:
    """The request's signature when its source signs with a timestamp (replays are then detectable)."""
    if isinstance(source.auth, HmacAuth) and source.auth.timestamp_header:
        return _hex(headers.get(source.auth.header, "")).lower() or None
    return None
