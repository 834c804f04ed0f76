"""Search speed, measured on this machine's CPU with real Fashion-MNIST:

1. candidate evaluations per minute of the default `python -m search.evolve` search (SPOS: population 50,
   20 generations; 2 in quick mode) scored on the default eval_images (1000) held-out validation images, over a
   small fmnist_2d and fmnist_1d supernet (a few training steps: speed does not depend on how well it is trained);
2. proposals, evaluations and cache hits (proposals that needed no evaluation) of that search, of a rerun of the
   finished command (resume) and of a 3-band ``flops_budgets`` search whose bands share one cache;
3. the cost of the finalist re-scoring (the best 10 scored again on the whole 10k-image validation split) as a
   share of the whole search.

The supernets are kept in a temp dir and reused by later runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from space.cost import arch_cost, fmt_macs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CACHE = Path(tempfile.gettempdir()) / "psvit_bench_search"
TRAIN_STEPS = 20
TARGET = 50  # evaluations per minute on 2 CPU cores


def supernet(preset: str) -> Path:
    """A briefly trained supernet of ``preset`` with the default 10k-image validation split (reused if present)."""
    from space.errors import UserError
    from supernet.engine.checkpoint import load_checkpoint
    from supernet.train import train

    run_dir = CACHE / preset
    ckpt = run_dir / "last.ckpt"
    try:
        ck = load_checkpoint(ckpt)
        if ck["space"]["name"] == preset and ck["step"] == ck["total_steps"] == TRAIN_STEPS:
            print(f"  reusing {ckpt}")
            return ckpt
    except (UserError, KeyError):
        pass
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("supernet", overrides=[f"space={preset}", f"run_dir={run_dir}", f"max_steps={TRAIN_STEPS}",
                                             "data.batch_size=64", "eval.every=0", "progress=false",
                                             "resume=never"])
    t = time.perf_counter()
    train(cfg)
    print(f"  trained {ckpt} ({TRAIN_STEPS} steps x 64 images, {time.perf_counter() - t:.0f} s)")
    return ckpt


@dataclass
class SearchRun:
    wall_s: float  # the whole evolve() call: checkpoint and data loading, proposals, evaluation, outputs
    eval_s: float  # inside the scorer (InheritedAccuracy)
    proposals: int  # candidates in the history (every generation of every band)
    evaluations: int  # architectures actually scored by this call (the scorer's count)
    images: int  # validation images per evaluation (the fitness set)
    out: str  # the app's stdout
    rescore_s: float = 0.0  # the finalists' re-scoring on the whole split
    rescored: int = 0
    whole_images: int = 0

    @property
    def hits(self) -> int:
        return self.proposals - self.evaluations

    def line(self) -> str:
        return (f"{self.proposals} proposals, {self.evaluations} evaluations, {self.hits} cache hits"
                + (f" ({self.hits / self.proposals:.1%})" if self.proposals else ""))


def search(ckpt: Path, run_dir: Path, *overrides: str) -> SearchRun:
    """Run `python -m search.evolve checkpoint=ckpt run_dir=run_dir ...` in-process; the counts and the time
    spent scoring come from the app's summary (its scorer counts them)."""
    from search.evolve import evolve

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evolve", overrides=[f"checkpoint={ckpt}", f"run_dir={run_dir}", *overrides])
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        summary = evolve(cfg)
    wall = time.perf_counter() - t
    meta = json.loads(next(run_dir.glob("best_arch*.json")).read_text())["meta"]
    return SearchRun(wall, summary["scoring_s"], summary["proposals"], summary["scored"],
                     meta.get("fitness_images", meta["val_images"]), out.getvalue(), summary.get("rescoring_s", 0.0),
                     summary.get("rescored", 0), meta["val_images"] if "fitness_images" in meta else 0)


def bands(ckpt: Path) -> list[tuple[int, int]]:
    """Three FLOPs bands (MACs) over the bulk of the space's uniform samples, each overlapping the next by ~10%."""
    from supernet.engine.checkpoint import load_supernet

    space = load_supernet(ckpt, torch.device("cpu")).net.space
    rng = random.Random(0)
    macs = sorted(arch_cost(space.sample(rng)).macs for _ in range(2000))
    q = [macs[int(f * (len(macs) - 1))] for f in (0.05, 0.35, 0.65, 0.95)]
    return [(q[0], int(q[1] * 1.1)), (int(q[1] * 0.9), int(q[2] * 1.1)), (int(q[2] * 0.9), q[3])]


def main(quick: bool = False) -> None:
    generations = 2 if quick else 20
    print(f"== search speed (CPU, {torch.get_num_threads()} threads, real Fashion-MNIST; FLOPs are MACs)")
    with tempfile.TemporaryDirectory(prefix="search_speed_") as tmp:
        for preset in ("fmnist_2d", "fmnist_1d"):
            ckpt = supernet(preset)
            run_dir = Path(tmp) / preset
            r = search(ckpt, run_dir, f"evolution.generations={generations}", "progress=false")
            rate = 60 * r.evaluations / r.wall_s
            print(f"  {preset}: default search, population 50 x {generations} generations, {r.images} held-out "
                  f"validation images per candidate")
            print(f"    {rate:.1f} evaluations/min over the whole search ({r.wall_s:.0f} s; "
                  f"{60 * r.evaluations / r.eval_s:.1f}/min inside the scorer)   target >= {TARGET}/min")
            print(f"    {r.line()}")
            if r.rescored:
                print(f"    finalist re-scoring: {r.rescored} finalists on all {r.whole_images} validation images, "
                      f"{r.rescore_s:.1f} s = {r.rescore_s / r.wall_s:.1%} of the search's {r.wall_s:.0f} s "
                      f"(the evolution's scoring: {r.eval_s:.0f} s)")
            if preset == "fmnist_2d":
                again = search(ckpt, run_dir, f"evolution.generations={generations}", "progress=false")
                assert "resumed" in again.out
                print(f"    rerun of the same command (resumes the finished state): {again.line()}, "
                      f"{again.wall_s:.1f} s")
                b = bands(ckpt)
                band_gens = 1 if quick else 4
                spec = "[" + ",".join(f"[{lo},{hi}]" for lo, hi in b) + "]"
                r3 = search(ckpt, Path(tmp) / "bands", f"flops_budgets={spec}",
                            f"evolution.generations={band_gens}", "progress=false")
                print("    3 overlapping FLOPs bands " + ", ".join(f"[{fmt_macs(lo)}, {fmt_macs(hi)}]" for lo, hi in b)
                      + f" MACs, population 50 x {band_gens} generations each, one shared cache:")
                print(f"    {r3.line()}; {60 * r3.evaluations / r3.wall_s:.1f} evaluations/min")


if __name__ == "__main__":
    import sys

    main(quick="quick" in sys.argv[1:])
