"""What every app (`supernet.train`, `supernet.retrain`, `search.evolve`, `space.info`, `space.baselines`)
shares: the Hydra config directory, the error-to-exit-code policy, atomic file writes and the check that
a space or an architecture fits the dataset. Pure Python: no torch, no Hydra import.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from space.errors import Diverged, UserError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

T = TypeVar("T")


def run_app(fn: Callable[[], T]) -> T:
    """Run an app body: a :class:`UserError` becomes one ``error: ...`` line on stderr and exit status 2,
    :class:`Diverged` one such line and status 1; anything else is a bug and keeps its traceback."""
    try:
        return fn()
    except UserError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr, flush=True)
        sys.exit(2)  # SystemExit is not an Exception: Hydra lets it through
    except Diverged as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr, flush=True)
        sys.exit(1)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` through a hidden temp file in the same directory and ``os.replace``, so a
    reader sees the old file or the new one, never half of one. ``data`` is text, bytes, or a function
    that writes the temp path it is given (e.g. one calling ``torch.save`` on it). The temp file is removed
    if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_fits(what: str, obj: Any, data: Any) -> None:
    """A space or an architecture (``what``) must take the dataset's images and predict its classes.

    Raises:
        UserError: naming the first of ``img_size``, ``in_chans``, ``num_classes`` that differs.
    """
    for k in ("img_size", "in_chans", "num_classes"):
        if getattr(obj, k) != getattr(data, k):
            raise UserError(f"{what}.{k}: {getattr(obj, k)} but dataset {data.name} has {getattr(data, k)} "
                            f"(use a {what} built for {data.name} input and classes, or another data=)")
