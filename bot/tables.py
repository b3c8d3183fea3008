"""Plain-text tables and relative times for the command line."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import timedelta


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_width: int = 60) -> str:
    """Columns padded to fit, long cells cut with an ellipsis."""
    cells = [[_cut(str(c), max_width) for c in row] for row in rows]
    widths = [max([width(h)] + [width(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(_pad(h, w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(_pad(c, w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def width(text: str) -> int:
    """How many terminal columns `text` takes: two for wide characters (山田, most emoji), none for combining
    marks; padding by len() shifted every later column of a row with a Japanese name."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


def ago(delta: timedelta) -> str:
    """timedelta(minutes=12) -> `12 min ago`."""
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return "just now" if seconds < 10 else f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d ago"


# Characters a terminal acts on rather than shows: C0 and C1 controls (ESC starts colour and title sequences) and
# the bidirectional overrides that reorder what is shown. Text from alerts reaches the terminal through tables.
_ACTIVE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ACTIVE.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def printable(text: str) -> str:
    """`text` with the characters a terminal would act on written out (`\\x1b`), so that what an alert says
    cannot recolour, retitle or rewrite the terminal that shows it."""
    return text.translate(_ACTIVE)


def _cut(text: str, columns: int) -> str:
    text = printable(" ".join(text.split()))
    if width(text) <= columns:
        return text
    out, used = [], 0
    for c in text:
        used += width(c)
        if used > columns - 1:
            break
        out.append(c)
    return "".join(out) + "…"
