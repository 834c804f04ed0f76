"""The search's trustworthiness at small scale (Fashion-MNIST, fmnist_2d); writes docs/results.md from measured
numbers. Every step runs the project's own apps as commands, 2 processes at a time with one thread each (a
2-core machine), and is resumable: rerunning the script skips finished runs and continues interrupted ones.

    .venv/bin/python scripts/experiments.py            # ~2 h on 2 CPU cores; outputs in runs/experiments/
    .venv/bin/python scripts/experiments.py --smoke    # a few steps of everything on generated data

F0  four supernets at equal wall-clock training time: SPOS uniform, FLOPs bins, sandwich, sandwich + in-place
    distillation; step counts scaled by each sampler's cost per step (`make bench`, section "by sampler").
F1  ranking fidelity of each (`python -m search.fidelity`): 24 architectures over the FLOPs range and 12 in a
    band, inherited-weight scores vs 2 seeds of stand-alone training (shared by the four).
F2  search vs random after retraining: evolution inside the band on the default supernet; the found
    architecture is trained with F1's stand-alone recipe and seeds, and its official test top-1 is compared
    with F1's random band architectures trained the same way.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from space.arch import ArchSpec  # noqa: E402
from space.cost import fmt_macs, fmt_params, macs, params  # noqa: E402
from space.space import SearchSpace  # noqa: E402

SMOKE = "--smoke" in sys.argv
OUT = REPO / "runs" / ("experiments_smoke" if SMOKE else "experiments")
PY = sys.executable
BAND = (3.5e6, 4.5e6)  # MACs: candidates of about the demo's 4 M budget
# Uniform's steps; the others are shorter by their measured cost per step relative to uniform (make bench:
# flops_bins x1.19, sandwich x5.51, sandwich+distill x5.91 on this machine), for equal wall-clock time.
SUPERNETS = {"uniform": (900, []), "flops_bins": (756, ["sampler=flops_bins"]),
             "sandwich": (163, ["sampler=sandwich"]),
             "sandwich_distill": (152, ["sampler=sandwich", "distill=inplace"])}
SUPERNET_ARGS = ["space=fmnist_2d", "optim.warmup_epochs=0.2", "eval.every=0", "progress=false", "ckpt_every=50"]
FIDELITY_ARGS = ["archs=24", "band_archs=12", "seeds=2", "standalone.max_steps=100",
                 "standalone.optim.warmup_epochs=0.1", "progress=false", f"band=[{BAND[0]:g},{BAND[1]:g}]"]
SEARCH_ARGS = ["evolution.population=20", "evolution.generations=10", "evolution.topk=5", "evolution.mutations=8",
               "evolution.crossovers=8", f"flops_min={BAND[0]:g}", f"flops_max={BAND[1]:g}", "progress=false"]
DATA_ARGS: list[str] = []
if SMOKE:
    SUPERNETS = {k: (3, v[1]) for k, v in SUPERNETS.items()}
    FIDELITY_ARGS = ["archs=4", "band_archs=3", "seeds=2", "standalone.max_steps=2", "progress=false",
                     "band=[3e6,5e6]"]
    SEARCH_ARGS = ["evolution.population=4", "evolution.generations=2", "evolution.topk=2", "evolution.mutations=1",
                   "evolution.crossovers=1", "flops_min=3e6", "flops_max=5e6", "eval_images=40", "progress=false"]
    DATA_ARGS = [f"data.root={OUT / 'data'}", "data.val_size=40", "data.batch_size=16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TIMES = OUT / "timings.json"


def run(*cmds: list[str], log: str) -> None:
    """Run the commands side by side (one core each); fail loudly with the tail of the failing one's log."""
    OUT.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(cmds):
        f = open(OUT / f"{log}{'' if len(cmds) == 1 else f'_{i}'}.log", "a")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT), f, cmd))
    for p, f, cmd in procs:
        p.wait()
        f.close()
        if p.returncode != 0:
            sys.exit(f"experiments: `{' '.join(map(str, cmd))}` exited {p.returncode}; see {f.name}")


def timed(key: str, fn) -> None:
    """Run ``fn`` and add its wall time to timings.json (kept across resumed runs of the script)."""
    t = time.perf_counter()
    fn()
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[key] = times.get(key, 0.0) + time.perf_counter() - t
    TIMES.write_text(json.dumps(times, indent=1))
    print(f"[{key}] done ({(time.perf_counter() - t) / 60:.1f} min)", flush=True)


def supernet_cmd(name: str) -> list[str]:
    steps, extra = SUPERNETS[name]
    return [PY, "-m", "supernet.train", f"run_dir={OUT / f'supernet_{name}'}", f"max_steps={steps}",
            *SUPERNET_ARGS, *extra, *DATA_ARGS]


def trained(name: str) -> bool:
    """Whether the supernet ``name`` has reached its last step (its run is then not relaunched)."""
    import torch

    ckpt = OUT / f"supernet_{name}" / "last.ckpt"
    return ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=False)["step"] == SUPERNETS[name][0]


def fidelity_cmd(name: str) -> list[str]:
    return [PY, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2", "-m", "search.fidelity",
            f"checkpoint={OUT / f'supernet_{name}' / 'last.ckpt'}", f"run_dir={OUT / f'fidelity_{name}'}",
            f"standalone_dir={OUT / 'standalone'}", *FIDELITY_ARGS]


def loop_seconds(run_dir: Path) -> float:
    """Wall seconds of a training loop, summed from the img/s points rank 0 logs (start-up excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    ck_cfg = OmegaConf.load(REPO / "conf" / "data" / "fashion_mnist.yaml")
    prev, total = 0, 0.0
    for p in acc.Scalars("train/img_per_s"):
        total += ck_cfg.batch_size / p.value * (p.step - prev)
        prev = p.step
    return total


# ----------------------------------------------------------------------------- F2 helpers
def band_test_scores(fid: dict, search_best: ArchSpec) -> dict[str, dict]:
    """Official test top-1 of F1's band architectures and of the searched one, per seed, each trained with
    F1's stand-alone recipe (the searched one is trained here, through the same function)."""
    import torch
    from hydra import compose, initialize_config_dir

    from search.fidelity import run_id, standalone_run
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import top1
    from supernet.model.psvit import PSViT

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("fidelity", overrides=FIDELITY_ARGS + [f"checkpoint={fid['checkpoint']}"])
    torch.set_num_threads(2)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    data_cfg = {**fid["data_cfg"], "eval_batch_size": 1000}
    test = build_data(data_cfg, 0, 1, env.device, test=True).test
    root = OUT / "standalone"
    band = [ArchSpec.from_dict(r["arch"]) for r in fid["archs"] if "band" in r["groups"]]
    out = {}
    for kind, archs in (("random", band), ("searched", [search_best])):
        for a in archs:
            scores = []
            for seed in range(cfg.seeds):
                standalone_run(a, seed, root / run_id(a, seed), data_cfg, cfg, env, {})  # no-op when done
                model = PSViT(a)
                model.load_state_dict(torch.load(root / run_id(a, seed) / "last.ckpt", map_location="cpu",
                                                 weights_only=False)["model"])
                scores.append(top1(model.eval(), test, env, None, False))
            out[a.to_json()] = {"kind": kind, "arch": a, "test": scores, "test_images": test.num_examples}
    return out


def main() -> None:
    if SMOKE:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import _fake_fmnist

        _fake_fmnist(OUT / "data", n_train=120, n_test=40)
    # F0: supernets, two at a time
    names = [n for n in SUPERNETS if not trained(n)]
    for i in range(0, len(names), 2):
        timed(f"F0 supernets {' + '.join(names[i:i + 2])}",
              lambda i=i: run(*[supernet_cmd(n) for n in names[i:i + 2]], log=f"supernet_{i}"))
    # F1: fidelity; the first builds the shared stand-alone ground truth on 2 ranks
    for name in SUPERNETS:
        if not (OUT / f"fidelity_{name}" / "fidelity.json").exists():
            timed(f"F1 fidelity {name}", lambda name=name: run(fidelity_cmd(name), log=f"fidelity_{name}"))
    names = list(SUPERNETS)
    fids = {n: json.loads((OUT / f"fidelity_{n}" / "fidelity.json").read_text()) for n in names}
    # F2: evolution in the band on the default supernet, then the retrained comparison
    default = OmegaConf.load(REPO / "conf" / "supernet.yaml").sampler
    search_dir = OUT / f"search_{default}"
    if not (search_dir / "best_arch.json").exists():
        ckpt = OUT / f"supernet_{default}" / "last.ckpt"
        timed("F2 search", lambda: run([PY, "-m", "search.evolve", f"checkpoint={ckpt}", f"run_dir={search_dir}",
                                        *SEARCH_ARGS], log="search"))
    best = ArchSpec.load(search_dir / "best_arch.json")
    f2: dict = {}

    def retrained() -> None:
        f2.update(band_test_scores({**fids[default], "data_cfg": data_cfg_of(default)}, best))
    timed("F2 retrain + test", retrained)
    write_page(fids, default, best, f2, json.loads(TIMES.read_text()))


def data_cfg_of(name: str) -> dict:
    import torch

    ck = torch.load(OUT / f"supernet_{name}" / "last.ckpt", map_location="cpu", weights_only=False)
    return dict(ck["config"]["data"])


# ----------------------------------------------------------------------------- the page
def ci(e: dict | None) -> str:
    if e is None or e["value"] is None:
        return "n/a"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def write_page(fids: dict, default: str, best: ArchSpec, f2: dict, times: dict) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    lines: list[str] = []
    w = lines.append
    total = sum(times.values()) / 60
    w("# Results: how far the search can be trusted, at small scale (Fashion-MNIST)\n")
    w(f"Measured by `.venv/bin/python scripts/experiments.py` ({total:.0f} min of wall time in all, processes "
      f"with one thread each, two at a time, on 2 cores of an {cpu}; torch {torch.__version__}). FLOPs are "
      "multiply-accumulates (MACs). Outputs: `runs/experiments/`; the fidelity plots and JSON are copied to "
      "`docs/fidelity/`. The earlier page (one-epoch ground truth over 10 architectures, the unfair DeiT "
      "comparison) is kept as [results_v1.md](results_v1.md). This is a CPU-sized study: short schedules, and "
      "accuracies far below converged ones.\n")
    uni = fids["uniform"]
    st = uni["standalone"]
    w("## F0/F1. Ranking fidelity of four supernet training rules at equal wall-clock time\n")
    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    lo, hi = space.macs_range()
    w(f"Supernets on `fmnist_2d` (its FLOPs range is {fmt_macs(lo)} .. {fmt_macs(hi)}), batch 256, AdamW "
      "peak lr 1e-3, warmup 0.2 epoch, cosine to the end; the step counts make the training time equal "
      "(per-step cost measured by `make bench`). Fidelity (`python -m search.fidelity`, seed 0): the 24 "
      f"architectures stratified over the range and 12 uniform ones with {fmt_macs(BAND[0])} .. "
      f"{fmt_macs(BAND[1])} MACs are scored with inherited weights on all {uni['data']['val_images']} held-out "
      f"validation images, and trained from scratch for {st['max_steps']} steps of 256 images (warmup 0.1 "
      "epoch) with seeds 0 and 1 (init and data order), scored on the same images. Intervals: 95% bootstrap "
      "over architectures (2000 resamples). The noise ceiling is the stand-alone ground truth's own "
      "seed-0-vs-seed-1 Kendall tau.\n")
    w("| supernet | steps | training time | τ range | ρ range | τ band | ρ band |\n|---|---:|---:|---|---|---|---|")
    for name, fid in fids.items():
        s = fid["stats"]
        loop = loop_seconds(OUT / f"supernet_{name}") / 60
        w(f"| {name} | {SUPERNETS[name][0]} | {loop:.1f} min | {ci(s['range']['kendall_tau'])} | "
          f"{ci(s['range']['spearman_rho'])} | {ci(s['band']['kendall_tau'])} | {ci(s['band']['spearman_rho'])} |")
    s = uni["stats"]
    topk = {g: next(k for k in s[g] if k.endswith("_overlap")) for g in ("range", "band")}
    w(f"\nNoise ceiling (stand-alone seed 0 vs seed 1): range {ci(s['range']['noise_ceiling_tau'])}, band "
      f"{ci(s['band']['noise_ceiling_tau'])}. Top-k overlap of the default supernet: range {topk['range']} "
      f"{ci(s['range'][topk['range']])}, band {topk['band']} {ci(s['band'][topk['band']])}.\n")
    for name in fids:
        w(f"![{name}](fidelity/{name}.png)")
    w("")
    w(verdict(fids))
    w("\n## F2. Search vs random architectures, after retraining\n")
    rand = [v for v in f2.values() if v["kind"] == "random"]
    found = next(v for v in f2.values() if v["kind"] == "searched")
    seeds_spread = statistics.mean(abs(v["test"][0] - v["test"][1]) for v in f2.values())
    w(f"Evolution (population 20, 10 generations, 1000 validation images per candidate) on the `{default}` "
      f"supernet inside the band, then the found architecture and F1's {len(rand)} random band architectures, "
      f"each trained from scratch with F1's stand-alone recipe ({st['max_steps']} steps, seeds 0 and 1), "
      f"official test split ({found['test_images']} images):\n")
    w("| architecture | FLOPs | params | test top-1 seed 0 | seed 1 | mean |\n|---|---:|---:|---:|---:|---:|")
    rows = sorted(f2.values(), key=lambda v: -statistics.mean(v["test"]))
    for v in rows:
        a = v["arch"]
        name = f"**searched** `{a.short()}`" if v["kind"] == "searched" else f"`{a.short()}`"
        w(f"| {name} | {fmt_macs(macs(a))} | {fmt_params(params(a))} | {v['test'][0]:.4f} | {v['test'][1]:.4f} | "
          f"{statistics.mean(v['test']):.4f} |")
    med = statistics.median(statistics.mean(v["test"]) for v in rand)
    gap = statistics.mean(found["test"]) - med
    rank = 1 + sum(statistics.mean(v["test"]) > statistics.mean(found["test"]) for v in rand)
    w(f"\nThe searched architecture ranks {rank} of {len(rand) + 1}; its mean minus the random ones' median: "
      f"{gap:+.4f}; mean seed-to-seed difference of one architecture: {seeds_spread:.4f}. "
      + ("The gap is larger than the seed spread." if abs(gap) > seeds_spread else
         "**The gap is not larger than the seed spread: this run is no evidence that search beats random "
         "picks in the band.**"))
    w("\n## Timings\n")
    for k, v in times.items():
        w(f"- {k}: {v / 60:.1f} min")
    page = REPO / "docs" / "results.md"
    if SMOKE:
        print("\n".join(lines))
        return
    (REPO / "docs" / "fidelity").mkdir(exist_ok=True)
    for name in fids:
        for ext in ("png", "json"):
            (REPO / "docs" / "fidelity" / f"{name}.{ext}").write_bytes(
                (OUT / f"fidelity_{name}" / f"fidelity.{ext}").read_bytes())
    page.write_text("\n".join(lines) + "\n")
    print(f"wrote {page}")


def verdict(fids: dict) -> str:
    """Whether any rule beats uniform by more than the intervals, on the range and in the band."""
    out = []
    uni = fids["uniform"]["stats"]
    for name, fid in fids.items():
        if name == "uniform":
            continue
        for g in ("range", "band"):
            a, b = fid["stats"][g]["kendall_tau"], uni[g]["kendall_tau"]
            if a["value"] is None or b["value"] is None:
                continue
            if a["low"] > b["high"]:
                out.append(f"{name} beats uniform on the {g} (τ intervals do not overlap)")
            elif a["high"] < b["low"]:
                out.append(f"{name} is worse than uniform on the {g} (τ intervals do not overlap)")
    if not out:
        return ("**Verdict:** no rule separates from SPOS's uniform sampling by more than the intervals, so "
                "the default stays `sampler=uniform`.")
    return "**Verdict:** " + "; ".join(out) + "."


if __name__ == "__main__":
    main()
