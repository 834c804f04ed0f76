"""The ranking-fidelity app (`python -m search.fidelity`) and its statistics: Kendall tau, Spearman rho and top-k
overlap against brute force, the bootstrap interval's coverage on synthetic rankings with a known population
tau, the stratified and in-band picks, end-to-end runs on generated IDX files (outputs, resume, 2 ranks equal
1 rank) and the one-line errors."""

from __future__ import annotations

import json
import math
import os
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats

from search.ranking import (agreement, bootstrap, ceiling_tau, kendall_tau, noise_ceiling, paired_difference,
                            seed_to_seed_tau, spearman_rho, tau_single, topk_overlap)
from space.cost import macs
from space.errors import UserError
from space.samplers import band_archs, stratified_archs
from space.space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FMNIST_2D = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))


# ----------------------------------------------------------------------------- statistics
def brute_tau_b(a, b) -> float:
    """Kendall's tau-b from its definition: concordant minus discordant pairs over the tie-corrected count."""
    conc = disc = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))


@pytest.mark.parametrize("seed", range(5))
def test_rank_statistics_equal_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 17).astype(float)  # many ties, like accuracies on a small split
    b = a + rng.integers(-2, 3, 17)
    assert kendall_tau(a, b) == pytest.approx(brute_tau_b(a, b), abs=1e-12)
    assert spearman_rho(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    # vectorized over a leading axis, as the bootstrap calls them
    batch = np.stack([a, b[::-1], b])
    assert kendall_tau(batch, np.stack([b, a, a]), axis=-1) == pytest.approx(
        [brute_tau_b(a, b), brute_tau_b(b[::-1], a), brute_tau_b(b, a)], abs=1e-12)
    # top-k overlap with ties counted fractionally: the mean over every way of breaking the ties at random
    k = 4
    perms = [rng.permutation(17) for _ in range(3000)]
    top = lambda v, p: set(p[np.argsort(-v[p], kind="stable")[:k]])  # noqa: E731
    brute = np.mean([len(top(a, p) & top(b, q)) / k for p, q in zip(perms, perms[::-1])])
    assert topk_overlap(a, b, k) == pytest.approx(brute, abs=0.02)


def test_topk_overlap_does_not_depend_on_the_order_of_the_lists():
    """Tied scores: reordering the architectures (both lists alike) leaves the overlap unchanged (it broke ties by
    position: 1.0 for one order, 0.0 for the reverse)."""
    a, b = np.array([0.5, 0.5, 0.4, 0.3]), np.array([0.9, 0.1, 0.5, 0.2])
    assert topk_overlap(a, b, 1) == topk_overlap(a[::-1], b[::-1], 1) == 0.5
    assert topk_overlap([1, 1, 1, 0], [0, 1, 1, 1], 2) == pytest.approx(4 / 9)
    assert topk_overlap([0, 1, 1, 1], [1, 1, 1, 0], 2) == pytest.approx(4 / 9)


def test_perfect_and_reversed_rankings():
    a = list(range(10))
    assert kendall_tau(a, a) == 1 and kendall_tau(a, a[::-1]) == -1
    est = agreement(a, [2 * v for v in a], k=3, resamples=200)
    assert est["kendall_tau"].value == 1 and est["kendall_tau"].low == 1 and est["top3_overlap"].value == 1
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # undefined: a constant side ...
    assert agreement([1, 1, 1, 1], [1, 2, 3, 4], k=1, resamples=100)["kendall_tau"].to_dict()["value"] is None


def test_bootstrap_interval_covers_the_population_tau():
    """Bivariate normal samples with correlation r have population Kendall tau (2/pi) asin(r). Over 120
    synthetic rankings of 24 architectures, the paired percentile interval covers it in about 95% of them; an
    unpaired bootstrap (each side resampled on its own) would centre on 0 and almost never cover 0.41."""
    r, n, trials = 0.6, 24, 120
    truth = 2 / math.pi * math.asin(r)
    rng = np.random.default_rng(0)
    cov = [[1, r], [r, 1]]
    covered = 0
    for t in range(trials):
        x = rng.multivariate_normal([0, 0], cov, n)
        est = bootstrap(kendall_tau, list(x[:, 0]), list(x[:, 1]), resamples=400, seed=t)
        covered += est.low <= truth <= est.high
    assert 0.85 <= covered / trials <= 1.0, covered


def test_noise_ceiling_is_the_mean_seed_to_seed_tau():
    rng = np.random.default_rng(1)
    quality = rng.normal(size=20)
    runs = [[q + rng.normal(scale=0.5) for _ in range(3)] for q in quality]  # 3 seeds of 20 archs
    est = seed_to_seed_tau(runs, resamples=300)
    cols = np.asarray(runs).T
    want = np.mean([brute_tau_b(cols[i], cols[j]) for i, j in combinations(range(3), 2)])
    assert est.value == pytest.approx(want, abs=1e-12) and est.low < est.value < est.high
    assert seed_to_seed_tau([[0.5], [0.6], [0.7]]) is None  # one seed: no ceiling


# ----------------------------------------------------------------------------- the picks
def test_ceiling_for_the_mean_is_what_the_true_quality_reaches_against_it():
    """Simulated ground truth (quality + seed noise, 2 seeds, 4000 architectures): the true quality's tau against
    the 2-seed mean is the ceiling computed from the seed-to-seed tau alone, and so is its tau against one
    seed; the old ceiling (the seed-to-seed tau itself) understates both. Calibrated like the 100-step study
    (seed-to-seed tau about 0.38)."""
    rng = np.random.default_rng(0)
    n, noise = 4000, 0.9
    quality = rng.normal(size=n)
    runs = quality[:, None] + noise * rng.normal(size=(n, 2))
    ss = kendall_tau(runs[:, 0], runs[:, 1])
    assert 0.3 < ss < 0.45
    assert kendall_tau(quality, runs.mean(1)) == pytest.approx(ceiling_tau(ss, 2), abs=0.02)
    assert kendall_tau(quality, runs[:, 0]) == pytest.approx(ceiling_tau(ss, 1), abs=0.02)
    assert ceiling_tau(ss, 2) > ceiling_tau(ss, 1) > ss + 0.1
    c = noise_ceiling(runs[:300].tolist(), resamples=200)
    assert c["mean"].low <= c["mean"].value <= c["mean"].high and c["mean"].value > c["single"].value
    assert tau_single(quality[:300].tolist(), runs[:300].tolist(), 200).value == pytest.approx(
        np.mean([kendall_tau(quality[:300], runs[:300, s]) for s in (0, 1)]), abs=1e-12)


def test_paired_difference_interval_is_narrower_than_unpaired_on_correlated_vectors():
    """Two nets right on mostly the same images: the lead's paired interval covers the true 0.01 and is far
    narrower than the spread of each accuracy alone."""
    rng = np.random.default_rng(1)
    easy = rng.random(10000) < 0.8
    a = easy | (rng.random(10000) < 0.05)
    b = easy | (rng.random(10000) < 0.0)
    lead = paired_difference(a, b, resamples=500)
    assert lead.value == pytest.approx(a.mean() - b.mean()) and lead.low < lead.value < lead.high
    assert lead.high - lead.low < 0.5 * 2 * 1.96 * np.sqrt(0.8 * 0.2 / 10000)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b[:10])


def test_stratified_picks_cover_the_range_one_per_stratum():
    archs = stratified_archs(FMNIST_2D, 12, seed=0, pool=1500)
    lo, hi = FMNIST_2D.macs_range()
    cost = [macs(a) for a in archs]
    assert len(set(archs)) == 12 and all(FMNIST_2D.contains(a) for a in archs) and cost == sorted(cost)
    width = (hi - lo) / 12
    assert cost[0] < lo + width and cost[-1] > hi - width  # both ends of the range are represented
    assert sum(lo + k * width <= c <= lo + (k + 1) * width for k in range(12) for c in cost) >= 12
    assert archs == stratified_archs(FMNIST_2D, 12, seed=0, pool=1500)
    assert archs != stratified_archs(FMNIST_2D, 12, seed=1, pool=1500)


def test_band_picks_lie_in_the_band_and_a_narrow_band_is_a_user_error():
    archs = band_archs(FMNIST_2D, 10, 3e6, 4e6, seed=0)
    assert len(set(archs)) == 10 and all(3e6 <= macs(a) <= 4e6 for a in archs)
    with pytest.raises(UserError, match=r"band: only \d+ of 10 architectures found with MACs in \[1e\+06, 1\.001e"):
        band_archs(FMNIST_2D, 10, 1e6, 1.001e6, seed=0, draws=2000)


def test_tau_difference_tells_a_better_proxy_from_a_noisier_one():
    """Two proxies of 30 architectures: one is the truth plus small noise, the other plus large noise. The
    difference of their taus is the difference of the two taus, and its interval excludes zero; a proxy against
    itself gives exactly zero."""
    from search.ranking import kendall_tau, tau_difference

    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    good, bad = truth + 0.1 * rng.normal(size=30), truth + 2.0 * rng.normal(size=30)
    d = tau_difference(good, bad, truth, 1000, 0)
    assert d.value == pytest.approx(kendall_tau(good, truth) - kendall_tau(bad, truth)) and d.low > 0
    same = tau_difference(good, good, truth, 200, 0)
    assert same.value == same.low == same.high == 0


def test_runs_are_balanced_over_ranks():
    from supernet.engine.distributed import balance

    costs = [5, 1, 9, 3, 3, 7, 2]
    shares = balance(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(7))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(costs) and balance(costs, 1) == [sorted(range(7), key=lambda i: -costs[i])]


# ----------------------------------------------------------------------------- the app
ARGS = ["archs=3", "band=[3e6,5e6]", "band_archs=3", "seeds=2", "standalone.max_steps=2", "bootstrap=200",
        "progress=false", "eval_batch_size=64", "eval_images=16"]


@pytest.fixture(scope="module")
def supernet_ckpt(tmp_path_factory, fake_fmnist) -> Path:
    """A fmnist_2d supernet trained 2 steps on generated images (the app needs a checkpoint, not a good one)."""
    from supernet.train import train

    root = tmp_path_factory.mktemp("fid")
    data = fake_fmnist(root / "data", n_train=96, n_test=10)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("supernet", overrides=[f"run_dir={root / 'sn'}", f"data.root={data}", "data.val_size=32",
                                             "data.batch_size=16", "max_steps=2", "eval.every=0", "progress=false"])
    train(cfg)
    return root / "sn" / "last.ckpt"


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("fidelity", overrides=list(overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, supernet_ckpt) -> tuple[Path, dict]:
    """One in-process study on one intra-op thread (what each rank of a torchrun uses): its run_dir and result."""
    import torch

    from search.fidelity import fidelity

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fidelity") / "out"
    res = fidelity(_cfg(f"checkpoint={supernet_ckpt}", f"run_dir={out}", *ARGS))
    torch.set_num_threads(before)
    return out, res


def test_fidelity_end_to_end_scores_resume_and_outputs(supernet_ckpt, reference):
    import torch

    from search.fidelity import fidelity
    from search.inherited import InheritedAccuracy, validation_batches
    from supernet.engine.checkpoint import load_supernet
    from supernet.engine.distributed import DistEnv

    out, res = reference
    saved = json.loads((out / "fidelity.json").read_text())
    assert saved == json.loads(json.dumps(res)) and (out / "fidelity.png").stat().st_size > 5000
    rows = saved["archs"]
    assert sum("range" in r["groups"] for r in rows) == 3 and sum("band" in r["groups"] for r in rows) == 3
    assert all(len(r["standalone_val_top1"]) == 2 for r in rows) and saved["data"]["val_images"] == 32
    # the inherited scores are the supernet's on the whole validation split
    from space.arch import ArchSpec
    sck = load_supernet(supernet_ckpt, torch.device("cpu"))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    scorer = InheritedAccuracy(sck.net, validation_batches(sck.data, None, 64, env.device), env)
    archs = [ArchSpec.from_dict(r["arch"]) for r in rows]
    assert scorer(archs) == [r["inherited_val_top1"] for r in rows] and scorer.images == 32
    # the fitness scores are the same scorer's on the search's subset (the first eval_images of the split)
    fit = InheritedAccuracy(sck.net, validation_batches(sck.data, 16, 64, env.device), env)
    assert fit(archs) == [r["inherited_fitness_top1"] for r in rows] and saved["data"]["fitness_images"] == 16
    # the statistics are those of the rows, for both proxies
    for group in ("range", "band"):
        g = [r for r in rows if group in r["groups"]]
        for proxy, key in (("whole", "inherited_val_top1"), ("fitness", "inherited_fitness_top1")):
            want = brute_tau_b([r[key] for r in g], [r["standalone_mean"] for r in g]) \
                if len({r[key] for r in g}) > 1 and len({r["standalone_mean"] for r in g}) > 1 else None
            got = saved["stats"][group][proxy]["kendall_tau"]["value"]
            assert got == pytest.approx(want, abs=1e-12) if want is not None else got is None
        ceiling = saved["stats"][group]["ceiling"]
        ss = kendall_tau(*np.array([r["standalone_val_top1"] for r in g]).T)
        if not math.isnan(ss):  # a tiny net trained 2 steps may score every architecture alike
            assert ceiling["seed_to_seed"]["value"] == pytest.approx(ss, abs=1e-12)
            assert ceiling["mean"]["value"] == pytest.approx(ceiling_tau(ss, 2), abs=1e-12)
    # a rerun trains nothing: every stand-alone result is reused; a deleted one is retrained to the same value
    results = sorted((out / "standalone").glob("*/result.json"))
    assert len(results) == 12
    stamps = [p.stat().st_mtime_ns for p in results]
    results[0].unlink()
    torch.set_num_threads(1)
    again = fidelity(_cfg(f"checkpoint={supernet_ckpt}", f"run_dir={out}", *ARGS))
    assert again == res
    assert [p.stat().st_mtime_ns for p in results[1:]] == stamps[1:]


def test_several_checkpoints_share_one_ground_truth_and_seeds_0_trains_nothing(tmp_path, supernet_ckpt, reference):
    """checkpoints=[...] scores each further checkpoint on the same architectures against the same stand-alone
    runs (reused from standalone_dir: nothing is trained); seeds=0 reports the inherited scores alone."""
    import torch

    from search.fidelity import fidelity

    out, res = reference
    torch.set_num_threads(1)
    curve = fidelity(_cfg(f"checkpoint={supernet_ckpt}", f"checkpoints=[{supernet_ckpt}]", f"run_dir={tmp_path / 'c'}",
                          f"standalone_dir={out / 'standalone'}", *ARGS))
    assert not (tmp_path / "c" / "standalone").exists() and len(curve["curve"]) == 1
    point = curve["curve"][0]
    assert point["step"] == res["step"] == 2 and point["stats"] == res["stats"] == curve["stats"]
    assert point["inherited_val_top1"] == [r["inherited_val_top1"] for r in res["archs"]]
    only = fidelity(_cfg(f"checkpoint={supernet_ckpt}", f"run_dir={tmp_path / 'o'}", *ARGS, "seeds=0"))
    assert [r["inherited_fitness_top1"] for r in only["archs"]] == [r["inherited_fitness_top1"] for r in res["archs"]]
    assert all("ceiling" not in st for st in only["stats"].values()) and not (tmp_path / "o" / "standalone").exists()


def test_standalone_results_of_other_settings_are_refused(tmp_path, supernet_ckpt):
    from search.fidelity import fidelity

    args = [f"checkpoint={supernet_ckpt}", f"run_dir={tmp_path}", *ARGS, "archs=3", "band=null", "seeds=1"]
    fidelity(_cfg(*args))
    with pytest.raises(UserError, match=r"standalone_dir: .* holds a stand-alone result trained with other settings"):
        fidelity(_cfg(*args, "standalone.optim.lr=0.01"))


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, supernet_ckpt, reference, forkserver):
    """Under torchrun the stand-alone runs are split over 2 ranks, each trained alone: the one-process result."""
    out = tmp_path / "n2"
    r = forkserver.run([sys.executable, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2", "-m",
                        "search.fidelity", f"checkpoint={supernet_ckpt}", f"run_dir={out}", *ARGS], cwd=REPO, env=ENV,
                       timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "fidelity.json").read_text()) == json.loads(json.dumps(reference[1]))
    assert len(list((out / "standalone").glob("*/result.json"))) == 12


@pytest.mark.parametrize("overrides, message", [
    (["archs=2"], "archs: 2 is not allowed (allowed: an integer >= 3)"),
    (["band=[5e7,6e7]"], "band: [5e+07, 6e+07] MACs lies outside the space's FLOPs range"),
    (["band=[5e6,4e6]"], "band: [5000000.0, 4000000.0] is not allowed (allowed: [lo, hi] in MACs with lo < hi"),
    (["seeds=-1"], "seeds: -1 is not allowed (allowed: an integer >= 0)"),
    (["checkpoints=[nowhere.ckpt]"], "checkpoints: 'nowhere.ckpt' is not a checkpoint file"),
    (["standalone.optim.lr=-1"], "standalone.optim.lr: -1 is not allowed (allowed: a number > 0)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, supernet_ckpt, overrides, message):
    from search.fidelity import fidelity

    with pytest.raises(UserError) as e:
        fidelity(_cfg(f"checkpoint={supernet_ckpt}", f"run_dir={tmp_path / 'out'}", *ARGS, *overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_missing_checkpoint_exits_2_with_one_line(tmp_path, run_module):
    r = run_module("search.fidelity", f"checkpoint={tmp_path / 'nope.ckpt'}", f"run_dir={tmp_path / 'out'}", cwd=REPO)
    assert r.returncode == 2
    missing = tmp_path / "nope.ckpt"
    assert r.stderr.strip() == f"error: checkpoint: {missing} does not exist (train one with `make supernet`)"
    assert not (tmp_path / "out").exists()
