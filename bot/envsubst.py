"""`${VAR}` and `${VAR:-default}` in app.yaml, replaced from the environment.

Substitution happens on the parsed document, so a value can never change the
YAML structure; a placeholder token is put in first so `{bearer: ${TOKEN}}`
(flow style, unquoted) still parses. `$${` writes a literal `${`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN = re.compile(r"__chatops_env_(\d+)__")


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


def resolve(node: Any, refs: list[tuple[str | None, str | None]], env: Mapping[str, str]) -> Any:
    """Walk the parsed document; tokens become values or `Unset(VAR)`."""
    if isinstance(node, dict):
        return {resolve(k, refs, env): resolve(v, refs, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, refs, env) for v in node]
    if not isinstance(node, str) or "__chatops_env_" not in node:
        return node
    missing: list[Unset] = []

    def repl(m: re.Match[str]) -> str:
        name, default = refs[int(m.group(1))]
        if name is None:
            return default or ""
        if env.get(name):
            return env[name]
        if default is not None:  # as in the shell, `:-` covers a variable set to nothing too
            return default
        missing.append(Unset(name, empty=name in env))
        return ""

    value = _TOKEN.sub(repl, node)
    return missing[0] if missing else value


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
    """A copy of a subtree with every `Unset` replaced by `value` (to check the rest of a section that is off)."""
    if isinstance(node, Unset):
        return value
    if isinstance(node, dict):
        return {fill(k, value): fill(v, value) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, value) for v in node]
    return node
