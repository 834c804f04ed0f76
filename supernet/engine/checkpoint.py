"""The checkpoint layout, in one place: what a training checkpoint holds, how it is written (atomically, from a
background thread that never stalls training) and read (``weights_only``: no pickle can run code), and how a
trained supernet is loaded back for search and inherited-weight retraining.

A training checkpoint (``run_dir/last.ckpt``) is a dict:

* ``model``, ``optimizer``, ``scheduler``: the state dicts; ``step`` / ``total_steps``; ``rng_cpu``;
* ``identity``: every setting that changes the result (engine/loop.py ``run_identity``); a resume must match it;
* ``task_state``: the task's own resumable state (e.g. the digest of the paths trained so far);
* ``lr_history``: the peak-lr restarts of ``resume_lr=`` (a way out of divergence), with their steps;
* ``config``: the app's whole resolved config (search reads ``config.data`` and ``config.recipe`` to rebuild the
  validation split as training saw it);
* the task's extras: a supernet checkpoint carries ``space`` and ``space_hash``, read by :func:`load_supernet`.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from space.app import atomic_write
from space.errors import UserError

CKPT_NAME = "last.ckpt"
SUPERNET_KEYS = frozenset({"model", "space", "space_hash", "config"})


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temp file and a rename: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def host_snapshot(obj: Any) -> tuple[Any, torch.cuda.Event | None]:
    """A copy of ``obj`` (nested dicts / lists / tuples of tensors and plain values) whose tensors live in host
    memory of their own, so training may go on updating the originals in place; and, when some came from a CUDA
    device, the event after which the copies hold their values.

    CUDA tensors are copied without waiting (``non_blocking`` into pinned memory, which the caching host
    allocator reuses from one checkpoint to the next): the copies are queued on the current stream before any
    later kernel, so they read exactly the state of this moment while the host goes on queueing steps.
    """
    cuda = False

    def copy(x: Any) -> Any:
        nonlocal cuda
        if isinstance(x, torch.Tensor):
            if x.device.type == "cuda":
                cuda = True
                out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
                return out.copy_(x.detach(), non_blocking=True)
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x  # numbers, strings, None: immutable

    out = copy(obj)
    if not cuda:
        return out, None
    ready = torch.cuda.Event()
    ready.record()
    return out, ready


class CheckpointWriter:
    """Writes checkpoints with :func:`save_checkpoint` from a background thread, one at a time: ``submit``
    snapshots the state to host memory at once (:func:`host_snapshot`) and returns; the next ``submit`` and
    ``wait`` first wait for the write in flight, and re-raise its error (e.g. the one-line full-disk
    :class:`UserError`) in the training thread. The write stays atomic: a kill -9 during it leaves the previous
    file, and a temp file that ``run_dir_lock`` removes at the next start.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: Path, keep: Path | None = None) -> None:
        """Snapshot ``state`` now and write it to ``path`` in the background; with ``keep``, that file is then
        also kept under this second name (a hard link: the next checkpoint replaces ``path``, not it)."""
        self.wait()
        snapshot, ready = host_snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, ready, Path(path), keep),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, snapshot: dict[str, Any], ready: torch.cuda.Event | None, path: Path,
               keep: Path | None = None) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the device-to-host copies have landed
            save_checkpoint(snapshot, path)
            if keep is not None:
                keep.unlink(missing_ok=True)
                try:
                    os.link(path, keep)
                except OSError:  # a file system without hard links
                    atomic_write(keep, path.read_bytes())
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint at ``path`` and the sha256 of the very bytes it was loaded from.

    Raises:
        UserError: the file is missing or is not a readable checkpoint (one line).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"checkpoint: {path} does not exist") from None
    except OSError as e:
        raise UserError(f"checkpoint: {path} cannot be read ({e.strerror})") from None
    try:
        ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(f"checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return ck, hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


def training_state(*, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, total_steps: int,
                   identity: dict[str, Any], task_state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint in the layout described above."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "total_steps": total_steps, "rng_cpu": torch.get_rng_state(), "identity": identity,
            "task_state": task_state, "config": config}


def restore_training(ck: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load a :func:`training_state` into the live objects and the CPU RNG; returns the step to continue at."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng_cpu"])
    return int(ck["step"])


@dataclass
class SupernetCheckpoint:
    """A trained supernet as search and inherited-weight retraining need it."""

    net: nn.Module  # the Supernet, in eval mode, on the requested device
    data: dict[str, Any]  # the training run's data config (search rebuilds the same validation split)
    step: int
    total_steps: int
    sha256: str  # of the bytes the weights were loaded from
    recipe: dict[str, Any] | None = None  # the training run's recipe group (None: a run from before it): the
    # interpolation of the validation crops it was trained and validated with
    source_digest: str | None = None  # a prepared store's digest of the images it was trained on


def load_supernet(path: Path, device: torch.device) -> SupernetCheckpoint:
    """The supernet of a training checkpoint (``last.ckpt`` of `make supernet`).

    Raises:
        UserError: the file is not a supernet training checkpoint, or its weights do not fit its own space.
    """
    from space.space import SearchSpace
    from supernet.model.supernet import Supernet  # here, so that retraining from scratch never imports it

    ck, digest = read_checkpoint(path)
    if not isinstance(ck, dict) or not SUPERNET_KEYS <= set(ck) or not isinstance(ck["config"], dict) \
            or not isinstance(ck["config"].get("data"), dict) or not isinstance(ck["model"], dict):
        raise UserError(f"checkpoint: {path} is not a supernet training checkpoint (from `make supernet`)")
    net = Supernet(SearchSpace.from_config(ck["space"]))
    try:
        net.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint: {path} does not match its own space config ({str(e).splitlines()[0]})") from None
    steps = [ck.get(k, 0) for k in ("step", "total_steps")]
    if not all(isinstance(v, int) for v in steps):
        raise UserError(f"checkpoint: {path} is not a supernet training checkpoint (its step is not an integer)")
    recipe = ck["config"].get("recipe")
    identity = ck.get("identity") if isinstance(ck.get("identity"), dict) else {}
    source = identity.get("data", {}).get("source_digest") if isinstance(identity.get("data"), dict) else None
    return SupernetCheckpoint(net.to(device).eval(), dict(ck["config"]["data"]), steps[0], steps[1], digest,
                              dict(recipe) if isinstance(recipe, dict) else None, source)
