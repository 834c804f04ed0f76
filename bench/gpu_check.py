"""`make gpu-check`: the training and search code on one CUDA GPU at steady state, with the figures to document.

    python -m bench.gpu_check                  # CUDA: minutes, most of them compiling (--compile false: eager only)
    python -m bench.gpu_check --device cpu --preset cifar_2d --steps 2 --paths 1 --evals 2 --batch 4
                                               # the same code path on the CPU (gloo), in seconds

It launches itself as a 1-process torchrun (supernet/engine/launch.py, what `make supernet` runs) and joins the
process group with the backend training uses (NCCL on CUDA, gloo on the CPU), all-reducing a tensor. Every model
trains through the engine's ``Trainer.train_step`` (bf16 autocast on CUDA, synthetic batches of ``--batch``):

1. **the supernet** (``--preset``, ``--entangle``): a *warm-up* of sampled steps, each timed on its own, until every
   call shape of the space has been seen (a cell's stage, tokens and dim, a pooling's, the stem's and the head's:
   what keys cuBLAS / attention kernel plans and allocator growth) or ``--warmup-max`` steps; the steps that met a
   first-seen shape are reported apart from the others. Then ``--steps`` *steady-state* steps, a new sampled path
   each, all of whose shapes have been seen;
2. **the same paths extracted** (the first ``--paths`` of them, each a stand-alone PSViT through retraining's task,
   one untimed step then ``--extracted-steps`` timed);
3. **the PSViT DeiT-Ti spec** (conf/baselines/deit_tiny.json at the preset's image size and classes) and **timm's
   DeiT-Ti** (``deit_tiny_patch16_224``, pretrained=False, no download), ``--steps`` steps after a few untimed;

eager, and with ``--compile`` (auto: on CUDA) compiled as the apps compile (supernet/engine/compile.py: each cell
and pooling; timm's model whole), after an untimed pass that compiles every call shape the timed steps meet. It
prints images/s and *per-MAC throughput* (forward MACs of the images trained per second) of each, the two ratios the
issue sets goals for (supernet / extracted per MAC >= 0.9, PSViT DeiT-Ti / timm DeiT-Ti >= 0.95), a torch.profiler
summary of ``--profile-steps`` steady-state steps of each eager model (wall, host CPU and kernel time per step, top
kernels), the search's inherited-weight evaluations/s, and a one-row markdown table to paste. It also counts the
kernels of one step: one fused SDPA kernel per basic cell (per DeiT block), one attention map per shared pair, and
on CUDA the host syncs of steady-state steps (``torch.cuda.set_sync_debug_mode``: a training step should make none);
a contradiction is exit status 1 after the figures. Without CUDA (and ``--device cuda``) it prints one line and
exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from bench.gpu_report import Figures, Kernels, Run, ops_of, problems, report
from bench.gpu_steady import (Batch, OpCounter, Rate, host_syncs, is_sync_warning, profile,
                              run_steps, sync, timed, warm_up)
from bench.synthetic import SyntheticLoader, synthetic_batches
from bench.train_speed import CONF, _compose
from search.inherited import InheritedAccuracy
from space.arch import ArchSpec
from space.cost import macs
from space.errors import UserError
from space.space import SearchSpace
from supernet.data import DataBundle
from supernet.engine.compile import compile_cells, compile_wanted
from supernet.engine.distributed import DistEnv, distributed
from supernet.engine.loop import Trainer
from supernet.engine.standalone import RetrainTask
from supernet.model.psvit import PSViT
from supernet.model.supernet import Supernet
from supernet.train import SupernetTask

__all__ = ["Figures", "is_sync_warning", "problems"]  # tests import them from here
DEIT = "deit_tiny_patch16_224"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every app's user errors
        self.exit(2, f"error: {message} (python -m bench.gpu_check --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} (allowed: an integer >= 1)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the same code path, on gloo")
    p.add_argument("--preset", default="imagenet_tiny_2d", help="search-space preset (conf/space/)")
    p.add_argument("--entangle", choices=("dense", "slice"), default="dense", help="the supernet's entangle mode")
    p.add_argument("--batch", type=_positive, default=128, help="images per training step (conf/data's per GPU)")
    p.add_argument("--steps", type=_positive, default=30, help="timed steady-state steps of each model")
    p.add_argument("--warmup-max", type=_positive, default=None,
                   help="stop the supernet's warm-up here even if a call shape was not seen (default 1000; 3 on "
                        "the CPU)")
    p.add_argument("--paths", type=_positive, default=6, help="timed supernet paths that are also extracted")
    p.add_argument("--extracted-steps", type=_positive, default=3, help="timed steps of each extracted path")
    p.add_argument("--profile-steps", type=_positive, default=5, help="steady-state steps profiled per model")
    p.add_argument("--evals", type=_positive, default=20, help="timed search evaluations")
    p.add_argument("--eval-images", type=_positive, default=None,
                   help="validation images per evaluation (default conf/evolve.yaml's eval_images; --batch on the CPU)")
    p.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                   help="also time compiled models (auto: on CUDA only; inductor is slow to compile on a CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the torchrun worker
    args = p.parse_args(argv)
    if not (CONF / "space" / f"{args.preset}.yaml").is_file():
        presets = ", ".join(sorted(f.stem for f in (CONF / "space").glob("*.yaml")))
        p.error(f"--preset: {args.preset!r} is not in conf/space (allowed: {presets})")
    if args.warmup_max is None:
        args.warmup_max = 1000 if args.device == "cuda" else 3
    args.warmup = 3 if args.device == "cuda" else 1  # untimed steps of the fixed models
    args.paths = min(args.paths, args.steps)
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    return args


# ----------------------------------------------------------------------------- the models
def kernels(trainer: Trainer, batches: list[Batch], step: int, synced: list[int]) -> Kernels:
    """Counts the kernels of ``step``, then on CUDA the host syncs of the steps ``synced`` (untimed)."""
    with OpCounter() as ops:
        run_steps(trainer, batches, [step])
    if trainer.env.device.type != "cuda":  # nothing to wait for: the CPU runs the ops as they come
        return Kernels(ops.sdpa(), ops.counts["_softmax"])
    syncs = host_syncs(lambda: run_steps(trainer, batches, synced))
    return Kernels(ops.sdpa(), ops.counts["_softmax"], syncs, len(synced))


def supernet_trainer(args: argparse.Namespace, data: DataBundle, env: DistEnv, tmp: str) -> Trainer:
    """The supernet's trainer, built as ``supernet.train.train`` builds it (``Trainer.fit`` adds only what is not
    the step: a run-dir lock, TensorBoard and checkpoints)."""
    cfg = _compose(f"space={args.preset}", f"data.batch_size={args.batch}", "max_steps=1000000",
                   f"device={args.device}", "amp=true", f"run_dir={tmp}/supernet", f"entangle={args.entangle}")
    torch.manual_seed(cfg.seed)
    net = Supernet(SearchSpace.from_config(cfg.space), args.entangle).to(env.device)
    trainer = Trainer(SupernetTask(net, cfg, data, env), data, cfg, env)
    net.train()
    return trainer


def retrain_trainer(model: nn.Module, arch: ArchSpec, args: argparse.Namespace, data: DataBundle, env: DistEnv,
                    tmp: str) -> Trainer:
    """A stand-alone model's trainer, as retraining builds it (``arch`` names the run)."""
    cfg = _compose("arch=gpu_check", f"data.batch_size={args.batch}", "max_steps=1000000", f"device={args.device}",
                   "amp=true", f"run_dir={tmp}/retrain", app="retrain")
    trainer = Trainer(RetrainTask(model.to(env.device), arch, "gpu_check", cfg, data, env), data, cfg, env)
    model.train()
    return trainer


def deit_spec(space: SearchSpace) -> ArchSpec:
    """The PSViT DeiT-Ti spec (conf/baselines/deit_tiny.json) at the space's image size, channels and classes."""
    deit = ArchSpec.load(CONF / "baselines" / "deit_tiny.json")
    tokens = (space.img_size // deit.patch_size) ** 2
    return replace(deit, img_size=space.img_size, in_chans=space.in_chans, num_classes=space.num_classes,
                   stages=(replace(deit.stages[0], tokens=tokens),))


def timm_deit(space: SearchSpace) -> nn.Module:
    import timm

    return timm.create_model(DEIT, pretrained=False, img_size=space.img_size, in_chans=space.in_chans,
                             num_classes=space.num_classes)


def measure_supernet(args: argparse.Namespace, trainer: Trainer, run: Run) -> None:
    """Warm-up until every call shape was seen; the kernels of a path with both ops and the host syncs; then the
    steady-state steps timed."""
    batches, task = trainer.data.train.batches, trainer.task
    run.warm = warm_up(trainer, batches, at_least=1, at_most=args.warmup_max)
    start = run.warm.steps
    mixed = next(t for t in itertools.count(start) if {"basic", "shared"} <= set(ops_of(task.sampler(t))))
    run.checked = task.sampler(mixed)
    run.supernet_kernels = kernels(trainer, batches, mixed, [mixed] * min(3, args.warmup))
    run.steady = list(range(start, start + args.steps + args.profile_steps))
    time_supernet(args, trainer, run, compiled=False)


def time_supernet(args: argparse.Namespace, trainer: Trainer, run: Run, compiled: bool) -> None:
    """The supernet's ``--steps`` steady-state steps, the first ``--paths`` (the ones extracted) timed apart."""
    batches, task = trainer.data.train.batches, trainer.task
    steps = run.steady[:args.steps]
    first = timed(trainer, batches, steps[:args.paths], lambda t: macs(task.sampler(t)))
    rest = steps[args.paths:]
    run.rates["same_paths", compiled] = first
    run.rates["supernet", compiled] = first + (timed(trainer, batches, rest, lambda t: macs(task.sampler(t)))
                                               if rest else Rate(0, 0, 0.0, 0.0))


def measure_extracted(args: argparse.Namespace, trainer: Trainer, run: Run, tmp: str, compiled: bool) -> None:
    """The first ``--paths`` steady-state paths, each extracted from the supernet as it is now: one untimed step
    (with ``compiled``: after compiling its cells), then ``--extracted-steps`` timed."""
    task, batches, total = trainer.task, trainer.data.train.batches, None
    for step in run.steady[:args.paths]:
        arch = task.sampler(step)
        sub = retrain_trainer(task.net.extract(arch), arch, args, trainer.data, trainer.env, tmp)
        if compiled:
            compile_cells(sub.task.net, True, trainer.env.device)
        run_steps(sub, batches, [0])
        rate = timed(sub, batches, list(range(args.extracted_steps)), lambda _: macs(arch))
        total = rate if total is None else total + rate
    run.rates["extracted", compiled] = total


def measure_fixed(args: argparse.Namespace, name: str, trainer: Trainer, run: Run, compiled: bool) -> None:
    """A fixed model (DeiT-Ti as a PSViT spec or timm's, both of the spec's MACs): untimed steps, then ``--steps``
    timed."""
    batches, arch_macs = trainer.data.train.batches, macs(ArchSpec.from_dict(trainer.task.identity["arch"]))
    run_steps(trainer, batches, list(range(args.warmup)))
    run.rates[name, compiled] = timed(trainer, batches, list(range(args.steps)), lambda _: arch_macs)


def compile_model(name: str, trainer: Trainer) -> None:
    """Compile a model as its app would: cells and poolings of a supernet or a PSViT, timm's model whole."""
    net = trainer.task.net
    if name == "timm_deit":
        net.compile()
    else:
        compile_cells(net, True, trainer.env.device)


def measure_compiled(args: argparse.Namespace, trainers: dict[str, Trainer], run: Run, tmp: str) -> None:
    """Every model again with compiled cells (timm's DeiT-Ti compiled whole): one untimed pass over the steps to time
    compiles each call shape they meet (not every shape of the space: inductor takes seconds a shape), then the
    same steps timed. A supernet with entangle=slice stays eager."""
    sup = trainers["supernet"]
    if sup.task.net.slices is None:
        compile_model("supernet", sup)
        started = time.perf_counter()
        run_steps(sup, sup.data.train.batches, run.steady[:args.steps])
        run.compiled_note = (f"an untimed pass over the timed steps compiled their shapes in "
                             f"{time.perf_counter() - started:.0f} s")
        time_supernet(args, sup, run, compiled=True)
    else:
        run.compiled_note = "the supernet's cells stay eager with entangle=slice (docs/pipeline.md)"
    measure_extracted(args, sup, run, tmp, compiled=True)
    for name in ("psvit_deit", "timm_deit"):
        compile_model(name, trainers[name])
        run_steps(trainers[name], trainers[name].data.train.batches, list(range(args.steps)))
        measure_fixed(args, name, trainers[name], run, compiled=True)


def measure_profiles(args: argparse.Namespace, trainers: dict[str, Trainer], run: Run, tmp: str) -> None:
    """One torch.profiler summary per eager model over ``--profile-steps`` steady-state steps (the supernet's on
    new paths, the extracted one on the first timed path)."""
    n, run.profiles = args.profile_steps, {}
    sup = trainers["supernet"]
    batches = sup.data.train.batches
    steps = run.steady[args.steps:]
    run.profiles["supernet"] = profile(lambda: run_steps(sup, batches, steps), n, sup.env.device)
    arch = sup.task.sampler(run.steady[0])
    sub = retrain_trainer(sup.task.net.extract(arch), arch, args, sup.data, sup.env, tmp)
    run_steps(sub, batches, [0])
    run.profiles["extracted"] = profile(lambda: run_steps(sub, batches, list(range(n))), n, sup.env.device)
    for name in ("psvit_deit", "timm_deit"):
        t = trainers[name]
        run.profiles[name] = profile(lambda t=t: run_steps(t, batches, list(range(n))), n, sup.env.device)


def search_rate(net: nn.Module, space: SearchSpace, args: argparse.Namespace, env: DistEnv) -> tuple[float, int, int]:
    """Evaluations/s of the search's scorer (inherited-weight top-1 of a path) over ``args.evals`` uniform
    architectures after an untimed one; returns the rate, the images per evaluation and the evaluation batch."""
    evolve = _compose(app="evolve")
    images = args.eval_images or (evolve.eval_images if env.device.type == "cuda" else args.batch)
    per_batch = min(evolve.eval_batch_size, images)
    sizes = [per_batch] * (images // per_batch) + [images % per_batch] * (images % per_batch > 0)
    scorer = InheritedAccuracy(net.eval(), synthetic_batches(sizes, space, env.device, seed=1), env, amp=True)
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(args.evals + 1)]
    scorer(archs[:1])
    sync(env.device)
    t = time.perf_counter()
    scorer(archs[1:])
    sync(env.device)
    net.train()
    return args.evals / (time.perf_counter() - t), images, per_batch


# ----------------------------------------------------------------------------- the worker and the launcher
def check_collective(env: DistEnv) -> str:
    """Joins the process group torchrun prepared, with the backend training picks for the device (NCCL on CUDA,
    gloo on the CPU; ``setup_distributed`` gives a 1-process job no group, as it needs no collective), and
    all-reduces a tensor; returns the backend.

    Raises:
        UserError: not started by torchrun.
    """
    if "MASTER_ADDR" not in os.environ:
        raise UserError("--worker: run under torchrun (python -m bench.gpu_check launches it)")
    cuda = env.device.type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size,
                                device_id=env.device if cuda else None)
    t = torch.ones(4, device=env.device)
    dist.all_reduce(t)
    if t.tolist() != [float(env.world_size)] * 4:
        raise RuntimeError(f"all_reduce over {env.world_size} rank(s) gave {t.tolist()}")
    return str(dist.get_backend())


def measure(args: argparse.Namespace, env: DistEnv, tmp: str) -> tuple[Run, dict[str, Trainer], SearchSpace]:
    """Every model's figures (the supernet first: its warm-up sees the shapes before anything else runs)."""
    space = SearchSpace.from_config(_compose(f"space={args.preset}").space)
    loader = SyntheticLoader(synthetic_batches([args.batch] * 2, space, env.device, seed=0), 1000000)
    data = DataBundle("synthetic", loader, None, None, space.img_size, space.in_chans, space.num_classes)
    run = Run()
    trainers = {"supernet": supernet_trainer(args, data, env, tmp)}
    measure_supernet(args, trainers["supernet"], run)
    measure_extracted(args, trainers["supernet"], run, tmp, compiled=False)
    torch.manual_seed(0)
    trainers["psvit_deit"] = retrain_trainer(PSViT(deit_spec(space)), deit_spec(space), args, data, env, tmp)
    trainers["timm_deit"] = retrain_trainer(timm_deit(space), deit_spec(space), args, data, env, tmp)
    run.deit_blocks = len(trainers["timm_deit"].task.net.blocks)
    run.deit_kernels = kernels(trainers["timm_deit"], data.train.batches, 0, list(range(min(3, args.warmup))))
    for name in ("psvit_deit", "timm_deit"):
        measure_fixed(args, name, trainers[name], run, compiled=False)
    measure_profiles(args, trainers, run, tmp)
    return run, trainers, space


def worker(args: argparse.Namespace) -> int:
    """The torchrun worker: measures, and rank 0 reports; returns 1 when a kernel count contradicts the model."""
    start = time.perf_counter()
    with distributed(args.device) as env, tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        backend = check_collective(env)
        run, trainers, space = measure(args, env, tmp)
        evals_per_s, images, per_batch = search_rate(trainers["supernet"].task.net, space, args, env)
        cuda, threads = env.device.type == "cuda", torch.get_num_threads()
        name = torch.cuda.get_device_name(env.device) if cuda else f"CPU, {threads} thread{'s' * (threads > 1)}"
        peak = torch.cuda.max_memory_allocated(env.device) / 2**30 if cuda else None
        if compile_wanted(args.compile, env.device):  # last: everything above ran eager
            measure_compiled(args, trainers, run, tmp)
        f = Figures(name, backend, args.batch, run, evals_per_s, images, per_batch, peak, time.perf_counter() - start)
        if not env.is_main:
            return 0
        report(args, f)
        bad = problems(f)
        for line in bad:
            print(f"gpu-check: FAILED: {line}", file=sys.stderr)
        return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Launches the worker as a 1-process torchrun; without CUDA (and ``--device cuda``) prints one line, returns 0."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        from space.app import run_app

        return run_app(lambda: worker(args))
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False); nothing to check")
        return 0
    from supernet.engine import launch

    return launch.main(["--standalone", "--nproc_per_node=1", "-m", "bench.gpu_check", "--worker", *argv])


if __name__ == "__main__":
    sys.exit(main())
