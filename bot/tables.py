"""Plain-text tables and relative times for the command line."""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_width: int | None = 60,
          fit: int | None = None, shrink: Collection[str] = (), below: str | None = None,
          keep_end: Collection[str] = ()) -> str:
    """Columns padded to fit, long cells cut with an ellipsis: each to `max_width` columns (None: whole).

    With `fit`, the width of the terminal, the `shrink` columns (free text: a title, an error) are cut further, the
    widest first, down to FREE_FLOOR columns, until the lines fit: the identifiers beside them stay whole. If the
    `below` column would get fewer than BELOW_FLOOR, it leaves the grid for a line of its own under each row, as wide
    as the terminal (an error cut to a few columns lost its cause, a title what it was about). A cell of a `keep_end`
    column is cut in the middle: an error's cause is mostly at its end."""
    cells = [[_one_line(str(c)) for c in row] for row in rows]
    if fit is not None and below in headers:
        at = list(headers).index(below)
        grid = _grid(headers, cells, max_width, fit, shrink, keep_end, floor_of=below)
        if grid is None:  # it does not fit with the column in it
            rest = [h for i, h in enumerate(headers) if i != at]
            lines = _grid(rest, [[c for i, c in enumerate(row) if i != at] for row in cells], max_width, fit, shrink,
                          keep_end) or []
            out, indent = [lines[0], "  " + below], "  "
            for line, row in zip(lines[1:], cells):
                out.append(line)
                if row[at] and below in keep_end:  # an error, whole over as many lines as it takes: cut in the
                    # middle, it lost what was off and why ("slack is off (SLACK…l for a platform that is on")
                    out += [indent + part for part in _wrap(row[at], max(fit - len(indent), 1))]
                elif row[at]:
                    out.append(indent + _cut(row[at], max(fit - len(indent), 1)))
            return "\n".join(out)
        return "\n".join(grid)
    return "\n".join(_grid(headers, cells, max_width, fit, shrink, keep_end) or [])


FREE_FLOOR = 12  # the fewest columns a free-text column is cut to, to fit a terminal
BELOW_FLOOR = 24  # the fewest a `below` column keeps in the grid (fewer: a line of its own)


def _grid(headers: Sequence[str], cells: list[list[str]], max_width: int | None, fit: int | None,
          shrink: Collection[str], keep_end: Collection[str], floor_of: str | None = None) -> list[str] | None:
    """The table's lines, its free-text columns cut to fit `fit` as far as they can; None if they would not fit with
    `floor_of` given BELOW_FLOOR columns (table() then puts it below)."""
    limits = [max([width(h)] + [width(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if max_width is not None:
        limits = [min(w, max(max_width, width(h))) for w, h in zip(limits, headers)]
    if fit is not None:
        floors = {i: min(limits[i], max(width(h), BELOW_FLOOR if h == floor_of else FREE_FLOOR))
                  for i, h in enumerate(headers) if h in shrink or h == floor_of}
        excess = sum(limits) + 2 * (len(limits) - 1) - fit
        while excess > 0:  # the widest first: lower the widest to the next width down, sharing the excess
            open_ = [i for i in floors if limits[i] > floors[i]]
            if not open_:
                break
            top = max(limits[i] for i in open_)
            tops = [i for i in open_ if limits[i] == top]
            lower = max([limits[i] for i in open_ if limits[i] < top] + [min(floors[i] for i in tops)])
            step = min(top - lower, -(-excess // len(tops)))
            for i in tops:
                cut = min(step, excess, limits[i] - floors[i])
                limits[i] -= cut
                excess -= cut
        if excess > 0 and floor_of is not None:
            return None
    cut = [[_cut(c, w, middle=h in keep_end) for c, w, h in zip(row, limits, headers)] for row in cells]
    widths = [max([width(h)] + [width(r[i]) for r in cut]) for i, h in enumerate(headers)]
    lines = ["  ".join(_pad(h, w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(_pad(c, w) for c, w in zip(row, widths)).rstrip() for row in cut]
    return lines


def width(text: str) -> int:
    """How many terminal columns `text` takes: two for wide characters (山田, most emoji), none for combining
    marks; padding by len() shifted every later column of a row with a Japanese name. An emoji built of several
    (a family joined with ZWJ, a skin tone, a variation selector) is drawn as one: its first emoji's width."""
    if text.isascii():
        return len(text)
    return sum(w for _, w in _clusters(text))


# Joined to the character before them, drawn as part of it: zero-width joiner, variation selectors, emoji tags
_JOINING = {0x200D, *range(0xFE00, 0xFE10), *range(0xE0020, 0xE0080)}
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_ZWJ, _EMOJI_PRESENTATION = "\u200d", "\ufe0f"


def _char_width(c: str) -> int:
    if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me") or ord(c) in _JOINING:
        return 0
    if unicodedata.category(c) == "Cf" and c != "\u00ad":  # zero-width space, word joiner, BOM: drawn as nothing
        return 0
    return 2 if unicodedata.east_asian_width(c) in "WF" else 1


def _clusters(text: str) -> list[tuple[str, int]]:
    """`text` as what a terminal draws in one cell or two, with the columns of each: a character with the marks,
    joiners, variation selectors and skin tones that follow it, and what a ZWJ joins to it. A variation selector 16
    asks for the emoji presentation, which terminals draw two columns wide (❤️)."""
    out: list[list[Any]] = []
    joined = False
    for c in text:
        extends = bool(out) and (joined or _char_width(c) == 0 or ord(c) in _SKIN_TONES)
        if extends:
            out[-1][0] += c
            if c == _EMOJI_PRESENTATION:
                out[-1][1] = 2
        else:
            out.append([c, _char_width(c)])
        joined = c == _ZWJ
    return [(chars, columns) for chars, columns in out]


def _pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


def counted(n: int, one: str, many: str | None = None) -> str:
    """"1 delivery", "3 deliveries": a count with its noun in the right number (`many`: an irregular plural; else
    `one` with an s), where the words said "3 delivery(ies)"."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


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


# The bidi marks, embeddings, overrides and isolates: shown as they are, they reorder what a line says ("exit 0").
# Written out wherever text from outside is shown: tables (here), the log (bot.logs), a runbook's output, chat
# (bot.render: everything a template shows).
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# Characters a terminal acts on rather than shows: C0 and C1 controls (ESC starts colour and title sequences) and
# the bidi controls. Text from alerts reaches the terminal through tables.
_ACTIVE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ACTIVE.update({ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS})


_BIDI_SHOWN = {ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS}


def bidi_shown(text: str) -> str:
    """`text` with its bidi controls written out (`\\u202e`), as chat shows text from outside: an alert's title that
    reorders the card's own words ("Resolved" read backwards around it) shows what it holds instead."""
    return text.translate(_BIDI_SHOWN)


def printable(text: str) -> str:
    """`text` with the characters a terminal would act on written out (`\\x1b`), so that what an alert says
    cannot recolour, retitle or rewrite the terminal that shows it."""
    return text.translate(_ACTIVE)


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))


def _wrap(text: str, columns: int) -> list[str]:
    """`text` in lines of `columns` at most, broken at a space where there is one (a word wider than a line, where
    the line ends). A character drawn of several stays whole."""
    lines: list[str] = []
    rest = text
    while width(rest) > columns:
        parts = _clusters(rest)
        used, taken = 0, 0
        for _chars, w in parts:
            if used + w > columns:
                break
            used += w
            taken += 1
        head = "".join(chars for chars, _ in parts[:max(taken, 1)])
        space = head.rfind(" ")
        if space > 0:
            lines.append(head[:space])
            rest = rest[space + 1:]
        else:
            lines.append(head)
            rest = rest[len(head):]
    return [*lines, rest] if rest or not lines else lines


def _cut(text: str, columns: int, *, middle: bool = False) -> str:
    """`text` in `columns` at most, an ellipsis where it was cut: at the end, or in the middle (a third of it kept
    before, the rest after). A character drawn of several is kept or cut whole."""
    if width(text) <= columns:
        return text
    parts = _clusters(text)
    head = (columns - 1) // 3 if middle else columns - 1
    kept, used = [], 0
    for chars, w in parts:
        if used + w > head:
            break
        kept.append(chars)
        used += w
    tail: list[str] = []
    if middle:
        room = columns - 1 - used
        for chars, w in reversed(parts[len(kept):]):
            if w > room:
                break
            tail.append(chars)
            room -= w
    return "".join(kept) + "…" + "".join(reversed(tail))
