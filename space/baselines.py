"""DeiT-like baselines: one stage of basic layers with a CLS token and no pooling, sized to a FLOPs budget,
so a searched PSViT can be compared with a plain ViT of about the same cost.

    python -m space.baselines --macs 3e6 --space conf/space/fmnist_2d.yaml --out deit_like.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from space.app import run_app
from space.arch import ArchSpec, StageSpec
from space.cost import fmt_macs, fmt_params, macs, params
from space.errors import UserError


def deit_like(target_macs: float, img_size: int, patch_size: int, in_chans: int, num_classes: int,
              mlp_ratio: float, head_dim: int, dims: Sequence[int], depths: Sequence[int] = range(4, 17),
              by: str = "macs") -> ArchSpec:
    """The DeiT layout (1D, CLS token, ``depth`` basic layers at one ``dim``) whose MACs (``by="params"``: whose
    parameter count) are closest to ``target_macs`` among ``dims`` x ``depths``; ties go to the shallower net."""
    cost = {"macs": macs, "params": params}[by]
    grid = img_size // patch_size
    best: tuple[float, int, ArchSpec] | None = None
    for dim in dims:
        for depth in depths:
            arch = ArchSpec(pooling="1d", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                            num_classes=num_classes, mlp_ratio=float(mlp_ratio),
                            stages=(StageSpec(grid * grid, dim, dim // head_dim, ("basic",) * depth),))
            key = (abs(cost(arch) - target_macs), depth, arch)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    return best[2]


def baseline_for(target_macs: float, space_file: str, dims: str) -> ArchSpec:
    """:func:`deit_like` for the input, classes, MLP ratio and head dim of the space preset ``space_file``."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from space.space import SearchSpace

    if not math.isfinite(target_macs) or target_macs <= 0:
        raise UserError(f"--macs: {target_macs} (allowed: a positive number of MACs, e.g. 4e6)")
    try:
        widths = [int(d) for d in dims.split(",")]
    except ValueError:
        raise UserError(f"--dims: {dims!r} (allowed: comma-separated integers, e.g. 32,48,64)") from None
    try:
        node = OmegaConf.to_container(OmegaConf.load(space_file), resolve=True)
    except OSError as e:
        raise UserError(f"--space: cannot read {space_file} ({e.strerror or e})") from None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--space: {space_file} is not a space preset YAML ({first}; allowed: a file of "
                        "conf/space/)") from None
    sp = SearchSpace.from_config(node)
    bad = [d for d in widths if d <= 0 or d % sp.head_dim]
    if bad:
        raise UserError(f"--dims: {bad[0]} is not a positive multiple of the space's head_dim {sp.head_dim} "
                        f"(allowed: e.g. {','.join(str(sp.head_dim * k) for k in (4, 6, 8))})")
    return deit_like(target_macs, sp.img_size, sp.patch_size, sp.in_chans, sp.num_classes, sp.mlp_ratio,
                     sp.head_dim, widths)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--macs", type=float, required=True, help="FLOPs budget in multiply-accumulates")
    p.add_argument("--space", required=True, help="space preset YAML giving input, classes, mlp_ratio, head_dim")
    p.add_argument("--dims", default="32,48,64,96", help="candidate widths (multiples of the space's head_dim)")
    p.add_argument("--out", required=True, help="the architecture JSON to write")
    a = p.parse_args(argv)

    def run() -> None:
        if Path(a.out).is_dir():
            raise UserError(f"--out: {a.out} is a directory (give a file name, e.g. {Path(a.out) / 'deit.json'})")
        arch = baseline_for(a.macs, a.space, a.dims)
        arch.save(a.out)
        print(f"{arch.short()}: {fmt_macs(macs(arch))} MACs, {fmt_params(params(arch))} params -> {a.out}")

    run_app(run)


if __name__ == "__main__":
    main()
