"""The training loop on a GPU's terms (engine/loop.py, engine/checkpoint.py), checked on the CPU: a step never
waits for the device and a sync point reads it once; sync points fall every ``log_every`` steps, before every
checkpoint and at the end; path MACs are counted for logged steps only; the per-step history and the supernet's
path-check memo are bounded; a checkpoint holds the state of its own step although it is written in the
background while training goes on, one write at a time, a failed write surfacing in one line; ``ckpt_minutes`` is
decided by rank 0's clock and, like a stop that only one rank received, acted on by every rank at the same step.
Runs on generated IDX files."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from space.errors import UserError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"name": "tiny", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, fake_fmnist) -> Path:
    return fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=200, n_test=10)


def _cfg(app: str, run_dir: Path, root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(app, overrides=[f"run_dir={run_dir}", f"data.root={root}", "data.val_size=16",
                                       "data.batch_size=8", "eval.every=0", "progress=false", "device=cpu",
                                       *overrides])


def _supernet_trainer(run_dir: Path, root: Path, *overrides: str):
    """A real supernet `Trainer` (fmnist_2d, batch 8) with its task; nothing is written before `fit`."""
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import Trainer
    from supernet.model.supernet import Supernet
    from supernet.train import SupernetTask
    from space.space import SearchSpace

    cfg = _cfg("supernet", run_dir, root, "eval.max_batches=2", "data.eval_batch_size=8", *overrides)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    data = build_data(cfg.data)
    torch.manual_seed(0)
    task = SupernetTask(Supernet(SearchSpace.from_config(cfg.space)), cfg, data, env)
    return Trainer(task, data, cfg, env), task


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device: a scalar read (``.item()``, ``float()``, ``int()``,
    ``bool()`` all dispatch ``_local_scalar_dense``) and ``.tolist()`` (which does not dispatch, so it is wrapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self._tolist = torch.Tensor.tolist

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.reads["scalar"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        def tolist(t):
            self.reads["tolist"] += 1
            return self._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_a_training_step_waits_for_nothing_and_a_sync_point_or_top1_reads_the_device_once(tmp_path, root):
    from supernet.engine.loop import top1

    from supernet.engine.optim import build_optimizer

    trainer, task = _supernet_trainer(tmp_path, root, "optim.grad_clip=1.0")
    # AdamW as the recipe builds it on CUDA (fused, which runs on the CPU too): the CPU's default single-tensor
    # AdamW reads every step count on the host, the fused one reads none
    trainer.opt, trainer.sched = build_optimizer(task.net, trainer.cfg.optim, 8, trainer.steps_per_epoch,
                                                 trainer.total, torch.device("cuda"))
    trainer._interval = type(trainer._interval)(4, trainer.env.device, 0)
    batches = list(trainer.data.train.epoch(0))
    with HostReads() as steps:
        for x, y in batches[:3]:
            trainer._interval.add(trainer.train_step(x, y))  # clipping on: its norm is not read either
    assert steps.reads == Counter()
    with HostReads() as sync:
        point = trainer.sync(False)
    assert sync.reads == Counter({"tolist": 1}) and len(point.losses) == len(point.grad_norms) == 3
    assert not point.stop and not point.checkpoint
    arch = task.tracked["max"]
    val = list(trainer.data.val)
    assert len(val) == 2
    with HostReads() as acc:
        top1(lambda x: task.net(x, arch), val, trainer.env)
    assert acc.reads == Counter({"tolist": 1})  # not one read per batch


def test_sync_points_path_macs_and_the_bounded_history(tmp_path, root, monkeypatch):
    """7 steps, log_every 3, ckpt_every 2: sync points at 2 (checkpoint), 3 (log), 4, 6 and 7 (the end), path MACs
    counted for the logged steps 3, 6 and 7 only; with KEPT_STEPS = 3 the result keeps the last 3 steps' values."""
    import supernet.engine.loop as L
    import supernet.train as T

    syncs, macs_calls, real_sync, real_macs = [], [], L.Trainer.sync, T.macs
    monkeypatch.setattr(L.Trainer, "sync", lambda self, stop: syncs.append(self.step) or real_sync(self, stop))
    monkeypatch.setattr(T, "macs", lambda arch: macs_calls.append(arch) or real_macs(arch))
    args = ("max_steps=7", "log_every=3", "ckpt_every=2", "optim.grad_clip=1.0")
    full = T.train(_cfg("supernet", tmp_path / "full", root, *args))
    assert syncs == [2, 3, 4, 6, 7]
    assert len(macs_calls) == 3  # uniform sampling: one path a step
    assert len(full.losses) == len(full.grad_norms) == 7 and len(set(full.losses)) == 7

    monkeypatch.setattr(L, "KEPT_STEPS", 3)
    capped = T.train(_cfg("supernet", tmp_path / "capped", root, *args))
    assert capped.losses == full.losses[-3:] and capped.grad_norms == full.grad_norms[-3:]


def _retrain_trainer(run_dir: Path, root: Path):
    """A real retraining `Trainer` of the small DeiT-like baseline."""
    from space.arch import ArchSpec
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import Trainer
    from supernet.engine.standalone import RetrainTask
    from supernet.model.psvit import PSViT

    arch = ArchSpec.load(REPO / "conf" / "baselines" / "deit_fmnist.json")
    cfg = _cfg("retrain", run_dir, root, f"arch={REPO / 'conf' / 'baselines' / 'deit_fmnist.json'}", "max_steps=20")
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    data = build_data(cfg.data)
    torch.manual_seed(0)
    task = RetrainTask(PSViT(arch), arch, "deit", cfg, data, env)
    return Trainer(task, data, cfg, env)


def test_a_background_save_writes_its_own_steps_state_one_write_at_a_time(tmp_path, root, monkeypatch):
    """Writes held back until more steps have changed the weights in place still hold the state of the step they
    were asked at; the second save waits for the first write."""
    import supernet.engine.checkpoint as C

    trainer = _retrain_trainer(tmp_path, root)
    gate, events, written, real = threading.Event(), [], [], C.save_checkpoint

    def held_back(state, path):
        events.append(f"start {state['step']}")
        gate.wait(timeout=60)
        real(state, path)
        written.append(torch.load(path, weights_only=True))
        events.append(f"end {state['step']}")

    monkeypatch.setattr(C, "save_checkpoint", held_back)
    batches = iter(trainer.data.train.epoch(0))

    def steps(n: int) -> dict:
        for _ in range(n):
            trainer.train_step(*next(batches))
        return {"model": {k: v.clone() for k, v in trainer.task.net.state_dict().items()},
                "exp_avg": [s["exp_avg"].clone() for s in trainer.opt.state.values()]}

    at2 = steps(2)
    trainer.save()
    at5 = steps(3)
    assert events == ["start 2"] and not written  # training went on while the write waits
    threading.Timer(0.3, gate.set).start()
    trainer.save()  # waits for the write of step 2 first
    assert events[:2] == ["start 2", "end 2"]
    trainer.checkpoints.wait()
    assert events == ["start 2", "end 2", "start 5", "end 5"]
    for ck, want in zip(written, (at2, at5)):
        for k, v in want["model"].items():
            assert torch.equal(ck["model"][k], v), (ck["step"], k)
        assert all(torch.equal(s["exp_avg"], m) for s, m in zip(ck["optimizer"]["state"].values(), want["exp_avg"]))
    assert any(not torch.equal(at2["model"][k], at5["model"][k]) for k in at2["model"])


def test_a_failed_background_write_surfaces_in_one_line_at_the_next_save(tmp_path, root, monkeypatch):
    import supernet.engine.checkpoint as C

    trainer = _retrain_trainer(tmp_path, root)
    real, calls = C.torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch, "save", full_disk)
    x, y = next(iter(trainer.data.train.epoch(0)))
    for _ in range(3):
        trainer.train_step(x, y)
        if trainer.step < 3:
            trainer.save()  # the write of step 2 fails in the background: save() returns
    with pytest.raises(UserError) as e:
        trainer.save()
    assert str(e.value) == f"{tmp_path / 'last.ckpt'}: no space left on device writing it; the previous last.ckpt is " \
                           "intact"
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 1


def test_the_path_check_memo_is_bounded(monkeypatch):
    import random

    from space.arch import ArchError
    from space.space import SearchSpace
    from supernet.model.supernet import Supernet

    space = SearchSpace.from_config(TINY)
    net = Supernet(space)
    monkeypatch.setattr(net, "checked_paths", 3)
    rng = random.Random(0)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(50)))[:5]
    for a in archs:
        net.check(a)
    net.check(archs[2])  # used again: the most recent
    assert list(net._checked) == [archs[3], archs[4], archs[2]]
    other = SearchSpace.from_config({**TINY, "num_classes": 5}).extreme("max")
    with pytest.raises(ArchError, match="not in space 'tiny'"):  # a path of another space is still refused
        net.check(other)
    assert other not in net._checked


# ----------------------------------------------------------------------------- 2 gloo ranks
def _minutes_worker(rank: int, port: int, run_dir: str, root: str, out_dir: str) -> None:
    """Rank 0's clock reads 60 s per step, rank 1's a billion (it would want a checkpoint at every sync point);
    rank 1 alone receives SIGTERM after step 7."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.engine.loop import Trainer
    from supernet.train import train

    saves, real_save, real_step = [], Trainer.save, Trainer.train_step

    def save(self):
        saves.append(self.step)
        real_save(self)

    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        if rank == 1 and self.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    Trainer.save, Trainer.train_step = save, train_step
    Trainer.clock = (lambda self: 60.0 * self.step) if rank == 0 else (lambda self: 1e9 * self.step)
    res = train(_cfg("supernet", Path(run_dir), Path(root), "max_steps=12", "log_every=2", "ckpt_every=1000",
                     "ckpt_minutes=2.5"))
    torch.save({"saves": saves, "step": res.step, "stopped": res.stopped, "losses": res.losses},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ckpt_minutes_is_rank_0s_clock_and_every_rank_saves_and_stops_at_the_same_steps(tmp_path, root, fork_ranks,
                                                                                      free_port):
    """Sync points at 2, 4, 6, 8: rank 0's clock reads 240 s at step 4, past ckpt_minutes=2.5 since the start, so
    both ranks checkpoint at 4 (not at rank 1's wish at every sync point); rank 1's SIGTERM after step 7 stops both
    at the sync point of step 8, with a checkpoint there."""
    fork_ranks(_minutes_worker, (free_port(), str(tmp_path / "run"), str(root), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["saves"] == r1["saves"] == [4, 8]
    assert r0["step"] == r1["step"] == 8 and r0["stopped"] and r1["stopped"]
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 8
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["step"] == 8
