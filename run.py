#!/usr/bin/env python3
"""Bootstrap: create ./.venv when needed, install the project into it, then run.

    python3 run.py serve [chatops serve options]   start the bot (example app.yaml, SQLite)
    python3 run.py test [pytest options]           run the whole test suite
    python3 run.py chatops ARGS...                 any other chatops command

Needs only Python 3.11+. The virtual environment is re-installed when
pyproject.toml changes. Commands run where you are, as `.venv/bin/chatops`
does (./app.yaml, else the example one beside the code; a relative SQLite
path from here); the test suite runs in the project, its paths named from there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.path.abspath(os.environ.get("CHATOPS_VENV", ROOT / ".venv")))
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
    command, rest = argv[0], argv[1:]
    if command == "test":
        os.chdir(ROOT)  # pytest's rootdir, its conftest and the tests/ paths are the project's
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif command == "chatops":
        args = [str(BIN / "chatops"), *rest]
    else:
        args = [str(BIN / "chatops"), command, *rest]
    os.execv(args[0], args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
