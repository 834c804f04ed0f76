"""What every app (`supernet.train`, `supernet.retrain`, `search.evolve`, `space.info`, `space.baselines`)
shares: the Hydra config directory, the error-to-exit-code policy, atomic file writes and the check that
a space or an architecture fits the dataset. Pure Python: no torch, no Hydra import.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from space.errors import Diverged, UserError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

T = TypeVar("T")


def run_app(fn: Callable[[], T]) -> T:
    """Run an app body: a :class:`UserError` becomes one ``error: ...`` line on stderr and exit status 2,
    :class:`Diverged` one such line and status 1; anything else is a bug and keeps its traceback.

    Under torchrun every rank usually meets the same error: rank 0 reports it, and the other ranks wait a
    moment first (10 s: on a loaded machine the launcher took over 3 s), in which the launcher stops them once
    rank 0 has exited; a rank that is still running
    after it (an error of its own, e.g. unreadable data on one node) then reports it, naming its rank.
    """
    try:
        return fn()
    except (UserError, Diverged) as e:
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank:
            time.sleep(10)
        print(f"error{f' (rank {rank})' if rank else ''}: " + " ".join(str(e).splitlines()), file=sys.stderr,
              flush=True)
        sys.exit(2 if isinstance(e, UserError) else 1)  # SystemExit is not an Exception: Hydra lets it through


def config_hash(cfg: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able config (a search space: a checkpoint's ``space_hash``, a latency table's)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def check_overrides(config_name: str, argv: list[str] | None = None) -> None:
    """Compose ``conf/<config_name>.yaml`` with the command line's overrides before Hydra does, so that an
    unknown preset, an unknown key or a malformed override is one ``error: config: ...`` line and exit 2
    instead of Hydra's multi-line report. Command lines with Hydra flags (``--help``, ``-m``) go to Hydra as
    they are."""
    overrides = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") for a in overrides):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def compose_them() -> None:
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                compose(config_name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise UserError(f"config: {text}") from None

    run_app(compose_them)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` through a hidden temp file in the same directory and ``os.replace``, so a
    reader sees the old file or the new one, never half of one. ``data`` is text, bytes, or a function
    that writes the temp path it is given (e.g. one calling ``torch.save`` on it).

    Raises:
        UserError: the write failed (full disk, read-only or missing directory, ...); the temp file is
            removed and the previous ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        reason = _write_failure(e)
        if reason is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise UserError(f"{path}: {reason} writing it; {kept}") from None
    return path


def atomic_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build the directory ``path`` as a whole: ``fill`` writes a hidden temp directory next to it, which is
    renamed into place when ``fill`` returns; on any error (Ctrl-C included) the temp directory is removed, so
    ``path`` is complete or absent. Temp directories of writers that were killed (their pid is gone) are
    removed first.

    Raises:
        UserError: ``path`` exists, or the file system failed (full disk, read-only, ...); nothing is left.
    """
    import shutil

    path = Path(path)
    if path.exists():
        raise UserError(f"{path}: already exists (remove it or choose another path); nothing was written")
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(e)
        if reason is None:
            raise
        raise UserError(f"{path}: {reason} writing it; nothing was written") from None
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _write_failure(e: BaseException) -> str | None:
    """The reason a write failed, if it is the file system's (torch.save reports ENOSPC as a RuntimeError)."""
    if isinstance(e, OSError):
        return (os.strerror(e.errno) if e.errno else str(e)).lower()
    if isinstance(e, RuntimeError) and "write" in str(e).lower():
        return f"the write failed ({str(e).splitlines()[0][:100]}; is the disk full?)"
    return None


def _lock_holder(path: Path) -> str:
    """The pid holding a flock on ``path``, read from /proc/locks (Linux), or "unknown"."""
    st = os.stat(path)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(st.st_ino):
            return f[4]
    return "unknown"


@contextmanager
def run_dir_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock on ``run_dir`` (created if missing) for the length of a run, so two runs
    never write one directory; the kernel drops it when the process dies, so no stale lock survives. While
    it is held, leftover temp files of killed writers (``.NAME.tmpPID``) are removed. Writes no file.

    Args:
        enabled: False on the ranks that do not write (every DDP rank but 0).

    Raises:
        UserError: another live process holds the lock (its pid is named).
    """
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"run_dir: cannot use {run_dir} ({os.strerror(e.errno).lower()}; pass another run_dir=)") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise UserError(f"run_dir: {run_dir} is in use by another run (pid {_lock_holder(run_dir)}); wait for "
                            "it to finish or pass another run_dir=") from None
        for tmp in run_dir.glob(".*.tmp*"):  # partial writes of killed runs
            tmp.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_fits(what: str, obj: Any, data: Any) -> None:
    """A space or an architecture (``what``) must take the dataset's images and predict its classes.

    Raises:
        UserError: naming the first of ``img_size``, ``in_chans``, ``num_classes`` that differs.
    """
    for k in ("img_size", "in_chans", "num_classes"):
        if getattr(obj, k) != getattr(data, k):
            raise UserError(f"{what}.{k}: {getattr(obj, k)} but dataset {data.name} has {getattr(data, k)} "
                            f"(use a {what} built for {data.name} input and classes, or another data=)")
