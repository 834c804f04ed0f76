"""What a measuring command writes besides its printout: its provenance (date, commit, machine, threads, command)
and what it printed, as JSON that scripts/docs.py renders into the docs' tables."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (the platform's machine type elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def provenance(command: str) -> dict[str, Any]:
    """Where and how a measurement is made: a table rendered from it states this once.

    ``dirty`` is true when tracked files differed from ``commit``; ``load`` is the 1/5/15-minute load average when
    the command started (other work on the machine slows every figure).
    """
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _git("rev-parse", "--short=7", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": command,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """``record`` as indented JSON at ``path``, written whole or not at all (the project's one atomic write)."""
    from space.app import atomic_write

    return atomic_write(path, json.dumps(record, indent=2) + "\n")


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def printed(into: list[str]) -> Iterator[None]:
    """Everything printed to stdout inside the block still reaches stdout and is appended to ``into`` as lines."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
        yield
    into.extend(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
