"""`python -m supernet.latency`: the latency lookup table of a search space on this machine, and how well it
predicts whole networks (space/latency.py holds the table and the prediction; this app measures).

    python -m supernet.latency space=fmnist_2d device=cpu threads=2 batch=1 out=runs/latency/fmnist_2d_cpu.json
    python -m supernet.latency space=imagenet_tiny_2d device=cuda batch=256 out=...     # bf16 autocast on CUDA

Every block the space can build (each op at every tokens x dim, each pooling step, embedding and head) is built
from the model's own modules (supernet/model/layers.py) at its sizes and timed at ``batch`` images: ``warmup``
untimed calls, then the median of ``repeats`` timed ones (CUDA: events around each call). ``calibrate`` random
architectures of the space are then timed end to end as ``PSViT(arch)``; the median of (measured - sum of its
blocks) is the table's ``overhead_ms``. Finally ``archs`` other random architectures are timed end to end and
the table reports its own accuracy on them: mean absolute percentage error, worst error and Kendall tau.
User errors print one ``error: ...`` line, exit 2 and write nothing.
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import kendalltau
from torch import Tensor, nn
from tqdm import tqdm

from space.app import CONF_DIR, check_overrides, config_hash, run_app
from space.arch import ArchSpec
from space.cost import macs
from space.latency import Accuracy, LatencyError, LatencyTable, parse_block, space_blocks
from space.schema import LATENCY, check_config
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


def measure_blocks(space: SearchSpace, timing: Timing, progress: bool = True) -> dict[str, float]:
    """Median milliseconds of every block of ``space``."""
    out = {}
    for key in tqdm(space_blocks(space), desc="blocks", disable=not progress, dynamic_ncols=True):
        module, shape = block_module(space, key)
        init_weights(module)
        module.to(timing.device).eval()
        x = torch.randn((timing.batch, *shape[1:]), device=timing.device)
        out[key] = timing(module, x)
    return out


def measure_arch(arch: ArchSpec, timing: Timing) -> float:
    """Median milliseconds of one forward of ``PSViT(arch)``."""
    model = PSViT(arch).to(timing.device).eval()
    x = torch.randn(timing.batch, arch.in_chans, arch.img_size, arch.img_size, device=timing.device)
    return timing(model, x)


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


def measure_table(space: SearchSpace, timing: Timing, threads: int, calibrate: int, archs: int, seed: int,
                  progress: bool = True) -> tuple[LatencyTable, list[dict[str, Any]]]:
    """The latency table of ``space`` and, for each accuracy architecture, its MACs, prediction and measurement."""
    blocks = measure_blocks(space, timing, progress)
    rng = random.Random(f"psvit-latency:{seed}")
    cal = distinct_archs(space, calibrate, rng, set())
    test = distinct_archs(space, archs, rng, set(cal))
    bar = tqdm(total=len(cal) + len(test), desc="archs", disable=not progress, dynamic_ncols=True)
    device_name = torch.cuda.get_device_name(timing.device) if timing.device.type == "cuda" else \
        (platform.processor() or platform.machine())
    table = LatencyTable(space=space.name, space_hash=config_hash(space.to_config()), device=timing.device.type,
                         device_name=device_name, torch=torch.__version__, threads=threads, batch=timing.batch,
                         dtype="bfloat16" if timing.device.type == "cuda" and timing.amp else "float32",
                         overhead_ms=0.0, blocks=blocks)
    residuals = []
    for a in cal:
        residuals.append(measure_arch(a, timing) - table.predict(a))
        bar.update(1)
    table = LatencyTable(**{**vars(table), "overhead_ms": statistics.median(residuals) if residuals else 0.0})
    rows = []
    for a in test:
        rows.append({"arch": a.short(), "macs": macs(a), "predicted_ms": table.predict(a),
                     "measured_ms": measure_arch(a, timing)})
        bar.update(1)
    bar.close()
    if rows:
        acc = accuracy_of([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
        table = LatencyTable(**{**vars(table), "accuracy": acc})
    return table, rows


def latency(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Measure and write ``cfg.out``; returns the summary the app prints. Nothing is written on error."""
    check_config(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, LATENCY)
    if not cfg["out"]:
        raise LatencyError(f"out: required (e.g. out=runs/latency/{cfg['space']['name']}_{cfg['device']}.json)")
    out = Path(cfg["out"])
    if out.is_dir():
        raise LatencyError(f"out: {out} is a directory (give a file name, e.g. out={out / 'latency.json'})")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise LatencyError("device: 'cuda' but no CUDA device is visible (measure with device=cpu)")
    space = SearchSpace.from_config(cfg["space"])
    torch.set_num_threads(cfg["threads"])
    timing = Timing(torch.device(cfg["device"]), cfg["batch"], cfg["warmup"], cfg["repeats"], cfg["amp"])
    torch.manual_seed(cfg["seed"])
    table, rows = measure_table(space, timing, cfg["threads"], cfg["calibrate"], cfg["archs"], cfg["seed"],
                                cfg["progress"])
    table.save(out)
    lines = [f"{out}: {len(table.blocks)} blocks of space {space.name!r} on {table.device_name} ({table.device}, "
             f"{table.threads} threads, batch {table.batch}, {table.dtype}, torch {table.torch}); "
             f"overhead {table.overhead_ms:.3f} ms"]
    if table.accuracy is not None:
        a = table.accuracy
        lines.append(f"accuracy on {a.archs} other random architectures: MAPE {a.mape:.1f}%, worst {a.max_ape:.1f}%, "
                     f"Kendall tau {a.kendall_tau:.3f}")
        lines += [f"  {r['arch']}  {r['macs'] / 1e6:8.2f} M MACs  predicted {r['predicted_ms']:8.3f} ms  "
                  f"measured {r['measured_ms']:8.3f} ms" for r in rows]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="latency")
def main(cfg: DictConfig) -> None:
    print(run_app(lambda: latency(cfg)))


if __name__ == "__main__":
    check_overrides("latency")
    main()
