"""Process plumbing shared by training, search and retraining: distributed set-up and tear-down, gradient
all-reduce for paths that change every step, scalar all-reduce, autocast, graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from space.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device: {device!r} (allowed: auto, cpu, cuda)")
    if device != "cpu" and not torch.cuda.is_available():
        gpus = visible_gpus()
        if gpus:  # training on the CPU beside idle GPUs is never what was meant
            seen = f"device: {device} but {gpus} NVIDIA GPU(s) are visible (nvidia-smi) and torch {torch.__version__}"
            if torch.version.cuda is None:
                raise UserError(f"{seen} is a build without CUDA; install a CUDA build (make install "
                                "TORCH_REQ=\"torch==X torchvision==Y --index-url <CUDA wheel index>\") or pass "
                                "device=cpu to train on the CPU")
            raise UserError(f"{seen} cannot use them (built for CUDA {torch.version.cuda}): check the NVIDIA "
                            "driver against it, or pass device=cpu to train on the CPU")
        if device == "cuda":
            raise UserError("device: 'cuda' requested but no CUDA device is visible (use device=cpu or device=auto)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local, dev)


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use as the driver lists them (``nvidia-smi -L``, then narrowed by
    ``CUDA_VISIBLE_DEVICES``), whatever torch can do with them; 0 without the driver's tool."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return 0
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(line.startswith("GPU ") for line in out.splitlines())
    if hidden is not None:
        n = min(n, len([d for d in hidden.split(",") if d.strip()]))
    return n


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """``setup_distributed`` for the length of an app run; the process group is destroyed however it ends."""
    try:
        yield setup_distributed(device)
    finally:
        cleanup_distributed()


def broadcast_parameters(module: nn.Module, env: DistEnv) -> None:
    """Start every rank from rank 0's weights."""
    if env.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def allreduce_gradients(params: Iterable[nn.Parameter], env: DistEnv, bucket_bytes: int = 32 << 20) -> None:
    """Average the gradients that exist, in coalesced buckets.

    This replaces DDP's reducer for the supernet: every rank samples the same path from (seed, step), so
    the set of parameters with a gradient is the same on all ranks and exactly these are reduced.
    Parameters off the path keep ``grad is None`` (DDP with ``find_unused_parameters=True`` would traverse
    the autograd graph every step and reduce zero gradients for them, which AdamW would then apply).
    """
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= env.world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def allreduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over ranks (one collective)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def allreduce_sum_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it, without reading it on the host (on NCCL the collective is
    queued on the device like a kernel; the caller decides when to read the result)."""
    if env.distributed:
        dist.all_reduce(t)
    return t


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on CUDA (no loss scaling needed), nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked between steps (finish the step, checkpoint, exit 0)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

