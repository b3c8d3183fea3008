"""Plain-text tables and relative times for the command line."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_width: int = 60) -> str:
    """Columns padded to fit, long cells cut with an ellipsis."""
    cells = [[_cut(str(c), max_width) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


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


def _cut(text: str, width: int) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"
