#!/usr/bin/env python3
"""Bootstrap: create ./.venv when needed, install the project into it, then run.

    python3 run.py serve [chatops serve options]   start the bot (example app.yaml, SQLite)
    python3 run.py test [pytest options]           run the whole test suite
    python3 run.py chatops ARGS...                 any other chatops command

Needs only Python 3.11+. The virtual environment is re-installed when
pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CHATOPS_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".chatops-installed"


def _ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"run.py: creating virtual environment in {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("run.py: installing the project and its test dependencies", file=sys.stderr)
    subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-e", f"{ROOT}[test]"],
        check=True,
    )
    STAMP.write_text(wanted + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__.strip())
        return 0 if argv else 2
    _ensure_venv()
    command, rest = argv[0], _absolute_config(argv[1:])
    if os.environ.get("CHATOPS_CONFIG"):  # a path given from where you are, not from the project
        os.environ["CHATOPS_CONFIG"] = os.path.abspath(os.environ["CHATOPS_CONFIG"])
    os.chdir(ROOT)  # the example app.yaml, and its ./chatops.db, are the project's
    if command == "test":
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif command == "chatops":
        args = [str(BIN / "chatops"), *rest]
    else:
        args = [str(BIN / "chatops"), command, *rest]
    os.execv(args[0], args)
    return 0  # not reached


def _absolute_config(args: list[str]) -> list[str]:
    """`-c FILE` / `--config FILE` / `--config=FILE` with FILE made absolute (the command runs in the project)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            out += [arg, os.path.abspath(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + os.path.abspath(arg.partition("=")[2])
        out.append(arg)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
