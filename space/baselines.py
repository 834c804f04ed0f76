"""DeiT-like baselines: one stage of basic layers with a CLS token and no pooling, sized to a FLOPs budget,
so a searched PSViT can be compared with a plain ViT of about the same cost.

    python -m space.baselines --macs 3e6 --space conf/space/fmnist_2d.yaml --out deit_like.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from space.arch import ArchSpec, StageSpec
from space.cost import fmt_macs, fmt_params, macs, params


def deit_like(target_macs: float, img_size: int, patch_size: int, in_chans: int, num_classes: int,
              mlp_ratio: float, head_dim: int, dims: Sequence[int], depths: Sequence[int] = range(4, 17),
              ) -> ArchSpec:
    """The DeiT layout (1D, CLS token, ``depth`` basic layers at one ``dim``) whose MACs are closest to
    ``target_macs`` among ``dims`` x ``depths``; ties go to the shallower net."""
    grid = img_size // patch_size
    best: tuple[float, int, ArchSpec] | None = None
    for dim in dims:
        for depth in depths:
            arch = ArchSpec(pooling="1d", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                            num_classes=num_classes, mlp_ratio=float(mlp_ratio),
                            stages=(StageSpec(grid * grid, dim, dim // head_dim, ("basic",) * depth),))
            key = (abs(macs(arch) - target_macs), depth, arch)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    return best[2]


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from space.space import SearchSpace, SpaceError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--macs", type=float, required=True, help="FLOPs budget in multiply-accumulates")
    p.add_argument("--space", required=True, help="space preset YAML giving input, classes, mlp_ratio, head_dim")
    p.add_argument("--dims", default="32,48,64,96", help="candidate widths (multiples of the space's head_dim)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        sp = SearchSpace.from_config(OmegaConf.load(a.space))
        arch = deit_like(a.macs, sp.img_size, sp.patch_size, sp.in_chans, sp.num_classes, sp.mlp_ratio,
                         sp.head_dim, [int(d) for d in a.dims.split(",")])
    except (OSError, SpaceError, ValueError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    arch.save(a.out)
    print(f"{arch.short()}: {fmt_macs(macs(arch))} MACs, {fmt_params(params(arch))} params -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
