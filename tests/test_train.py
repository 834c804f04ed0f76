"""SPOS supernet training on real Fashion-MNIST: learning, DDP (2 gloo ranks), NaN stop, refused resumes and
the sampler settings (SIGKILL / SIGTERM / SIGINT: test_interrupt.py)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from space.errors import Diverged, UserError

REPO = Path(__file__).resolve().parents[1]
# Real short runs on the real dataset (conftest.py fails them when it is missing), on one thread (conftest.py);
# interrupted runs and the missing-dataset error run on generated IDX files in test_interrupt.py and test_data.py.
pytestmark = [pytest.mark.fmnist, pytest.mark.usefixtures("one_thread")]

# Tiny and fast: small batches, a short validation, no tqdm.
QUICK = ["data.batch_size=32", "data.val_size=512", "eval.max_batches=1", "eval.n_random=1", "progress=false",
         "log_every=5"]


def make_cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=[f"run_dir={run_dir}", *QUICK, *overrides])


def cli(forkserver, run_dir: Path, *overrides: str):
    """``python -m supernet.train``'s own process (forked from conftest.py's ``forkserver``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forkserver.popen([sys.executable, "-m", "supernet.train", f"run_dir={run_dir}", *QUICK, *overrides],
                            cwd=REPO, env=env)


@pytest.mark.slow
def test_loss_goes_down_and_checkpoint_resumes(tmp_path):
    from supernet.train import train

    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, "max_steps=60", "ckpt_every=30", "eval.every=60", "optim.lr=1.6e-2",
                   "optim.warmup_epochs=0.005")
    res = train(cfg)
    assert res.step == 60 and len(res.losses) == 60
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert last < first - 0.3, (first, last)
    assert set(res.val) == {"min", "max", "rand0"} and all(0 <= v <= 1 for v in res.val.values())
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ck["step"] == 60 and ck["space"]["name"] == "fmnist_2d"
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
    # Same command again: nothing left to do, nothing retrained.
    again = train(cfg)
    assert again.step == 60 and again.losses == []


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run, trained once for the resume tests (each resumes a copy of it)."""
    from supernet.train import train

    run = tmp_path_factory.mktemp("two_steps") / "run"
    train(make_cfg(run, "max_steps=2", "eval.every=0"))
    return run


def test_resume_with_another_space_is_refused(tmp_path, two_steps):
    from supernet.train import train

    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    pattern = (r"resume: .* was trained with other settings: .*space.pooling \('2d' in the checkpoint, '1d' now\)"
               r".*use the same values, another run_dir= or resume=never")
    with pytest.raises(UserError, match=pattern):
        train(make_cfg(tmp_path, "space=fmnist_1d", "max_steps=2", "eval.every=0"))


@pytest.mark.parametrize("override, key", [
    ("seed=1", "seed (0 in the checkpoint, 1 now)"),
    ("data.batch_size=16", "data.batch_size (32 in the checkpoint, 16 now)"),
    ("data.seed=3", "data.seed (0 in the checkpoint, 3 now)"),
    ("data.split_seed=3", "data.split_seed"),
    ("optim.lr=0.002", "optim.lr (0.001 in the checkpoint, 0.002 now)"),
    ("sampler=flops_bins", "sampler ('uniform' in the checkpoint, 'flops_bins' now)"),
    ("entangle=slice", "entangle (None in the checkpoint, 'slice' now)"),  # a dense run's identity has no entangle
    ("max_steps=3", "max_steps (2 in the checkpoint, 3 now)"),
])
def test_resume_with_settings_that_change_the_result_is_refused(tmp_path, two_steps, override, key):
    from supernet.train import train

    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="was trained with other settings: .*" + re.escape(key)):
        train(make_cfg(tmp_path, "max_steps=2", "eval.every=0", override))
    assert (tmp_path / "last.ckpt").read_bytes() == before


def test_tensorboard_train_points_are_means_since_the_previous_point(tmp_path):
    """`train/loss` and `train/grad_norm` at a logged step are the means over the steps since the previous point,
    sync points that log nothing (checkpoints) included; read back as TensorBoard reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from supernet.train import train

    res = train(make_cfg(tmp_path, "max_steps=7", "log_every=3", "ckpt_every=2", "eval.every=0"))
    assert len(res.losses) == len(res.grad_norms) == 7
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    for tag, per_step in (("train/loss", res.losses), ("train/grad_norm", res.grad_norms)):
        points = [(e.step, e.value) for e in tb.Scalars(tag)]
        assert [step for step, _ in points] == [3, 6, 7]  # every log_every steps, and the last one
        means = [sum(per_step[a:b]) / (b - a) for a, b in ((0, 3), (3, 6), (6, 7))]
        assert [v for _, v in points] == pytest.approx(means, rel=1e-6), tag


def test_resume_accepts_settings_that_do_not_change_the_result(tmp_path, two_steps):
    from supernet.train import train

    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    res = train(make_cfg(tmp_path, "max_steps=2", "eval.every=1", "log_every=1", "ckpt_every=7", "progress=true",
                         "eval.max_batches=2", "data.eval_batch_size=64"))
    assert res.step == 2 and res.losses == []


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_resume_lr_recovers(tmp_path, monkeypatch):
    import supernet.engine.loop as L
    from supernet.train import train

    real = L.F.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(L.F, "cross_entropy", flaky)
    with pytest.raises(Diverged, match=r"non-finite loss nan at step 6; .*last.ckpt \(step 4\) is kept as the last "
                                       r"good checkpoint; .*rerun the same command with resume_lr=0\.0001$"):
        train(make_cfg(tmp_path, "max_steps=8", "ckpt_every=4", "eval.every=0"))
    kept = _final(tmp_path)
    assert kept["step"] == 4 and all(torch.isfinite(v).all() for v in kept["model"].values())
    monkeypatch.setattr(L.F, "cross_entropy", real)

    res = train(make_cfg(tmp_path, "max_steps=8", "ckpt_every=4", "eval.every=0", "resume_lr=1e-4"))
    assert res.step == 8 and len(res.losses) == 4  # resumed at the kept step, with the new peak lr
    final = _final(tmp_path)
    assert final["lr_history"] == [{"step": 4, "peak_lr": 1e-4}]
    assert final["scheduler"]["base_lrs"] == [pytest.approx(1e-4 * 32 / 256)] * 2  # lr x global batch / 256
    # the cosine's floor stays optim.min_lr (1e-5) under the new peak
    assert [f["min_ratio"] for f in final["scheduler"]["lr_lambdas"]] == [pytest.approx(1e-5 / (1e-4 * 32 / 256))] * 2


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    from supernet.train import train

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoning_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # the update that step 6's checkpoint would save
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(Diverged, match=r"non-finite weights or optimizer state at step 6; .*\(step 4\) is kept"):
        train(make_cfg(tmp_path, "max_steps=8", "ckpt_every=2", "eval.every=0"))
    assert _final(tmp_path)["step"] == 4


def test_divergence_exits_1_with_one_line(forkserver, tmp_path):
    p = cli(forkserver, tmp_path / "run", "max_steps=4", "eval.every=0", "optim.lr=1e30", "optim.warmup_epochs=0")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite "), err
    assert "no checkpoint was written; start over with a lower optim.lr" in lines[0]
    assert not (tmp_path / "run" / "last.ckpt").exists()


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", weights_only=True)


DDP_ARGS = ["max_steps=6", "eval.every=6", "ckpt_every=6", "optim.lr=1.6e-2", "optim.warmup_epochs=0.005",
            "device=cpu", "data.augment=false"]  # no augmentation: its draws are per rank, the images would differ


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, entangle: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.train import train

    res = train(make_cfg(Path(run_dir), *DDP_ARGS, "data.batch_size=16", f"entangle={entangle}"))
    torch.save({"model": res.model.state_dict(), "losses": res.losses, "grad_norms": res.grad_norms,
                "val": res.val, "digest": res.paths_digest}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("entangle", ["dense", "slice"])
def test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch(tmp_path, fork_ranks, free_port, entangle):
    """2 ranks x 16 images train what 1 rank x 32 trains: the same paths, the same mean loss and gradient norm
    every step and the same weights (up to float summation order), and the two ranks agree bit for bit; in both
    entangle modes (entangle=slice all-reduces the slice leaves, and its column-major weights are broadcast)."""
    from supernet.train import train

    fork_ranks(_ddp_worker, (2, free_port(), str(tmp_path / "run"), str(tmp_path), entangle))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["digest"] == r1["digest"]
    assert r0["losses"] == r1["losses"] and r0["grad_norms"] == r1["grad_norms"]  # all-reduced on both ranks
    assert r0["val"] == r1["val"]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert _final(tmp_path / "run")["step"] == 6

    one = train(make_cfg(tmp_path / "one", *DDP_ARGS, "data.batch_size=32", f"entangle={entangle}"))
    assert one.paths_digest == r0["digest"]
    assert len(one.grad_norms) == len(r0["grad_norms"]) == 6
    # a gradient summed instead of averaged over ranks doubles the norm; AdamW alone would barely notice
    assert one.grad_norms == pytest.approx(r0["grad_norms"], rel=1e-4)
    assert one.losses == pytest.approx(r0["losses"], rel=1e-4)
    # the same weights up to summation order, which AdamW amplifies on the few near-zero gradients: its step is
    # about lr x sign(gradient) there (seen: 1-3 elements of a tensor off by up to 7e-4); every other element agrees
    for k, v in one.model.state_dict().items():
        off = ~torch.isclose(v, r0["model"][k], rtol=1e-4, atol=1e-5)
        assert off.float().mean() <= 1e-3 and (v - r0["model"][k]).abs().max() <= 2e-3, (k, int(off.sum()))


def test_flops_bins_sampler_trains_its_own_paths(tmp_path):
    """sampler=flops_bins reaches the loop: the trained paths are exactly FlopsBinsSampler's, not uniform ones."""
    import hashlib

    from space.samplers import FlopsBinsSampler, UniformSampler
    from space.space import SearchSpace
    from supernet.train import train

    cfg = make_cfg(tmp_path, "max_steps=4", "eval.every=0", "sampler=flops_bins", "flops_bins=5")
    res = train(cfg)

    def digest(sampler) -> str:
        d = ""
        for t in range(4):
            for path in sampler.paths(t):
                d = hashlib.sha256((d + path.to_json()).encode()).hexdigest()
        return d

    space = SearchSpace.from_config(cfg.space)
    assert res.paths_digest == digest(FlopsBinsSampler(space, cfg.seed, 5))
    assert res.paths_digest != digest(UniformSampler(space, cfg.seed))


def test_unknown_sampler_is_a_user_error(tmp_path):
    from supernet.train import train

    with pytest.raises(UserError, match=r"sampler: 'foo' is not allowed \(allowed: uniform, flops_bins, sandwich\)"):
        train(make_cfg(tmp_path, "max_steps=1", "sampler=foo"))
    assert not (tmp_path / "last.ckpt").exists()


def test_keep_every_keeps_the_checkpoints_of_those_steps(tmp_path):
    """keep_every=2 over 5 steps: step_2.ckpt and step_4.ckpt are the checkpoints of those steps (loadable
    supernets, different weights), last.ckpt goes on to step 5; the fidelity app scores such files."""
    from supernet.engine.checkpoint import load_supernet
    from supernet.train import train

    cfg = make_cfg(tmp_path, "max_steps=5", "eval.every=0", "keep_every=2")
    assert train(cfg).step == 5
    kept = sorted(p.name for p in tmp_path.glob("step_*.ckpt"))
    assert kept == ["step_2.ckpt", "step_4.ckpt"]
    two, four = (load_supernet(tmp_path / k, torch.device("cpu")) for k in kept)
    assert (two.step, four.step) == (2, 4) and load_supernet(tmp_path / "last.ckpt", torch.device("cpu")).step == 5
    assert any(not torch.equal(a, b) for a, b in zip(two.net.state_dict().values(), four.net.state_dict().values()))
