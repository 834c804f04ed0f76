"""What a finished search leaves behind: best_arch.json per budget, history.jsonl, pareto.png and the final
table on stdout. Every file goes through :func:`space.app.atomic_write`. FLOPs are multiply-accumulates (MACs);
the output fields keep their documented names (``flops_macs``). No torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.constraint import Constraint
from search.evolution import Record, Search, best_per_budget, pareto_front, ranked
from search.finalists import Final
from space.app import atomic_write
from space.arch import ArchSpec
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
    measured_ms: float | None = None  # the winner's latency measured on this machine (a table of this device)
    final: Final | None = None  # the finalists re-scored on the whole validation split, when they were


def write_report(run_dir: Path, searches: list[Search], constraints: Sequence[Constraint], prov: Provenance,
                 show_top: int, measure: Callable[[ArchSpec], float] | None = None,
                 finals: Sequence[Final | None] | None = None) -> dict[str, Any]:
    """Write best_arch.json (one per budget when several), history.jsonl and pareto.png, print the final
    table, and return the summary of the run. ``measure`` times a winner on this machine (a latency table of
    this device). With ``finals`` (search/finalists.py), each budget's winner is its re-scored best."""
    history = [r for s in searches for r in s.history]
    if finals is None:
        bests = best_per_budget(history, searches[0].space, constraints)
        finals = [None] * len(bests)
    else:
        bests = [None if f is None else f.winner.record for f in finals]
    chosen = write_best_archs(run_dir, constraints, bests, prov, measure, finals)
    full = {f.record.arch: f.full for fin in finals if fin is not None for f in fin.finalists}
    write_history(run_dir / "history.jsonl", searches, full)
    plot_pareto(run_dir / "pareto.png", history, constraints, [c.record for c in chosen])
    evaluated = len(searches[0].cache)  # the cache is shared by every budget
    print_table(run_dir, searches[0].strategy, history, evaluated, chosen, prov.eval_images, show_top)
    return {"run_dir": str(run_dir), "evaluations": evaluated, "proposals": len(history),
            "best": [str(c.path) for c in chosen], "best_records": [c.record for c in chosen],
            "finals": list(finals)}


def write_best_archs(run_dir: Path, constraints: Sequence[Constraint], bests: list[Record | None],
                     prov: Provenance, measure: Callable[[ArchSpec], float] | None = None,
                     finals: Sequence[Final | None] | None = None) -> list[Chosen]:
    """best_arch.json, or best_arch_{i}.json per budget when there are several; none for an empty budget. With
    a latency table the meta holds the predicted latency, and the measured one when ``measure`` is given. With
    re-scored finalists, ``val_acc`` is the winner's top-1 on the whole split (what it was picked by) and
    ``fitness_acc`` its score on the ``eval_images`` subset."""
    out = []
    finals = finals or [None] * len(bests)
    for i, (c, best, final) in enumerate(zip(constraints, bests, finals)):
        if best is None:
            continue
        path = run_dir / ("best_arch.json" if len(constraints) == 1 else f"best_arch_{i}.json")
        meta = {"flops_macs": best.macs, "params": best.params, "val_acc": best.score,
                "val_images": prov.eval_images, "constraint": c.describe(), "checkpoint": str(prov.checkpoint),
                "checkpoint_sha256": prov.checkpoint_sha256, "search": prov.search}
        if final is not None:
            meta.update(val_acc=final.winner.full, val_images=final.images, fitness_acc=best.score,
                        fitness_images=prov.eval_images,
                        finalists=[{"arch": f.record.arch.short(), "fitness_acc": f.record.score, "val_acc": f.full,
                                    "flops_macs": f.record.macs} for f in final.finalists],
                        lead_over_runner_up=None if final.lead is None else final.lead.to_dict())
        if c.latency is not None:
            t = c.latency
            meta["latency_ms_predicted"] = c.latency_ms(best.arch)
            meta["latency_table"] = {"device": t.device, "device_name": t.device_name, "threads": t.threads,
                                     "batch": t.batch, "dtype": t.dtype, "torch": t.torch,
                                     "mape": None if t.accuracy is None else t.accuracy.mape}
            if measure is not None:
                meta["latency_ms_measured"] = measure(best.arch)
        best.arch.save(path, meta=meta)
        out.append(Chosen(c, best, path, meta.get("latency_ms_measured"), final))
    return out


def write_history(path: Path, searches: list[Search], full: dict[ArchSpec, float] | None = None) -> None:
    """One JSON line per candidate of every budget, in proposal order: ``val_acc`` is the fitness score (the
    ``eval_images`` subset); finalists also have ``val_acc_full``, their top-1 on the whole validation split."""
    full = full or {}
    atomic_write(path, "".join(
        json.dumps({"budget": b, "generation": r.generation, "flops_macs": r.macs, "params": r.params,
                    **_latency(s.constraint, r), "val_acc": r.score,
                    **({"val_acc_full": full[r.arch]} if r.arch in full else {}), "arch": r.arch.to_dict()}) + "\n"
        for b, s in enumerate(searches) for r in s.history))


def _latency(c: Constraint, r: Record) -> dict[str, float]:
    return {} if c.latency is None else {"latency_ms": c.latency_ms(r.arch)}


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
        lat = "" if c.constraint.latency is None else f", {c.constraint.latency_ms(b.arch):.3f} ms predicted"
        if c.measured_ms is not None:
            lat += f" ({c.measured_ms:.3f} ms measured)"
        if c.final is not None:
            print_finalists(c.final, eval_images)
        score = (f"val top-1 {b.score:.4f}" if c.final is None else
                 f"val top-1 {c.final.winner.full:.4f} on all {c.final.images} images ({b.score:.4f} on {eval_images})")
        print(f"best under {c.constraint.describe()}: {score}, {fmt_macs(b.macs)} MACs, "
              f"{fmt_params(b.params)} params{lat} -> {c.path}")
    for name in ("history.jsonl", "pareto.png", "state.json", "tb/"):
        print(f"  {run_dir / name}")


def print_finalists(final: Final, eval_images: int) -> None:
    """The finalists re-scored on the whole split, and the winner's lead over the runner-up."""
    print(f"finalists re-scored on all {final.images} validation images:")
    print(f"{'':>4}  {'all':>7}  {'subset':>7}  {'FLOPs (MACs)':>12}  arch")
    for k, f in enumerate(final.finalists):
        r = f.record
        print(f"{k + 1:>4}  {f.full:>7.4f}  {r.score:>7.4f}  {fmt_macs(r.macs):>12}  {r.arch.short()}")
    if final.lead is not None:
        lead = final.lead
        verdict = ("the interval excludes 0" if lead.low > 0 else
                   "within the noise of the validation split: the runner-up is as good a pick")
        print(f"winner's lead over the runner-up: {lead.value:+.4f} top-1 [{lead.low:+.4f}, {lead.high:+.4f}] "
              f"(paired bootstrap over the same images, 95%): {verdict}")


def plot_pareto(path: Path, history: list[Record], constraints: Sequence[Constraint], bests: list[Record]) -> None:
    """Accuracy vs FLOPs: all candidates, the Pareto front, the constraint bands and the chosen archs; with a
    latency table, a second panel of accuracy vs predicted latency with the latency bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = constraints[0].latency
    fig, axes = plt.subplots(1, 1 if table is None else 2, figsize=(7 if table is None else 12, 4.5), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
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
    if table is not None:
        lat = axes[0][1]
        ms = constraints[0].latency_ms
        lat.scatter([ms(r.arch) for r in history], [r.score for r in history], s=8, alpha=0.35, label="candidates")
        lat.scatter([ms(b.arch) for b in bests], [b.score for b in bests], marker="*", s=160, color="C3", zorder=5,
                    label="chosen")
        for c in constraints:
            if c.latency_max is not None:
                lat.axvline(c.latency_max, color="C2", ls="--", label="latency_max")
        lat.set_xlabel(f"predicted latency (ms; {table.device}, {table.threads} threads, batch {table.batch})")
        lat.grid(alpha=0.3)
        lat.legend(loc="best", fontsize=8)
    ax.set_ylabel("inherited-weight val top-1")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
