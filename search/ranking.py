"""Rank agreement between two scorings of the same architectures, with bootstrap 95% intervals: Kendall's
tau-b, Spearman's rho and top-k overlap. Pure numpy/scipy: the fidelity app (search/fidelity.py) hands it
plain lists of scores.

The point estimates are scipy's; the bootstrap resamples *architectures* (pairs of scores) with
replacement through ``scipy.stats.bootstrap``, so each statistic is also written vectorized over resamples.
Tau-b and Spearman's rank correlation handle the ties that resampling creates (a pair drawn twice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
from scipy import stats


def kendall_tau(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Kendall's tau-b of ``a`` vs ``b`` along ``axis`` (vectorized over the other axes); nan if either is
    constant."""
    a, b = np.moveaxis(np.asarray(a, float), axis, -1), np.moveaxis(np.asarray(b, float), axis, -1)
    da = np.sign(a[..., :, None] - a[..., None, :])
    db = np.sign(b[..., :, None] - b[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (da * db).sum((-1, -2)) / np.sqrt((da * da).sum((-1, -2)) * (db * db).sum((-1, -2)))


def spearman_rho(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho (Pearson correlation of average ranks) along ``axis``; nan if either is constant."""
    ra = stats.rankdata(a, axis=axis)
    rb = stats.rankdata(b, axis=axis)
    ra, rb = np.moveaxis(ra, axis, -1), np.moveaxis(rb, axis, -1)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Overlap of the ``k`` best by ``a`` with the ``k`` best by ``b``, ties counted fractionally: an item's
    membership in a top k is the share of the top k's remaining slots its tie group fills (the expected
    membership if ties were broken at random), so the result never depends on the order of the lists."""
    a, b = np.moveaxis(np.asarray(a, float), axis, -1), np.moveaxis(np.asarray(b, float), axis, -1)
    return (_membership(a, k) * _membership(b, k)).sum(-1) / k


def _membership(x: np.ndarray, k: int) -> np.ndarray:
    """Each item's (fractional) membership in the top ``k`` of ``x`` along the last axis."""
    above = (x[..., None, :] > x[..., :, None]).sum(-1)  # items strictly better
    tied = (x[..., None, :] == x[..., :, None]).sum(-1)  # its tie group, itself included
    return np.clip(k - above, 0, tied) / tied


@dataclass(frozen=True)
class Estimate:
    """A statistic and its bootstrap 95% interval (percentile method)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready: an undefined value (a constant side) is None, not NaN."""
        return {k: None if math.isnan(v) else v for k, v in asdict(self).items()}


def bootstrap(statistic, a: list[float], b: list[float], resamples: int, seed: int) -> Estimate:
    """``statistic(a, b, axis)`` on the data and its 95% interval over ``resamples`` paired resamples of the
    architectures (percentile bootstrap). A resample in which one side is constant (likely only with very
    few architectures) has no rank correlation and counts as 0."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    value = float(statistic(x, y, axis=-1))
    res = stats.bootstrap((x, y), lambda p, q, axis: np.nan_to_num(statistic(p, q, axis=axis), nan=0.0),
                          paired=True, vectorized=True, n_resamples=resamples, confidence_level=0.95,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Estimate(value, float(ci.low), float(ci.high))


def agreement(proxy: list[float], truth: list[float], k: int, resamples: int = 2000, seed: int = 0) -> dict:
    """Kendall tau, Spearman rho and top-k overlap of ``proxy`` against ``truth``, each an :class:`Estimate`.
    ``k`` is capped at half the architectures (at least 1): the top k of all would always overlap fully."""
    k = max(1, min(k, len(proxy) // 2))
    return {"kendall_tau": bootstrap(kendall_tau, proxy, truth, resamples, seed),
            "spearman_rho": bootstrap(spearman_rho, proxy, truth, resamples, seed),
            f"top{k}_overlap": bootstrap(lambda p, q, axis: topk_overlap(p, q, k, axis), proxy, truth, resamples,
                                         seed)}


def seed_to_seed_tau(runs: list[list[float]], resamples: int = 2000, seed: int = 0) -> Estimate | None:
    """The ground truth's own agreement: Kendall tau between seed i's and seed j's scores of the same
    architectures, averaged over seed pairs, with a bootstrap interval. None with fewer than 2 seeds.

    ``runs[i][s]`` is architecture i's score with seed s. No proxy can be trusted to rank beyond this noise
    ceiling: a second training of the same architectures does not agree with the first any better."""
    scores = np.asarray(runs, float)  # (architectures, seeds)
    if scores.ndim != 2 or scores.shape[1] < 2:
        return None
    pairs = list(combinations(range(scores.shape[1]), 2))

    def mean_tau(*cols: np.ndarray, axis: int) -> np.ndarray:
        return np.mean([kendall_tau(cols[i], cols[j], axis=axis) for i, j in pairs], axis=0)

    cols = tuple(scores[:, s] for s in range(scores.shape[1]))
    value = float(mean_tau(*cols, axis=-1))
    res = stats.bootstrap(cols, lambda *c, axis: np.nan_to_num(mean_tau(*c, axis=axis), nan=0.0), paired=True,
                          vectorized=True, n_resamples=resamples, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(seed))
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> Estimate:
    """mean(a) - mean(b) for two per-image 0/1 (or score) vectors of the SAME images, with a paired percentile
    bootstrap 95% interval (images resampled, both vectors together): the winner's lead over the runner-up."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_difference: two vectors over the same images, got shapes {a.shape} and {b.shape}")
    d = a - b
    res = stats.bootstrap((d,), lambda x, axis: x.mean(axis=axis), vectorized=True, n_resamples=resamples,
                          confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    return Estimate(float(d.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high))


def tau_difference(a: list[float], b: list[float], truth: list[float], resamples: int = 2000,
                   seed: int = 0) -> Estimate:
    """tau(a, truth) - tau(b, truth): which of two proxies of the same architectures ranks them closer to the
    truth, with a 95% interval from resampling the architectures (all three scores together), so the
    correlation between the two proxies' errors narrows it as it should."""
    x, y, t = (np.asarray(v, float) for v in (a, b, truth))

    def diff(p: np.ndarray, q: np.ndarray, r: np.ndarray, axis: int) -> np.ndarray:
        return np.nan_to_num(kendall_tau(p, r, axis=axis), nan=0.0) - np.nan_to_num(kendall_tau(q, r, axis=axis),
                                                                                      nan=0.0)

    res = stats.bootstrap((x, y, t), diff, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    return Estimate(float(diff(x, y, t, axis=-1)), float(res.confidence_interval.low),
                    float(res.confidence_interval.high))


def ceiling_tau(seed_tau: float | np.ndarray, seeds: int) -> float | np.ndarray:
    """The Kendall tau that a perfect proxy (the architectures' true quality) reaches against the mean of
    ``seeds`` trainings, given ``seed_tau``, the tau between two single trainings (seed_to_seed_tau).

    Under the usual normal model (score = quality + independent seed noise): two single trainings correlate at
    r = sin(pi tau / 2) (Greiner's relation between Pearson's r and Kendall's tau), which is a single
    training's reliability; the mean of k trainings has reliability R_k = k r / (1 + (k - 1) r)
    (Spearman-Brown); the quality correlates with it at sqrt(R_k), a tau of (2 / pi) arcsin(sqrt(R_k)). A
    seed_tau <= 0 gives 0. The map is increasing, so an interval of seed_tau maps to the ceiling's interval."""
    r = np.clip(np.sin(np.pi * np.asarray(seed_tau, float) / 2), 0.0, 1.0)
    rk = seeds * r / (1 + (seeds - 1) * r)
    out = 2 / np.pi * np.arcsin(np.sqrt(rk))
    return float(out) if np.ndim(out) == 0 else out


def noise_ceiling(runs: list[list[float]], resamples: int = 2000, seed: int = 0) -> dict[str, Estimate] | None:
    """The ground truth's own noise, with bootstrap intervals over architectures: ``seed_to_seed`` (the mean
    tau between two single seeds), ``single`` (the ceiling of a proxy against one seed's scores) and ``mean``
    (against the mean of all the seeds, what the fidelity study compares with). None with fewer than 2 seeds.

    A proxy's tau against the mean can exceed the seed-to-seed tau: the mean of k seeds is less noisy than
    either seed, so only ``mean`` is the bound that applies to it."""
    ss = seed_to_seed_tau(runs, resamples, seed)
    if ss is None:
        return None
    k = len(runs[0])

    def mapped(n: int) -> Estimate:
        return Estimate(ceiling_tau(ss.value, n), ceiling_tau(ss.low, n), ceiling_tau(ss.high, n))

    return {"seed_to_seed": ss, "single": mapped(1), "mean": mapped(k)}


def tau_single(proxy: list[float], runs: list[list[float]], resamples: int = 2000, seed: int = 0) -> Estimate:
    """Kendall tau of ``proxy`` against each seed's scores alone, averaged over seeds, with its bootstrap
    interval (architectures resampled): the figure to hold against the ``single`` ceiling."""
    scores = np.asarray(runs, float)
    cols = (np.asarray(proxy, float), *(scores[:, s] for s in range(scores.shape[1])))

    def mean_tau(p: np.ndarray, *seeds: np.ndarray, axis: int) -> np.ndarray:
        return np.mean([kendall_tau(p, s, axis=axis) for s in seeds], axis=0)

    value = float(mean_tau(*cols, axis=-1))
    res = stats.bootstrap(cols, lambda *c, axis: np.nan_to_num(mean_tau(*c, axis=axis), nan=0.0), paired=True,
                          vectorized=True, n_resamples=resamples, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(seed))
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high))
