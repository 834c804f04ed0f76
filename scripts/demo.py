"""`make demo`: the whole PSViT-NAS pipeline end to end on Fashion-MNIST, sized for 2 CPU cores.

1. trains the fmnist_2d supernet with SPOS (a short schedule),
2. searches it with evolution under a FLOPs budget and exports best_arch.json,
3. builds a DeiT-like baseline (one stage of basic layers, no pooling, no sharing) of about the same FLOPs,
4. retrains both from scratch with the same recipe and evaluates them on the official test split,
5. prints a table with the paths of every output.

Every stage resumes: rerunning `make demo` continues where it stopped. Outputs go to runs/demo/ (OUT=...).
It computes with one intra-op thread whatever the machine's cores (THREADS=N to change it): a CPU sums in another
order with another thread count, so its figures would depend on the core count (docs/reliability.md, Determinism),
and two OpenMP threads run in lockstep, so anything else running on one of the cores slows both several-fold.
Hydra overrides for each stage can be appended, e.g. `make demo ARGS="supernet.optim.epochs=1"`.
What the table shows is also written to summary.json with the run's schedule and provenance (date, commit, machine,
threads), which `scripts/docs.py record demo` turns into the docs' tables.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from space.arch import ArchSpec  # noqa: E402
from space.baselines import deit_like  # noqa: E402
from space.cost import fmt_macs, fmt_params, macs, params  # noqa: E402
from bench.record import provenance, write_json  # noqa: E402

THREADS = 1  # the demo's figures are those of this thread count on every machine
# The demo's schedule: small enough for ~15 minutes on 2 CPU cores, long enough to learn something.
SUPERNET = ["optim.epochs=3", "eval.every=400", "eval.max_batches=2", "eval.n_random=2"]
SEARCH = ["flops_max=4e6", "evolution.population=20", "evolution.topk=5", "evolution.generations=6",
          "evolution.mutations=8", "evolution.crossovers=8", "eval_images=1000"]
RETRAIN = ["optim.epochs=3", "eval.every=0"]


def cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def user_overrides(stage: str) -> list[str]:
    """ARGS like `supernet.optim.epochs=1` or `search.flops_max=3e6` go to the named stage."""
    return [a.split(".", 1)[1] for a in sys.argv[1:] if a.startswith(stage + ".")]


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def arg(name: str, default: str) -> str:
    """The value of a NAME=value argument (OUT=, THREADS=), else ``default``."""
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(name + "=")), default)


def main() -> None:
    import torch

    from search.evolve import evolve
    from supernet.retrain import retrain
    from supernet.train import train

    out = Path(arg("OUT", str(REPO / "runs" / "demo")))
    torch.set_num_threads(int(arg("THREADS", str(THREADS))))
    fresh = not (out / "supernet").exists()  # its minutes are then the whole pipeline's, not a resumed rerun's
    made = provenance("make demo" + (f' ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else ""))
    schedule = {"supernet": [*SUPERNET, *user_overrides("supernet")], "search": [*SEARCH, *user_overrides("search")],
                "retrain": [*RETRAIN, *user_overrides("retrain")]}
    t0 = time.perf_counter()
    times = {}

    banner(f"1/4 SPOS supernet training on Fashion-MNIST (fmnist_2d) -> {out / 'supernet'}")
    t = time.perf_counter()
    train(cfg("supernet", [f"run_dir={out / 'supernet'}", *schedule["supernet"]]))
    times["supernet"] = time.perf_counter() - t

    banner("2/4 evolutionary search under a FLOPs budget (inherited weights, held-out validation images)")
    t = time.perf_counter()
    res = evolve(cfg("evolve", [f"checkpoint={out / 'supernet' / 'last.ckpt'}", f"run_dir={out / 'search'}",
                                *schedule["search"]]))
    times["search"] = time.perf_counter() - t
    best_path = Path(res["best"][0])
    best = ArchSpec.load(best_path)

    banner("3/4 a DeiT-like baseline (one stage of basic layers, no pooling, no sharing) of about the same FLOPs")
    sp = cfg("supernet", [])["space"]
    base = deit_like(macs(best), sp.img_size, sp.patch_size, sp.in_chans, sp.num_classes, sp.mlp_ratio,
                     sp.head_dim, dims=[16, 24, 32, 48, 64])
    base_path = out / "deit_like.json"
    base.save(base_path)
    print(f"{base.short()}: {fmt_macs(macs(base))} MACs vs searched {fmt_macs(macs(best))} MACs -> {base_path}")

    banner("4/4 retraining both from scratch with the same recipe; top-1 on the official test split")
    results, result_files = {}, []
    t = time.perf_counter()
    for name, path in (("PSViT (searched)", best_path), ("DeiT-like baseline", base_path)):
        run_dir = out / f"retrain_{path.stem}"
        results[name] = retrain(cfg("retrain", [f"arch={path}", f"run_dir={run_dir}", *schedule["retrain"]]))
        result_files.append(run_dir / "result.json")
    times["retrain"] = time.perf_counter() - t

    banner(f"done in {(time.perf_counter() - t0) / 60:.1f} min "
           f"(supernet {times['supernet'] / 60:.1f}, search {times['search'] / 60:.1f}, "
           f"retrain {times['retrain'] / 60:.1f}); FLOPs are multiply-accumulates")
    print(f"{'model':20s} {'FLOPs (MACs)':>12s} {'params':>9s} {'test top-1':>10s}  arch")
    for name, r in results.items():
        a = ArchSpec.load(r["arch"])
        print(f"{name:20s} {fmt_macs(macs(a)):>12s} {fmt_params(params(a)):>9s} {r['test_top1']:>10.4f}  {a.short()}")
    print("\noutputs:")
    for p in (out / "supernet" / "last.ckpt", out / "supernet" / "tb", best_path, out / "search" / "history.jsonl",
              out / "search" / "pareto.png", base_path, *result_files):
        print(f"  {p}")
    write_json(out / "summary.json", {"provenance": made, "fresh": fresh, "schedule": schedule, "results": results,
                                      "minutes": {k: round(v / 60, 2) for k, v in times.items()}})


if __name__ == "__main__":
    main()
