"""Where a result comes from: the command that made it, the code state, the machine and the date (what a
committed study file records so that its tables can be traced and re-run)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def code_state() -> str:
    """The checkout's git commit, ``-dirty`` with uncommitted changes to tracked files; ``unknown``
    outside a checkout or without git."""
    root = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    """The CPU count and model, e.g. ``2-core Intel(R) Xeon(R) Processor`` (what figures compare within)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{os.cpu_count()}-core {model}"


def of_command(program: str, args: Sequence[str]) -> dict[str, str]:
    """``command`` (``program`` and its arguments), ``code`` (:func:`code_state` and :func:`machine`) and
    the UTC ``date``."""
    return {"command": " ".join([program, *map(shlex.quote, args)]), "code": f"{code_state()} ({machine()})",
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
