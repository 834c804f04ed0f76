"""`python -m space.info`: a read-only summary of a search space, or of one architecture JSON.

    python -m space.info space=imagenet_tiny_2d            # choices, exact size, FLOPs / params range, a sample
    python -m space.info space=fmnist_1d samples=3 seed=7  # three samples
    python -m space.info arch=conf/baselines/deit_tiny.json     # cost breakdown, and whether it is in `space`

FLOPs are multiply-accumulates (MACs), as in the DeiT / PSViT tables (DeiT-Ti ~1.3 G). Nothing is written to
disk (see conf/info.yaml). User errors print one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import hydra

from space import cost
from space.app import CONF_DIR, check_overrides, run_app
from space.arch import ArchSpec
from space.space import SearchSpace, SpaceError


def _range(lo: int, hi: int, fmt: Any) -> str:
    return f"{fmt(lo)} .. {fmt(hi)}  ({lo:,} .. {hi:,})"


def _cost_line(arch: ArchSpec) -> str:
    c = cost.arch_cost(arch)
    return (f"params {cost.fmt_params(c.params)} ({c.params:,}), FLOPs (MACs) {cost.fmt_macs(c.macs)} "
            f"({c.macs:,}), depth {arch.depth}")


def _tokens(pooling: str, t: int) -> str:
    if pooling == "2d":
        side = int(round(t ** 0.5))
        return f"{t} ({side}x{side})"
    return f"{t} (+CLS)"


def describe_space(space: SearchSpace, samples: int = 1, seed: int = 0) -> str:
    """Choices, exact size, exact FLOPs (MACs) and params ranges, and ``samples`` uniform samples."""
    cells = sum(s.cells for s in space.stages)
    size = space.size()
    lines = [
        f"space: {space.name}",
        f"  pooling: {space.pooling}" + (" (CLS token, 1D conv + adaptive max-pooling)" if space.pooling == "1d"
                                         else " (token grid, 3x3 conv with stride 1 or 2)"),
        f"  input: {space.img_size}x{space.img_size}x{space.in_chans}, patch {space.patch_size}, "
        f"{space.num_classes} classes, mlp_ratio {space.mlp_ratio}, head_dim {space.head_dim}",
        f"  ops: {', '.join(space.ops)}",
    ]
    for i, s in enumerate(space.stages):
        heads = [d // space.head_dim for d in s.dims]
        tokens = ", ".join(_tokens(space.pooling, t) for t in s.tokens)
        lines.append(f"  stage {i}: {s.cells} cells, tokens [{tokens}], dims {list(s.dims)}, heads {heads}")
    lines += [
        f"size: {size:,} architectures ({size:.3e}) = {len(space.chains):,} valid token/dim chains "
        f"x {len(space.ops)}^{cells} cell ops",
        f"FLOPs (MACs): {_range(*space.macs_range(), cost.fmt_macs)}",
        f"params: {_range(*space.params_range(), cost.fmt_params)}",
    ]
    rng = random.Random(seed)
    for k in range(samples):
        arch = space.sample(rng)
        lines.append(f"sample {k} (seed {seed}): {arch.short()}: {_cost_line(arch)}")
        lines.append(arch.to_json().rstrip("\n"))
    return "\n".join(lines) + "\n"


def describe_arch(arch: ArchSpec, space: SearchSpace, source: str = "") -> str:
    """Cost breakdown (embedding, each stage with the pooling into it, head) and membership of ``space``."""
    lines = [f"architecture: {source}" if source else "architecture:",
             f"  {arch.pooling} pooling, {arch.img_size}x{arch.img_size}x{arch.in_chans}, patch {arch.patch_size}, "
             f"{arch.num_classes} classes, mlp_ratio {arch.mlp_ratio}",
             f"  {arch.short()}  (B basic, S shared pair, I identity)",
             f"  {'part':<10} {'params':>14} {'FLOPs (MACs)':>16}"]
    parts = cost.breakdown(arch)
    groups: dict[str, cost.Cost] = {"embed": parts["embed"]}
    for i in range(len(arch.stages)):
        total = cost.ZERO
        for k, c in parts.items():
            if k == f"pool[{i}]" or k.startswith(f"stages[{i}]."):
                total = total + c
        groups[f"stage {i}"] = total
    groups["head"] = parts["head"]
    for k, c in groups.items():
        lines.append(f"  {k:<10} {c.params:>14,} {c.macs:>16,}")
    lines.append(f"total: {_cost_line(arch)}")
    why = space.why_not(arch)
    lines.append(f"in space {space.name}: " + ("yes" if why is None else f"no ({why})"))
    return "\n".join(lines) + "\n"


def info(cfg: Mapping[str, Any]) -> str:
    """The text ``python -m space.info`` prints for a composed ``conf/info.yaml`` (or an equivalent mapping).

    Raises:
        SpaceError: the space config is invalid.
        ArchError: ``arch`` cannot be read or is not a valid architecture.
    """
    space = SearchSpace.from_config(cfg["space"])
    path = cfg.get("arch")
    if path is not None:
        return describe_arch(ArchSpec.load(str(path)), space, str(path))
    samples, seed = cfg.get("samples", 1), cfg.get("seed", 0)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise SpaceError(f"samples: {samples!r} must be a non-negative integer")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpaceError(f"seed: {seed!r} must be an integer")
    return describe_space(space, samples, seed)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="info")
def main(cfg: Any) -> None:
    print(run_app(lambda: info(cfg)), end="")


if __name__ == "__main__":
    check_overrides("info")
    main()
