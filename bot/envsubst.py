"""`${VAR}` and `${VAR:-default}` in app.yaml, replaced from the environment.

Substitution happens on the parsed document, so a value can never change the
YAML structure; a placeholder token is put in first so `{bearer: ${TOKEN}}`
(flow style, unquoted) still parses. `$${` writes a literal `${`.

Any other `${...}` (the shell's `${VAR:?message}`, `${VAR-x}`, `${VAR:=x}`, one never closed) is an error rather than
its text: taken as written, `bearer: ${AM_TOKEN:?set it}` became the token. So is a bare `$NAME` in a secret (which
the shell would substitute, and this does not); a secret that holds such text comes from a variable, whose value is
never looked into.

A runbook step's `run` is the exception: it is the text the started program reads (its shell's `${VAR}`), so it is
kept exactly as written, and nothing of the bot's environment is put into it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN = re.compile(r"__chatops_env_(\d+)__")


@dataclass(frozen=True)
class Malformed:
    """A value written with a form of variable this does not substitute: an error wherever it is."""

    problem: str

    def __str__(self) -> str:
        return self.problem


_UNSUPPORTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)?(:?[-=?+])?")
_BARE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")
_ONLY = "only ${VAR} and ${VAR:-default}"
_STEP_RUN = re.compile(r"^runbooks\[\d+\]\.steps\[\d+\]\.run(\[\d+\])?$")  # what a runbook step runs: never substituted


def _literal_problem(text: str, secret: bool) -> str | None:
    """What is wrong with the text written around the references of a value (what `protect` left), if anything. Of
    a secret, no more is shown than a variable's name."""
    at = text.find("${")
    if at >= 0:
        rest = text[at:]
        m = _UNSUPPORTED.match(rest)
        assert m is not None
        if "}" not in rest:
            shown = f"${{{m.group(1) or ''}" if secret else rest.split()[0]
            return f"{shown} has no closing }} ({_ONLY} are supported; write $${{ for a literal ${{)"
        if m.group(2) is None:
            shown = rest[:rest.index("}") + 1] if not secret else f"${{{m.group(1) or ''}...}}"
        else:
            shown = f"${{{m.group(1) or ''}{m.group(2)}...}}"
        return f"{shown} is not supported: {_ONLY} are (write $${{ for a literal ${{)"
    if secret and (m := _BARE.search(text)):
        return (f"a secret holds `{m.group()}`, which is not substituted (only ${{VAR}} is): write "
                f"${{{m.group()[1:]}}} for the variable; a secret that really holds a `$` before a letter or `_` is "
                "given through a variable, whose value is used as it is")
    return None


@dataclass(frozen=True)
class Unset:
    """A value whose environment variable is not set, or set to nothing (and has no default)."""

    variable: str
    empty: bool = False  # set, to the empty string (what compose files and Kubernetes give a missing secret)

    def __str__(self) -> str:
        return f"{self.variable} is {'empty' if self.empty else 'not set'}"


def protect(text: str) -> tuple[str, list[tuple[str | None, str | None]]]:
    """Replace every reference by a token YAML reads as a plain word."""
    refs: list[tuple[str | None, str | None]] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            refs.append((None, "${"))
        else:
            refs.append((m.group(1), m.group(2)))
        return f"__chatops_env_{len(refs) - 1}__"

    return _REF.sub(repl, text), refs


def resolve(node: Any, refs: list[tuple[str | None, str | None]], env: Mapping[str, str], *,
            secret: Callable[[str], bool] = lambda key: False,
            origins: dict[str, tuple[list[str], str]] | None = None, path: str = "") -> Any:
    """Walk the parsed document; tokens become values, `Unset(VAR)` or `Malformed(problem)`. `secret(key)` says
    which keys hold secrets (a bare `$NAME` there is refused); `origins` gets, by config path, the variables each
    value was made of, and the value."""
    if isinstance(node, dict):
        return {resolve(k, refs, env, secret=secret, path=path):
                resolve(v, refs, env, secret=secret, origins=origins, path=f"{path}.{k}" if path else str(k))
                for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, refs, env, secret=secret, origins=origins, path=f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    if _STEP_RUN.match(path):
        # A runbook step's command is the started program's text (`sh -c "...${INSTANCE%%:*}"`, `echo $HOME`), which it
        # reads with its own environment of PATH and LANG: substituted here, `${SLACK_SIGNING_SECRET}` put the bot's
        # secret in the dialog, the thread and the audit log. Kept exactly as written, every form.
        return _TOKEN.sub(lambda m: _written(*refs[int(m.group(1))]), node)
    key = path.rsplit(".", 1)[-1].split("[", 1)[0]
    hidden = secret(key) or _url_password(node) is not None
    problem = None if path.startswith("runbooks[") and not hidden else _literal_problem(_TOKEN.sub("\0", node), hidden)
    if problem:
        return Malformed(problem)
    if "__chatops_env_" not in node:
        return node
    for m in _TOKEN.finditer(node):
        name, default = refs[int(m.group(1))]
        if name is not None and default is not None and "${" in default:
            # `${A:-${B}}` (a default that is itself a reference): read as the default `${B` and a `}` left over, the
            # value would be that text, a guessable token; the shell's nesting is not supported.
            return Malformed(f"${{{name}:-${{...}}}} nests a reference in a default, which is not supported "
                             f"({_ONLY} are, the default being plain text): set {name} itself")
    missing: list[Unset] = []
    used: list[str] = []
    nothing: list[Unset] = []  # variables unset or empty whose `:-` default is empty too

    def repl(m: re.Match[str]) -> str:
        name, default = refs[int(m.group(1))]
        if name is None:
            return default or ""
        if env.get(name):
            used.append(name)
            return env[name]
        if default is not None:  # as in the shell, `:-` covers a variable set to nothing too
            if not default:
                nothing.append(Unset(name, empty=name in env))
            return default
        missing.append(Unset(name, empty=name in env))
        return ""

    value = _TOKEN.sub(repl, node)
    if used and origins is not None:
        origins[path] = (used, value)
    elif not value and nothing and origins is not None:  # (a secret a mode may do without: an error names its variable)
        origins[path] = ([u.variable for u in nothing], value)
    if not missing and not value and nothing and _REQUIRED_SECRET.match(path):
        # A secret an adapter or a source cannot be without that came to nothing (`${SLACK_BOT_TOKEN:-}`): the section
        # is off, as for `${SLACK_BOT_TOKEN}` (the error said only that the token was malformed, or too short). Not one
        # that may be empty: polling Telegram's webhook_secret, the Teams emulator's app_id and app_password.
        return nothing[0]
    return missing[0] if missing else value


_REQUIRED_SECRET = re.compile(r"^(adapters\.(slack\.(bot_token|signing_secret)|telegram\.bot_token)"
                              r"|sources\[\d+\]\.auth\.(bearer|hmac_secret))$")


def _written(name: str | None, default: str | None) -> str:
    """A reference as app.yaml wrote it (what `protect` replaced by a token)."""
    if name is None:
        return "$${"
    return "${" + name + (f":-{default}" if default is not None else "") + "}"


def _url_password(text: str) -> str | None:
    """The password of a URL written as `scheme://user:password@host...` (storage.url), else None."""
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:([^/]*)@", text)
    return m.group(1) if m else None


def find_malformed(node: Any, path: str = "") -> list[tuple[str, Malformed]]:
    """Every `Malformed` in a subtree, with its config path (a key: the mapping it is in)."""
    found: list[tuple[str, Malformed]] = []
    if isinstance(node, Malformed):
        found.append((path, node))
    elif isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, Malformed):
                found.append((path, k))
            found += find_malformed(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_malformed(v, f"{path}[{i}]")
    return found


def find_unset(node: Any, path: str = "") -> list[tuple[str, Unset]]:
    """Every `Unset` in a subtree, with its config path."""
    found: list[tuple[str, Unset]] = []
    if isinstance(node, Unset):
        found.append((path, node))
    elif isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, Unset):  # a key made of a variable: the mapping it is in is where
                found.append((path, k))
                continue
            found += find_unset(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_unset(v, f"{path}[{i}]")
    return found


def fill(node: Any, value: str) -> Any:
    """A copy of a subtree with every `Unset` (and `Malformed`) replaced by `value` (to check the rest of a section
    that is off, or of a config with such a value)."""
    if isinstance(node, (Unset, Malformed)):
        return value
    if isinstance(node, dict):
        return {fill(k, value): fill(v, value) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, value) for v in node]
    return node
