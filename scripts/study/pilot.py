"""The pilot's analysis, from the committed result files alone: per schedule, the accuracy, the seed-to-seed
Kendall tau and the noise ceiling of the 2-seed mean over the pilot's 8 architectures, and the tau between the
rankings at E and 2E; the chosen schedule E is the shortest at which the ranking has settled."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.study import plan
from scripts.study.units import RESULTS
from space.arch import ArchSpec

SETTLED = 0.8  # tau(E, 2E) and the ceiling of the 2-seed mean must both reach it (issue: the trained regime)


def load(kind: str, results: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((results / kind).glob("*.json"))]


def table(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, float]]:
    """(architecture JSON, epochs) -> {seed: validation top-1}."""
    from space.arch import ArchSpec

    out: dict[tuple[str, int], dict[int, float]] = {}
    for r in records:
        out.setdefault((ArchSpec.from_dict(r["arch"]).to_json(), r["epochs"]), {})[r["seed"]] = r["val_top1"]
    return out


@dataclass(frozen=True)
class Schedule:
    epochs: int
    runs: int  # finished of the pilot's 16
    mean: float | None
    low: float | None
    high: float | None
    seed_tau: Any  # Estimate or None
    ceiling: Any  # Estimate of the 2-seed mean's ceiling, or None
    settle: Any  # tau between this schedule's and the next one's ranking (Estimate), or None


def pilot_runs(results: Path = RESULTS) -> dict[int, list[list[float | None]]]:
    """Per pilot schedule, each pilot architecture's (plan.pilot_archs order) validation top-1 per pilot seed
    (None: not run yet)."""
    t = table(load("standalone", results))
    archs = [a.to_json() for a in plan.pilot_archs()]
    return {e: [[t.get((a, e), {}).get(s) for s in plan.PILOT_SEEDS] for a in archs] for e in plan.PILOT_SCHEDULES}


def complete_means(runs: dict[int, list[list[float | None]]]) -> dict[int, list[float]]:
    """The seed-mean ranking of every schedule whose pilot runs have all finished."""
    return {e: [statistics.mean(r) for r in rs] for e, rs in runs.items()
            if all(v is not None for r in rs for v in r)}


def schedules(results: Path = RESULTS, resamples: int = 2000) -> list[Schedule]:
    from search.ranking import bootstrap, kendall_tau, noise_ceiling

    runs = pilot_runs(results)
    means = complete_means(runs)
    out = []
    for i, e in enumerate(plan.PILOT_SCHEDULES):
        flat = [v for r in runs[e] for v in r if v is not None]
        ceiling = noise_ceiling(runs[e], resamples) if e in means else None
        nxt = plan.PILOT_SCHEDULES[i + 1] if i + 1 < len(plan.PILOT_SCHEDULES) else None
        settle = bootstrap(kendall_tau, means[e], means[nxt], resamples, 0) if e in means and nxt in means else None
        out.append(Schedule(e, len(flat), statistics.mean(flat) if flat else None, min(flat, default=None),
                            max(flat, default=None), ceiling["seed_to_seed"] if ceiling else None,
                            ceiling["mean"] if ceiling else None, settle))
    return out


def pair_taus(results: Path = RESULTS, resamples: int = 2000) -> dict[tuple[int, int], Any]:
    """Kendall tau (bootstrap Estimate) between the 2-seed-mean rankings at every two finished schedules, shorter
    first: tau(E, 2E) is the rule's pair; tau(E, 4E) and beyond show whether the ranking keeps drifting."""
    from search.ranking import bootstrap, kendall_tau

    means = complete_means(pilot_runs(results))
    return {(a, b): bootstrap(kendall_tau, means[a], means[b], resamples, 0)
            for a in means for b in means if a < b}


def pending(results: Path = RESULTS) -> tuple[list[int], int, float] | None:
    """The pilot schedules not all run, the longest schedule that is, and the CPU-hours the missing runs would
    take (that schedule's measured time per run, scaled by the schedule); None when every run has finished."""
    from scripts.study.answers import unit_hours  # answers imports this module

    runs = pilot_runs(results)
    full = len(plan.pilot_archs()) * len(plan.PILOT_SEEDS)
    left = {e: full - sum(v is not None for r in rs for v in r) for e, rs in runs.items()}
    todo = [e for e in plan.PILOT_SCHEDULES if left[e]]
    if not todo:
        return None
    base = max(e for e in plan.PILOT_SCHEDULES if not left[e])
    keys = {a.to_json() for a in plan.pilot_archs()}
    per_run = sum(unit_hours(r) for r in load("standalone", results) if r["epochs"] == base
                  and r["seed"] in plan.PILOT_SEEDS and ArchSpec.from_dict(r["arch"]).to_json() in keys) / full
    return todo, base, sum(left[e] * per_run * e / base for e in todo)


def chosen_schedule(results: Path = RESULTS) -> int | None:
    """The shortest pilot schedule E whose 2-seed mean has a ceiling >= 0.8 and from which on the ranking has
    settled: tau(E', 2E') >= 0.8 for E and every longer schedule E' measured so far (a later pair that moves
    the ranking moves E later). None while the pilot cannot tell."""
    rows = schedules(results, resamples=200)
    for i, s in enumerate(rows):
        if s.settle is None or s.settle.value < SETTLED or s.ceiling.value < SETTLED:
            continue
        if all(r.settle is None or r.settle.value >= SETTLED for r in rows[i + 1:]):
            return s.epochs
    return None


def first_settled(results: Path = RESULTS) -> int | None:
    """The shortest schedule whose own pair settled (tau(E, 2E) >= 0.8, ceiling >= 0.8), whether or not a longer
    pair unsettled it later: where F1-F3 were measured before a longer pair could say otherwise."""
    return next((s.epochs for s in schedules(results, resamples=200) if s.settle is not None
                 and s.settle.value >= SETTLED and s.ceiling.value >= SETTLED), None)
