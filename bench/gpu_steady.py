"""What bench/gpu_check.py measures, apart from its command line and report: training steps at steady state (once
every call shape of the space has been seen), per-MAC throughput, the kernels a step dispatches, host syncs, and a
torch.profiler summary (host time against device time per step, top kernels)."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from space.arch import ArchSpec
from space.space import SearchSpace
from supernet.engine.compile import call_shape_keys
from supernet.engine.loop import Trainer

Batch = tuple[Tensor, Tensor]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- call shapes
def _shapes(chains: list, stage_ops: list, pooling: str) -> set[tuple]:
    keys = {(name, *k) for name, ks in call_shape_keys(chains, stage_ops, pooling).items() for k in ks}
    return keys | {("stem", chain[0][1]) for chain in chains} | {("head", chain[-1]) for chain in chains}


def path_shapes(arch: ArchSpec) -> set[tuple]:
    """The call shapes a step of ``arch`` meets: every cell and pooling call shape (engine/compile.py's, which also
    key cuBLAS / attention kernel plans), the stem's dim and the head's (tokens, dim)."""
    return _shapes([SearchSpace.chain_of(arch)], [s.cells for s in arch.stages], arch.pooling)


def space_shapes(space: SearchSpace) -> set[tuple]:
    """Every call shape the paths of ``space`` meet (:func:`path_shapes` over all of them)."""
    return _shapes(list(space.chains), [space.ops] * len(space.stages), space.pooling)


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Rate:
    """A model's timed training steps."""

    steps: int
    images: int
    seconds: float
    macs: float  # multiply-accumulates of those images' forward passes (MACs/img x images)

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def gmacs_per_s(self) -> float:
        """Per-MAC throughput: forward MACs of the images trained per second, in G."""
        return self.macs / self.seconds / 1e9

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.steps + other.steps, self.images + other.images, self.seconds + other.seconds,
                    self.macs + other.macs)


def run_steps(trainer: Trainer, batches: list[Batch], steps: list[int]) -> float:
    """Wall seconds of ``trainer.train_step`` at each of ``steps`` (the step counter pinned to each: it picks the
    supernet's path), cycling through ``batches``, the device synchronized at both ends."""
    device = trainer.env.device
    sync(device)
    t = time.perf_counter()
    for i, step in enumerate(steps):
        trainer.step = step
        trainer.train_step(*batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - t


def timed(trainer: Trainer, batches: list[Batch], steps: list[int], macs_of: Callable[[int], float]) -> Rate:
    """:func:`run_steps` as a :class:`Rate`; ``macs_of(step)``: MACs per image of the step's model."""
    seconds = run_steps(trainer, batches, steps)
    n = len(batches[0][1])
    return Rate(len(steps), n * len(steps), seconds, n * sum(macs_of(s) for s in steps))


@dataclass(frozen=True)
class WarmUp:
    """The supernet's steps until every call shape of its space was seen."""

    steps: int
    first_seen: int  # steps whose path met a call shape no earlier step had met
    first_seen_s: float  # their seconds
    other_s: float  # the seconds of the other warm-up steps (every shape already seen)
    covered: int  # call shapes seen
    total: int  # call shapes of the space

    def line(self) -> str:
        other = self.steps - self.first_seen
        return (f"{self.steps} warm-up steps ({self.covered} of the space's {self.total} call shapes seen): "
                f"{self.first_seen} met a first-seen shape ({1e3 * self.first_seen_s / max(self.first_seen, 1):.1f} "
                f"ms each), {other} did not" + (f" ({1e3 * self.other_s / other:.1f} ms each)" if other else ""))


def warm_up(trainer: Trainer, batches: list[Batch], at_least: int, at_most: int) -> WarmUp:
    """Supernet steps 0, 1, 2, ... (one sampled path each), each timed on its own, until every call shape of the
    space has been seen and at least ``at_least`` steps ran, or ``at_most`` steps."""
    space = trainer.task.net.space
    every, seen = space_shapes(space), set()
    step, first, first_s, other_s = 0, 0, 0.0, 0.0
    while step < at_most and (step < at_least or not every <= seen):
        shapes = set().union(*(path_shapes(p) for p in trainer.task.sampler.paths(step)))
        seconds = run_steps(trainer, batches, [step])
        if shapes <= seen:
            other_s += seconds
        else:
            first, first_s = first + 1, first_s + seconds
        seen |= shapes
        step += 1
    return WarmUp(step, first, first_s, other_s, len(seen & every), len(every))


# ----------------------------------------------------------------------------- kernels, syncs, profile
class OpCounter(TorchDispatchMode):
    """Counts the aten ops a block dispatches below autograd and autocast: the kernels that really ran. SDPA shows
    as the fused kernel it chose (``_scaled_dot_product_flash_attention``, ``..._efficient_attention``,
    ``..._cudnn_attention``, ``..._flash_attention_for_cpu``); its math fallback decomposes into matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def sdpa(self) -> Counter[str]:
        """The fused attention kernels of forward passes, with their calls."""
        return Counter({k: v for k, v in self.counts.items()
                        if k.startswith("_scaled_dot_product_") and not k.endswith("_backward")})


def host_syncs(run: Callable[[], object]) -> tuple[str, ...]:
    """Runs ``run()`` with CUDA's sync debug mode on; returns the message of every call that made the host wait
    for the device (``Trainer.train_step`` should make none: the loop reads the loss at its sync points only)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return tuple(m for m in (str(w.message).splitlines()[0] for w in seen) if is_sync_warning(m))


def is_sync_warning(message: str) -> bool:
    """Whether a warning of sync debug mode reports a synchronizing call (torch: "called a synchronizing CUDA
    operation"), not its own note that the mode "is a prototype feature", which the first H100 run counted."""
    return "called a synchronizing" in message


@dataclass(frozen=True)
class Profile:
    """Where a model's steady-state step goes."""

    wall_ms: float  # per step, the device synchronized at both ends
    host_ms: float  # CPU time of the host thread per step until the last step is queued: Python, dispatch, launches
    device_ms: float | None  # kernel time per step on the GPU (None on the CPU)
    top: list[tuple[str, float]]  # the kernels (CPU: ops) with the most time, ms per step


def profile(run: Callable[[], object], steps: int, device: torch.device, top: int = 5) -> Profile:
    """``run()`` (``steps`` training steps) timed once as it is, for the wall and host time, then once under
    torch.profiler, for the kernel time and the top kernels (by device time; by self CPU time off CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync(device)
    wall, host = time.perf_counter(), time.thread_time()
    run()
    host = time.thread_time() - host  # until the last step is queued: waiting for the device is not host work
    sync(device)
    wall = time.perf_counter() - wall
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run()
        sync(device)
    events = prof.key_averages()
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ranked = sorted(events, key=key, reverse=True)[:top]
    device_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps if cuda else None
    return Profile(1e3 * wall / steps, 1e3 * host / steps, device_ms,
                   [(e.key, key(e) / 1e3 / steps) for e in ranked if key(e) > 0])
