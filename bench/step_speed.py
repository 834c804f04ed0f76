"""The whole training step, supernet path against the same path extracted, measured side by side on this machine:

    python -m bench.step_speed            # every row (~15 min on 2 busy cores); writes docs/bench/train_step.json
    python -m bench.step_speed quick      # fewer paths and repetitions; prints only
    make docs                             # docs/benchmarks.md's table from docs/bench/train_step.json

Each row runs the engine's real ``Trainer.train_step`` (forward and backward under the app's loss, the gradient
reducer, clipping, the optimizer, the lr schedule) on both sides: the supernet task (``SupernetTask``: path
sampling, path digest) with ``entangle=dense`` or ``slice``, and retraining's task (``RetrainTask``) on the path
extracted from that supernet. The supernet trainer's step counter is pinned so each pair trains the same path,
and the two sides run in alternation (bench/timing.py) on the same batches. A row's ratio is the median over its
paths of (supernet step / extracted step), each the median of its repetitions. Rows: ``fmnist_2d`` and
``imagenet_tiny_2d`` at batch 1 and at their data config's default batch (Fashion-MNIST's real images; ImageNet
batches are synthetic, since a step's cost depends on shapes alone), ``fmnist_1d`` at its default batch.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bench.synthetic import synthetic_data
from bench.timing import interleaved_cpu
from space.cost import macs
from space.space import SearchSpace
from supernet.data import DataBundle, build_data
from supernet.engine.distributed import DistEnv
from supernet.engine.loop import Trainer
from supernet.engine.standalone import RetrainTask
from supernet.model.supernet import Supernet
from supernet.train import SupernetTask

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
JSON = REPO / "docs" / "bench" / "train_step.json"
PAGE = REPO / "docs" / "benchmarks.md"
TARGET = 1.05
# (preset, batch: None for the data config's default, paths, repetitions) of a full and a quick run
PLAN = {"full": [("fmnist_2d", 1, 16, 7), ("fmnist_2d", None, 6, 3), ("fmnist_1d", None, 6, 3),
                 ("imagenet_tiny_2d", 1, 8, 5), ("imagenet_tiny_2d", None, 2, 2)],
        "quick": [("fmnist_2d", 1, 4, 3), ("fmnist_2d", None, 2, 1), ("imagenet_tiny_2d", 1, 2, 2),
                  ("imagenet_tiny_2d", None, 1, 1)]}
DATA_OF = {"fmnist_2d": "fashion_mnist", "fmnist_1d": "fashion_mnist", "imagenet_tiny_2d": "imagenet_folder"}


def _compose(*overrides: str, app: str = "supernet") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=list(overrides))


@dataclass(frozen=True)
class StepRow:
    """One row: a preset at a batch in one entangle mode. Times are this process's CPU time (``process_time``),
    the work a step costs whatever else the machine runs; ``ratio_wall`` is the same ratio on the wall clock."""

    preset: str
    batch: int
    entangle: str
    data: str  # "Fashion-MNIST" (real images) or "synthetic"
    paths: int  # sampled paths (steps 0..paths-1 of the uniform sampler)
    reps: int  # timed repetitions of each side per path, after one untimed
    path_macs: float  # mean MACs per image of the paths
    super_ms: float  # median over paths of the supernet step's median CPU time, ms
    sub_ms: float  # the same for the extracted path
    ratio: float  # median over paths of supernet / extracted, CPU time
    ratio_min: float
    ratio_max: float
    ratio_wall: float  # median over paths of supernet / extracted, wall clock
    profile: dict[str, dict[str, float]] | None = None  # rows over the target: where a step's CPU time goes

    def line(self) -> str:
        return (f"  {self.preset:16s} batch {self.batch:3d}  entangle={self.entangle:5s}  {self.paths:2d} paths of "
                f"{self.path_macs / 1e6:7.1f} M MACs/img: supernet {self.super_ms:8.1f} ms  extracted "
                f"{self.sub_ms:8.1f} ms  ratio {self.ratio:.3f} (min {self.ratio_min:.3f}, max {self.ratio_max:.3f}; "
                f"wall clock {self.ratio_wall:.3f}){'' if self.ratio <= TARGET else f'   over the {TARGET} target'}")


def trainers(preset: str, batch: int, entangle: str, data: DataBundle) -> tuple[Trainer, Any]:
    """The supernet's trainer and a function ``step -> trainer`` of the extracted path of ``step``, both as the apps
    build them (``supernet.train.train``, ``supernet.retrain``); nothing is written (``run_dir`` only has to be set)."""
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    tmp = tempfile.gettempdir()
    cfg = _compose(f"space={preset}", f"data.batch_size={batch}", "max_steps=100000", f"entangle={entangle}",
                   f"run_dir={tmp}")
    torch.manual_seed(cfg.seed)
    task = SupernetTask(Supernet(SearchSpace.from_config(cfg.space), entangle), cfg, data, env)
    trainer = Trainer(task, data, cfg, env)
    task.net.train()
    sub_cfg = _compose("arch=bench", f"data.batch_size={batch}", "max_steps=100000", f"run_dir={tmp}", app="retrain")

    def extracted(step: int) -> Trainer:
        arch = task.sampler(step)
        return Trainer(RetrainTask(task.net.extract(arch).train(), arch, "bench", sub_cfg, data, env), data, sub_cfg,
                       env)

    return trainer, extracted


def step_row(preset: str, batch: int, entangle: str, data: DataBundle, n_paths: int, reps: int) -> StepRow:
    """Times ``Trainer.train_step`` of the supernet on the paths of steps 0..n_paths-1 against the extracted paths."""
    trainer, extracted = trainers(preset, batch, entangle, data)
    batches = list(itertools.islice(data.train.epoch(0), 2))  # the same batches feed both sides, in turn
    supers, subs, ratios, walls, path_macs = [], [], [], [], []
    for step in range(n_paths):
        path_macs.append(macs(trainer.task.sampler(step)))
        sub = extracted(step)
        feed_super, feed_sub = itertools.cycle(batches), itertools.cycle(batches)

        def super_step(step: int = step, feed: Any = feed_super) -> None:
            trainer.step = step  # pins the path: step t trains sampler(t)
            trainer.train_step(*next(feed))

        def sub_step(sub: Trainer = sub, feed: Any = feed_sub) -> None:  # this path's, kept for the profile
            sub.train_step(*next(feed))

        wall, cpu = interleaved_cpu([super_step, sub_step], reps=reps)
        supers.append(cpu[0])
        subs.append(cpu[1])
        ratios.append(cpu[0] / cpu[1])
        walls.append(wall[0] / wall[1])
        if step == 0:
            first = ({"super": super_step, "extracted": sub_step}, {"super": trainer, "extracted": sub})
    source = "synthetic" if data.name == "synthetic" else "Fashion-MNIST"
    ratio = statistics.median(ratios)
    profile = phases(*first) if ratio > TARGET else None
    return StepRow(preset, batch, entangle, source, n_paths, reps, statistics.fmean(path_macs),
                   1e3 * statistics.median(supers), 1e3 * statistics.median(subs), ratio, min(ratios), max(ratios),
                   statistics.median(walls), profile)


def phases(steps: dict[str, Any], trainers: dict[str, Trainer], reps: int = 7) -> dict[str, dict[str, float]]:
    """CPU ms per step (this process's ``process_time``, as the rows) of each side's real ``train_step``, split into
    the optimizer's step, its zero_grad and the rest (forward, backward, reducer, clipping, schedule): the two
    optimizer calls are timed through wrappers while the sides run in alternation; medians over ``reps`` steps."""
    spent: dict[str, dict[str, list[float]]] = {side: {"optimizer_ms": [], "zero_grad_ms": [], "rest_ms": []}
                                               for side in steps}
    own = {(side, name): vars(t.opt).get(name) for side, t in trainers.items() for name in ("step", "zero_grad")}
    for side, trainer in trainers.items():
        for name, key in (("step", "optimizer_ms"), ("zero_grad", "zero_grad_ms")):
            real = getattr(trainer.opt, name)  # the lr scheduler's wrapper of step, which it keeps on the instance

            @functools.wraps(real)  # keeps the scheduler's mark on its step wrapper: no warning
            def timed_call(*a: Any, real: Any = real, side: str = side, key: str = key, **k: Any) -> Any:
                start = time.process_time()
                out = real(*a, **k)
                spent[side][key].append(1e3 * (time.process_time() - start))
                return out

            setattr(trainer.opt, name, timed_call)
    try:
        for _ in range(reps):
            for side, step in steps.items():
                start = time.process_time()
                step()
                total = 1e3 * (time.process_time() - start)
                spent[side]["rest_ms"].append(total - spent[side]["optimizer_ms"][-1] - spent[side]["zero_grad_ms"][-1])
    finally:
        for (side, name), was in own.items():
            if was is None:
                delattr(trainers[side].opt, name)
            else:
                setattr(trainers[side].opt, name, was)
    return {side: {k: statistics.median(v) for k, v in parts.items()} for side, parts in spent.items()}


def default_batch(preset: str) -> int:
    """The per-process batch of the preset's data config (conf/data/)."""
    return int(_compose(f"data={DATA_OF[preset]}").data.batch_size)


def data_for(preset: str, batch: int, cache: dict[tuple[str, int], DataBundle]) -> DataBundle:
    """Real Fashion-MNIST batches for the fmnist presets, synthetic ImageNet-sized ones otherwise."""
    space = SearchSpace.from_config(_compose(f"space={preset}").space)
    kind = "fmnist" if DATA_OF[preset] == "fashion_mnist" else preset
    if (kind, batch) not in cache:
        cache[kind, batch] = build_data(_compose(f"data.batch_size={batch}").data) if kind == "fmnist" else \
            synthetic_data(space, batch, torch.device("cpu"), length=100000)
    return cache[kind, batch]


def run(mode: str) -> list[StepRow]:
    """Every row of ``PLAN[mode]``, in both entangle modes, printed as they come."""
    rows, cache = [], {}
    for preset, batch, n_paths, reps in PLAN[mode]:
        batch = batch or default_batch(preset)
        for entangle in ("dense", "slice"):
            rows.append(step_row(preset, batch, entangle, data_for(preset, batch, cache), n_paths, reps))
            print(rows[-1].line(), flush=True)
    return rows


# ----------------------------------------------------------------------------- the record and the page
def machine() -> str:
    """CPU model, cores, torch and its intra-op threads."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    threads = torch.get_num_threads()
    return (f"{names[0] if names else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {threads} thread{'s' * (threads > 1)}")


def commit() -> str:
    """HEAD's short hash, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")


def record(rows: list[StepRow], command: str, start: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps: the rows and how they were measured (``start``: :func:`started`)."""
    return {"command": command, **start, "machine": machine(),
            "load_average": [*start["load_average"], round(os.getloadavg()[0], 2)], "target": TARGET,
            "rows": [asdict(r) for r in rows]}


def started() -> dict[str, Any]:
    """The date, the commit (of the code this process imported) and the load average at the start of a run."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
            "load_average": [round(os.getloadavg()[0], 2)]}


def render(doc: dict[str, Any]) -> str:
    """The markdown table of a record, with its provenance line."""
    load = doc["load_average"]
    lines = [f"Measured {doc['date']} at commit `{doc['commit']}` on {doc['machine']} with `{doc['command']}` "
             f"(1-minute load average {load[0]} before, {load[-1]} after).", "",
             "| preset | batch | data | entangle | paths | supernet ms | extracted ms | supernet / extracted "
             "(median) | min | max | wall clock |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        mark = "" if r["ratio"] <= doc["target"] else " (over)"
        lines.append(f"| {r['preset']} | {r['batch']} | {r['data']} | {r['entangle']} | {r['paths']} | "
                     f"{r['super_ms']:.1f} | {r['sub_ms']:.1f} | {r['ratio']:.3f}{mark} | {r['ratio_min']:.3f} | "
                     f"{r['ratio_max']:.3f} | {r['ratio_wall']:.3f} |")
    over = [r for r in doc["rows"] if r.get("profile")]
    if over:
        lines += ["", f"Rows over {doc['target']}: where a step of the first path spends its CPU time, ms per step "
                  "(medians of 7 steps of each side in alternation, the optimizer's two calls timed inside the real "
                  "step):", "",
                  "| preset | batch | entangle | optimizer step: supernet / extracted | zero_grad | rest (forward, "
                  "backward, clipping): supernet / extracted |", "| --- | ---: | --- | ---: | ---: | ---: |"]
        for r in over:
            a, b = r["profile"]["super"], r["profile"]["extracted"]
            lines.append(f"| {r['preset']} | {r['batch']} | {r['entangle']} | {a['optimizer_ms']:.1f} / "
                         f"{b['optimizer_ms']:.1f} | {a['zero_grad_ms']:.1f} / {b['zero_grad_ms']:.1f} | "
                         f"{a['rest_ms']:.1f} / {b['rest_ms']:.1f} |")
    return "\n".join(lines)


def write_page() -> None:
    """Re-render docs/benchmarks.md's table:train_step block (scripts/docs.py renders it from JSON)."""
    from scripts.docs import render as render_tables

    render_tables([PAGE])


def main(quick: bool = False, command: str = "python -m bench.step_speed") -> list[StepRow]:
    """The rows; a full run also writes docs/bench/train_step.json and re-renders docs/benchmarks.md's table.
    ``command``: what ran them, for the record (OMP_NUM_THREADS is added when set)."""
    start = started()
    print(f"== training step: supernet path vs the extracted path (CPU, {torch.get_num_threads()} threads; "
          f"Trainer.train_step with reducer, clipping, AdamW; target <= {TARGET})")
    rows = run("quick" if quick else "full")
    if not quick:
        threads = os.environ.get("OMP_NUM_THREADS")
        doc = record(rows, f"OMP_NUM_THREADS={threads} {command}" if threads else command, start)
        JSON.parent.mkdir(parents=True, exist_ok=True)
        JSON.write_text(json.dumps(doc, indent=1) + "\n")
        write_page()
        print(f"  wrote {JSON.relative_to(REPO)} and the table of {PAGE.relative_to(REPO)}")
    return rows


if __name__ == "__main__":
    main(quick="quick" in sys.argv[1:])
