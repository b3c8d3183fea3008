"""The action codec: a button's action, incident id and argument in one string of at most 64 bytes.

`ack:42`, `rb:42:restart-nginx`. The same string is Slack's button `value`,
Telegram's `callback_data` (limited to 64 bytes, and not checked by the client
library) and Teams' `Action.Submit` data. Decoding is strict: anything that is
not exactly what `encode` makes is refused, since a click's payload comes from
outside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAX_BYTES = 64
# The largest id the store holds: incidents' and swaps' ids are INTEGER columns, 32 bits on PostgreSQL. A larger
# number names nothing, and asking PostgreSQL for it is an error rather than no row, so it never reaches a query.
MAX_ID = 2**31 - 1
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


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class Decoded:
    action: Action
    incident_id: int
    arg: str


_ARG = re.compile(r"^[A-Za-z0-9_.@+=/-]*$")
_VALUE = re.compile(r"^([a-z-]{1,12}):([1-9][0-9]{0,9})(?::([A-Za-z0-9_.@+=/-]+))?$")  # ids up to MAX_ID's 10 digits


def encode(action: str, incident_id: int, arg: str = "") -> str:
    """The compact form; raises CodecError when it would not fit or could not be decoded back."""
    action = Action(action)
    if not 0 < incident_id <= MAX_ID:
        raise CodecError(f"incident id {incident_id} is out of range")
    if not _ARG.fullmatch(arg):
        raise CodecError(f"argument {arg!r} may only hold letters, digits and _.@+=/-")
    value = f"{action.value}:{incident_id}" + (f":{arg}" if arg else "")
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
    return Decoded(action, int(m.group(2)), m.group(3) or "")
