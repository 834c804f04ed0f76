"""Supernet training options that rank better (issue: trustworthy search): the sandwich rule's paths, the
step's gradient as the mean over its paths with in-place distillation from the largest path, the options'
one-line errors, and an exact resume of a sandwich + distillation run after a crash. Runs on a tiny space and
generated IDX files, so it needs no dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from space.cost import macs
from space.errors import UserError
from space.samplers import SandwichSampler, UniformSampler, make_sampler
from space.space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]}


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=list(overrides))


def test_sandwich_paths_are_largest_smallest_then_random_from_seed_and_step():
    space = SearchSpace.from_config(TINY)
    s = SandwichSampler(space, seed=3, n=2)
    lo, hi = space.macs_range()
    for step in range(5):
        paths = s.paths(step)
        assert len(paths) == 4 and macs(paths[0]) == hi and macs(paths[1]) == lo
        assert all(space.contains(p) for p in paths)
        assert paths == SandwichSampler(space, seed=3, n=2).paths(step)  # a pure function of (seed, step)
    assert {s.paths(t)[2] for t in range(20)} != {s.paths(0)[2]}  # the random ones change with the step
    assert make_sampler("uniform", space, 3).paths(7) == [UniformSampler(space, 3)(7)]
    with pytest.raises(UserError, match=r"sampler: unknown sampler 'nope' \(allowed: uniform, flops_bins, sandwich\)"):
        make_sampler("nope", space, 0)


@pytest.mark.parametrize("distill, weight", [("none", 1.0), ("inplace", 0.5), ("inplace", 1.0)])
def test_sandwich_step_gradient_is_the_mean_over_paths_with_inplace_distillation(distill, weight):
    """SupernetTask.backward against the loss written out by hand: mean over the step's paths of
    cross-entropy (label smoothing 0.1), the non-largest paths mixing in the largest path's softmax."""
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import LossBackward
    from supernet.model.supernet import Supernet
    from supernet.train import SupernetTask

    torch.manual_seed(0)
    space = SearchSpace.from_config(TINY)
    net = Supernet(space)
    cfg = _cfg("sampler=sandwich", "sandwich_n=2", f"distill={distill}", f"distill_weight={weight}")
    task = SupernetTask(net, cfg, None, DistEnv(0, 1, 0, torch.device("cpu")))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    got = task.backward(x, y, 4, LossBackward(torch.device("cpu"), False, 0.1))
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)

    paths = SandwichSampler(space, cfg.seed, 2).paths(4)
    assert task.paths == paths
    teacher = net(x, paths[0]).detach().softmax(-1)
    losses = []
    for i, p in enumerate(paths):
        logits = net(x, p)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        if distill == "inplace" and i > 0:
            loss = (1 - weight) * loss + weight * F.cross_entropy(logits, teacher)
        losses.append(loss)
    want = torch.stack(losses).mean()
    want.backward()
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-6)
    ref = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys()
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("overrides, message", [
    (["distill=inplace"], "distill: inplace needs sampler=sandwich"),
    (["sampler=sandwich", "distill=soft"], "distill: 'soft' is not allowed (allowed: none, inplace)"),
    (["sampler=sandwich", "distill=inplace", "distill_weight=1.5"],
     "distill_weight: 1.5 is not allowed (allowed: a number in [0, 1])"),
    (["sampler=sandwich", "sandwich_n=-1"], "sandwich_n: -1 is not allowed (allowed: an integer >= 0)"),
])
def test_bad_sandwich_options_are_one_line_and_write_nothing(tmp_path, overrides, message):
    from supernet.train import train

    with pytest.raises(UserError) as e:
        train(_cfg(f"run_dir={tmp_path / 'run'}", "max_steps=1", *overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entangle", ["dense", "slice"])
def test_sandwich_distill_run_resumes_exactly_after_a_crash(tmp_path, fake_fmnist, monkeypatch, entangle):
    """A run that dies between checkpoints (here an exception at step 3, checkpoints every 2) resumes from
    step 2 and ends with the weights, optimizer state and path digest of an uninterrupted run; with
    entangle=slice too (each step merges its paths' sizes, SliceAdamW's state goes through the checkpoint)."""
    from supernet.engine.loop import Trainer
    from supernet.train import train

    torch.set_num_threads(1)
    root = fake_fmnist(tmp_path / "data", n_train=80, n_test=10)
    args = [f"data.root={root}", "data.val_size=16", "data.batch_size=16", "max_steps=5", "ckpt_every=2",
            "eval.every=0", "progress=false", "sampler=sandwich", "sandwich_n=1", "distill=inplace",
            "distill_weight=0.7", "device=cpu", f"entangle={entangle}"]
    ref = train(_cfg(f"run_dir={tmp_path / 'ref'}", *args))
    space = SearchSpace.from_config(_cfg().space)
    import hashlib
    digest = ""
    for t in range(5):
        for p in SandwichSampler(space, 0, 1).paths(t):
            digest = hashlib.sha256((digest + p.to_json()).encode()).hexdigest()
    assert ref.paths_digest == digest

    step = Trainer.train_step

    def crash_at_3(self, *a, **k):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(f"run_dir={tmp_path / 'run'}", *args))
    monkeypatch.setattr(Trainer, "train_step", step)
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["step"] == 2
    res = train(_cfg(f"run_dir={tmp_path / 'run'}", *args))
    assert res.step == 5 and res.paths_digest == ref.paths_digest and res.losses == ref.losses[2:]
    a, b = (torch.load(tmp_path / d / "last.ckpt", weights_only=False) for d in ("ref", "run"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items()), i


def test_flops_bins_spreads_its_steps_over_many_paths_and_its_bins_evenly():
    """2000 steps on fmnist_2d: no path gets more than 3 of them (before: one path got 214, 10.7%, from the
    fallback pool of a sparse end bin) and every merged bin gets its uniform share; every bin holds at least
    min_share of the probe samples, so the fallback pool is never one or two paths."""
    from collections import Counter

    from omegaconf import OmegaConf

    from space.samplers import FlopsBinsSampler
    from space.space import SearchSpace

    space = SearchSpace.from_config(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "space"
                                                   / "fmnist_2d.yaml"))
    s = FlopsBinsSampler(space, 0)
    assert min(len(v) for v in s.pool.values()) >= s.min_share * s.probe and 2 <= len(s.pool) <= 10
    paths = [s(step) for step in range(2000)]
    assert max(Counter(p.to_json() for p in paths).values()) <= 3
    per_bin = Counter(s.bin_of(p) for p in paths)
    expected = 2000 / len(s.pool)
    assert set(per_bin) == set(s.pool) and all(abs(n - expected) < 4 * expected ** 0.5 for n in per_bin.values())
    assert [s(7) for _ in range(2)] == [paths[7]] * 2  # a step's path depends on (seed, step) alone
