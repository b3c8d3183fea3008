"""The action codec: a button's action, incident id and argument in one string of at most 64 bytes.

`ack:42`, `rb:42:restart-nginx`, and with the tag of the incident the button was drawn for, `ack:42.qzx1f0`. The
same string is Slack's button `value`,
Telegram's `callback_data` (limited to 64 bytes, and not checked by the client
library) and Teams' `Action.Submit` data. Decoding is strict: anything that is
not exactly what `encode` makes is refused, since a click's payload comes from
outside.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

MAX_BYTES = 64
# The largest id the store holds: incidents' and swaps' ids are INTEGER columns, 32 bits on PostgreSQL. A larger
# number names nothing, and asking PostgreSQL for it is an error rather than no row, so it never reaches a query.
MAX_ID = 2**31 - 1
TAG_SPAN = 36**6  # a tag is at most 6 base-36 digits
TYPED_DIGITS_MAX = 4000  # digits of a typed id made into a number (Python refuses to read one of more than 4300)


def typed_id(text: str) -> int | None:
    """The id of an incident or swap someone typed (`42` or `#42`), or None for what is no such number. One past
    MAX_ID is returned all the same, however long: no incident or swap has it, and the answer says so ("There is no
    incident #99999999999999999999"), not how to type an id, before the store is asked (PostgreSQL would refuse it)."""
    raw = text.lstrip("#")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > TYPED_DIGITS_MAX:
        return None
    number = int(raw)
    return number if number > 0 else None


def stamp(opened_at: datetime, key: str = "") -> str:
    """The tag of an incident: opened when (whole seconds, whatever a store keeps of them) with what group key, hashed
    to at most 6 base-36 digits. A button carries the tag of the incident it was drawn for, and the server compares it
    with that of the incident it finds by the id: after a move to a new store, where numbers start again at #1, an
    old card's button is told apart from the new #1 (and one whose incident was copied over still works)."""
    if opened_at.tzinfo is None:  # (the store's datetimes are UTC)
        opened_at = opened_at.replace(tzinfo=UTC)
    digest = hashlib.sha256(f"{int(opened_at.timestamp())}|{key}".encode("utf-8", "surrogatepass")).digest()
    n, digits = int.from_bytes(digest[:8], "big") % TAG_SPAN, ""
    while True:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not n:
            return digits


class Action(StrEnum):
    ACKNOWLEDGE = "ack"
    ESCALATE = "esc"
    RESOLVE = "res"
    REOPEN = "reo"
    RUN_RUNBOOK = "rb"
    APPROVE = "apv"
    REJECT = "rej"
    # shift swaps: the id slot carries the swap request's id
    SWAP_ACCEPT = "swok"
    SWAP_DECLINE = "swno"
    SWAP_APPROVE = "swapv"
    SWAP_REJECT = "swrej"
    SWAP_CANCEL = "swcx"
    SWAP_UNDO = "swun"


# The buttons of an incident card, whose id is the incident's (a swap's buttons carry the swap's id)
CARD_ACTIONS = frozenset(a.value for a in (Action.ACKNOWLEDGE, Action.ESCALATE, Action.RESOLVE, Action.REOPEN,
                                           Action.RUN_RUNBOOK, Action.APPROVE, Action.REJECT))


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class Decoded:
    action: Action
    incident_id: int
    arg: str
    tag: str = ""  # `stamp` of the incident it was drawn for; "" on a button drawn before tags (or on a swap's)


_ARG = re.compile(r"^[A-Za-z0-9_.@+=/-]*$")
_TAG = re.compile(r"^[0-9a-z]{0,6}$")
# ids up to MAX_ID's 10 digits
_VALUE = re.compile(r"^([a-z-]{1,12}):([1-9][0-9]{0,9})(?:\.([0-9a-z]{1,6}))?(?::([A-Za-z0-9_.@+=/-]+))?$")


def encode(action: str, incident_id: int, arg: str = "", tag: str = "") -> str:
    """The compact form; raises CodecError when it would not fit or could not be decoded back."""
    action = Action(action)
    if not 0 < incident_id <= MAX_ID:
        raise CodecError(f"incident id {incident_id} is out of range")
    if not _ARG.fullmatch(arg):
        raise CodecError(f"argument {arg!r} may only hold letters, digits and _.@+=/-")
    if not _TAG.fullmatch(tag):
        raise CodecError(f"tag {tag!r} is not one `stamp` makes")
    value = f"{action.value}:{incident_id}" + (f".{tag}" if tag else "") + (f":{arg}" if arg else "")
    size = len(value.encode())
    if size > MAX_BYTES:
        raise CodecError(f"{value[:30]}... is {size} bytes; a button value must fit {MAX_BYTES} (Telegram's limit)")
    return value


def decode(value: str) -> Decoded:
    """The parts of a value made by `encode`; CodecError for anything else (forged or from another bot)."""
    if not isinstance(value, str) or len(value.encode()) > MAX_BYTES:
        raise CodecError("not a chatops button value (too long)")
    m = _VALUE.fullmatch(value)
    if m is None or int(m.group(2)) > MAX_ID:
        raise CodecError(f"not a chatops button value: {value[:40]!r}")
    try:
        action = Action(m.group(1))
    except ValueError:
        raise CodecError(f"unknown action {m.group(1)!r}") from None
    return Decoded(action, int(m.group(2)), m.group(4) or "", m.group(3) or "")
