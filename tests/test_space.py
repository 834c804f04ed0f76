"""SearchSpace: presets, exact size and cost range against brute force, uniform sampling, variation, errors."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from space import cost
from space.arch import ArchError, ArchSpec, StageSpec
from space.space import SearchSpace, SpaceError

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("fmnist_2d", "fmnist_1d", "cifar_2d", "cifar_1d", "imagenet_tiny_2d", "imagenet_tiny_1d",
           "imagenet_small_2d")
SEEDS = st.integers(0, 2**32 - 1)


@lru_cache(maxsize=None)
def preset(name: str) -> SearchSpace:
    return SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / f"{name}.yaml"))


@lru_cache(maxsize=None)
def ranges(name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    return preset(name).macs_range(), preset(name).params_range()


def small(pooling: str, stages: list[dict], ops: list[str], img: int, patch: int, head_dim: int = 4,
          mlp: float = 2.0) -> dict[str, Any]:
    return {"name": f"small_{pooling}", "pooling": pooling, "img_size": img, "patch_size": patch, "in_chans": 1,
            "num_classes": 3, "mlp_ratio": mlp, "head_dim": head_dim, "ops": ops, "stages": stages}


# Small enough to enumerate; the constraints bite (some token/dim combinations are not chains).
SMALL = {
    # 16 tokens (+CLS); stage 1 dim 4 only after stage-0 dim 4; stage-2 tokens 9 only after 16 or 9.
    "1d_3stages": small("1d", [{"cells": 1, "tokens": [16], "dims": [4, 8]},
                               {"cells": 2, "tokens": [16, 9, 4], "dims": [4, 8, 12]},
                               {"cells": 1, "tokens": [9, 4], "dims": [12, 16]}], ["basic", "shared"], 8, 2),
    # 4x4 grid -> 4x4|2x2 -> ...; 1 token (1x1) only after the 2x2 grid.
    "2d_3stages": small("2d", [{"cells": 2, "tokens": [16], "dims": [8, 16]},
                               {"cells": 1, "tokens": [16, 4], "dims": [8, 16]},
                               {"cells": 1, "tokens": [4, 1], "dims": [16, 24]}], ["basic", "identity"], 16, 4),
    "1d_2stages_all_ops": small("1d", [{"cells": 1, "tokens": [4], "dims": [4, 8]},
                                       {"cells": 2, "tokens": [4, 2, 1], "dims": [8]}],
                                ["basic", "shared", "identity"], 4, 2),
    "2d_2stages_one_op": small("2d", [{"cells": 2, "tokens": [9], "dims": [4, 8]},
                                      {"cells": 1, "tokens": [9, 4], "dims": [8, 12]}], ["shared"], 12, 4),
}


@lru_cache(maxsize=None)
def small_space(name: str) -> SearchSpace:
    return SearchSpace.from_config(SMALL[name])


def brute_force(cfg: dict[str, Any]) -> set[ArchSpec]:
    """Every combination of the raw choices that ArchSpec itself accepts (independent of SearchSpace)."""
    out = set()
    per_stage = []
    for s in cfg["stages"]:
        per_stage.append([(t, d, cells) for t in s["tokens"] for d in s["dims"]
                          for cells in itertools.product(cfg["ops"], repeat=s["cells"])])
    for combo in itertools.product(*per_stage):
        try:
            out.add(ArchSpec(pooling=cfg["pooling"], img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                             in_chans=cfg["in_chans"], num_classes=cfg["num_classes"], mlp_ratio=cfg["mlp_ratio"],
                             stages=tuple(StageSpec(t, d, d // cfg["head_dim"], c) for t, d, c in combo)))
        except ArchError:
            pass
    return out


# ----------------------------------------------------------------------------- presets
def test_plain_preset_is_fmnist_2d_without_pooling_and_sharing() -> None:
    plain, full = preset("fmnist_2d_plain"), preset("fmnist_2d")
    assert plain.ops == ("basic", "identity") and plain.size() == len(plain.chains) * 2 ** 18
    assert {a.stages[i].tokens for a in (plain.sample(random.Random(k)) for k in range(50)) for i in range(3)} == {49}
    assert [s.dims for s in plain.stages] == [s.dims for s in full.stages]
    assert (plain.img_size, plain.patch_size, plain.mlp_ratio, plain.head_dim) == \
        (full.img_size, full.patch_size, full.mlp_ratio, full.head_dim)


def _docs_presets() -> dict[str, list[str]]:
    """docs/pipeline.md's preset table: name -> [architectures, FLOPs range, params range] as printed."""
    text = (REPO / "docs" / "pipeline.md").read_text()
    table = text.split("| preset | input | architectures | FLOPs range (MACs) | params range |", 1)[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {r[0].strip("`"): r[2:] for r in rows}


def _close(printed: str, exact: int) -> bool:
    """``printed`` ("142 K", "5.48 G", "0.50 M", "1.39e10") is ``exact`` rounded to its last printed digit."""
    import re

    m = re.fullmatch(r"(\d+(?:\.(\d+))?)(?:e(\d+)| ([KMG]))", printed)
    assert m, printed
    scale = 10 ** int(m[3]) if m[3] else {"K": 1e3, "M": 1e6, "G": 1e9}[m[4]]
    unit = 10 ** -len(m[2] or "") * scale
    return abs(float(m[1]) * scale - exact) <= unit / 2 * (1 + 1e-9)


def test_the_preset_table_of_pipeline_md_is_what_the_spaces_compute():
    table = _docs_presets()
    assert sorted(table) == sorted(p.stem for p in (REPO / "conf" / "space").glob("*.yaml"))
    for name, (size, flops, params) in table.items():
        space = preset(name)
        for printed, exact in ((size, space.size()), *zip(flops.split(" .. "), space.macs_range()),
                               *zip(params.split(" .. "), space.params_range())):
            assert _close(printed, exact), (name, printed, exact)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name: str) -> None:
    space = preset(name)
    assert space.name == name
    assert space.pooling == name[-2:]
    assert len(space.stages) == 3 and all(s.cells == 6 for s in space.stages)
    assert space.size() == len(space.chains) * 3 ** 18
    lo, hi = space.macs_range()
    assert 0 < lo < hi
    for which, key in itertools.product(("min", "max"), ("macs", "params")):
        arch = space.extreme(which, key)
        assert space.contains(arch)
        assert getattr(cost, key)(arch) == space.cost_range(key)[which == "max"]


@pytest.mark.parametrize("name,budget", [("imagenet_tiny_2d", 1.3e9), ("imagenet_tiny_1d", 1.3e9),
                                         ("imagenet_small_2d", 4.6e9)])
def test_imagenet_ranges_contain_deit_budget(name: str, budget: float) -> None:
    lo, hi = preset(name).macs_range()
    assert lo < budget < hi


@pytest.mark.parametrize("name", PRESETS + tuple(SMALL))
def test_to_config_round_trips(name: str) -> None:
    space = preset(name) if name in PRESETS else small_space(name)
    cfg = space.to_config()
    assert json.loads(json.dumps(cfg)) == cfg  # plain data, fit for a checkpoint
    back = SearchSpace.from_config(cfg)
    assert back == space and back.to_config() == cfg and back.chains == space.chains


# ----------------------------------------------------------------------------- sample / mutate / crossover
@settings(deadline=None, max_examples=60)
@given(seed=SEEDS, name=st.sampled_from(PRESETS), prob=st.floats(0.0, 1.0))
def test_variation_stays_in_space(seed: int, name: str, prob: float) -> None:
    space, rng = preset(name), random.Random(seed)
    a, b = space.sample(rng), space.sample(rng)
    m = space.mutate(a, prob, rng)
    c = space.crossover(a, m, rng)
    (lo, hi), (plo, phi) = ranges(name)
    for arch in (a, b, m, c):
        assert space.why_not(arch) is None
        space.check(arch)
        assert lo <= cost.macs(arch) <= hi and plo <= cost.params(arch) <= phi


@settings(deadline=None, max_examples=40)
@given(seed=SEEDS, name=st.sampled_from(PRESETS))
def test_mutate_with_prob_zero_is_identity(seed: int, name: str) -> None:
    space = preset(name)
    a = space.sample(random.Random(seed))
    assert space.mutate(a, 0.0, random.Random(seed + 1)) == a


@settings(deadline=None, max_examples=40)
@given(seed=SEEDS, name=st.sampled_from(PRESETS))
def test_crossover_takes_every_choice_from_a_parent(seed: int, name: str) -> None:
    space, rng = preset(name), random.Random(seed)
    a, b = space.sample(rng), space.sample(rng)
    c = space.crossover(a, b, rng)
    for sa, sb, sc in zip(a.stages, b.stages, c.stages):
        assert sc.tokens in (sa.tokens, sb.tokens) and sc.dim in (sa.dim, sb.dim)
        assert all(oc in (oa, ob) for oa, ob, oc in zip(sa.cells, sb.cells, sc.cells))
    assert space.crossover(a, a, rng) == a


@pytest.mark.parametrize("prob", [0.1, 0.5, 1.0])
def test_mutate_changes_about_prob_of_the_ops(prob: float) -> None:
    space, rng = preset("fmnist_2d"), random.Random(0)
    changed = total = 0
    for _ in range(300):
        a = space.sample(rng)
        m = space.mutate(a, prob, rng)
        for sa, sm in zip(a.stages, m.stages):
            changed += sum(x != y for x, y in zip(sa.cells, sm.cells))
            total += len(sa.cells)
    # a resampled op is uniform over 3 ops, so it changes with probability 2/3
    assert abs(changed / total - prob * 2 / 3) < 0.03


def test_mutate_resamples_tokens_and_dims() -> None:
    space, rng = preset("fmnist_2d"), random.Random(1)
    a = space.sample(rng)
    chains = {space.chain_of(space.mutate(a, 1.0, rng)) for _ in range(200)}
    assert len(chains) > 5 and all(c in space.chains for c in chains)


# ----------------------------------------------------------------------------- exact size and range
@pytest.mark.parametrize("name", tuple(SMALL))
def test_size_and_ranges_match_brute_force(name: str) -> None:
    space = small_space(name)
    archs = list(space.all_archs())
    assert set(archs) == brute_force(SMALL[name])
    assert len(set(archs)) == len(archs) == space.size()
    macs = [cost.macs(a) for a in archs]
    params = [cost.params(a) for a in archs]
    assert space.macs_range() == (min(macs), max(macs))
    assert space.params_range() == (min(params), max(params))
    for which, key in itertools.product(("min", "max"), ("macs", "params")):
        arch = space.extreme(which, key)
        assert arch in archs
        assert getattr(cost, key)(arch) == space.cost_range(key)[which == "max"]


def test_small_sizes_by_hand() -> None:
    # 1d_2stages_all_ops: stage-0 dim 4|8, then (tokens 4|2|1, dim 8): 6 chains x 3^3 ops
    assert small_space("1d_2stages_all_ops").size() == 6 * 27
    # 2d_3stages: grids 16->16->4, 16->4->4, 16->4->1; dims (8,8,16|24), (8,16,16|24), (16,16,16|24)
    assert len(small_space("2d_3stages").chains) == 3 * 6
    assert small_space("2d_3stages").size() == 18 * 2 ** 4


def test_sampling_is_uniform_over_archs() -> None:
    # Unbalanced chain tree: stage-0 dim 4 continues with 2 dims, dim 8 with 1; a stage-by-stage
    # sampler would favour the latter. 3 dim chains x 2 token counts x 2^2 ops = 24 archs.
    cfg = small("1d", [{"cells": 1, "tokens": [4], "dims": [4, 8]}, {"cells": 1, "tokens": [4, 1], "dims": [4, 8]}],
                ["basic", "identity"], 4, 2)
    space = SearchSpace.from_config(cfg)
    assert space.size() == len(list(space.all_archs())) == 24
    n, rng = 24 * 500, random.Random(0)
    counts = Counter(space.sample(rng) for _ in range(n))
    assert set(counts) == set(space.all_archs())
    expected = n / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 50  # 23 degrees of freedom: p ~ 1e-3
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values())


# ----------------------------------------------------------------------------- membership
def _sample_fmnist() -> ArchSpec:
    return preset("fmnist_2d").sample(random.Random(3))


def _with_stage(arch: ArchSpec, i: int, **kw: Any) -> ArchSpec:
    stages = list(arch.stages)
    stages[i] = StageSpec(**{**stages[i].__dict__, **kw})
    return ArchSpec(**{**arch.__dict__, "stages": tuple(stages)})


@pytest.mark.parametrize("make,fragment", [
    (lambda a: _with_stage(a, 2, dim=72, num_heads=9), "stages[2].dim: 72 is not a choice of the space"),
    (lambda a: _with_stage(a, 0, cells=a.stages[0].cells + ("basic",)), "stages[0].cells: 7 cells, the space has 6"),
    (lambda a: _with_stage(a, 0, num_heads=a.stages[0].dim // 4 if a.stages[0].dim % 4 == 0 else 1),
     "stages[0].num_heads"),
    (lambda a: ArchSpec(**{**a.__dict__, "img_size": 32, "stages": (
        StageSpec(64, 16, 2, ("basic",) * 6), StageSpec(16, 32, 4, ("basic",) * 6),
        StageSpec(4, 48, 6, ("basic",) * 6))}),
     "img_size: 32 differs from the space's 28"),
    (lambda a: ArchSpec(**{**a.__dict__, "stages": a.stages[:2]}), "stages: 2 stages, the space has 3"),
    (lambda a: ArchSpec(**{**a.__dict__, "num_classes": 100}), "num_classes: 100 differs"),
], ids=["dim-too-large", "cell-count", "heads", "img-size", "stage-count", "classes"])
def test_check_names_the_field(make: Callable[[ArchSpec], ArchSpec], fragment: str) -> None:
    space = preset("fmnist_2d")
    arch = make(_sample_fmnist())
    assert not space.contains(arch)
    with pytest.raises(ArchError) as e:
        space.check(arch)
    assert str(e.value).startswith("not in space 'fmnist_2d': ") and fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_check_op_outside_the_space() -> None:
    space = small_space("2d_3stages")  # ops basic, identity
    arch = space.sample(random.Random(0))
    bad = _with_stage(arch, 1, cells=("shared",))
    with pytest.raises(ArchError, match=r"stages\[1\]\.cells\[0\]: op 'shared' is not in the space"):
        space.check(bad)
    with pytest.raises(ArchError, match="not in space"):
        space.mutate(bad, 0.5, random.Random(0))


# ----------------------------------------------------------------------------- invalid space configs
def _edit(fn: Callable[[dict], None]) -> dict:
    cfg = copy.deepcopy(SMALL["2d_3stages"])
    fn(cfg)
    return cfg


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c["ops"].append("shard"), "space.ops[2]: unknown op 'shard'"),
    (lambda c: c.update(ops=["basic", "basic"]), "space.ops: ['basic', 'basic'] must be a non-empty list"),
    (lambda c: c.update(ops=[]), "space.ops"),
    (lambda c: c["stages"][1].update(dims=[8, 10, 16]), "space.stages[1].dims: 10 is not a multiple of head_dim 4"),
    (lambda c: c.update(head_dim=16), "space.stages[0].dims: 8 is not a multiple of head_dim 16"),
    (lambda c: c["stages"][0].update(tokens=[9]), "space.stages[0].tokens: [9] must be [16]"),
    (lambda c: c["stages"][1].update(tokens=[16, 9]), "space.stages[1].tokens: choice 9 fits no valid chain"),
    (lambda c: c["stages"][2].update(dims=[4, 16]), "space.stages[2].dims: choice 4 fits no valid chain"),
    (lambda c: c.update(stages=[]), "space.stages: empty"),
    (lambda c: c.pop("pooling"), "space.pooling: missing"),
    (lambda c: c.update(pooling="3d"), "space.pooling: '3d'"),
    (lambda c: c.update(patch_size=3), "space.patch_size: 3 does not divide img_size 16"),
    (lambda c: c.update(patch_size=0), "space.patch_size: 0 must be a positive integer"),
    (lambda c: c.update(head_dim=0), "space.head_dim: 0 must be a positive integer"),
    (lambda c: c.update(img_size="16"), "space.img_size: '16' has the wrong type"),
    (lambda c: c["stages"][0].update(tokens=16), "space.stages[0].tokens: 16 must be a list"),
    (lambda c: c["stages"][1].update(dims=[]), "space.stages[1].dims: [] must be a non-empty list"),
    (lambda c: c["stages"][1].update(dims=[8, 8]), "space.stages[1].dims: [8, 8] has repeated choices"),
    (lambda c: c["stages"][1].update(cells=0), "space.stages[1].cells: 0 must be a positive integer"),
    (lambda c: c["stages"][1].update(cells=True), "space.stages[1].cells: True must be a positive integer"),
    (lambda c: c["stages"][1].pop("cells"), "space.stages[1]: expected a mapping with keys cells, tokens, dims"),
    (lambda c: c.update(mlp_ratio=0.3), "space: its fields do not form a valid architecture: mlp_ratio"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_space_config_names_the_field(edit: Callable[[dict], None], fragment: str) -> None:
    with pytest.raises(SpaceError) as e:
        SearchSpace.from_config(_edit(edit))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_from_config_accepts_omegaconf() -> None:
    node = OmegaConf.create(SMALL["1d_3stages"])
    assert SearchSpace.from_config(node) == small_space("1d_3stages")


# ----------------------------------------------------------------------------- space.info (called directly)
def _compose(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="info", overrides=list(overrides))


def test_info_summarises_imagenet_tiny_2d() -> None:
    from space.info import info

    cfg = _compose("space=imagenet_tiny_2d", "seed=5")
    assert cfg.arch is None and cfg.samples == 1
    text = info(cfg)
    space = preset("imagenet_tiny_2d")
    lo, hi = space.macs_range()
    plo, phi = space.params_range()
    assert lo < 1.3e9 < hi
    assert f"FLOPs (MACs): {cost.fmt_macs(lo)} .. {cost.fmt_macs(hi)}  ({lo:,} .. {hi:,})" in text
    assert f"params: {cost.fmt_params(plo)} .. {cost.fmt_params(phi)}  ({plo:,} .. {phi:,})" in text
    assert f"size: {space.size():,} architectures" in text and f"{len(space.chains)} valid token/dim chains" in text
    sample = space.sample(random.Random(5))
    assert sample.to_json() in text + "\n"
    assert f"({cost.macs(sample):,})" in text


def test_info_arch_mode() -> None:
    from space.info import info

    cfg = _compose("space=imagenet_tiny_1d")
    cfg.arch = str(REPO / "conf" / "baselines" / "deit_tiny.json")
    text = info(cfg)
    assert "params 5.72 M (5,717,416), FLOPs (MACs) 1.25 G (1,253,683,200), depth 12" in text
    assert "in space imagenet_tiny_1d: no (stages: 1 stages, the space has 3)" in text
    cfg.arch = str(REPO / "nope.json")
    with pytest.raises(ArchError, match="cannot read"):
        info(cfg)
