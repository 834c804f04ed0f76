"""Process plumbing shared by training, search and retraining: distributed set-up and tear-down, gradient
all-reduce for paths that change every step (overlapped with backward), work dealt to ranks by cost, scalar
all-reduce, autocast, graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
            flat = t.data.contiguous()  # collectives take dense row-major tensors (entangle=slice stores some
            dist.broadcast(flat, src=0)  # weights column-major)
            if flat is not t.data:
                t.data.copy_(flat)


def allreduce_gradients(params: Iterable[nn.Parameter], env: DistEnv, bucket_bytes: int = 32 << 20) -> None:
    """Average the gradients that exist, in coalesced buckets, after backward: the reference that
    :class:`GradReducer` (what training runs) is tested against.

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


class GradReducer:
    """Averages the gradients over ranks while the step's last backward runs, as DDP overlaps its reducer with
    backward, for a model whose path changes every step.

    Every parameter carries a post-accumulate-grad hook. During the step's final backward (:meth:`backward`
    with ``final=True``), each hook adds its parameter's finished gradient to the open bucket, in the order the
    hooks fire, and a bucket holding ``bucket_bytes`` is all-reduced asynchronously at once, while autograd
    goes on with the layers below. :meth:`finish` then reduces the rest (the open bucket, and the gradients
    accumulated by the step's earlier backward passes, e.g. the other sandwich paths, that the final one did
    not touch), waits, divides each bucket by the world size and copies it back.

    No bookkeeping across ranks is needed: every rank trains the same paths, so the same parameters get a
    gradient on every rank and autograd fires their hooks in the same order (identical graphs), giving
    identical buckets. Parameters off the paths keep ``grad is None`` (AdamW skips them). Only the final
    backward may launch a bucket: a gradient that a later pass adds to is not finished yet.

    With ``leaves`` (a supernet with ``entangle=slice``, model/entangle.py), the step's gradients are those of the
    slice leaves its forward passes took, not of the parameters: each backward pass hooks the leaves taken since
    the last one, and :meth:`finish` takes theirs too, in the order they were taken (the same on every rank). So
    a bucket carries the slices a step trained and nothing outside them.

    On 2 ranks the gradients are bit-identical to :func:`allreduce_gradients` (a sum of two addends does not
    depend on the order); on more ranks they agree up to the order in which the collective adds the ranks,
    which depends on a gradient's place in its bucket.
    """

    def __init__(self, params: Iterable[nn.Parameter], env: DistEnv, bucket_bytes: int = 25 << 20,
                 leaves: Callable[[], list[Tensor]] | None = None) -> None:
        """Hooks ``params`` when ``env`` is distributed (one process: nothing to reduce, no hook).

        Args:
            bucket_bytes: gradient bytes per all-reduce (DDP's default, 25 MB: large enough to keep the link
                busy, small enough to start early).
            leaves: the step's slice leaves so far (``SliceLeaves.leaves``), whose gradients are reduced too.
        """
        self.params = [p for p in params if p.requires_grad]
        self.env, self.bucket_bytes, self.leaves = env, bucket_bytes, leaves
        self._leaf_hooks: dict[int, Any] = {}  # id(leaf) -> the handle of its hook, for the step's leaves
        self.armed = False  # inside the step's final backward: hooks launch buckets
        self.final_done = False  # the step's final backward has run; the next backward belongs to the next step
        self.overlapped = 0  # buckets of the last finished step launched during backward (the rest: in finish)
        self.buckets = 0  # buckets of the last finished step
        self._open: list[Tensor] = []  # gradients of the bucket being filled
        self._open_bytes = 0
        self._inflight: list[tuple[Any, Tensor, list[Tensor]]] = []  # (work, flat buffer, its gradients)
        self._taken: set[int] = set()  # ids of the parameters whose gradient is in a bucket this step
        if env.distributed:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    @contextmanager
    def backward(self, final: bool) -> Iterator[None]:
        """Around one backward pass of the step; ``final`` for its last one, the only one whose hooks reduce.

        Raises:
            RuntimeError: a backward after the step's final one before :meth:`finish` (a task that runs
                several passes must mark all but the last ``final=False``, or their gradients would be
                reduced before they are complete).
        """
        if self.final_done:
            raise RuntimeError("GradReducer: a backward pass after the step's final one; mark the earlier passes "
                               "final=False")
        if self.leaves is not None and self.env.distributed:
            for leaf in self.leaves():
                if id(leaf) not in self._leaf_hooks:
                    self._leaf_hooks[id(leaf)] = leaf.register_post_accumulate_grad_hook(self._on_grad)
        self.armed = final
        try:
            yield
        finally:
            self.armed, self.final_done = False, final

    def _on_grad(self, p: nn.Parameter) -> None:
        if self.armed:  # in earlier passes the gradient may still grow: finish() takes it
            self._add(p)

    def _add(self, p: nn.Parameter) -> None:
        g = p.grad
        if id(p) in self._taken:
            raise RuntimeError("GradReducer: a gradient was accumulated twice in the step's final backward")
        if self._open and g.dtype != self._open[0].dtype:  # one flat buffer holds one dtype
            self._launch()
        self._taken.add(id(p))
        self._open.append(g)
        self._open_bytes += g.numel() * g.element_size()
        if self._open_bytes >= self.bucket_bytes:
            self._launch()

    def _launch(self) -> None:
        flat = torch.cat([g.reshape(-1) for g in self._open])
        self._inflight.append((dist.all_reduce(flat, async_op=True), flat, self._open))
        self._open, self._open_bytes = [], 0

    def finish(self) -> None:
        """Reduce what the final backward did not launch, wait for every bucket and write the averages back
        into ``.grad``; ends the step."""
        if self.env.distributed:
            overlapped = len(self._inflight)
            leaves = [] if self.leaves is None else self.leaves()
            for p in self.params + leaves:  # parameters order, then the leaves': the same on every rank
                if p.grad is not None and id(p) not in self._taken:
                    self._add(p)
            if self._open:
                self._launch()
            for work, flat, grads in self._inflight:
                work.wait()
                flat /= self.env.world_size
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            self.overlapped, self.buckets = overlapped, len(self._inflight)
        for handle in self._leaf_hooks.values():  # the next step takes new leaves
            handle.remove()
        self._inflight, self._taken, self._leaf_hooks, self.final_done = [], set(), {}, False


def balance(costs: list[int], world: int) -> list[list[int]]:
    """Indices of ``costs`` dealt into ``world`` shares of about equal total: largest first, each to the
    least-loaded share so far, ties to the lower index and rank, so every rank computes the same split.
    The shares' totals differ by at most the largest cost (round-robin can put every large item on one rank)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    return shares


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

