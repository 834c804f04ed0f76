"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: without CUDA it prints one line and exits 0; its CPU
dry mode runs the same code path (the launcher, a 1-process torchrun on gloo, the supernet and DeiT-Ti training
steps, the search's scorer) and prints consistent figures; a kernel count that contradicts the model fails."""

from __future__ import annotations

import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.synthetic import SyntheticLoader, synthetic_batches

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_it_prints_one_line_and_exits_0(run_module, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run_module("bench.gpu_check")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == (f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False); "
                        "nothing to check\n")


def test_unknown_preset_is_refused_before_any_work(run_module):
    r = run_module("bench.gpu_check", "--device", "cpu", "--preset", "nope")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: --preset: 'nope' is not in conf/space "
                                                                   "(allowed: ")
    assert "imagenet_tiny_2d" in r.stderr


def test_cpu_dry_mode_runs_through_the_launcher_and_prints_consistent_figures(forkserver):
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--steps", "2", "--evals", "2", "--batch", "4",
           "--preset", "cifar_2d"]  # the smallest RGB preset: the code path of imagenet_tiny_2d, in a few seconds
    r = forkserver.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.startswith(f"gpu-check: CPU, 1 thread, torch {torch.__version__}")
    assert "1-process torchrun, backend gloo (all_reduce ok)" in out
    sdpa, basic, maps, shared, deit, blocks = map(int, re.search(
        r"fused SDPA \(_scaled_dot_product_\w+\) (\d+) calls for (\d+) basic cells; (\d+) attention maps for (\d+) "
        r"shared pairs; deit_tiny_patch16_224: (\d+) fused SDPA calls for (\d+) blocks", out).groups())
    assert sdpa == basic > 0 and maps == shared > 0 and deit == blocks == 12
    assert "2 timed steps after 1, batch 4" in out and "2 inherited-weight evaluations of 4 synthetic" in out
    assert "compiled cells: not measured (--compile auto; auto compiles on CUDA only)" in out
    header, rule, row = out.splitlines()[-3:]
    assert header.startswith("| device | torch | batch | supernet img/s | compiled img/s |")
    assert rule.startswith("| --- |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["CPU, 1 thread", torch.__version__, "4"] and cells[4] == "-"
    supernet, deit_rate, ratio, evals = map(float, cells[3:4] + cells[5:])
    assert supernet > 0 and deit_rate > 0 and evals > 0
    assert ratio == pytest.approx(supernet / deit_rate, rel=0.02, abs=0.01)  # rates printed to 3 digits


def test_a_math_fallback_a_missing_attention_map_or_a_host_sync_is_a_failure():
    from space.space import SearchSpace

    space = SearchSpace.from_config(gpu_check._compose("space=cifar_2d").space)
    arch = next(a for a in (space.sample(random.Random(s)) for s in range(100))
                if {"basic", "shared"} <= set(gpu_check.ops_of(a)))
    cells = gpu_check.ops_of(arch)

    def figures(sdpa: int, softmax: int, deit: int) -> gpu_check.Figures:
        fused = Counter({"_scaled_dot_product_flash_attention": sdpa} if sdpa else {})
        run = gpu_check.Training(100.0, fused, softmax)
        deit_run = gpu_check.Training(100.0, Counter({"_scaled_dot_product_flash_attention": deit}), 0)
        return gpu_check.Figures("GPU", "nccl", 8, run, None, [arch, arch], deit_run, 12, 1.0, 8, 8, None, 1.0)

    assert gpu_check.problems(figures(cells["basic"], cells["shared"], 12)) == []
    bad = gpu_check.problems(figures(0, cells["shared"] - 1, 11))
    assert len(bad) == 3
    assert bad[0] == f"supernet: 0 fused SDPA calls for {cells['basic']} basic cells (none: the math fallback)"
    assert "attention maps (softmax)" in bad[1] and bad[2].startswith("deit_tiny_patch16_224: 11 fused SDPA calls")
    f = figures(cells["basic"], cells["shared"], 12)
    synced = gpu_check.Training(100.0, f.supernet.sdpa, f.supernet.softmax, ("called a synchronizing op",) * 2, 4)
    assert gpu_check.problems(gpu_check.Figures(*[synced if v is f.supernet else v for v in vars(f).values()])) == \
        ["supernet: 2 host syncs in 4 training steps (first: called a synchronizing op)"]


def test_compiled_timing_compiles_the_supernet_cells_and_reruns_the_same_steps(monkeypatch, tmp_path):
    """``--compile``: the supernet's cells and poolings are compiled as the apps compile them, then every step runs
    once untimed (compiling the shapes of its path) and the timed steps again (the CPU cannot afford inductor
    here: nn.Module.compile is replaced by a recorder)."""
    from space.space import SearchSpace
    from supernet.data import DataBundle
    from supernet.engine import compile as compile_module
    from supernet.engine.distributed import DistEnv

    compiled: Counter[str] = Counter()
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.update([type(self).__name__]))
    monkeypatch.setattr(compile_module, "_entries", Counter())
    args = gpu_check.parse_args(["--device", "cpu", "--preset", "cifar_2d", "--steps", "2", "--batch", "2",
                                 "--compile", "true"])
    assert args.compile is True and args.warmup == 1
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    space = SearchSpace.from_config(gpu_check._compose("space=cifar_2d").space)
    loader = SyntheticLoader(synthetic_batches([2, 2], space, env.device, seed=0), 3)
    data = DataBundle("synthetic", loader, None, None, space.img_size, space.in_chans, space.num_classes)
    _, trainer, steps = gpu_check.train_supernet(args, data, env, str(tmp_path))
    ran: list[int] = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a: (ran.append(trainer.step), step(*a))[1])
    c = gpu_check.compiled_training(trainer, data.train.batches, steps, args.warmup)
    assert dict(compiled) == {"BasicCell": 18, "SharedPair": 18, "Pool2d": 2} and trainer.task.net.training
    assert ran == steps + steps[1:] and len(steps) == 3
    assert c.img_per_s > 0 and c.warmup_s > 0 and c.graphs == 0
    assert c.shapes == {"BasicCell": 11, "SharedPair": 11, "Pool2d": 24}


def test_only_synchronizing_calls_count_as_host_syncs():
    """torch's own note on enabling the mode is not a sync (the first H100 run failed on it with 0 real syncs)."""
    assert gpu_check.is_sync_warning("called a synchronizing CUDA operation (Triggered internally at Module.cpp:92.)")
    assert not gpu_check.is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect "
                                         "all synchronizing operations (Triggered internally at Module.cpp:1003.)")
