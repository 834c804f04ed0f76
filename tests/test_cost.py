"""Analytic cost model: the real DeiT counts, and tiny specs counted by hand term by term.

Expected values are written out from the layer layout in space/cost.py's docstring (weights + biases of
every linear / conv, 2C per LayerNorm, CLS and position embedding; MACs of every linear / conv and of both
attention matmuls), never by calling the helpers under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from space import cost
from space.arch import ArchSpec, StageSpec

REPO = Path(__file__).resolve().parent.parent


def spec(pooling: str, img: int, patch: int, chans: int, classes: int, mlp: float,
         *stages: tuple[int, int, int, tuple[str, ...]]) -> ArchSpec:
    return ArchSpec(pooling=pooling, img_size=img, patch_size=patch, in_chans=chans, num_classes=classes,
                    mlp_ratio=mlp, stages=tuple(StageSpec(t, d, h, c) for t, d, h, c in stages))


# ----------------------------------------------------------------------------- DeiT (timm counts)
@pytest.mark.parametrize("name,params,gmacs", [("deit_tiny", 5_717_416, 1.3), ("deit_small", 22_050_664, 4.6)])
def test_deit_matches_timm(name: str, params: int, gmacs: float) -> None:
    arch = ArchSpec.load(REPO / "conf" / "baselines" / f"{name}.json")
    assert cost.params(arch) == params
    assert round(cost.macs(arch) / 1e9, 1) == gmacs


def test_deit_tiny_exact_macs_and_format() -> None:
    arch = ArchSpec.load(REPO / "conf" / "baselines" / "deit_tiny.json")
    L, C, H = 197, 192, 768
    layer = L * C * 3 * C + 2 * L * L * C + L * C * C + L * C * H + L * H * C
    assert cost.macs(arch) == 196 * 3 * 16 * 16 * C + 12 * layer + C * 1000 == 1_253_683_200
    assert cost.fmt_macs(cost.macs(arch)) == "1.25 G"
    assert cost.fmt_params(cost.params(arch)) == "5.72 M"


# ----------------------------------------------------------------------------- hand-counted tiny specs
def test_1d_two_stages_shared_pair_and_pooling() -> None:
    # 8x8x1 image, patch 4 -> 2x2 = 4 patch tokens + CLS; mlp_ratio 2.
    arch = spec("1d", 8, 4, 1, 3, 2.0, (4, 4, 1, ("shared",)), (2, 8, 2, ("basic", "identity")))
    # embed: conv 1*4*4 -> 4 (+bias), CLS 4, pos (4+1)*4; MACs 4 tokens * 16 * 4
    embed_p, embed_m = (16 * 4 + 4) + 4 + 5 * 4, 4 * 16 * 4
    # stage 0, L=5, C=4, H=8. First layer of the pair: LN, qkv, proj, LN, fc1, fc2 + QK^T and AV.
    first_p = 2 * 4 + (4 * 12 + 12) + (4 * 4 + 4) + 2 * 4 + (4 * 8 + 8) + (8 * 4 + 4)
    first_m = 5 * 4 * 12 + 5 * 5 * 4 + 5 * 5 * 4 + 5 * 4 * 4 + 5 * 4 * 8 + 5 * 8 * 4
    # second layer: v only, and attn @ v with the first layer's map
    second_p = 2 * 4 + (4 * 4 + 4) + (4 * 4 + 4) + 2 * 4 + (4 * 8 + 8) + (8 * 4 + 4)
    second_m = 5 * 4 * 4 + 5 * 5 * 4 + 5 * 4 * 4 + 5 * 4 * 8 + 5 * 8 * 4
    # pooling: pointwise Conv1d 4 -> 8 over all 5 tokens (CLS too), LN(8); max-pooling is free
    pool_p, pool_m = (4 * 8 + 8) + 2 * 8, 5 * 4 * 8
    # stage 1 basic layer, L=2+1, C=8, H=16; the identity cell costs nothing
    basic_p = 2 * 8 + (8 * 24 + 24) + (8 * 8 + 8) + 2 * 8 + (8 * 16 + 16) + (16 * 8 + 8)
    basic_m = 3 * 8 * 24 + 3 * 3 * 8 + 3 * 3 * 8 + 3 * 8 * 8 + 3 * 8 * 16 + 3 * 16 * 8
    # head: LN(8), Linear(8, 3) on the CLS token
    head_p, head_m = 2 * 8 + (8 * 3 + 3), 8 * 3
    p = embed_p + first_p + second_p + pool_p + basic_p + head_p
    m = embed_m + first_m + second_m + pool_m + basic_m + head_m
    assert (p, m) == (1095, 3540)
    assert (cost.params(arch), cost.macs(arch)) == (p, m)
    parts = cost.breakdown(arch)
    assert parts["pool[1]"] == cost.Cost(pool_p, pool_m)
    assert parts["stages[0].cells[0]"] == cost.Cost(first_p + second_p, first_m + second_m)
    assert parts["stages[1].cells[1]"] == cost.Cost(0, 0)
    assert arch.depth == 3


def test_2d_stride_2_pooling() -> None:
    # 16x16x3 image, patch 4 -> 4x4 grid, pooled to 2x2 by a stride-2 3x3 conv; mlp_ratio 1.5, no CLS.
    arch = spec("2d", 16, 4, 3, 5, 1.5, (16, 8, 2, ("basic",)), (4, 16, 4, ("basic",)))
    assert arch.strides() == (2,)
    embed_p, embed_m = (3 * 16 * 8 + 8) + 16 * 8, 16 * 48 * 8  # conv + pos embedding (no CLS)
    # stage 0: L=16, C=8, H=12
    l0_p = 2 * 8 + (8 * 24 + 24) + (8 * 8 + 8) + 2 * 8 + (8 * 12 + 12) + (12 * 8 + 8)
    l0_m = 16 * 8 * 24 + 16 * 16 * 8 * 2 + 16 * 8 * 8 + 16 * 8 * 12 + 16 * 12 * 8
    # pooling: Conv2d(8, 16, 3, stride 2, padding 1) evaluated at the 4 output positions, LN(16)
    pool_p, pool_m = (9 * 8 * 16 + 16) + 2 * 16, 4 * 9 * 8 * 16
    # stage 1: L=4, C=16, H=24
    l1_p = 2 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + 2 * 16 + (16 * 24 + 24) + (24 * 16 + 16)
    l1_m = 4 * 16 * 48 + 4 * 4 * 16 * 2 + 4 * 16 * 16 + 4 * 16 * 24 + 4 * 24 * 16
    head_p, head_m = 2 * 16 + (16 * 5 + 5), 16 * 5  # on the mean token
    p = embed_p + l0_p + pool_p + l1_p + head_p
    m = embed_m + l0_m + pool_m + l1_m + head_m
    assert (p, m) == (4329, 29776)
    assert (cost.params(arch), cost.macs(arch)) == (p, m)


def test_2d_stride_1_pooling_keeps_the_grid() -> None:
    one = spec("2d", 16, 4, 3, 5, 1.5, (16, 8, 2, ("identity",)), (16, 16, 4, ("identity",)))
    two = spec("2d", 16, 4, 3, 5, 1.5, (16, 8, 2, ("identity",)), (4, 16, 4, ("identity",)))
    assert one.strides() == (1,)
    # same weights, the conv runs at 16 output positions instead of 4
    assert cost.params(one) == cost.params(two)
    assert cost.macs(one) - cost.macs(two) == (16 - 4) * 9 * 8 * 16


def test_all_identity() -> None:
    arch = spec("1d", 8, 4, 1, 3, 2.0, (4, 4, 1, ("identity", "identity")), (1, 4, 1, ("identity",)))
    embed_p, embed_m = (16 * 4 + 4) + 4 + 5 * 4, 4 * 16 * 4
    pool_p, pool_m = (4 * 4 + 4) + 2 * 4, 5 * 4 * 4
    head_p, head_m = 2 * 4 + (4 * 3 + 3), 4 * 3
    assert (cost.params(arch), cost.macs(arch)) == (embed_p + pool_p + head_p, embed_m + pool_m + head_m)
    assert (cost.params(arch), cost.macs(arch)) == (143, 348)
    assert arch.depth == 0


@pytest.mark.parametrize("pooling,tokens,dim,mlp", [("1d", 4, 8, 2.0), ("2d", 16, 16, 4.0), ("1d", 49, 24, 1.5),
                                                    ("2d", 196, 192, 4.0)])
def test_shared_pair_saves_qk_and_one_matmul(pooling: str, tokens: int, dim: int, mlp: float) -> None:
    side = int(tokens ** 0.5)
    patch = 2
    img = side * patch
    shared = spec(pooling, img, patch, 3, 10, mlp, (tokens, dim, 2, ("basic", "shared", "identity")))
    basics = spec(pooling, img, patch, 3, 10, mlp, (tokens, dim, 2, ("basic", "basic", "basic", "identity")))
    L = tokens + (1 if pooling == "1d" else 0)
    C = dim
    assert shared.depth == basics.depth == 3
    assert cost.params(basics) - cost.params(shared) == 2 * C * C + 2 * C
    assert cost.macs(basics) - cost.macs(shared) == 2 * L * C * C + L * L * C


def test_breakdown_sums_to_total() -> None:
    arch = ArchSpec.load(REPO / "conf" / "baselines" / "deit_small.json")
    parts = cost.breakdown(arch)
    assert sorted(parts) == sorted(["embed", "head"] + [f"stages[0].cells[{j}]" for j in range(12)])
    assert sum(c.params for c in parts.values()) == cost.params(arch)
    assert sum(c.macs for c in parts.values()) == cost.macs(arch)
