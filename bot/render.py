"""Message templates: Jinja2, one template per message kind and platform.

A template is looked up as `{kind}.{platform}.{format}.j2`, first in the
override directory (when one is given), then in the project's `templates/`;
when neither has it, the generic plain-text `{kind}.generic.txt.j2` is used
(errbot's specific-then-generic loader). HTML templates are autoescaped. JSON
templates print strings with `tojson` (and Slack text with `slack_escape`
first); their output is parsed and checked, and a template that makes
something a platform would refuse raises `RenderError` naming it.
"""

from __future__ import annotations

import json
import re
import traceback
from html.parser import HTMLParser
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
from markupsafe import Markup, escape

from bot.incidents import ACKNOWLEDGED, RESOLVED, TRIGGERED
from bot.tables import BIDI_CONTROLS, bidi_shown
from bot.view import incident_context, thread_line

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
TEXT_FORMATS = ("html", "md", "txt")  # render_text takes the first a platform has
SLACK_MAX_BLOCKS, SLACK_SECTION_MAX, SLACK_FIELD_MAX, SLACK_FIELDS_MAX = 50, 3000, 2000, 10
SLACK_HEADER_MAX, SLACK_CONTEXT_ELEMENTS_MAX, SLACK_TEXT_MAX = 150, 10, 40000
# What Telegram's HTML parse mode takes (core.telegram.org/bots/api#html-style); anything else and it refuses the message.
TELEGRAM_TAGS = frozenset({"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a",
                           "tg-emoji", "code", "pre", "blockquote"})
TELEGRAM_ENTITIES = frozenset({"lt", "gt", "amp", "quot"})
TELEGRAM_TEXT_MAX = 4096  # characters of a message's text once its tags and entities are parsed


_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,40}")
_SLACK_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


class RenderError(Exception):
    """A template is missing, broken, or made output the platform would refuse."""

    def __init__(self, template: str, problem: str):
        self.template = template
        self.problem = problem
        super().__init__(f"template {template}: {problem}")


def slack_escape(value: Any, limit: int | None = None) -> str:
    """Slack mrkdwn text: `&`, `<`, `>` as entities, cut to `limit` characters (never inside an entity)."""
    pieces = [_SLACK_ENTITIES.get(c, c) for c in ("" if value is None else str(value))]
    text = "".join(pieces)
    if limit is None or len(text) <= limit:
        return text
    out, size = [], 0
    for piece in pieces:
        if size + len(piece) > limit - 1:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out) + "\u2026"


def slack_link(link: Any) -> str:
    """A (label, url) pair as a mrkdwn link `<url|label>`; a `|` in the URL would end it, so it is encoded."""
    label, url = link
    return f"<{slack_escape(str(url).replace('|', '%7C'))}|{slack_escape(label)}>"


def slack_links(links: Any, limit: int = 2900) -> str:
    """Links as `<url|label> · <url|label>`, as many as fit in `limit` characters (a Block Kit text element holds
    3,000): a link that does not fit is left out whole (a cut URL would lead somewhere else)."""
    out: list[str] = []
    size = 0
    for label, url in links:
        piece = slack_link((clip(label, 80), url))
        extra = len(piece) + (3 if out else 0)
        if size + extra > limit:
            continue
        out.append(piece)
        size += extra
    return " \u00b7 ".join(out)


SLACK_WHEN = "{ago} ({date_short_pretty} {time})"  # "12 minutes ago (today 2:03 PM)"


def slack_date(at: Any, fallback: Any) -> str:
    """A moment (Unix seconds) as Slack's date token: how long ago, and the day and time in each reader's own time
    zone, which Slack keeps current as the card ages ("12 minutes ago (today 2:03 PM)", the next day "a day ago
    (yesterday 2:03 PM)"); `fallback` (escaped) where it cannot."""
    return f"<!date^{int(at)}^{SLACK_WHEN}|{slack_escape(fallback)}>"


def slack_facts(facts: Any, limit: int = 2900) -> str:
    """An incident's facts (bot.view) as one escaped mrkdwn line, `a · b`. A fact that ends with a moment (`at`, its
    `text` ending with `when`) shows it as Slack's date token. As many whole facts as fit in `limit` characters: a
    token is never cut."""
    out: list[str] = []
    size = 0
    for fact in facts:
        text, when = str(fact["text"]), fact.get("when")
        if fact.get("at") is not None and when and text.endswith(when):
            piece = slack_escape(text[: len(text) - len(when)]) + slack_date(fact["at"], when)
        else:
            piece = slack_escape(text, limit)
        extra = len(piece) + (3 if out else 0)
        if size + extra > limit:  # (the limit leaves room for the ellipsis: a text element holds 3,000)
            return " \u00b7 ".join(out) + " \u2026"
        out.append(piece)
        size += extra
    return " \u00b7 ".join(out)


def teams_link(link: Any) -> str:
    """A (label, url) pair as a Markdown link for an Adaptive Card's TextBlock: brackets in the label and
    parentheses in the URL, which would end it, escaped and encoded."""
    label, url = link
    label = re.sub(r"([\\\[\]])", r"\\\1", clip(label, 80))
    return f"[{label}]({str(url).replace('(', '%28').replace(')', '%29')})"


def teams_text(value: Any) -> str:
    """Text from an alert made inert in Teams' markdown (an Adaptive Card's TextBlock, a message): a link with a label
    of its own (`[Silence it here](https://...)`, or `[Silence it here]` and a `[Silence it here]: https://...`
    under it) or bold that passes for the card's own words (`**Latest:**`) is
    shown as written, its markup broken by a zero-width space. A bare URL stays a link that shows where it goes."""
    text = "" if value is None else str(value)
    # every pair in a run (`***x***` kept a `**` pair: bold still); a reference link's definition (`[x]: url`) too
    return _EMPHASIS_RUN.sub("\\1\u200b", text.replace("](", "]\u200b(").replace("]:", "]\u200b:"))


_EMPHASIS_RUN = re.compile(r"([*_])(?=\1)")


def clip(value: Any, limit: int) -> str:
    """Plain text cut to `limit` characters, ending with an ellipsis when cut."""
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "\u2026"


def telegram_code(value: Any) -> Markup:
    """Telegram HTML of plain text whose `code` spans (Slack's markup, which the bot's own words use for commands and
    names, an escalation's note among them) and ```fenced``` ones (a command that holds a backtick, bot.view.code)
    become <code>; the rest escaped. Telegram shows a backtick as typed."""
    out = []
    for n, fenced in enumerate(("" if value is None else str(value)).split("```")):
        if n % 2:
            out.append(Markup("<code>{}</code>").format(fenced.replace("\u200b", "")))
            continue
        out.extend(Markup("<code>{}</code>").format(part) if i % 2 else escape(part)
                   for i, part in enumerate(fenced.split("`")) if part)
    return Markup("").join(out)


def chunks(value: Any, size: int, most: int = 40) -> list[str]:
    """Escaped text split into pieces of at most `size` characters, at line ends where it can be."""
    text = "" if value is None else str(value)
    out: list[str] = []
    while text and len(out) < most:
        if len(text) <= size:
            out.append(text)
            break
        cut = text.rfind("\n", 0, size + 1)
        if cut <= 0:
            cut = size
            amp = text.rfind("&", max(0, cut - 5), cut)  # don't split &amp; and friends
            if amp != -1 and ";" not in text[amp:cut]:
                cut = amp
        out.append(text[:cut])
        text = text[cut:].lstrip("\n")
    if text and len(out) == most and len(text) > len(out[-1]):
        out[-1] = clip(out[-1], size)
    return out


class Renderer:
    """Renders `kind` for `platform` from the override directory, templates/, or the generic fallback."""

    def __init__(self, override_dir: Path | None = None):
        self.dirs = [Path(override_dir)] if override_dir is not None else []
        self.dirs.append(TEMPLATES)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2", "htm.j2"), default=False,
                                                default_for_string=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
        self.env.filters.update(slack_escape=slack_escape, slack_link=slack_link, slack_links=slack_links, clip=clip, chunks=chunks,
                                slack_date=slack_date, slack_facts=slack_facts, teams_link=teams_link, teams_text=teams_text,
                                telegram_code=telegram_code,
                                tojson=_tojson)
        self.checks: dict[str, Callable[[Any], str | None]] = {"slack": _slack_problem, "teams": _teams_problem}
        self.text_checks: dict[tuple[str, str], Callable[[str], str | None]] = {("telegram", "html"): _telegram_problem}

    def render_text(self, kind: str, platform: str, context: Mapping[str, Any]) -> str:
        """Text for `platform`: its `.html`, `.md` or `.txt` template, else the generic text."""
        name = self.find(kind, platform, TEXT_FORMATS)
        return self._render(name, context).strip()

    def render_json(self, kind: str, platform: str, context: Mapping[str, Any]) -> dict[str, Any]:
        """The platform's JSON payload, parsed and checked. Without a JSON template for `kind`, the
        generic text is wrapped by the platform's `text` JSON template (or returned as `{"text": ...}`)."""
        name = self.find(kind, platform, ("json",))
        if name == f"{kind}.generic.txt.j2":
            text = self._render(name, context).strip()
            if kind == "text" or self.find("text", platform, ("json",), fallback=False) is None:
                return {"text": text}
            return self.render_json("text", platform, {"text": text})
        return self._payload(name, platform, self._render(name, context))

    def _payload(self, name: str, platform: str, output: str) -> dict[str, Any]:
        """A JSON template's output, parsed and checked as `platform` would take it."""
        try:
            payload = json.loads(output)
        except json.JSONDecodeError as e:
            raise RenderError(self._where(name), f"output is not valid JSON: {e.msg} at line {e.lineno} "
                                                 f"column {e.colno}") from None
        problem = "output must be a JSON object" if not isinstance(payload, dict) else None
        check = self.checks.get(platform)
        problem = problem or (check(payload) if check else None)
        if problem:
            raise RenderError(self._where(name), problem)
        return payload

    def check(self, samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[RenderError]:
        """What is wrong with the override directory's templates, before any message needs them: every `.j2` file
        there must compile, and `{kind}.{platform}.{format}.j2` for a kind in `samples` must render each sample
        context (a JSON one to a payload `platform` takes). A template broken there fails every message of its kind
        (each retried, then given up in the outbox), so `chatops check-config` and start-up refuse it."""
        if len(self.dirs) < 2:
            return []
        folder = self.dirs[0]
        found: dict[str, RenderError] = {}  # by template: one included by several is named once
        for path in sorted(folder.rglob("*.j2")):
            name = path.relative_to(folder).as_posix()
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            try:
                self._template(name)
            except RenderError as e:
                found.setdefault(e.template, e)
                continue
            parts = name.removesuffix(".j2").split(".")
            if len(parts) != 3 or parts[0] not in samples:
                continue  # it compiles; what it is given (when another includes it) is that one's to say
            kind, platform, fmt = parts
            for context in samples[kind]:
                try:
                    output = self._render(name, context)
                    if fmt == "json":
                        self._payload(name, platform, output)
                    elif (text_check := self.text_checks.get((platform, fmt))) and (problem := text_check(output)):
                        raise RenderError(self._where(name), problem)
                except RenderError as e:
                    said = f"{e.problem} (rendering a sample {kind} message)"
                    if re.match(rf"(line \d+: )?{jinja2.UndefinedError.__name__}:", e.problem):  # (as _render names it)
                        said = (f"{e.problem} (rendering a sample {kind} message; {kind} templates are given "
                                f"{', '.join(sorted(context))}: see {TEMPLATES / 'README.md'})")
                    found.setdefault(e.template, RenderError(e.template, said))
                    break
        return list(found.values())

    def find(self, kind: str, platform: str, formats: tuple[str, ...], *, fallback: bool = True) -> str | None:
        """The template name to use: override dir first, then templates/, each trying `formats` in order."""
        for part in (kind, platform):
            if not _NAME.fullmatch(part):
                raise RenderError(f"{kind}.{platform}", f"{part!r} is not a template kind or platform name")
        for d in self.dirs:
            for fmt in formats:
                name = f"{kind}.{platform}.{fmt}.j2"
                if (d / name).is_file():
                    return name
        if not fallback:
            return None
        name = f"{kind}.generic.txt.j2"
        if any((d / name).is_file() for d in self.dirs):
            return name
        tried = ", ".join(f"{kind}.{platform}.{f}.j2" for f in formats)
        raise RenderError(name, f"not found (tried {tried} and {name} in {', '.join(map(str, self.dirs))})")

    def _template(self, name: str) -> jinja2.Template:
        try:
            return self.env.get_template(name)
        except jinja2.TemplateSyntaxError as e:
            raise RenderError(self._where(e.name or name), f"line {e.lineno}: {e.message}") from None
        except UnicodeDecodeError as e:
            raise RenderError(self._where(name), f"not UTF-8 text (byte {e.start} cannot be read); save it as "
                                                 "UTF-8") from None

    def _render(self, name: str, context: Mapping[str, Any]) -> str:
        try:
            return self._template(name).render(_bidi_shown(dict(context)))
        except jinja2.TemplateSyntaxError as e:  # an included template's
            raise RenderError(self._where(e.name or name), f"line {e.lineno}: {e.message}") from None
        except Exception as e:  # what an expression raises ({{ 1/0 }}, an unknown name, tojson of something that is
            # not JSON): where, as a syntax error says it
            where, line = self._raised_at(e, name)
            raise RenderError(self._where(where), f"{'' if line is None else f'line {line}: '}{type(e).__name__}: {e}"
                              ) from None

    def _raised_at(self, exc: BaseException, name: str) -> tuple[str, int | None]:
        """The template (by name) and line an exception was raised in: Jinja's traceback frames carry them."""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            path = Path(frame.filename).resolve()
            for d in self.dirs:
                if path.suffix == ".j2" and path.is_relative_to(d.resolve()):
                    return path.relative_to(d.resolve()).as_posix(), frame.lineno
        return name, None

    def _where(self, name: str) -> str:
        path = next((d / name for d in self.dirs if (d / name).is_file()), None)
        return f"{name} ({path})" if path else name


def _bidi_shown(value: Any) -> Any:
    """A template's context with the bidi controls of every text in it written out (bot.tables.bidi_shown): what an
    alert, a person or a runbook says cannot reorder the words around it on a card, a line or a page."""
    if isinstance(value, str):
        return bidi_shown(value) if _HAS_BIDI.search(value) else value
    if isinstance(value, dict):
        return {k: _bidi_shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_bidi_shown(v) for v in value) if not hasattr(value, "_fields") else value
    return value


_HAS_BIDI = re.compile(f"[{BIDI_CONTROLS}]")


@jinja2.pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
    """Jinja's `tojson` (valid JSON, with `<`, `>`, `&`, `'` as \\u escapes), refusing undefined values."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises, naming the variable
        value = None
    return jinja2.filters.do_tojson(eval_ctx, value, indent)


class _TelegramHTML(HTMLParser):
    """Reads a message as Telegram's HTML parse mode would, noting the first thing it would refuse."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.open: list[str] = []
        self.length = 0
        self.problem: str | None = None

    def _refuse(self, problem: str) -> None:
        self.problem = self.problem or problem

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in TELEGRAM_TAGS:
            self._refuse(f"<{tag}> is not a tag Telegram takes (it takes {', '.join(sorted(TELEGRAM_TAGS))})")
        self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._refuse(f"<{tag}/>: Telegram takes no self-closing tags (write a line break as a new line)")

    def handle_endtag(self, tag: str) -> None:
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self._refuse(f"</{tag}> closes no open <{tag}>" + (f" (<{self.open[-1]}> is open)" if self.open else ""))

    def handle_entityref(self, name: str) -> None:
        if name not in TELEGRAM_ENTITIES:
            self._refuse(f"&{name}; is not an entity Telegram takes (only &lt; &gt; &amp; &quot; and numeric ones)")
        self.length += 1

    def handle_charref(self, name: str) -> None:
        self.length += 1

    def handle_data(self, data: str) -> None:
        self.length += len(data)


def _telegram_problem(text: str) -> str | None:
    """What Telegram would refuse in a message in its HTML parse mode, or None."""
    if not text.strip():
        return "output is empty; Telegram refuses an empty message"
    reader = _TelegramHTML()
    reader.feed(text)
    reader.close()
    if reader.problem is None and reader.open:
        reader.problem = f"<{reader.open[-1]}> is never closed"
    if reader.problem is None and reader.length > TELEGRAM_TEXT_MAX:
        reader.problem = f"{reader.length} characters of text; Telegram takes {TELEGRAM_TEXT_MAX} in a message"
    return reader.problem


def _slack_problem(payload: dict[str, Any]) -> str | None:
    """What Slack would refuse in a chat.postMessage payload, or None."""
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        return '"text" must be a non-empty string (the notification fallback)'
    if len(text) > SLACK_TEXT_MAX:
        return f'"text" is {len(text)} characters; Slack allows {SLACK_TEXT_MAX}'
    blocks = payload.get("blocks")
    if not isinstance(blocks, list):
        return '"blocks" must be a list'
    if len(blocks) > SLACK_MAX_BLOCKS:
        return f"{len(blocks)} blocks; Slack allows {SLACK_MAX_BLOCKS}"
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return f"blocks[{i}] must be an object with a \"type\""
        problem = _slack_block_problem(block)
        if problem:
            return f"blocks[{i}] ({block['type']}): {problem}"
    return None


def _teams_problem(payload: dict[str, Any]) -> str | None:
    """What the Teams adapter cannot send of a `{"text", "body"}` payload (body: an Adaptive Card's elements), or None."""
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        return '"text" must be a non-empty string (the notification\'s summary)'
    body = payload.get("body", [])
    if not isinstance(body, list) or not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in body):
        return '"body" must be a list of Adaptive Card elements, each an object with a "type"'
    return None


def _slack_block_problem(block: dict[str, Any]) -> str | None:
    kind = block["type"]
    if kind in ("section", "header"):
        limit = SLACK_SECTION_MAX if kind == "section" else SLACK_HEADER_MAX
        text = block.get("text")
        if text is not None and not _text_object_ok(text, limit):
            return f"text must be a text object with 1 to {limit} characters"
        fields = block.get("fields")
        if fields is not None:
            if not isinstance(fields, list) or not 0 < len(fields) <= SLACK_FIELDS_MAX:
                return f"fields must be a list of 1 to {SLACK_FIELDS_MAX} text objects"
            if not all(_text_object_ok(f, SLACK_FIELD_MAX) for f in fields):
                return f"each field must be a text object with 1 to {SLACK_FIELD_MAX} characters"
        if text is None and fields is None:
            return "needs text or fields"
    elif kind == "context":
        elements = block.get("elements")
        if not isinstance(elements, list) or not 0 < len(elements) <= SLACK_CONTEXT_ELEMENTS_MAX:
            return f"elements must be a list of 1 to {SLACK_CONTEXT_ELEMENTS_MAX}"
        if not all(isinstance(e, dict) and (e.get("type") == "image" or _text_object_ok(e, SLACK_SECTION_MAX))
                   for e in elements):
            return f"each text element must have 1 to {SLACK_SECTION_MAX} characters"
    return None


def _text_object_ok(obj: Any, limit: int) -> bool:
    return (isinstance(obj, dict) and obj.get("type") in ("mrkdwn", "plain_text")
            and isinstance(obj.get("text"), str) and 0 < len(obj["text"]) <= limit)


def sample_contexts(now: datetime) -> dict[str, list[dict[str, Any]]]:
    """Contexts such as the bot renders, by message kind: an incident's card as it fires, is acknowledged, resolved and
    silenced (three alerts, a title with quotes and markup as alert titles have), a thread line, a plain message.
    `chatops check-config` and start-up render the override templates with them (bot.render.Renderer.check)."""
    opened = now - timedelta(minutes=12)
    labels = {"alertname": "DiskFull", "instance": "db-1:9100", "service": "postgres"}
    alerts = [SimpleNamespace(summary=f'Disk {used}% full on "/var"', status="firing", labels=labels,
                              annotations={"description": "only 300 MB left <& more>",
                                           "runbook_url": "https://wiki.example/disk", "values": f"B={used}, C=1"},
                              links={"dashboard": "https://grafana.example/d/abc"},
                              last_received=now - timedelta(minutes=ago))
              for used, ago in ((91, 12), (93, 5), (97, 1))]
    firing = dict(id=42, title='Disk "/var" full on <db-1> & db-2', status=TRIGGERED, silenced=False,
                  severity="critical", priority=95, labels=labels,
                  links={"generator": "http://prom:9090/graph?g0.expr=disk"}, sources=["alertmanager", "grafana"],
                  alert_count=3, firing_count=2, opened_at=opened, acknowledged_by=None, acknowledged_at=None,
                  resolved_by=None, resolved_at=None)
    states = [firing, {**firing, "status": ACKNOWLEDGED, "acknowledged_by": "alice", "acknowledged_at": now},
              {**firing, "status": RESOLVED, "firing_count": 0, "resolved_by": "source:alertmanager",
               "resolved_at": now},
              {**firing, "silenced": True}]
    return {
        "incident": [incident_context(SimpleNamespace(**state), alerts, now=now, acknowledged_name="Alice")
                     for state in states],
        "thread": [{"line": thread_line("incident.acknowledged", {}, actor_name="Alice"), "incident_id": 42}],
        "text": [{"text": 'Commands: /incident ack <id>, /oncall [rotation]\n"quoted" & <marked> `code`'}],
    }
