"""What a finished search leaves behind: best_arch.json per budget, history.jsonl, pareto.png and the final
table on stdout. Every file goes through :func:`space.app.atomic_write`. FLOPs are multiply-accumulates (MACs);
the output fields keep their documented names (``flops_macs``). No torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.constraint import Constraint
from search.evolution import Record, Search, best_per_budget, pareto_front, ranked
from space.app import atomic_write
from space.cost import fmt_macs, fmt_params


@dataclass(frozen=True)
class Provenance:
    """Where the scores come from, stored in every best_arch.json."""

    checkpoint: Path
    checkpoint_sha256: str
    eval_images: int  # held-out validation images each score was measured on
    search: dict[str, Any]  # the app's resolved config


@dataclass(frozen=True)
class Chosen:
    """The best architecture of one budget and the file it was written to."""

    constraint: Constraint
    record: Record
    path: Path


def write_report(run_dir: Path, searches: list[Search], constraints: Sequence[Constraint], prov: Provenance,
                 show_top: int) -> dict[str, Any]:
    """Write best_arch.json (one per budget when several), history.jsonl and pareto.png, print the final
    table, and return the summary of the run."""
    history = [r for s in searches for r in s.history]
    bests = best_per_budget(history, searches[0].space, constraints)
    chosen = write_best_archs(run_dir, constraints, bests, prov)
    write_history(run_dir / "history.jsonl", searches)
    plot_pareto(run_dir / "pareto.png", history, constraints, [c.record for c in chosen])
    evaluated = len(searches[0].cache)  # the cache is shared by every budget
    print_table(run_dir, searches[0].strategy, history, evaluated, chosen, prov.eval_images, show_top)
    return {"run_dir": str(run_dir), "evaluations": evaluated, "proposals": len(history),
            "best": [str(c.path) for c in chosen], "best_records": [c.record for c in chosen]}


def write_best_archs(run_dir: Path, constraints: Sequence[Constraint], bests: list[Record | None],
                     prov: Provenance) -> list[Chosen]:
    """best_arch.json, or best_arch_{i}.json per budget when there are several; none for an empty budget."""
    out = []
    for i, (c, best) in enumerate(zip(constraints, bests)):
        if best is None:
            continue
        path = run_dir / ("best_arch.json" if len(constraints) == 1 else f"best_arch_{i}.json")
        meta = {"flops_macs": best.macs, "params": best.params, "val_acc": best.score,
                "val_images": prov.eval_images, "constraint": c.describe(), "checkpoint": str(prov.checkpoint),
                "checkpoint_sha256": prov.checkpoint_sha256, "search": prov.search}
        best.arch.save(path, meta=meta)
        out.append(Chosen(c, best, path))
    return out


def write_history(path: Path, searches: list[Search]) -> None:
    """One JSON line per candidate of every budget, in proposal order."""
    atomic_write(path, "".join(
        json.dumps({"budget": b, "generation": r.generation, "flops_macs": r.macs, "params": r.params,
                    "val_acc": r.score, "arch": r.arch.to_dict()}) + "\n"
        for b, s in enumerate(searches) for r in s.history))


def print_table(run_dir: Path, strategy: str, history: list[Record], evaluated: int, chosen: list[Chosen],
                eval_images: int, show_top: int) -> None:
    """The best ``show_top`` distinct architectures of the run, the best of each budget and the output files."""
    print(f"\nsearch: {strategy}, {len(history)} candidates, "
          f"{evaluated} evaluated on {eval_images} held-out validation images")
    print(f"{'rank':>4}  {'val top-1':>9}  {'FLOPs (MACs)':>12}  {'params':>9}  arch")
    for k, r in enumerate(ranked(history)[:show_top]):
        print(f"{k + 1:>4}  {r.score:>9.4f}  {fmt_macs(r.macs):>12}  {fmt_params(r.params):>9}  {r.arch.short()}")
    for c in chosen:
        b = c.record
        print(f"best under {c.constraint.describe()}: val top-1 {b.score:.4f}, {fmt_macs(b.macs)} MACs, "
              f"{fmt_params(b.params)} params -> {c.path}")
    for name in ("history.jsonl", "pareto.png", "state.json", "tb/"):
        print(f"  {run_dir / name}")


def plot_pareto(path: Path, history: list[Record], constraints: Sequence[Constraint], bests: list[Record]) -> None:
    """Accuracy vs FLOPs: all candidates, the Pareto front, the constraint bands and the chosen archs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r.macs / 1e6 for r in history], [r.score for r in history], s=8, alpha=0.35, label="candidates")
    front = pareto_front(history)
    ax.plot([r.macs / 1e6 for r in front], [r.score for r in front], "-o", ms=3, color="C1", label="Pareto front")
    for c in constraints:
        lo = (c.flops_min or 0) / 1e6
        hi = c.flops_max / 1e6 if c.flops_max is not None else max(r.macs for r in history) / 1e6
        ax.axvspan(lo, hi, color="C2", alpha=0.08)
    ax.scatter([b.macs / 1e6 for b in bests], [b.score for b in bests], marker="*", s=160, color="C3",
               zorder=5, label="chosen")
    ax.set_xlabel("FLOPs (M MACs)")
    ax.set_ylabel("inherited-weight val top-1")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
