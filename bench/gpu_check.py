"""`make gpu-check`: the training and search code on one CUDA GPU in about a minute, with figures for the README.

    python -m bench.gpu_check                      # CUDA: 50 supernet steps (eager, then compiled), 50 DeiT-Ti steps,
                                                   #       20 search evaluations
    python -m bench.gpu_check --device cpu --steps 2 --evals 2 --batch 4     # the same code path on the CPU (gloo)

It launches itself as a 1-process torchrun (supernet/engine/launch.py, what `make supernet` runs) and joins the
process group with the backend training uses (NCCL on CUDA, gloo on the CPU), all-reducing a tensor. The worker
then trains ``--preset`` supernet paths that hold both a basic cell (fused ``scaled_dot_product_attention``) and a
shared pair (an explicit attention map that its second layer reuses), bf16 autocast, synthetic batches; trains
timm's DeiT-Ti (``deit_tiny_patch16_224``, pretrained=False) through the same training step at the same batch;
scores ``--evals`` architectures with the search's inherited-weight scorer on synthetic validation images; and
prints images/s of both models, their ratio and evaluations/s as a markdown table to paste. With ``--compile``
(auto: on CUDA) the supernet's cells are then compiled as ``compile=true`` compiles them in the apps
(supernet/engine/compile.py) and the same timed steps run again, after one untimed pass over every step that
compiles each call shape they meet (its seconds are printed). It also counts the kernels one step of each model
dispatches: one fused SDPA kernel per basic cell (per DeiT block) and one attention
map per shared pair, and counts the host syncs of the other warm-up steps (``torch.cuda.set_sync_debug_mode``: a
training step should make none), or exit status 1 after the figures. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.synthetic import Batch, SyntheticLoader, synthetic_batches
from bench.train_speed import CONF, _compose
from search.inherited import InheritedAccuracy
from space.arch import ArchSpec
from space.cost import fmt_macs, macs
from space.errors import UserError
from space.space import SearchSpace
from supernet.data import DataBundle
from supernet.engine.compile import compile_cells, compile_wanted
from supernet.engine.distributed import DistEnv, distributed
from supernet.engine.loop import Trainer
from supernet.engine.standalone import RetrainTask
from supernet.model.supernet import Supernet
from supernet.train import SupernetTask

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
    p.add_argument("--batch", type=_positive, default=128, help="images per training step (conf/data's per GPU)")
    p.add_argument("--steps", type=_positive, default=50, help="timed training steps of each model")
    p.add_argument("--warmup", type=_positive, default=None, help="untimed steps first (default 5; 1 on the CPU)")
    p.add_argument("--evals", type=_positive, default=20, help="timed search evaluations")
    p.add_argument("--eval-images", type=_positive, default=None,
                   help="validation images per evaluation (default conf/evolve.yaml's eval_images; --batch on the CPU)")
    p.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                   help="also time the supernet with compiled cells (auto: on CUDA only; inductor is slow to compile "
                        "on a CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the torchrun worker
    args = p.parse_args(argv)
    if not (CONF / "space" / f"{args.preset}.yaml").is_file():
        presets = ", ".join(sorted(f.stem for f in (CONF / "space").glob("*.yaml")))
        p.error(f"--preset: {args.preset!r} is not in conf/space (allowed: {presets})")
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 1
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    return args


# ----------------------------------------------------------------------------- measuring
class OpCounter(TorchDispatchMode):
    """Counts the aten ops a block dispatches below autograd and autocast: the kernels that really ran. SDPA shows
    as the fused kernel it chose (``_scaled_dot_product_flash_attention``, ``..._efficient_attention``,
    ``..._cudnn_attention``, ``..._flash_attention_for_cpu``); its math fallback decomposes into matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def sdpa(self) -> Counter[str]:
        """The fused attention kernels of forward passes, with their calls."""
        return Counter({k: v for k, v in self.counts.items()
                        if k.startswith("_scaled_dot_product_") and not k.endswith("_backward")})


@dataclass(frozen=True)
class Training:
    """One model's training figures."""

    img_per_s: float
    sdpa: Counter[str]  # fused attention kernels of the first warm-up step's forward
    softmax: int  # explicit softmax calls of that step's forward: attention maps
    syncs: tuple[str, ...] = ()  # the synchronizing CUDA calls of the other warm-up steps (a step should make none)
    synced_steps: int = 0  # the steps checked for them (none off CUDA)


@dataclass(frozen=True)
class Compiled:
    """The supernet's training figures with compiled cells."""

    img_per_s: float
    warmup_s: float  # the untimed pass over every step, which compiles each call shape it meets
    graphs: int  # graphs compiled in that pass (forward and backward count once)
    shapes: dict[str, int]  # the space's call shapes per class, which sized the recompile limit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, batches: list[Batch], steps: list[int], device: torch.device) -> float:
    """Wall seconds of ``trainer.train_step`` at each of ``steps`` (the step counter pinned to each: it picks the
    supernet's path), cycling through ``batches``."""
    _sync(device)
    t = time.perf_counter()
    for i, step in enumerate(steps):
        trainer.step = step
        trainer.train_step(*batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - t


def host_syncs(trainer: Trainer, batches: list[Batch], steps: list[int]) -> tuple[str, ...]:
    """Runs ``steps`` with CUDA's sync debug mode on; returns the message of every call that made the host wait
    for the device (``Trainer.train_step`` should make none: the loop reads the loss at its sync points only)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_steps(trainer, batches, steps, trainer.env.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return tuple(m for m in (str(w.message).splitlines()[0] for w in seen) if is_sync_warning(m))


def is_sync_warning(message: str) -> bool:
    """Whether a warning of sync debug mode reports a synchronizing call (torch: "called a synchronizing CUDA
    operation"), not its own note that the mode "is a prototype feature", which the first H100 run counted."""
    return "called a synchronizing" in message


def timed_training(trainer: Trainer, batches: list[Batch], steps: list[int], warmup: int) -> Training:
    """``warmup`` untimed steps, the first with its kernels counted and on CUDA the others checked for host
    syncs, then the rest of ``steps`` timed."""
    device = trainer.env.device
    with OpCounter() as ops:
        run_steps(trainer, batches, steps[:1], device)
    if device.type == "cuda":
        syncs, checked = host_syncs(trainer, batches, steps[1:warmup]), len(steps[1:warmup])
    else:  # nothing to wait for: the CPU runs the ops as they come
        run_steps(trainer, batches, steps[1:warmup], device)
        syncs, checked = (), 0
    seconds = run_steps(trainer, batches, steps[warmup:], device)
    return Training(len(steps[warmup:]) * len(batches[0][1]) / seconds, ops.sdpa(), ops.counts["_softmax"], syncs,
                    checked)


def ops_of(arch: ArchSpec) -> Counter[str]:
    """Cells per op of an architecture."""
    return Counter(op for s in arch.stages for op in s.cells)


def mixed_steps(task: SupernetTask, n: int) -> list[int]:
    """The first ``n`` training steps whose path holds both a basic cell and a shared pair."""
    mixed = (t for t in itertools.count() if {"basic", "shared"} <= set(ops_of(task.sampler(t))))
    return list(itertools.islice(mixed, n))


def train_supernet(args: argparse.Namespace, data: DataBundle, env: DistEnv,
                   tmp: str) -> tuple[Training, Trainer, list[int]]:
    """The supernet's training step on ``args.preset`` paths with basic cells and shared pairs; returns the figures,
    the trainer and the steps run (the kernel-checked one, the warm-up ones, then the timed ones).

    Built as ``supernet.train.train`` builds it, then driven through ``Trainer.train_step``, the step `make supernet`
    runs on every batch (path sampling, bf16 autocast, gradient all-reduce, clipping, AdamW, lr schedule), as
    `make bench` drives it: ``Trainer.fit`` adds only what is not the step (a run-dir lock, TensorBoard, and a final
    checkpoint of the supernet and its AdamW state, about 1 GB for imagenet_tiny_2d) and takes no path choice.
    """
    total = args.warmup + args.steps
    cfg = _compose(f"space={args.preset}", f"data.batch_size={args.batch}", f"max_steps={total}",
                   f"device={args.device}", "amp=true", f"run_dir={tmp}/supernet")
    torch.manual_seed(cfg.seed)
    task = SupernetTask(Supernet(SearchSpace.from_config(cfg.space)).to(env.device), cfg, data, env)
    trainer = Trainer(task, data, cfg, env)
    task.net.train()
    steps = mixed_steps(task, total)
    return timed_training(trainer, data.train.batches, steps, args.warmup), trainer, steps


def compiled_training(trainer: Trainer, batches: list[Batch], steps: list[int], warmup: int) -> Compiled:
    """The same steps with the supernet's cells compiled: one untimed pass over all of ``steps`` compiles every call
    shape of their paths, then the steps after the first ``warmup`` are timed as in :func:`timed_training`."""
    from torch._dynamo.utils import counters

    device = trainer.env.device
    plan = compile_cells(trainer.task.net.train(), True, device)
    graphs = counters["stats"]["unique_graphs"]
    warmup_s = run_steps(trainer, batches, steps, device)
    seconds = run_steps(trainer, batches, steps[warmup:], device)
    return Compiled(len(steps[warmup:]) * len(batches[0][1]) / seconds, warmup_s,
                    counters["stats"]["unique_graphs"] - graphs, plan.shapes)


def train_deit(args: argparse.Namespace, space: SearchSpace, data: DataBundle, env: DistEnv,
               tmp: str) -> tuple[Training, int]:
    """timm's DeiT-Ti (random init) through retraining's task and the same ``Trainer.train_step``; returns the
    figures and its number of blocks."""
    import timm

    total = args.warmup + args.steps
    cfg = _compose("arch=gpu_check", f"data.batch_size={args.batch}", f"max_steps={total}", f"device={args.device}",
                   "amp=true", f"run_dir={tmp}/deit", app="retrain")
    torch.manual_seed(cfg.seed)
    model = timm.create_model(DEIT, pretrained=False, img_size=space.img_size, in_chans=space.in_chans,
                              num_classes=space.num_classes).to(env.device)
    arch = ArchSpec.load(CONF / "baselines" / "deit_tiny.json")  # only names the run (the task's identity)
    trainer = Trainer(RetrainTask(model, arch, "deit_tiny", cfg, data, env), data, cfg, env)
    model.train()
    return timed_training(trainer, data.train.batches, list(range(total)), args.warmup), len(model.blocks)


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
    _sync(env.device)
    t = time.perf_counter()
    scorer(archs[1:])
    _sync(env.device)
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


@dataclass(frozen=True)
class Figures:
    """Everything the report prints."""

    device: str
    backend: str
    batch: int
    supernet: Training
    compiled: Compiled | None  # the supernet with compiled cells (--compile)
    paths: list[ArchSpec]  # the kernel-checked path, then the timed ones
    deit: Training
    deit_blocks: int
    evals_per_s: float
    eval_images: int
    eval_batch: int
    peak_gib: float | None  # peak GPU memory allocated
    wall_s: float


def problems(f: Figures) -> list[str]:
    """What the kernel counts of the checked steps contradict, one line each."""
    out, checked = [], ops_of(f.paths[0])
    if sum(f.supernet.sdpa.values()) != checked["basic"]:
        out.append(f"supernet: {sum(f.supernet.sdpa.values())} fused SDPA calls for {checked['basic']} basic cells "
                   f"({dict(f.supernet.sdpa) or 'none: the math fallback'})")
    if f.supernet.softmax != checked["shared"]:
        out.append(f"supernet: {f.supernet.softmax} attention maps (softmax) for {checked['shared']} shared pairs")
    if sum(f.deit.sdpa.values()) != f.deit_blocks:
        out.append(f"{DEIT}: {sum(f.deit.sdpa.values())} fused SDPA calls for {f.deit_blocks} blocks")
    for name, t in (("supernet", f.supernet), (DEIT, f.deit)):
        if t.syncs:
            out.append(f"{name}: {len(t.syncs)} host syncs in {t.synced_steps} training steps (first: {t.syncs[0]})")
    return out


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def report(args: argparse.Namespace, f: Figures) -> None:
    """A few lines of context, then the markdown table to paste."""
    timed, checked = f.paths[1:], ops_of(f.paths[0])
    per_path = {op: statistics.fmean(ops_of(a)[op] for a in timed) for op in ("basic", "shared")}
    amp = "bf16 autocast" if args.device == "cuda" else "fp32 (autocast is CUDA-only)"
    deit_macs = fmt_macs(macs(ArchSpec.load(CONF / "baselines" / "deit_tiny.json")))
    print(f"gpu-check: {f.device}, torch {torch.__version__} (CUDA {torch.version.cuda}), 1-process torchrun, "
          f"backend {f.backend} (all_reduce ok), {amp}; FLOPs are MACs")
    print(f"  {args.preset} supernet: {args.steps} timed steps after {args.warmup}, batch {f.batch}, synthetic data; "
          f"each path has basic cells and shared pairs ({per_path['basic']:.1f} and {per_path['shared']:.1f} on "
          f"average), {fmt_macs(statistics.fmean(macs(a) for a in timed))} MACs/img on average")
    print(f"  attention in one step: fused SDPA ({', '.join(sorted(f.supernet.sdpa)) or 'none'}) "
          f"{sum(f.supernet.sdpa.values())} calls for {checked['basic']} basic cells; {f.supernet.softmax} attention "
          f"maps for {checked['shared']} shared pairs; {DEIT}: {sum(f.deit.sdpa.values())} fused SDPA calls for "
          f"{f.deit_blocks} blocks")
    print(f"  DeiT-Ti: timm {DEIT} ({deit_macs} MACs/img at 224x224), pretrained=False, the same Trainer.train_step "
          f"(retraining's task); search: {args.evals} inherited-weight evaluations of {f.eval_images} synthetic "
          f"validation images (batch {f.eval_batch})")
    if f.supernet.synced_steps:
        print(f"  host syncs (torch.cuda.set_sync_debug_mode) in {f.supernet.synced_steps} warm-up steps: supernet "
              f"{len(f.supernet.syncs)}, {DEIT} {len(f.deit.syncs)}")
    c = f.compiled
    if c is None:
        print(f"  compiled cells: not measured (--compile {args.compile}; auto compiles on CUDA only)")
    else:
        shapes = ", ".join(f"{n} {name}" for name, n in c.shapes.items())
        print(f"  compiled cells (torch.compile per cell and pooling, dynamic=False): {c.graphs} graphs compiled in "
              f"an untimed pass of {c.warmup_s:.0f} s over the {args.warmup + args.steps} steps' paths (the space "
              f"has {shapes} call shapes), then the same {args.steps} timed steps: "
              f"{c.img_per_s / f.supernet.img_per_s:.2f}x eager")
    print(f"  wall {f.wall_s:.0f} s" + ("" if f.peak_gib is None else f", peak GPU memory {f.peak_gib:.1f} GiB "
                                         "(eager)"))
    print("| device | torch | batch | supernet img/s | compiled img/s | DeiT-Ti img/s | supernet / DeiT-Ti | "
          "search evals/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {f.device} | {torch.__version__} | {f.batch} | {_rate(f.supernet.img_per_s)} | "
          f"{'-' if c is None else _rate(c.img_per_s)} | {_rate(f.deit.img_per_s)} | "
          f"{f.supernet.img_per_s / f.deit.img_per_s:.2f} | {f.evals_per_s:.1f} |")


def worker(args: argparse.Namespace) -> int:
    """The torchrun worker: measures, and rank 0 reports; returns 1 when a kernel count contradicts the model."""
    start = time.perf_counter()
    with distributed(args.device) as env, tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        backend = check_collective(env)
        space = SearchSpace.from_config(_compose(f"space={args.preset}").space)
        loader = SyntheticLoader(synthetic_batches([args.batch] * 2, space, env.device, seed=0),
                                 args.warmup + args.steps)
        data = DataBundle("synthetic", loader, None, None, space.img_size, space.in_chans, space.num_classes)
        supernet, trainer, steps = train_supernet(args, data, env, tmp)
        paths = [trainer.task.sampler(t) for t in steps[:1] + steps[args.warmup:]]
        deit, blocks = train_deit(args, space, data, env, tmp)
        evals_per_s, images, per_batch = search_rate(trainer.task.net, space, args, env)
        cuda, threads = env.device.type == "cuda", torch.get_num_threads()
        name = torch.cuda.get_device_name(env.device) if cuda else f"CPU, {threads} thread{'s' * (threads > 1)}"
        peak = torch.cuda.max_memory_allocated(env.device) / 2**30 if cuda else None
        compiled = None
        if compile_wanted(args.compile, env.device):  # last: the search above scored the eager supernet
            compiled = compiled_training(trainer, data.train.batches, steps, args.warmup)
        f = Figures(name, backend, args.batch, supernet, compiled, paths, deit, blocks, evals_per_s, images,
                    per_batch, peak, time.perf_counter() - start)
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
