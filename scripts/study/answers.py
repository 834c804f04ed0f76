"""F1, F2 and F3 from the committed result files alone (no training): how well each supernet ranks the study's
architectures against the stand-alone ground truth at the pilot's schedule E, along its training; where the
searched architecture lands among random ones of the same band; and what pooling, sharing and search buy
against the plain space and DeiT-like nets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scripts.study import plan
from scripts.study.pilot import load
from scripts.study.units import RESULTS

RESAMPLES = 2000


@dataclass(frozen=True)
class Truth:
    """The ground truth of one architecture set at one schedule: per architecture (JSON), its seeds' scores."""

    archs: list[str]  # the set's architectures whose every seed has finished
    runs: list[list[float]]  # runs[i][s]
    expected: int  # architectures in the set

    @property
    def means(self) -> list[float]:
        return [statistics.mean(r) for r in self.runs]


def standalone(results: Path = RESULTS) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """(architecture JSON, epochs) -> {seed: result record} of every finished stand-alone run."""
    from space.arch import ArchSpec

    out: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in load("standalone", results):
        out.setdefault((ArchSpec.from_dict(r["arch"]).to_json(), r["epochs"]), {})[r["seed"]] = r
    return out


def truth(runs, archs, seeds, epochs: int, key: str = "val_top1") -> Truth:
    done = [(a.to_json(), [runs[(a.to_json(), epochs)][s][key] for s in seeds]) for a in archs
            if all(s in runs.get((a.to_json(), epochs), {}) for s in seeds)]
    return Truth([a for a, _ in done], [r for _, r in done], len(archs))


def groups(epochs: int, results: Path = RESULTS) -> dict[str, Truth]:
    """F1's two sets at ``epochs``: the range (12 architectures, 2 seeds) and the band (12, 3 seeds)."""
    runs = standalone(results)
    return {"range": truth(runs, plan.f1_range(), plan.RANGE_SEEDS, epochs),
            "band": truth(runs, plan.band_set(), plan.BAND_SEEDS, epochs)}


def f1(epochs: int, results: Path = RESULTS) -> list[dict[str, Any]]:
    """Per finished supernet with kept checkpoints: per checkpoint and set, the mean inherited top-1 and the
    agreement (Kendall tau, Spearman rho, top-k overlap, with 95% bootstrap intervals) of its whole-split and
    fitness-set scores with the ground truth's seed mean; and each set's noise ceiling."""
    from search.ranking import agreement, noise_ceiling

    from space.arch import ArchSpec

    sets = groups(epochs, results)
    out = []
    for sn in load("supernet", results):
        if not sn["points"]:
            continue
        index = {ArchSpec.from_dict(a).to_json(): i for i, a in enumerate(sn["archs"])}
        members = {name: [i for i, g in enumerate(sn["groups"]) if name in g] for name in sets}
        curve = []
        for point in sn["points"]:
            row: dict[str, Any] = {"step": point["step"]}
            for name, t in sets.items():
                # the set's mean inherited top-1 over every architecture the fidelity app scored in it (the
                # plateau check needs no ground truth); the agreement needs the finished ground truth
                g = {"scored": len(members[name]),
                     "mean_whole": statistics.mean(point["whole"][i] for i in members[name])}
                if len(t.archs) >= 4:
                    whole = [point["whole"][index[a]] for a in t.archs]
                    fitness = [point["fitness"][index[a]] for a in t.archs]
                    g.update(archs=len(t.archs), scores=whole, truth=t.means,
                             whole=agreement(whole, t.means, 3, RESAMPLES, 0),
                             fitness=agreement(fitness, t.means, 3, RESAMPLES, 0))
                row[name] = g
            curve.append(row)
        ceilings = {name: noise_ceiling(t.runs, RESAMPLES, 0) if len(t.archs) >= 4 else None
                    for name, t in sets.items()}
        out.append({"rule": sn["rule"], "steps": sn["steps"], "curve": curve, "ceilings": ceilings,
                    "val_images": sn.get("val_images", 10000),
                    "sets": {n: (len(t.archs), t.expected) for n, t in sets.items()},
                    "cpu_s": sn.get("cpu_s"), "train_cpu_s": sn.get("train_cpu_s")})
    return out


def diagnosis(sets: dict[str, Truth], rules: list[dict[str, Any]], outliers: int = 2) -> dict[str, dict[str, Any]]:
    """Why a supernet's ranking differs from the ground truth, per F1 set (``groups``) with its ground truth
    finished, from each rule's final checkpoint (``f1``): how far each ranking's scores spread across the
    architectures (standard deviation), also without the set's ``outliers`` lowest architectures by ground truth
    (a few poor nets can carry a whole set's tau); the standard error of one score (ground truth: the seeds'
    pooled sd over the root of their number; inherited: binomial on the whole validation split); how each
    ranking follows cost (Kendall tau with MACs, and a supernet's minus the ground truth's, paired over the
    architectures); and per architecture, each ranking's score and rank in the set."""
    from search.ranking import bootstrap, kendall_tau, tau_difference
    from space.arch import ArchSpec
    from space.cost import macs

    out: dict[str, dict[str, Any]] = {}
    for name, t in sets.items():
        if len(t.archs) < 4 + outliers:
            continue
        cost = [float(macs(ArchSpec.from_json(a))) for a in t.archs]
        seeds = len(t.runs[0])
        pooled = statistics.mean(statistics.variance(r) for r in t.runs) ** 0.5
        rankings = [{"label": f"ground truth ({seeds}-seed mean)", "scores": t.means, "error": pooled / seeds ** 0.5}]
        for rule in rules:
            last = rule["curve"][-1]
            final = last[name]["scores"]  # the set's final inherited scores, in t.archs's order
            p = statistics.mean(final)
            rankings.append({"label": f"`{rule['rule']}` inherited (step {last['step']})", "scores": final,
                             "error": (p * (1 - p) / rule["val_images"]) ** 0.5,
                             # does it follow MACs more than the ground truth does? (paired over the archs)
                             "macs_over_truth": tau_difference(final, t.means, cost, RESAMPLES, 0)})
        lowest = sorted(range(len(t.means)), key=lambda i: t.means[i])[:outliers]
        for r in rankings:
            r["spread"] = statistics.stdev(r["scores"])
            r["spread_without"] = statistics.stdev(v for i, v in enumerate(r["scores"]) if i not in lowest)
            r["tau_macs"] = bootstrap(kendall_tau, r["scores"], cost, RESAMPLES, 0)
            order = sorted(range(len(r["scores"])), key=lambda i: -r["scores"][i])
            r["ranks"] = [order.index(i) + 1 for i in range(len(order))]
        out[name] = {"archs": [ArchSpec.from_json(a) for a in t.archs], "macs": cost, "rankings": rankings,
                     "lowest": lowest}
    return out


def against_pilot(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Each supernet's final inherited scores of the pilot's 8 architectures against the pilot's ground truth
    (2-seed mean) at every schedule finished so far, Kendall tau with its bootstrap interval: whether the
    supernet ranks architectures like short or like longer training."""
    from search.ranking import bootstrap, kendall_tau
    from space.arch import ArchSpec

    runs = standalone(results)
    out = []
    for sn in load("supernet", results):
        if not sn["points"]:
            continue
        index = {ArchSpec.from_dict(a).to_json(): i for i, a in enumerate(sn["archs"])}
        final = sn["points"][-1]["whole"]
        row = {"rule": sn["rule"], "step": sn["points"][-1]["step"], "taus": {}}
        for e in plan.PILOT_SCHEDULES:
            t = truth(runs, plan.pilot_archs(), plan.PILOT_SEEDS, e)
            if len(t.archs) == t.expected:
                row["taus"][e] = bootstrap(kendall_tau, [final[index[a]] for a in t.archs], t.means, RESAMPLES, 0)
        out.append(row)
    return out


def rule_differences(rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Per set, each other rule's final tau minus the default (uniform) rule's, on the same architectures and
    ground truth, with a paired bootstrap interval (search/ranking.py: tau_difference)."""
    from search.ranking import tau_difference

    base = next((r for r in rules if r["rule"] == "uniform"), None)
    out: dict[str, Any] = {}
    if base is None:
        return out
    for r in rules:
        if r is base:
            continue
        for name in ("range", "band"):
            a, b = r["curve"][-1].get(name), base["curve"][-1].get(name)
            if a and b and "truth" in a and "truth" in b and a["truth"] == b["truth"]:
                out[f"{r['rule']} - uniform, {name}"] = tau_difference(a["scores"], b["scores"], a["truth"],
                                                                       RESAMPLES, 0)
    return out


def lead_over_median(searched: list[float], random_means: list[float], resamples: int = RESAMPLES, seed: int = 0):
    """mean(searched seeds) - median(random architectures' seed means), with a 95% interval from the two sources
    of doubt drawn independently: the searched net's true mean from Student's t on its seeds (a bootstrap of 3
    seeds has only 10 distinct resamples and is far too narrow), the random median by resampling the random
    architectures (percentile)."""
    from scipy import stats

    from search.ranking import Estimate

    a, b = np.asarray(searched, float), np.asarray(random_means, float)
    rng = np.random.default_rng(seed)
    mine = a.mean() + a.std(ddof=1) / np.sqrt(len(a)) * stats.t.rvs(len(a) - 1, size=resamples, random_state=rng)
    median = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    low, high = np.percentile(mine - median, [2.5, 97.5])
    return Estimate(float(a.mean() - np.median(b)), float(low), float(high))


def welch(a: list[float], b: list[float]):
    """mean(a) - mean(b) with Welch's 95% t interval (few seeds per net: a bootstrap over 3 values would be too
    narrow); None when either side has fewer than 2 seeds."""
    from scipy import stats

    from search.ranking import Estimate

    if len(a) < 2 or len(b) < 2:
        return None
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return Estimate(float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high))


def search_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """The finished searches by their supernet's rule."""
    return {r["supernet"].split("/")[1].split("_")[0]: r for r in load("search", results)}


def seeds_of(runs, arch, epochs: int, key: str = "test_top1") -> list[float]:
    from space.arch import ArchSpec

    got = runs.get((ArchSpec.from_dict(arch).to_json() if isinstance(arch, dict) else arch.to_json(), epochs), {})
    return [got[s][key] for s in plan.F23_SEEDS if s in got]


def f2(epochs: int, results: Path = RESULTS) -> dict[str, Any] | None:
    """The PSViT search's winner against F1's 12 random band architectures, each at ``epochs`` with 3 seeds, on
    the official test split: its rank among them (by seed mean) and its lead over their median."""
    search = search_results(results).get("uniform")
    if search is None:
        return None
    runs = standalone(results)
    mine = seeds_of(runs, search["arch"], epochs)
    rnd = truth(runs, plan.band_set(), plan.BAND_SEEDS, epochs, key="test_top1")
    out = {"search": search, "searched": mine, "random": rnd, "rank": None, "lead": None}
    if len(mine) == len(plan.F23_SEEDS) and len(rnd.archs) >= 4:
        m = statistics.mean(mine)
        out["rank"] = 1 + sum(v > m for v in rnd.means)
        out["lead"] = lead_over_median(mine, rnd.means)
        out["val"] = seeds_of(runs, search["arch"], epochs, "val_top1")
    return out


def f3(epochs: int, results: Path = RESULTS) -> list[dict[str, Any]] | None:
    """Searched PSViT, the same search in the plain space, and DeiT-like nets matched to the PSViT winner on MACs
    and on parameters, at ``epochs`` with 3 seeds on the test split; each net's gap to the PSViT winner."""
    from space.arch import ArchSpec
    from space.cost import macs, params

    found = search_results(results)
    if "uniform" not in found:
        return None
    runs = standalone(results)
    psvit = ArchSpec.from_dict(found["uniform"]["arch"])
    nets = [("PSViT, searched (fmnist_2d)", psvit)]
    if "plain" in found:
        nets.append(("searched without pooling and sharing (fmnist_2d_plain)",
                     ArchSpec.from_dict(found["plain"]["arch"])))
    deit = plan.deit_matches(psvit)
    nets += [("DeiT-like, matched on MACs", deit["macs"]), ("DeiT-like, matched on parameters", deit["params"])]
    ref = seeds_of(runs, psvit, epochs)
    rows = []
    for label, arch in nets:
        got = seeds_of(runs, arch, epochs)
        rows.append({"label": label, "arch": arch, "macs": macs(arch), "params": params(arch), "test": got,
                     "gap": None if arch == psvit else welch(got, ref)})
    return rows


def unit_hours(r: dict[str, Any]) -> float:
    """CPU-hours one finished unit took (a unit timed by wall clock only counts its wall time: an upper bound on a
    shared machine; a training resumed across processes counts all of them by their TensorBoard event files, see
    units.train_wall_seconds)."""
    spent = r.get("cpu_s", r.get("wall_s", 0.0))
    if "train_cpu_s" in r and "train_wall_s" in r:  # a supernet: its training over every process, its scoring
        spent += r["train_wall_s"] - r["train_cpu_s"]
    elif "train_wall_s" in r:  # a stand-alone run resumed from an earlier process counts that process too
        spent = max(spent, r["train_wall_s"])
    return spent / 3600


def cpu_hours(results: Path = RESULTS) -> dict[str, float]:
    """CPU-hours the study's finished units took, by kind (see unit_hours)."""
    return {kind: sum(unit_hours(r) for r in load(kind, results)) for kind in ("standalone", "supernet", "search")}
