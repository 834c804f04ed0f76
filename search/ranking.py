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
    """Fraction of the ``k`` best by ``a`` that are among the ``k`` best by ``b`` (ties broken by position)."""
    a, b = np.moveaxis(np.asarray(a, float), axis, -1), np.moveaxis(np.asarray(b, float), axis, -1)
    top_a = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    top_b = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    hits = (top_a[..., :, None] == top_b[..., None, :]).any(-1).sum(-1)
    return hits / k


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
