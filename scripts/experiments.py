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
F3  what pooling + sharing buy: the same search without them, and DeiT-like nets at equal FLOPs / params.
F4  latency: the latency tables of fmnist_2d and imagenet_tiny_2d on this CPU (batch 1, 2 threads) and their
    accuracy, then the F2 search again under a latency bound equal to the F2 winner's predicted latency; both
    winners measured and retrained. Run it on a quiet machine: it times things.
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
from space.baselines import deit_like  # noqa: E402
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
PLAIN = ("plain", 900)  # the space without pooling and sharing (conf/space/fmnist_2d_plain.yaml): uniform's steps
SUPERNET_ARGS = ["space=fmnist_2d", "optim.warmup_epochs=0.2", "eval.every=0", "progress=false", "ckpt_every=50"]
FIDELITY_ARGS = ["archs=24", "band_archs=12", "seeds=2", "standalone.max_steps=100",
                 "standalone.optim.warmup_epochs=0.1", "progress=false", f"band=[{BAND[0]:g},{BAND[1]:g}]"]
SEARCH_ARGS = ["evolution.population=20", "evolution.generations=10", "evolution.topk=5", "evolution.mutations=8",
               "evolution.crossovers=8", f"flops_min={BAND[0]:g}", f"flops_max={BAND[1]:g}", "progress=false"]
DATA_ARGS: list[str] = []
if SMOKE:
    SUPERNETS = {k: (3, v[1]) for k, v in SUPERNETS.items()}
    PLAIN = ("plain", 3)
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


def measured(file: str, key: str, fn) -> dict:
    """``fn()``'s result, computed once (timed) and kept in ``OUT/file``, so a rerun only rewrites the page."""
    path = OUT / file
    if not path.exists():
        out: dict = {}
        timed(key, lambda: out.update(fn()))
        path.write_text(json.dumps(out, indent=1))
    return json.loads(path.read_text())


def supernet_cmd(name: str) -> list[str]:
    steps, extra = SUPERNETS[name]
    return [PY, "-m", "supernet.train", f"run_dir={OUT / f'supernet_{name}'}", f"max_steps={steps}",
            *SUPERNET_ARGS, *extra, *DATA_ARGS]


def trained(name: str) -> bool:
    """Whether the supernet ``name`` has reached its last step (its run is then not relaunched)."""
    import torch

    steps = PLAIN[1] if name == PLAIN[0] else SUPERNETS[name][0]
    ckpt = OUT / f"supernet_{name}" / "last.ckpt"
    return ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=False)["step"] == steps


def plain_cmd() -> list[str]:
    """The uniform supernet's training on the space without pooling and sharing (same steps and recipe)."""
    args = [a for a in SUPERNET_ARGS if not a.startswith("space=")]
    return [PY, "-m", "supernet.train", f"run_dir={OUT / f'supernet_{PLAIN[0]}'}", f"max_steps={PLAIN[1]}",
            "space=fmnist_2d_plain", *args, *DATA_ARGS]


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


# ----------------------------------------------------------------------------- F2/F3 helpers
def trained_test_top1(archs: dict[str, ArchSpec], checkpoint: str, data_cfg: dict,
                      root: Path = OUT / "standalone") -> dict[str, list[float]]:
    """Official test top-1 of each architecture per seed, trained from scratch with F1's stand-alone recipe
    through the fidelity app's own function (runs already in ``root``, e.g. F1's, are reused, not retrained)."""
    import torch
    from hydra import compose, initialize_config_dir

    from search.fidelity import run_id, standalone_run
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import top1
    from supernet.model.psvit import PSViT

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("fidelity", overrides=FIDELITY_ARGS + [f"checkpoint={checkpoint}"])
    torch.set_num_threads(2)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    data_cfg = {**data_cfg, "eval_batch_size": 1000}
    test = build_data(data_cfg, 0, 1, env.device, test=True).test
    out = {}
    for name, a in archs.items():
        out[name] = []
        for seed in range(cfg.seeds):
            standalone_run(a, seed, root / run_id(a, seed), data_cfg, cfg, env, {})  # no-op when done
            model = PSViT(a)
            ck = torch.load(root / run_id(a, seed) / "last.ckpt", map_location="cpu", weights_only=False)
            model.load_state_dict(ck["model"])
            out[name].append(top1(model.eval(), test, env, None, False))
    out["_test_images"] = [test.num_examples]
    return out


def search(supernet: str) -> ArchSpec:
    """Evolution inside the band on the named supernet (resumable; skipped when done)."""
    search_dir = OUT / f"search_{supernet}"
    if not (search_dir / "best_arch.json").exists():
        ckpt = OUT / f"supernet_{supernet}" / "last.ckpt"
        timed(f"search {supernet}", lambda: run([PY, "-m", "search.evolve", f"checkpoint={ckpt}",
                                                 f"run_dir={search_dir}", *SEARCH_ARGS], log=f"search_{supernet}"))
    return ArchSpec.load(search_dir / "best_arch.json")


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
    best = search(default)
    band = {f"random{i}": ArchSpec.from_dict(r["arch"]) for i, r in
            enumerate(r for r in fids[default]["archs"] if "band" in r["groups"])}
    ckpt, data = fids[default]["checkpoint"], data_cfg_of(default)
    f2 = measured("f2_test.json", "F2 retrain + test",
                  lambda: trained_test_top1({"searched": best, **band}, ckpt, data))
    # F3: the same search without pooling and sharing, and DeiT-like nets matched on FLOPs and on parameters
    if not trained(PLAIN[0]):
        timed("F3 supernet (no pooling, no sharing)", lambda: run(plain_cmd(), log="supernet_plain"))
    plain = search(PLAIN[0])
    sp = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    like = dict(img_size=sp.img_size, patch_size=sp.patch_size, in_chans=sp.in_chans, num_classes=sp.num_classes,
                mlp_ratio=sp.mlp_ratio, head_dim=sp.head_dim, dims=[16, 24, 32, 48, 64, 96, 128])
    f3_archs = {"PSViT (searched)": best, "no pooling, no sharing (searched)": plain,
                "DeiT-like, FLOPs-matched": deit_like(macs(best), **like),
                "DeiT-like, params-matched": deit_like(params(best), by="params", **like)}
    f3 = measured("f3_test.json", "F3 retrain + test", lambda: trained_test_top1(f3_archs, ckpt, data))
    f4 = latency_study(default, best, ckpt, data)
    write_page(fids, default, {"archs": {"searched": best, **band}, "test": f2},
               {"archs": f3_archs, "test": f3}, f4, json.loads(TIMES.read_text()))


# ----------------------------------------------------------------------------- F4
LATENCY = {"fmnist_2d": ["warmup=3", "repeats=10", "rounds=20"],
           "imagenet_tiny_2d": ["warmup=2", "repeats=5", "rounds=20"]}


def latency_study(supernet: str, flops_best: ArchSpec, ckpt: str, data: dict) -> dict:
    """F4: tables of both spaces, the latency-bound search at the FLOPs winner's predicted latency, and the two
    winners measured (batch 1, 2 threads) and retrained with F1's recipe."""
    from space.latency import LatencyTable

    tables = {}
    for space, extra in LATENCY.items():
        path = OUT / f"latency_{space}_cpu.json"
        if not path.exists():
            timed(f"F4 latency table {space}", lambda space=space, path=path, extra=extra: run(
                [PY, "-m", "supernet.latency", f"space={space}", "threads=2", "batch=1", f"out={path}",
                 "progress=false", *(["archs=3", "calibrate=1", "repeats=2", "rounds=2"] if SMOKE else extra)],
                log=f"latency_{space}"))
        tables[space] = LatencyTable.load(path)
    table_path = OUT / "latency_fmnist_2d_cpu.json"
    bound = tables["fmnist_2d"].predict(flops_best)
    search_dir = OUT / f"search_{supernet}_latency"
    if not (search_dir / "best_arch.json").exists():
        args = [a for a in SEARCH_ARGS if not a.startswith("flops_")]
        timed("F4 search under latency", lambda: run(
            [PY, "-m", "search.evolve", f"checkpoint={OUT / f'supernet_{supernet}' / 'last.ckpt'}",
             f"run_dir={search_dir}", f"latency_table={table_path}", f"latency_max={bound}", *args],
            log=f"search_{supernet}_latency"))
    archs = {"FLOPs-bound (F2)": flops_best, "latency-bound": ArchSpec.load(search_dir / "best_arch.json")}
    # both trained now, in their own directory: F1's runs predate the current code (LayerNorm eps, torch)
    # timed before the retraining, on a machine with nothing else running
    ms = measured("f4_latency.json", "F4 measured latency", lambda: measure_latency(archs))
    test = measured("f4_test.json", "F4 retrain + test",
                    lambda: trained_test_top1(archs, ckpt, data, OUT / "standalone_f4"))
    return {"tables": tables, "bound": bound, "archs": archs, "test": test, "measured_ms": ms}


def measure_latency(archs: dict[str, ArchSpec]) -> dict[str, float]:
    """Median ms of each network, timed as the tables time theirs: interleaved rounds (supernet.timing.time_rounds,
    3 warm-up and 10 timed calls of each per round, 20 rounds), so the VM's drift hits both networks alike."""
    import torch

    from supernet.timing import Timing, arch_input, time_rounds

    torch.set_num_threads(2)
    timing = Timing(torch.device("cpu"), 1, warmup=1 if SMOKE else 3, repeats=2 if SMOKE else 10, amp=False)
    return time_rounds({k: arch_input(a, timing) for k, a in archs.items()}, timing, 2 if SMOKE else 20).ms


def latency_section(f4: dict) -> list[str]:
    out = ["\n## F4. Measured latency: the latency model, and a search under a latency bound\n",
           "Latency tables measured by `python -m supernet.latency threads=2 batch=1` on this CPU: every block, 15 "
           "random calibration networks (overhead and scale fitted to them) and 30 other random networks (the "
           "accuracy) timed together in interleaved rounds, each a new random order of all of them, every figure the "
           "median over rounds of its per-round median; drift is how far the machine's speed moved between rounds:\n",
           "| space | blocks | overhead | scale | MAPE | worst | Kendall τ | warm-up / repeats / rounds | drift |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for space, t in f4["tables"].items():
        a = t.accuracy
        out.append(f"| {space} | {len(t.blocks)} | {t.overhead_ms:.3f} ms | {t.scale:.3f} | {a.mape:.1f}% | "
                   f"{a.max_ape:.1f}% | {a.kendall_tau:.3f} | "
                   f"{' / '.join(x.split('=')[1] for x in LATENCY[space])} | {t.drift:.2f}x |")
    out.append("\nThis 2-core VM's speed drifts by up to 2x over minutes with nothing else running (steal time 0). "
               "Timed one after the other (blocks first, networks later, as a first version did), the same tables "
               "missed by 35.3% (fmnist_2d) and 16.3% (imagenet_tiny_2d): the drift, read as the model's error.")
    t, test, ms = f4["tables"]["fmnist_2d"], f4["test"], f4["measured_ms"]
    out += [f"\nThe F2 search again on the same supernet with the same evolution, its FLOPs band replaced by "
            f"`latency_max` = the F2 winner's predicted latency ({f4['bound']:.3f} ms). Both winners measured here "
            "(batch 1, 2 threads, interleaved as the tables: 20 rounds of 10 calls of each) and trained with F1's "
            "recipe (seeds 0 and 1), official test split:\n",
            "| bound | architecture | FLOPs | params | predicted | measured | test top-1 seed 0 | seed 1 | mean |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, a in f4["archs"].items():
        scores = " | ".join(f"{x:.4f}" for x in test[k])
        out.append(f"| {k} | `{a.short()}` | {fmt_macs(macs(a))} | {fmt_params(params(a))} | {t.predict(a):.3f} ms | "
                   f"{ms[k]:.3f} ms | {scores} | {statistics.mean(test[k]):.4f} |")
    lat = ms["latency-bound"]
    out.append(f"\nThe latency-bound winner measured {lat:.3f} ms against the bound {f4['bound']:.3f} ms "
               f"({(lat / f4['bound'] - 1) * 100:+.1f}%; the table's MAPE {t.accuracy.mape:.1f}%, worst "
               f"{t.accuracy.max_ape:.1f}%): "
               + ("within the bound." if lat <= f4["bound"] else "over the bound, within the model's worst error."
                  if lat <= f4["bound"] * (1 + t.accuracy.max_ape / 100) else "over the bound by more than the "
                  "model's worst error."))
    flops = ms["FLOPs-bound (F2)"]
    p_lat, p_flops = (t.predict(f4["archs"][k]) for k in ("latency-bound", "FLOPs-bound (F2)"))
    out.append(f"Measured / predicted: {lat / p_lat:.3f} (latency-bound), {flops / p_flops:.3f} (FLOPs-bound): the two "
               f"winners were timed minutes after the table, and the machine's speed had moved (drift, above); "
               f"between the two, latency-bound / FLOPs-bound was {lat / flops:.3f} measured and {p_lat / p_flops:.3f} "
               "predicted.")
    spread = statistics.mean(abs(test[k][0] - test[k][1]) for k in f4["archs"])
    d = statistics.mean(test["latency-bound"]) - statistics.mean(test["FLOPs-bound (F2)"])
    out.append(f"\nLatency-bound minus FLOPs-bound: {d:+.4f} test top-1; mean seed-to-seed difference {spread:.4f}"
               + (" (not larger than that: no evidence either way)." if abs(d) <= spread else "."))
    return out


def data_cfg_of(name: str) -> dict:
    import torch

    ck = torch.load(OUT / f"supernet_{name}" / "last.ckpt", map_location="cpu", weights_only=False)
    return dict(ck["config"]["data"])


# ----------------------------------------------------------------------------- the page
def ci(e: dict | None) -> str:
    if e is None or e["value"] is None:
        return "n/a"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def write_page(fids: dict, default: str, f2: dict, f3: dict, f4: dict, times: dict) -> None:
    """docs/results.md, and the fidelity plots and JSON copied to docs/fidelity/."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    loops = sum(loop_seconds(OUT / f"supernet_{n}") for n in [*fids, PLAIN[0]]) / 60
    stages = sum(v for k, v in times.items() if not k.startswith(("F0 ", "F3 supernet"))) / 60
    lines = ["# Results: how far the search can be trusted, at small scale (Fashion-MNIST)\n",
             f"Measured by `.venv/bin/python scripts/experiments.py` (processes with one thread each, two at a time, "
             f"on 2 cores of an {cpu}; torch {torch.__version__}), resumed across sessions: the five supernets' "
             f"training loops took {loops:.0f} min between them, run two at a time (about {loops / 2:.0f} min of "
             f"wall time), and the later stages {stages:.0f} min (listed at the end): about "
             f"{(loops / 2 + stages) / 60:.1f} h in all, against a budget of about 2 h; the runs shared the 2 cores "
             "with other work, which inflated every wall time. FLOPs are multiply-accumulates (MACs). Outputs: "
             "`runs/experiments/`; the "
             "fidelity plots and JSON are copied to `docs/fidelity/`, F4's latency tables and winner to "
             "`docs/latency/`. The earlier page (one-epoch ground truth over "
             "10 architectures, a DeiT comparison at 0.28x the parameters) is kept as "
             "[results_v1.md](results_v1.md). This is a CPU-sized study: short schedules, and accuracies far "
             "below converged ones.\n"]
    lines += fidelity_section(fids)
    lines += retrained_section(f2, default, fids[default]["standalone"]["max_steps"])
    lines += fair_section(f3, default)
    lines += latency_section(f4)
    lines += ["\n## Timings\n"] + [f"- {k}: {v / 60:.1f} min" for k, v in times.items()]
    if SMOKE:
        print("\n".join(lines))
        return
    (REPO / "docs" / "fidelity").mkdir(exist_ok=True)
    for name in fids:
        for ext in ("png", "json"):
            (REPO / "docs" / "fidelity" / f"{name}.{ext}").write_bytes(
                (OUT / f"fidelity_{name}" / f"fidelity.{ext}").read_bytes())
    (REPO / "docs" / "latency").mkdir(exist_ok=True)  # F4's tables and the latency-bound winner
    for src, dst in [*((f"latency_{s}_cpu.json", f"{s}_cpu.json") for s in LATENCY),
                     (f"search_{default}_latency/best_arch.json", "latency_bound_best_arch.json")]:
        (REPO / "docs" / "latency" / dst).write_bytes((OUT / src).read_bytes())
    page = REPO / "docs" / "results.md"
    page.write_text("\n".join(lines) + "\n")
    print(f"wrote {page}")


def fidelity_section(fids: dict) -> list[str]:
    uni = fids["uniform"]
    st = uni["standalone"]
    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    lo, hi = space.macs_range()
    out = ["## F0/F1. Ranking fidelity of four supernet training rules at equal training cost\n",
           f"Supernets on `fmnist_2d` (its FLOPs range is {fmt_macs(lo)} .. {fmt_macs(hi)}), batch 256, AdamW peak "
           "lr 1e-3, warmup 0.2 epoch, cosine to the end. The step counts make the training cost equal: uniform's "
           "900 steps divided by each rule's cost per step relative to uniform, measured side by side by `make "
           "bench` (flops_bins 1.19x, sandwich 5.51x, sandwich + distillation 5.91x). The training time column is "
           "each loop's logged wall time; runs shared the 2 cores with other work, so it is only indicative. "
           "Fidelity (`python -m search.fidelity`, seed 0): the 24 architectures stratified over the range and 12 "
           f"uniform ones with {fmt_macs(BAND[0])} .. {fmt_macs(BAND[1])} MACs are scored with inherited weights on "
           f"all {uni['data']['val_images']} held-out validation images, and trained from scratch for "
           f"{st['max_steps']} steps of 256 images (warmup 0.1 epoch) with seeds 0 and 1 (init and data order), "
           "scored on the same images. Intervals: 95% bootstrap over architectures (2000 resamples). The noise "
           "ceiling is the stand-alone ground truth's own seed-0-vs-seed-1 Kendall τ.\n",
           "| supernet | steps | training time | τ range | ρ range | τ band | ρ band | τ / ceiling (range, band) |",
           "|---|---:|---:|---|---|---|---|---|"]
    for name, fid in fids.items():
        s = fid["stats"]
        loop = loop_seconds(OUT / f"supernet_{name}") / 60
        ratio = ", ".join(f"{r:.2f}" if (r := over_ceiling(s[g])) is not None else "n/a" for g in ("range", "band"))
        out.append(f"| {name} | {SUPERNETS[name][0]} | {loop:.1f} min | {ci(s['range']['kendall_tau'])} | "
                   f"{ci(s['range']['spearman_rho'])} | {ci(s['band']['kendall_tau'])} | "
                   f"{ci(s['band']['spearman_rho'])} | {ratio} |")
    s = uni["stats"]
    topk = {g: next(k for k in s[g] if k.endswith("_overlap")) for g in ("range", "band")}
    out.append(f"\nNoise ceiling (stand-alone seed 0 vs seed 1): range {ci(s['range']['noise_ceiling_tau'])}, band "
               f"{ci(s['band']['noise_ceiling_tau'])}. Top-k overlap of the uniform supernet: range {topk['range']} "
               f"{ci(s['range'][topk['range']])}, band {topk['band']} {ci(s['band'][topk['band']])}.\n")
    out += [f"![{name}](fidelity/{name}.png)" for name in fids]
    return out + ["", verdict(fids), "", why(fids)]


def over_ceiling(stats: dict) -> float | None:
    """τ / noise ceiling, only where the ceiling's interval excludes 0 (else the ratio means nothing)."""
    c = stats["noise_ceiling_tau"]
    if c is None or c["value"] is None or c["low"] <= 0 or stats["kendall_tau"]["value"] is None:
        return None
    return stats["kendall_tau"]["value"] / c["value"]


def why(fids: dict) -> str:
    """The default rule against the issue's bar (τ >= 0.6 across the range, >= 80% of the ceiling), and why."""
    default = OmegaConf.load(REPO / "conf" / "supernet.yaml").sampler
    s = fids[default]["stats"]
    tau, ceil = s["range"]["kendall_tau"], s["range"]["noise_ceiling_tau"]
    steps = fids[default]["standalone"]["max_steps"]
    r = over_ceiling(s["range"])
    text = (f"**Against the bar (τ ≥ 0.6 across the range and ≥ 80% of the noise ceiling):** the default "
            f"(`sampler={default}`) reaches τ = {tau['value']:.3f} across the range, ")
    if tau["value"] >= 0.6 and r is not None and r >= 0.8:
        return text + "which meets it."
    text += ("below 0.6" if tau["value"] < 0.6 else "above 0.6") + (f", and {r:.0%} of the ceiling" if r else "")
    if ceil["value"] < 0.6:
        text += (f". The ground truth is the limit: two seeds of the same {steps}-step stand-alone training agree "
                 f"with each other only at τ = {ci(ceil)}, so no proxy can be shown to rank better than that here; "
                 "a τ of 0.6 needs a longer stand-alone schedule (its cost grows with the steps: 72 runs here).")
    band = s["band"]["noise_ceiling_tau"]
    if band is not None and band["low"] <= 0:
        text += (f" Within the band the ceiling is {ci(band)}: at {steps} steps, architectures of similar cost are not "
                 "ranked reproducibly even by training them, so the band τ values above are not evidence either way.")
    return text


def _row(name: str, a: ArchSpec, scores: list[float]) -> str:
    return (f"| {name} | `{a.short()}` | {fmt_macs(macs(a))} | {fmt_params(params(a))} | "
            + " | ".join(f"{x:.4f}" for x in scores) + f" | {statistics.mean(scores):.4f} |")


def retrained_section(f2: dict, default: str, steps: int) -> list[str]:
    archs, test = f2["archs"], f2["test"]
    means = {k: statistics.mean(test[k]) for k in archs}
    rand = [k for k in archs if k != "searched"]
    spread = statistics.mean(abs(test[k][0] - test[k][1]) for k in archs)
    out = ["\n## F2. Search vs random architectures, after retraining\n",
           f"Evolution (population 20, 10 generations, 1000 validation images per candidate) on the `{default}` "
           f"supernet inside the band, then the found architecture and F1's {len(rand)} random band architectures, "
           f"each trained from scratch with F1's stand-alone recipe ({steps} steps, seeds 0 and 1), official test "
           f"split ({test['_test_images'][0]} images):\n",
           "| | architecture | FLOPs | params | test top-1 seed 0 | seed 1 | mean |",
           "|---|---|---:|---:|---:|---:|---:|"]
    out += [_row("**searched**" if k == "searched" else "random", archs[k], test[k])
            for k in sorted(archs, key=lambda k: -means[k])]
    med = statistics.median(means[k] for k in rand)
    gap = means["searched"] - med
    rank = 1 + sum(means[k] > means["searched"] for k in rand)
    out.append(f"\nThe searched architecture ranks {rank} of {len(rand) + 1}; its mean minus the random ones' "
               f"median: {gap:+.4f}; the mean seed-to-seed difference of one architecture: {spread:.4f}. "
               + ("The gap is larger than the seed spread." if abs(gap) > spread else
                  "**The gap is not larger than the seed spread: this run is no evidence that search beats random "
                  "picks in the band.**"))
    return out


def fair_section(f3: dict, default: str) -> list[str]:
    archs, test = f3["archs"], f3["test"]
    spread = statistics.mean(abs(test[k][0] - test[k][1]) for k in archs)
    means = {k: statistics.mean(test[k]) for k in archs}
    out = ["\n## F3. What pooling + sharing buy, and what search buys\n",
           f"The searched PSViT of F2; the best architecture that the same search (same supernet recipe and steps, "
           f"`{default}` sampling, same band, same evolution) finds in `fmnist_2d_plain`, the same space with token "
           "pooling and attention sharing switched off (every stage keeps the 7x7 grid; ops basic and identity); "
           "and DeiT-like nets (one stage, CLS token, basic layers) matched to the searched PSViT on FLOPs and on "
           "parameters (`space.baselines.deit_like`). All trained with F1's stand-alone recipe, seeds 0 and 1, "
           "official test split:\n",
           "| model | architecture | FLOPs | params | test top-1 seed 0 | seed 1 | mean |",
           "|---|---|---:|---:|---:|---:|---:|"]
    out += [_row(k, archs[k], test[k]) for k in archs]
    p = means["PSViT (searched)"]
    diffs = {k: p - m for k, m in means.items() if k != "PSViT (searched)"}
    out.append("\nPSViT (searched) minus: " + "; ".join(f"{k} {d:+.4f}" for k, d in diffs.items())
               + f". Mean seed-to-seed difference of one model: {spread:.4f}; "
               + ("every difference is larger than that." if all(abs(d) > spread for d in diffs.values()) else
                  "**differences smaller than that are not evidence either way.**"))
    return out


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
    if not any("beats" in o for o in out):
        out.append("no rule beats uniform by more than the intervals, so the default stays `sampler=uniform`")
    return "**Verdict:** " + "; ".join(out) + "."


if __name__ == "__main__":
    main()
