"""The dependency rules of the layout hold: no platform SDK in the core, the core imports no other folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDKS = ("slack_bolt", "slack_sdk", "telegram", "botbuilder")
COMPOSITION_ROOTS = {"server.py", "cli.py"}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["bot", "handlers", "storage"])
def test_no_platform_sdk_outside_adapters(folder: str) -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(imported(p) & set(SDKS)) for p in (ROOT / folder).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_imports_no_other_folder_except_its_composition_roots() -> None:
    offenders = {}
    for path in (ROOT / "bot").glob("*.py"):
        if path.name in COMPOSITION_ROOTS:
            continue
        bad = imported(path) & {"handlers", "storage", "adapters"}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_storage_imports_no_handlers_or_adapters() -> None:
    offenders = {p.name: sorted(imported(p) & {"handlers", "adapters"}) for p in (ROOT / "storage").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
