"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: without CUDA it prints one line and exits 0; its CPU
dry mode runs the same code path (the launcher, a 1-process torchrun on gloo, the supernet's warm-up and steady
state, the extracted paths, the PSViT and timm DeiT-Ti training steps, the profiles, the search's scorer) and prints
consistent figures; the warm-up sees every call shape of a space; compiled timing compiles every model; a kernel
count that contradicts the model fails."""

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
from bench.gpu_report import Kernels, Run
from bench.synthetic import synthetic_data
from space.space import SearchSpace
from supernet.engine.distributed import DistEnv
from supernet.model.psvit import PSViT

TINY = {"name": "tiny", "pooling": "2d", "img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]}

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


DRY = ["--device", "cpu", "--preset", "cifar_2d", "--steps", "2", "--paths", "1", "--extracted-steps", "1",
       "--profile-steps", "1", "--evals", "2", "--batch", "4"]  # the smallest RGB preset: imagenet_tiny_2d's code path


def test_cpu_dry_mode_runs_through_the_launcher_and_prints_consistent_figures(forkserver):
    r = forkserver.run([sys.executable, "-m", "bench.gpu_check", *DRY], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.startswith(f"gpu-check: CPU, 1 thread, torch {torch.__version__}")
    assert "1-process torchrun, backend gloo (all_reduce ok)" in out
    warm, covered, total, first = map(int, re.search(
        r"entangle=dense, batch 4, synthetic data: (\d+) warm-up steps \((\d+) of the space's (\d+) call shapes "
        r"seen\): (\d+) met a first-seen shape", out).groups())
    assert warm == 3 and first >= 1 and 0 < covered <= total  # --warmup-max 3 on the CPU: the warm-up is stated
    sdpa, basic, maps, shared, deit, blocks = map(int, re.search(
        r"fused SDPA \(_scaled_dot_product_\w+\) (\d+) calls for (\d+) basic cells; (\d+) attention maps for (\d+) "
        r"shared pairs; deit_tiny_patch16_224: (\d+) fused SDPA calls for (\d+) blocks", out).groups())
    assert sdpa == basic > 0 and maps == shared > 0 and deit == blocks == 12
    assert "compiled: not measured (--compile auto; auto compiles on CUDA only)" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and " | no | " in line}
    assert set(rows) == {"supernet, sampled paths", "supernet, the extracted paths", "the same paths, extracted",
                         "PSViT, DeiT-Ti spec", "timm deit_tiny_patch16_224"}
    assert rows["supernet, sampled paths"][2] == "2" and rows["the same paths, extracted"][2] == "1"
    assert rows["PSViT, DeiT-Ti spec"][4] == rows["timm deit_tiny_patch16_224"][4]  # the same MACs/img
    assert rows["timm deit_tiny_patch16_224"][6] == "1.00"
    gmacs = {k: float(v[5]) for k, v in rows.items()}
    per_mac, deit_ratio = map(float, re.search(r"eager: supernet / extracted per MAC ([\d.]+) \(goal >= 0.9\); "
                                               r"PSViT DeiT-Ti / timm DeiT-Ti img/s ([\d.]+)", out).groups())
    assert per_mac == pytest.approx(gmacs["supernet, the extracted paths"] / gmacs["the same paths, extracted"],
                                    rel=0.02, abs=0.01)
    profiled = [line for line in out.splitlines() if line.startswith("| ") and " | - | aten::" in line]
    assert len(profiled) == 4  # a profile row per eager model: wall, host, no kernel time off CUDA, top ops
    header, rule, row = out.splitlines()[-3:]
    assert header.startswith("| device | torch | batch | supernet / extracted per MAC | PSViT DeiT-Ti / timm DeiT-Ti")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["CPU, 1 thread", torch.__version__, "4"] and cells[5:7] == ["-", "-"]
    assert float(cells[3]) == per_mac and float(cells[4]) == deit_ratio and float(cells[8]) > 0


def test_the_warm_up_sees_every_call_shape_and_steady_steps_meet_none_new(tmp_path):
    """On a tiny space the warm-up runs until every call shape of the space was met (each step that met one is
    counted as first-seen), so the steps after it meet only seen shapes; a path's shapes are among the space's."""
    from bench.gpu_steady import path_shapes, space_shapes, warm_up

    from supernet.engine.loop import Trainer
    from supernet.model.supernet import Supernet
    from supernet.train import SupernetTask

    space, env = SearchSpace.from_config(TINY), DistEnv(0, 1, 0, torch.device("cpu"))
    data = synthetic_data(space, 2, env.device, length=1000)
    cfg = gpu_check._compose("data.batch_size=2", "max_steps=100000", f"run_dir={tmp_path}")
    trainer = Trainer(SupernetTask(Supernet(space), cfg, data, env), data, cfg, env)
    every = space_shapes(space)
    assert all(path_shapes(space.sample(random.Random(s))) <= every for s in range(50))
    warm = warm_up(trainer, data.train.batches, at_least=1, at_most=500)
    seen = set().union(*(path_shapes(trainer.task.sampler(t)) for t in range(warm.steps)))
    assert seen == every and warm.covered == warm.total == len(every)
    firsts = sum(not path_shapes(trainer.task.sampler(t)) <= set().union(
        *(path_shapes(trainer.task.sampler(u)) for u in range(t))) for t in range(warm.steps))
    assert warm.first_seen == firsts and warm.steps > warm.first_seen > 1
    assert not path_shapes(trainer.task.sampler(warm.steps - 1)) <= set().union(
        *(path_shapes(trainer.task.sampler(u)) for u in range(warm.steps - 1)))  # it stopped at the last new shape


def test_a_math_fallback_a_missing_attention_map_or_a_host_sync_is_a_failure():
    space = SearchSpace.from_config(gpu_check._compose("space=cifar_2d").space)
    arch = next(a for a in (space.sample(random.Random(s)) for s in range(100))
                if {"basic", "shared"} <= set(gpu_check.ops_of(a)))
    cells = gpu_check.ops_of(arch)

    def figures(sdpa: int, softmax: int, deit: int, syncs: tuple[str, ...] = ()) -> gpu_check.Figures:
        fused = Counter({"_scaled_dot_product_flash_attention": sdpa} if sdpa else {})
        run = Run(supernet_kernels=Kernels(fused, softmax, syncs, 4 if syncs else 0), checked=arch,
                  deit_kernels=Kernels(Counter({"_scaled_dot_product_flash_attention": deit}), 0), deit_blocks=12)
        return gpu_check.Figures("GPU", "nccl", 8, run, 1.0, 8, 8, None, 1.0)

    assert gpu_check.problems(figures(cells["basic"], cells["shared"], 12)) == []
    bad = gpu_check.problems(figures(0, cells["shared"] - 1, 11))
    assert len(bad) == 3
    assert bad[0] == f"supernet: 0 fused SDPA calls for {cells['basic']} basic cells (none: the math fallback)"
    assert "attention maps (softmax)" in bad[1] and bad[2].startswith("deit_tiny_patch16_224: 11 fused SDPA calls")
    synced = figures(cells["basic"], cells["shared"], 12, ("called a synchronizing op",) * 2)
    assert gpu_check.problems(synced) == ["supernet: 2 host syncs in 4 training steps (first: called a synchronizing "
                                          "op)"]


def test_compiled_timing_compiles_every_model_and_reruns_the_same_steps(monkeypatch, tmp_path):
    """``--compile``: the supernet's cells and poolings are compiled as the apps compile them, then its timed steps
    run once untimed (compiling the shapes of their paths) and again timed; the extracted
    paths and the PSViT DeiT-Ti spec compile their cells, timm's model compiles whole (the CPU cannot afford
    inductor here: nn.Module.compile is replaced by a recorder)."""
    from bench.gpu_report import Run as RunRecord
    from supernet.engine import compile as compile_module

    compiled: Counter[str] = Counter()
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.update([type(self).__name__]))
    monkeypatch.setattr(compile_module, "_entries", Counter())
    args = gpu_check.parse_args(["--device", "cpu", "--preset", "cifar_2d", "--steps", "2", "--paths", "1",
                                 "--extracted-steps", "1", "--batch", "2", "--compile", "true"])
    assert args.compile is True and args.warmup == 1 and args.warmup_max == 3
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    space = SearchSpace.from_config(gpu_check._compose("space=cifar_2d").space)
    data = synthetic_data(space, 2, env.device, length=1000)
    trainers = {"supernet": gpu_check.supernet_trainer(args, data, env, str(tmp_path))}
    run = RunRecord()
    gpu_check.measure_supernet(args, trainers["supernet"], run)
    for name, model in (("psvit_deit", PSViT(gpu_check.deit_spec(space))), ("timm_deit", gpu_check.timm_deit(space))):
        trainers[name] = gpu_check.retrain_trainer(model, gpu_check.deit_spec(space), args, data, env, str(tmp_path))
    ran: list[int] = []
    step = trainers["supernet"].train_step
    monkeypatch.setattr(trainers["supernet"], "train_step",
                        lambda *a: (ran.append(trainers["supernet"].step), step(*a))[1])
    gpu_check.measure_compiled(args, trainers, run, str(tmp_path))
    path = gpu_check.ops_of(trainers["supernet"].task.sampler(run.steady[0]))  # the extracted one
    assert dict(compiled) == {"BasicCell": 18 + path["basic"] + 12, "SharedPair": 18 + path["shared"],
                              "Pool2d": 2 + 2, "VisionTransformer": 1}  # supernet, extracted, DeiT spec, timm
    assert ran == run.steady[:2] + run.steady[:2]
    assert {k for k in run.rates if k[1]} == {(m, True) for m in ("supernet", "same_paths", "extracted",
                                                                     "psvit_deit", "timm_deit")}
    assert run.rates["supernet", True].steps == 2 and run.rates["extracted", True].steps == 1
    assert run.compiled_note.startswith("an untimed pass over the timed steps compiled their shapes in ")


def test_only_synchronizing_calls_count_as_host_syncs():
    """torch's own note on enabling the mode is not a sync (the first H100 run failed on it with 0 real syncs)."""
    assert gpu_check.is_sync_warning("called a synchronizing CUDA operation (Triggered internally at Module.cpp:92.)")
    assert not gpu_check.is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect "
                                         "all synchronizing operations (Triggered internally at Module.cpp:1003.)")
