"""Timing PSViT's blocks and whole networks on this machine: what the latency table is measured with
(`python -m supernet.latency`) and what the search measures its winner with (space/latency.py holds the table
and the prediction, pure Python)."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from scipy.stats import kendalltau
from torch import Tensor, nn
from tqdm import tqdm

from space.app import config_hash
from space.arch import ArchSpec
from space.cost import macs
from space.latency import Accuracy, LatencyTable, parse_block, space_blocks
from space.space import SearchSpace
from supernet.model.layers import (BasicCell, ElasticLayerNorm, ElasticLinear, PatchEmbed, Pool1d, Pool2d,
                                   SharedPair, classify, embed, init_weights)
from supernet.model.psvit import PSViT


@dataclass(frozen=True)
class Timing:
    """How every forward is timed."""

    device: torch.device
    batch: int
    warmup: int  # untimed calls first (allocator, caches, lazy kernel selection)
    repeats: int  # timed calls; the median is kept
    amp: bool  # bf16 autocast (CUDA only)

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
        """Median milliseconds of ``fn(x)``."""
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda and self.amp):
            for _ in range(self.warmup):
                fn(x)
            times = []
            for _ in range(self.repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    fn(x)
                    times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


class _Embed(nn.Module):
    """The stem as PSViT runs it: patch embedding, CLS (1D), position embedding."""

    def __init__(self, space: SearchSpace, dim: int) -> None:
        super().__init__()
        grid = space.img_size // space.patch_size
        self.patch_embed = PatchEmbed(space.in_chans, dim, space.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if space.pooling == "1d" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + (self.cls_token is not None), dim))

    def forward(self, x: Tensor) -> Tensor:
        return embed(x, self.patch_embed, self.cls_token, self.pos_embed)


class _Head(nn.Module):
    """The final norm and the classifier."""

    def __init__(self, dim: int, num_classes: int, has_cls: bool) -> None:
        super().__init__()
        self.norm, self.head, self.has_cls = ElasticLayerNorm(dim), ElasticLinear(dim, num_classes), has_cls

    def forward(self, x: Tensor) -> Tensor:
        return classify(self.norm(x), self.head, self.has_cls)


def block_module(space: SearchSpace, key: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The module of block ``key`` (space/latency.py) and the shape of its input at batch 1."""
    kind, sizes = parse_block(key)
    cls = 1 if space.pooling == "1d" else 0
    if kind == "embed":
        return _Embed(space, sizes[0]), (1, space.in_chans, space.img_size, space.img_size)
    if kind in ("basic", "shared"):
        tokens, dim = sizes
        op = BasicCell if kind == "basic" else SharedPair
        return op(dim, dim // space.head_dim, int(round(dim * space.mlp_ratio))), (1, tokens + cls, dim)
    if kind == "pool":
        t0, d0, t1, d1 = sizes
        if space.pooling == "1d":
            return Pool1d(d0, d1, t1), (1, t0 + 1, d0)
        return Pool2d(d0, d1, 1 if math.isqrt(t0) == math.isqrt(t1) else 2), (1, t0, d0)
    if kind == "head":
        tokens, dim = sizes
        return _Head(dim, space.num_classes, bool(cls)), (1, tokens + cls, dim)
    raise ValueError(f"unknown block kind {kind!r} in {key!r}")


def block_input(space: SearchSpace, key: str, timing: Timing) -> tuple[nn.Module, Tensor]:
    """Block ``key``'s module (initialised, on the device, in eval mode) and a random input at the timing's batch."""
    module, shape = block_module(space, key)
    init_weights(module)
    module.to(timing.device).eval()
    return module, torch.randn((timing.batch, *shape[1:]), device=timing.device)


def arch_input(arch: ArchSpec, timing: Timing) -> tuple[nn.Module, Tensor]:
    """``PSViT(arch)`` on the device in eval mode and a random batch of images."""
    model = PSViT(arch).to(timing.device).eval()
    return model, torch.randn(timing.batch, arch.in_chans, arch.img_size, arch.img_size, device=timing.device)


@dataclass(frozen=True)
class Rounds:
    """Medians of interleaved timing, and how much the machine's speed moved while it ran."""

    ms: dict[Any, float]  # item -> median over rounds of its per-round median
    drift: float  # slowest round's speed / fastest round's (1.0: steady)


def time_rounds(items: dict[Any, tuple[Callable[[Tensor], Tensor], Tensor]], timing: Timing, rounds: int,
                seed: int = 0, progress: bool = False, desc: str = "rounds") -> Rounds:
    """Median milliseconds of every item, timed in ``rounds`` rounds: each round times every item (``timing``: its
    warm-up, then the median of its repeats) in a new random order, and an item's figure is the median of its rounds.

    A machine whose speed drifts over minutes (a VM: up to 2x here) then slows every item alike, so items timed in
    one run compare as if timed at one moment; timing them one after the other would read the drift as a difference.
    A round's speed is the median over items of (its time / the item's median); ``drift`` is the slowest round's over
    the fastest's.
    """
    keys = list(items)
    rng = random.Random(f"psvit-rounds:{seed}")
    per_round: list[dict[Any, float]] = []
    for _ in tqdm(range(rounds), desc=desc, disable=not progress, dynamic_ncols=True):
        rng.shuffle(keys)
        per_round.append({k: timing(*items[k]) for k in keys})
    ms = {k: statistics.median(r[k] for r in per_round) for k in items}
    speed = [statistics.median(r[k] / ms[k] for k in items if ms[k] > 0) for r in per_round]
    return Rounds(ms, max(speed) / min(speed) if speed and min(speed) > 0 else 1.0)


def measure_arch(arch: ArchSpec, timing: Timing, rounds: int = 1) -> float:
    """Median milliseconds of one forward of ``PSViT(arch)`` (over ``rounds`` rounds of ``timing``)."""
    return time_rounds({0: arch_input(arch, timing)}, timing, rounds).ms[0]


def distinct_archs(space: SearchSpace, n: int, rng: random.Random, avoid: set[ArchSpec]) -> list[ArchSpec]:
    """``n`` different random architectures of ``space``, none in ``avoid`` (stops early in a tiny space)."""
    out: list[ArchSpec] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        a = space.sample(rng)
        if a not in avoid and a not in out:
            out.append(a)
    return out


def accuracy_of(predicted: list[float], measured: list[float]) -> Accuracy:
    """MAPE, worst absolute percentage error and Kendall tau of predictions against measurements."""
    ape = [abs(p - m) / m * 100 for p, m in zip(predicted, measured)]
    return Accuracy(len(measured), statistics.fmean(ape), float(kendalltau(predicted, measured).statistic), max(ape))


def calibration(sums: list[float], measured: list[float], smallest: float | None = None) -> dict[str, float]:
    """``overhead_ms`` and ``scale`` of ``measured ~ overhead + scale * sum``, least squares on the relative error
    (each network's residual over its own time, as the table's accuracy is judged: a 1 ms network counts as much
    as a 100 ms one): the line when it rises and predicts a positive time for a blocks' sum of ``smallest`` (the
    space's fastest network; default the smallest calibration sum), so no architecture is predicted a negative
    time; otherwise the line through the origin (overhead 0). A line may start below 0: networks can cost more
    than their blocks timed alone, more so the more cells they hold."""
    if not sums:
        return {"overhead_ms": 0.0, "scale": 1.0}
    # minimise sum((overhead / m + scale * s / m - 1) ** 2): ordinary least squares on u = 1 / m, v = s / m
    u = [1.0 / m for m in measured]
    v = [s / m for s, m in zip(sums, measured)]
    suu, svv, suv = sum(x * x for x in u), sum(x * x for x in v), sum(x * y for x, y in zip(u, v))
    det = suu * svv - suv * suv
    low = min(sums) if smallest is None else smallest
    if len(set(sums)) >= 2 and det > 1e-12 * suu * svv:
        overhead, scale = (sum(u) * svv - sum(v) * suv) / det, (suu * sum(v) - suv * sum(u)) / det
        if scale > 0 and overhead + scale * low > 0:
            return {"overhead_ms": overhead, "scale": scale}
    return {"overhead_ms": 0.0, "scale": sum(v) / svv}


def spread_archs(space: SearchSpace, n: int, rng: random.Random, avoid: set[ArchSpec]) -> list[ArchSpec]:
    """``n`` different architectures over the whole latency range, for the calibration: network ``i`` fills each cell
    with a random op other than identity with probability ``i / (n - 1)`` (an all-identity network first, one
    without identity cells last), on a random chain; none in ``avoid``."""
    ops = [op for op in space.ops if op != "identity"] or list(space.ops)
    out: list[ArchSpec] = []
    for i in range(n):
        fill = i / (n - 1) if n > 1 else 0.5
        for _ in range(100):
            chain = space.chains[rng.randrange(len(space.chains))]
            cells = tuple(tuple(rng.choice(ops) if rng.random() < fill else "identity" for _ in range(st.cells))
                          for st in space.stages)
            arch = space._build(chain, cells)
            if arch not in avoid and arch not in out:
                out.append(arch)
                break
    return out


def measure_table(space: SearchSpace, timing: Timing, threads: int, calibrate: int, archs: int, seed: int,
                  rounds: int = 1, progress: bool = True, extra: Sequence[ArchSpec] = ()
                  ) -> tuple[LatencyTable, list[dict[str, Any]]]:
    """The latency table of ``space`` and, for each accuracy architecture and then each of ``extra``, its MACs,
    prediction and measurement (only the accuracy architectures make the table's MAPE, worst error and tau; with
    them, the space's smallest and largest networks by MACs are timed too, and their errors kept in the table's
    accuracy).

    Every block, the ``calibrate`` networks the overhead and scale are fitted to (spread over the whole range,
    :func:`spread_archs`), the ``archs`` random networks the accuracy is reported on, the two ends and ``extra`` are
    timed together in interleaved rounds (:func:`time_rounds`), so the table and every network it is compared with
    hold the same moments of the machine."""
    rng = random.Random(f"psvit-latency:{seed}")
    # the smallest and largest networks, where the accuracy is reported apart (with the accuracy only)
    ends = (space.extreme("min", "macs"), space.extreme("max", "macs")) if archs else ()
    cal = spread_archs(space, calibrate, rng, set(ends))
    test = distinct_archs(space, archs, rng, set(cal) | set(ends))
    items: dict[Any, tuple[Callable[[Tensor], Tensor], Tensor]] = {}
    for key in space_blocks(space):
        items[key] = block_input(space, key, timing)
    networks = list(dict.fromkeys([*cal, *test, *ends, *extra]))
    for a in networks:
        items[a] = arch_input(a, timing)
    timed = time_rounds(items, timing, rounds, seed, progress, desc=f"{len(items)} blocks+networks, rounds")
    blocks = {k: timed.ms[k] for k in space_blocks(space)}
    table = LatencyTable(space=space.name, space_hash=config_hash(space.to_config()), device=timing.device.type,
                         device_name=device_name(timing.device), torch=torch.__version__, threads=threads,
                         batch=timing.batch,
                         dtype="bfloat16" if timing.device.type == "cuda" and timing.amp else "float32",
                         overhead_ms=0.0, blocks=blocks, drift=round(timed.drift, 4),
                         timing={"warmup": timing.warmup, "repeats": timing.repeats, "rounds": rounds},
                         cores=available_cores())
    sums = [table.predict(a) for a in cal]  # the blocks' sum: overhead 0, scale 1 so far
    smallest = table.predicted_range(space)[0]
    table = LatencyTable(**{**vars(table), **calibration(sums, [timed.ms[a] for a in cal], smallest)})
    row = lambda a: {"arch": a.short(), "macs": macs(a), "predicted_ms": table.predict(a),  # noqa: E731
                     "measured_ms": timed.ms[a]}
    rows = [row(a) for a in [*test, *extra]]
    if test:
        acc = accuracy_of([r["predicted_ms"] for r in rows[:len(test)]], [r["measured_ms"] for r in rows[:len(test)]])
        end = {name: {**row(a), "error_pct": 100 * (table.predict(a) / timed.ms[a] - 1)}
               for name, a in zip(("smallest", "largest"), ends)}
        table = LatencyTable(**{**vars(table), "accuracy": replace(acc, **end)})
    return table, rows


def device_name(device: torch.device) -> str:
    """The GPU model, or the CPU model, that a table records and a measurement is compared against (on Linux
    ``platform.processor()`` is empty and ``platform.machine()`` is only ``x86_64``: /proc/cpuinfo's model name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, str]:
    """This machine as a latency table identifies its own (``LatencyTable.machine``)."""
    return {"device": device.type, "device_name": device_name(device), "torch": torch.__version__}


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
