"""Evolutionary search: finds a brute-forced optimum far more often than random search at equal budget,
respects constraints, never evaluates twice, batches per generation, resumes exactly, fails fast."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from search.constraint import Constraint, InfeasibleError, check_feasible
from search.evolution import (Evolution, EvolutionConfig, RandomSearch, Record, best_per_budget, pareto_front,
                              records_from_cache)
from space import cost
from space.arch import ArchSpec
from space.space import SearchSpace

REPO = Path(__file__).resolve().parent.parent
SMALL_CFG = EvolutionConfig(population=12, topk=4, generations=5, mutations=6, crossovers=6, max_tries=2000)

# 8 chains x 3^6 ops = 5832 architectures: enumerable, yet far larger than a search budget of ~100.
TINY = {"name": "tiny", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 2,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 3, "tokens": [16], "dims": [4, 8]},
                   {"cells": 3, "tokens": [16, 4], "dims": [8, 12]}]}


@lru_cache(maxsize=None)
def preset(name: str) -> SearchSpace:
    return SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / f"{name}.yaml"))


@lru_cache(maxsize=None)
def tiny() -> SearchSpace:
    return SearchSpace.from_config(TINY)


def _weights() -> dict[tuple, float]:
    rng = random.Random(1234)
    space = tiny()
    w: dict[tuple, float] = {("chain", c): rng.random() for c in space.chains}
    for i, s in enumerate(space.stages):
        for j in range(s.cells):
            for op in space.ops:
                w[(i, j, op)] = rng.random()
    return w


WEIGHTS = _weights()


def synthetic(arch: ArchSpec) -> float:
    """A separable random landscape plus a pull towards more FLOPs, like accuracy: the optimum inside a band
    sits on a constrained ridge rather than at the unconstrained maximum."""
    s = WEIGHTS[("chain", SearchSpace.chain_of(arch))]
    s += sum(WEIGHTS[(i, j, op)] for i, st in enumerate(arch.stages) for j, op in enumerate(st.cells))
    return s + cost.macs(arch) / 20_000


@lru_cache(maxsize=None)
def tiny_table() -> tuple[tuple[ArchSpec, float, int], ...]:
    """(arch, score, macs) of every architecture of the tiny space."""
    return tuple((a, synthetic(a), cost.macs(a)) for a in tiny().all_archs())


def tiny_band() -> Constraint:
    flops = sorted(m for _, _, m in tiny_table())
    return Constraint(flops_min=flops[len(flops) // 4], flops_max=flops[len(flops) // 2])


class Counting:
    """Wraps a per-arch score into a batched evaluate that records every call."""

    def __init__(self, fn=synthetic) -> None:
        self.fn, self.batches = fn, []

    def __call__(self, archs: list[ArchSpec]) -> list[float]:
        assert isinstance(archs, list) and all(isinstance(a, ArchSpec) for a in archs)
        self.batches.append(list(archs))
        return [self.fn(a) for a in archs]

    @property
    def keys(self) -> list[ArchSpec]:
        return [k for b in self.batches for k in b]


def preset_score(arch: ArchSpec) -> float:
    """Deterministic, cheap and arch-dependent: rewards basic cells and width."""
    return sum(c == "basic" for s in arch.stages for c in s.cells) + arch.stages[-1].dim / 100


# --------------------------------------------------------------------- search quality
def test_finds_brute_force_optimum_far_more_often_than_random():
    band = tiny_band()
    inside = [(k, s, m) for k, s, m in tiny_table() if band.admits(m, 0)]
    optimum = max(inside, key=lambda t: t[1])[0]
    cfg = EvolutionConfig(population=12, topk=4, generations=8, mutations=6, crossovers=6)
    seeds = range(20)
    hits = {}
    for cls in (Evolution, RandomSearch):
        found = 0
        for seed in seeds:
            ev = Counting()
            search = cls(tiny(), ev, random.Random(seed), band, cfg)
            best = search.run()
            assert len(ev.keys) == cfg.population * cfg.generations  # equal budget for both
            found += best.arch == optimum
        hits[cls.strategy] = found / len(seeds)
    # Budget 96 of ~1500 feasible archs: random finds the optimum ~6% of the time, evolution most of the time.
    assert len(inside) > 10 * cfg.population * cfg.generations
    assert hits["evolution"] >= 0.6, hits
    assert hits["evolution"] >= hits["random"] + 0.4, hits


# --------------------------------------------------------------------- invariants on the real presets
@pytest.mark.parametrize("name,band", [("fmnist_2d", (0.2, 0.4)), ("fmnist_1d", (0.0, 0.3)),
                                       ("imagenet_tiny_2d", (0.5, 0.7))])
@pytest.mark.parametrize("cls", [Evolution, RandomSearch])
def test_constraint_dedup_batches_and_sizes(name: str, band: tuple[float, float], cls: type) -> None:
    space = preset(name)
    lo, hi = space.macs_range()
    con = Constraint(flops_min=int(lo + band[0] * (hi - lo)), flops_max=int(lo + band[1] * (hi - lo)))
    ev = Counting(preset_score)
    search = cls(space, ev, random.Random(3), con, SMALL_CFG)
    gens = []
    search.run(callback=lambda s: gens.append(s.generation))
    assert gens == list(range(1, SMALL_CFG.generations + 1))
    assert len(ev.batches) == SMALL_CFG.generations  # one batched call per generation
    assert all(len(b) == SMALL_CFG.population for b in ev.batches)
    assert len(ev.keys) == len(set(ev.keys))  # never evaluated twice
    assert [r.arch for r in search.history] == ev.keys
    for g in range(SMALL_CFG.generations):
        assert sum(r.generation == g for r in search.history) == SMALL_CFG.population
    for r in search.history:
        arch = r.arch
        assert space.contains(arch) and con(arch)
        assert r.macs == cost.macs(arch) and r.params == cost.params(arch) and r.score == preset_score(arch)
    assert search.population == ev.batches[-1]
    top = search.topk(SMALL_CFG.topk)
    assert top[0] == search.best and top[0].score == max(r.score for r in search.history)
    ranks = [(-r.score, r.macs, r.arch.to_json()) for r in top]
    assert ranks == sorted(ranks)


def test_evolution_improves_over_its_random_first_generation():
    ev = Counting(preset_score)
    search = Evolution(preset("fmnist_2d"), ev, random.Random(0), Constraint(), SMALL_CFG)
    search.run()
    gen0 = max(r.score for r in search.history if r.generation == 0)
    assert search.best.score > gen0


def test_prefilled_cache_is_not_reevaluated_and_batches_skip_when_all_cached():
    space = preset("fmnist_2d")
    first = Counting(preset_score)
    a = Evolution(space, first, random.Random(5), Constraint(), SMALL_CFG)
    a.run()
    second = Counting(preset_score)
    b = Evolution(space, second, random.Random(5), Constraint(), SMALL_CFG, cache=dict(a.cache))
    b.run()
    assert second.batches == []  # same seed, everything cached: evaluate is never called
    assert b.history == a.history and b.evaluations == 0
    shared: dict[str, float] = {}
    c = Evolution(space, Counting(preset_score), random.Random(6), Constraint(), SMALL_CFG, cache=shared)
    c.run()
    assert set(shared) == {r.arch for r in c.history}  # the cache is shared in place


# --------------------------------------------------------------------- resume
@pytest.mark.parametrize("cls", [Evolution, RandomSearch])
def test_resume_is_exact(cls: type) -> None:
    space = preset("fmnist_2d")
    lo, hi = space.macs_range()
    con = Constraint(flops_max=(lo + hi) // 2)
    full_ev = Counting(preset_score)
    full = cls(space, full_ev, random.Random(11), con, SMALL_CFG)
    full.run()

    part_ev = Counting(preset_score)
    part = cls(space, part_ev, random.Random(11), con, SMALL_CFG)
    for _ in range(3):
        part.step()
    state = json.loads(json.dumps(part.state_dict()))
    rest_ev = Counting(preset_score)
    rest = cls(space, rest_ev, random.Random(999), con, SMALL_CFG)  # a different seed: the state wins
    rest.load_state_dict(state)
    rest.run()
    assert rest.best == full.best
    assert rest.history == full.history
    assert len(part_ev.batches) + len(rest_ev.batches) == len(full_ev.batches)
    assert part_ev.keys + rest_ev.keys == full_ev.keys
    assert json.loads(json.dumps(rest.state_dict())) == json.loads(json.dumps(full.state_dict()))


def test_resume_rejects_a_different_config():
    space = preset("fmnist_2d")
    a = Evolution(space, Counting(preset_score), random.Random(0), Constraint(), SMALL_CFG)
    a.step()
    state = json.loads(json.dumps(a.state_dict()))
    other = EvolutionConfig(**{**SMALL_CFG.__dict__, "topk": 3})
    with pytest.raises(ValueError, match=r"state\.cfg\.topk"):
        Evolution(space, Counting(preset_score), random.Random(0), Constraint(), other).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\.strategy"):
        RandomSearch(space, Counting(preset_score), random.Random(0), Constraint(), SMALL_CFG).load_state_dict(state)
    longer = EvolutionConfig(**{**SMALL_CFG.__dict__, "generations": 7})
    b = Evolution(space, Counting(preset_score), random.Random(0), Constraint(), longer)
    b.load_state_dict(state)  # extending the number of generations is allowed
    b.run()
    assert b.generation == 7


# --------------------------------------------------------------------- feasibility
def test_infeasible_constraints_fail_fast_with_the_space_range():
    space = preset("fmnist_2d")
    lo, hi = space.macs_range()
    plo, _ = space.params_range()
    rng = random.Random(0)
    with pytest.raises(InfeasibleError, match="flops_min 200 > flops_max 100"):
        check_feasible(space, Constraint(flops_min=200, flops_max=100), rng)
    with pytest.raises(InfeasibleError, match=rf"outside the space 'fmnist_2d'\'s exact range \[{lo}, {hi}\] MACs"):
        check_feasible(space, Constraint(flops_min=hi + 1, flops_max=hi * 2), rng)
    with pytest.raises(InfeasibleError, match=rf"exact range \[{lo}, {hi}\]"):
        check_feasible(space, Constraint(flops_max=lo - 1), rng)
    with pytest.raises(InfeasibleError, match=rf"params <= {plo - 1} is below .* exact range \[{plo}, "):
        check_feasible(space, Constraint(params_max=plo - 1), rng)
    with pytest.raises(InfeasibleError, match="outside"):  # the search itself checks before running
        Evolution(space, Counting(), rng, Constraint(flops_min=hi + 1), SMALL_CFG)
    with pytest.raises(InfeasibleError) as e:
        check_feasible(space, Constraint(flops_min=hi + 1), rng)
    assert "\n" not in str(e.value) and f"[{hi + 1}, inf]" in str(e.value)


@pytest.mark.parametrize("name", ["fmnist_2d", "imagenet_tiny_2d"])
def test_narrow_bands_at_both_ends_are_found(name: str) -> None:
    space = preset(name)
    lo, hi = space.macs_range()
    step = (hi - lo) // 100
    for band in (Constraint(flops_max=lo), Constraint(flops_min=hi), Constraint(flops_min=lo, flops_max=lo + step),
                 Constraint(flops_min=(lo + hi) // 2 - 2 * step, flops_max=(lo + hi) // 2)):
        arch = check_feasible(space, band, random.Random(0), tries=2000)
        assert space.contains(arch) and band(arch)
    # the minimum is a one-arch band: generation 0 holds that arch, generation 1 finds nothing new to evaluate
    ev = Counting(preset_score)
    s = RandomSearch(space, ev, random.Random(0), Constraint(flops_max=lo), EvolutionConfig(
        population=4, topk=2, generations=2, mutations=0, crossovers=0, max_tries=400))
    s.run()
    assert [len(b) for b in ev.batches] == [1] and s.best.macs == lo


def test_infeasible_combination_found_by_sampling():
    space = tiny()
    lo, hi = space.macs_range()
    plo, _ = space.params_range()
    # each bound alone is in range, together impossible: only the largest FLOPs, only the fewest params
    with pytest.raises(InfeasibleError, match="no architecture of space 'tiny' satisfying .* in 300 tries"):
        check_feasible(space, Constraint(flops_min=hi, params_max=plo), random.Random(0), tries=300)


def test_config_and_constraint_validation():
    with pytest.raises(ValueError, match="evolution.mutation_prob"):
        EvolutionConfig(mutation_prob=1.5)
    with pytest.raises(ValueError, match="exceeds evolution.population 10"):
        EvolutionConfig(population=10, mutations=6, crossovers=6)
    with pytest.raises(ValueError, match="evolution.topk"):
        EvolutionConfig(topk=0)
    with pytest.raises(ValueError, match="constraint.flops_max"):
        Constraint(flops_max=-1)
    assert Constraint().describe() == "unconstrained"
    assert Constraint(1_200_000_000, 1_300_000_000, 5_700_000).describe() == \
        "FLOPs in [1.2 G, 1.3 G] MACs, params <= 5.7 M"
    assert Constraint(flops_max=1_300_000_000).describe() == "FLOPs <= 1.3 G MACs"


def test_evaluate_must_return_one_score_per_arch():
    space = preset("fmnist_2d")
    with pytest.raises(ValueError, match="returned 1 scores for 12"):
        Evolution(space, lambda archs: [0.0], random.Random(0), Constraint(), SMALL_CFG).step()
    with pytest.raises(ValueError, match="NaN"):
        Evolution(space, lambda archs: [float("nan")] * len(archs), random.Random(0), Constraint(), SMALL_CFG).step()


# --------------------------------------------------------------------- multi-budget and Pareto
def test_best_per_budget_matches_brute_force_over_a_shared_cache():
    space = tiny()
    table = tiny_table()
    sub = dict((a, s) for a, s, _ in table[::7])  # a shared cache of evaluations
    flops = {a: m for a, _, m in table}
    lo, hi = space.macs_range()
    mid = (lo + hi) // 2
    bands = [(None, mid), (mid, None), (lo, lo), (hi + 1, None), (None, None)]
    got = best_per_budget(sub, space, [Constraint(blo, bhi) for blo, bhi in bands])
    for (blo, bhi), rec in zip(bands, got):
        inside = [(s, -flops[a], a.to_json()) for a, s in sub.items()
                  if (blo is None or flops[a] >= blo) and (bhi is None or flops[a] <= bhi)]
        if not inside:
            assert rec is None
        else:
            assert rec.arch.to_json() == max(inside)[2] and rec.macs == flops[rec.arch] and rec.generation == -1
    assert got[3] is None
    records = records_from_cache(sub, space)
    assert best_per_budget(records, space, [Constraint(blo, bhi) for blo, bhi in bands]) == got
    with pytest.raises(ValueError, match=r"budgets\[0\]"):
        best_per_budget(records, space, [Constraint(5, 1)])


def test_best_per_budget_keeps_the_params_bound():
    space = tiny()
    records = records_from_cache({a: s for a, s, _ in tiny_table()[::7]}, space)
    best = max(records, key=lambda r: (r.score, -r.macs))
    below = Constraint(params_max=best.params - 1)  # the overall best is too large for this budget
    got_any, got_below = best_per_budget(records, space, [Constraint(), below])
    assert got_any == best
    fits = [r for r in records if r.params <= best.params - 1]
    assert got_below.params <= best.params - 1 and got_below.score == max(r.score for r in fits)


def test_pareto_front():
    archs = [a for a, _, _ in tiny_table()[:6]]  # six distinct architectures; only identity matters here
    a, b, c, d, e, f = archs
    r = [Record(0, a, 0.5, 100, 1), Record(0, b, 0.7, 200, 1), Record(0, c, 0.6, 300, 1),
         Record(0, d, 0.9, 300, 1), Record(0, e, 0.9, 400, 1), Record(0, f, 0.4, 50, 1),
         Record(1, a, 0.5, 100, 1)]
    assert [x.arch for x in pareto_front(r)] == [f, a, b, d]
    table = tiny_table()[::13]
    recs = [Record(0, k, s, m, 0) for k, s, m in table]
    front = pareto_front(recs)
    for p in front:  # nothing strictly better in both
        assert not any(q.score >= p.score and q.macs <= p.macs and (q.score, -q.macs) != (p.score, -p.macs)
                       for q in recs)
    assert front[-1].score == max(x.score for x in recs)


# --------------------------------------------------------------------- purity
def test_module_imports_no_torch_or_app_frameworks():
    code = ("import sys, search.constraint, search.evolution, search.report\n"
            "bad = [m for m in ('torch', 'hydra', 'tqdm', 'tensorboard', 'torch.distributed') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
