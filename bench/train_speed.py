"""Training speed, measured side by side on this machine's CPU with real Fashion-MNIST (the supernet step against
the extracted path's: bench/step_speed.py):

1. `python -m supernet.train` on 2 gloo ranks vs 1 process at the same global batch, both on all cores;
2. the wall time of one fmnist_2d supernet epoch with the default config;
3. the Fashion-MNIST TensorLoader (with augmentation) alone, and its share of a supernet step;
4. the cost of a supernet optimizer step under each path sampler (``sampler=``, ``distill=``) relative to
   SPOS's uniform one, the factor by which a run must be shorter to train for the same wall-clock time.

Run it on an otherwise idle machine: a process with 2 OpenMP threads slows down several-fold whenever
anything else holds one of 2 cores, which swamps every ratio here.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bench.timing import interleaved
from space.space import SearchSpace
from supernet.data import DataBundle, TensorLoader, build_data
from supernet.engine.distributed import DistEnv
from supernet.engine.loop import Trainer
from supernet.model.supernet import Supernet
from supernet.train import SupernetTask


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _compose(*overrides: str, app: str = "supernet") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=list(overrides))


@dataclass(frozen=True)
class RunTiming:
    step_s: float  # median wall seconds per step after the first logged interval
    loop_s: float  # wall seconds of the whole training loop (set-up and final checkpoint excluded)
    steps: int
    process_s: float  # the whole command, start-up included


def train_run(run_dir: Path, nproc: int, threads: int, steps: int | None, log_every: int,
              *overrides: str) -> RunTiming:
    """Runs `python -m supernet.train` (through torch.distributed.run when nproc > 1) and times its loop.

    Timing comes from the ``train/img_per_s`` scalars rank 0 writes every ``log_every`` steps: each is the
    global images over the wall time since the previous point, the first measured from just before the
    loop. So start-up (interpreter, imports, dataset decompression, rendezvous) never counts, which a
    stopwatch around the command could only remove by differencing two runs, doubling their noise. The
    first interval also holds one-off costs (AdamW state creation, first collectives, allocator warm-up),
    so the per-step time is the median over the later intervals; their sum plus the first gives the loop.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, "-m", "supernet.train"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "supernet.train"]
    args = [f"run_dir={run_dir}", "resume=never", "eval.every=0", "progress=false", f"log_every={log_every}",
            "ckpt_every=1000000000", *([] if steps is None else [f"max_steps={steps}"]), *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd + args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + args)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    points = acc.Scalars("train/img_per_s")
    global_batch = _compose(*args).data.batch_size * nproc
    prev, per_step, loop = 0, [], 0.0
    for p in points:
        s = global_batch / p.value  # seconds per step in this interval
        loop += s * (p.step - prev)
        per_step.append(s)
        prev = p.step
    return RunTiming(statistics.median(per_step[1:] or per_step), loop, prev, process_s)


def ranks_vs_one(tmp: Path, global_batch: int, steps: int, log_every: int) -> RunTiming:
    """2 gloo ranks vs 1 process at the same global batch, each side using all cores; returns the 1-process run."""
    cores = os.cpu_count() or 2
    two = train_run(tmp / "r2", 2, max(1, cores // 2), steps, log_every, f"data.batch_size={global_batch // 2}")
    one = train_run(tmp / "r1", 1, cores, steps, log_every, f"data.batch_size={global_batch}")
    print(f"  fmnist_2d, global batch {global_batch}, {steps} steps, eval off: 2 gloo ranks x {global_batch // 2} "
          f"({max(1, cores // 2)} thread each) {global_batch / two.step_s:.0f} img/s vs 1 process x {global_batch} "
          f"({cores} threads) {global_batch / one.step_s:.0f} img/s")
    print(f"    wall time per step 2 ranks / 1 rank: {two.step_s / one.step_s:.3f}   (1.0 = DDP costs nothing; "
          f"median over log intervals after the first, start-up excluded)")
    return one


def epoch_time(tmp: Path, steps: int, quick_run: RunTiming | None) -> None:
    """One fmnist_2d supernet epoch of ``steps`` steps; with ``quick_run``, extrapolated from its steps instead."""
    cores = os.cpu_count() or 2
    if quick_run is not None:
        sec = quick_run.step_s * steps
        print(f"  fmnist_2d epoch, default config, batch 256, {cores} threads: ~{sec:.0f} s, ~{steps * 256 / sec:.0f}"
              f" img/s   EXTRAPOLATED from the {quick_run.steps}-step 1-process run above (x {steps} steps/epoch), "
              f"not measured; the full bench runs the epoch")
        return
    t = train_run(tmp / "epoch", 1, cores, None, 20, "optim.epochs=1")
    print(f"  fmnist_2d epoch ({t.steps} steps x 256 images), default config, eval off, {cores} threads: "
          f"training loop {t.loop_s:.1f} s, {t.steps * 256 / t.loop_s:.0f} img/s   (whole command with start-up "
          f"{t.process_s:.1f} s; conf/supernet.yaml says ~90 s)")


def loader_throughput(loader: TensorLoader, t_step: float, reps: int) -> None:
    epochs = itertools.count(1)  # a fresh shuffle and augmentation draw each time

    def one_epoch() -> None:
        for _ in loader.epoch(next(epochs)):
            pass

    (t_epoch,) = interleaved([one_epoch], reps=reps, warmup=0)
    n = len(loader) * loader.batch_size
    t_batch = t_epoch / len(loader)
    print(f"  Fashion-MNIST TensorLoader, batch {loader.batch_size}, crop_pad {loader.crop_pad} + hflip "
          f"{loader.hflip}: one epoch ({n} images) {t_epoch:.2f} s, {n / t_epoch:.0f} img/s; {t_batch * 1e3:.1f} ms"
          f"/batch = {t_batch / (t_batch + t_step):.1%} of a supernet step with loading "
          f"(the fmnist_2d supernet step of bench/step_speed.py: {t_step * 1e3:.0f} ms)")


SAMPLER_VARIANTS = {"uniform": (), "flops_bins": ("sampler=flops_bins",), "sandwich": ("sampler=sandwich",),
                    "sandwich+distill": ("sampler=sandwich", "distill=inplace")}


def sampler_costs(data: DataBundle, steps: int, reps: int) -> dict[str, float]:
    """Mean seconds per optimizer step of each sampler over steps 0..steps-1 (each step's own paths), timed
    round-robin; prints them relative to uniform and returns them."""
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    batch = next(iter(data.train.epoch(0)))
    trainers = {}
    for name, overrides in SAMPLER_VARIANTS.items():
        cfg = _compose("space=fmnist_2d", "max_steps=100000", *overrides)
        torch.manual_seed(cfg.seed)
        task = SupernetTask(Supernet(SearchSpace.from_config(cfg.space)), cfg, data, env)
        trainers[name] = Trainer(task, data, cfg, env)

    def run(trainer: Trainer) -> None:
        for step in range(steps):
            trainer.step = step  # the same steps' paths every repetition
            trainer.train_step(*batch)

    times = dict(zip(trainers, interleaved([lambda t=t: run(t) for t in trainers.values()], reps=reps)))
    base = times["uniform"] / steps
    print(f"  fmnist_2d supernet step by sampler, batch {data.train.batch_size}, mean over the paths of steps "
          f"0..{steps - 1}:")
    for name, t in times.items():
        print(f"    {name:17s} {t / steps * 1e3:7.0f} ms/step   x{t / steps / base:.2f} of uniform")
    return {k: v / steps for k, v in times.items()}


def main(quick: bool = False, t_step: float | None = None) -> None:
    """``t_step``: the seconds of one fmnist_2d supernet step at the default batch (bench/step_speed.py's row);
    measured here when not given."""
    torch.set_num_threads(torch.get_num_threads())
    steps, log_every = (30, 5) if quick else (60, 10)
    print(f"== training speed (CPU, {torch.get_num_threads()} threads, real Fashion-MNIST; FLOPs are MACs)")
    data = build_data(_compose().data)
    if t_step is None:
        from bench.step_speed import step_row

        t_step = step_row("fmnist_2d", data.train.batch_size, "dense", data, 2, 1 if quick else 3).super_ms / 1e3
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        one = ranks_vs_one(Path(tmp), 256, steps, log_every)  # its 1-process run is the default config
        epoch_time(Path(tmp), len(data.train), one if quick else None)
    loader_throughput(data.train, t_step, 1 if quick else 3)
    sampler_costs(data, 4 if quick else 12, 1 if quick else 3)


if __name__ == "__main__":
    main()
