"""SPOS supernet training on real Fashion-MNIST: learning, DDP (2 gloo ranks), resume after SIGKILL,
graceful SIGTERM, NaN stop, refused resumes and clear data errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from space.errors import Diverged, UserError

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

# Tiny and fast: small batches, a short validation, no tqdm.
QUICK = ["data.batch_size=32", "data.val_size=512", "eval.max_batches=1", "eval.n_random=1", "progress=false",
         "log_every=5"]


def make_cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=[f"run_dir={run_dir}", *QUICK, *overrides])


def cli(run_dir: Path, *overrides: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "supernet.train", f"run_dir={run_dir}", *QUICK, *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


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


def test_resume_with_another_space_is_refused(tmp_path):
    from supernet.train import train

    train(make_cfg(tmp_path, "max_steps=2", "eval.every=0"))
    with pytest.raises(UserError, match="resume: .* was trained with another search space"):
        train(make_cfg(tmp_path, "space=fmnist_1d", "max_steps=4", "eval.every=0"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import supernet.engine.loop as L
    import supernet.train as T

    real = L.F.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(L.F, "cross_entropy", flaky)
    with pytest.raises(Diverged, match="non-finite loss nan at step 6; the last good checkpoint"):
        T.train(make_cfg(tmp_path, "max_steps=20", "ckpt_every=4", "eval.every=0"))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 4


def test_missing_dataset_is_one_line_exit_2(tmp_path):
    p = cli(tmp_path / "run", f"data.root={tmp_path / 'nowhere'}", "max_steps=1")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dataset-fashion-mnist" in lines[0], err
    assert "Traceback" not in err


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    args = ["max_steps=40", "ckpt_every=5", "eval.every=0"]
    ref = cli(tmp_path / "ref", *args)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    killed = cli(tmp_path / "run", *args)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill somewhere after the second checkpoint
        ck = tmp_path / "run" / "last.ckpt"
        if ck.exists() and torch.load(ck, weights_only=True)["step"] >= 10:
            break
        time.sleep(0.2)
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at = _final(tmp_path / "run")["step"]
    assert 10 <= at < 40
    rerun = cli(tmp_path / "run", *args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resumed from {tmp_path / 'run' / 'last.ckpt'} at step {at}/40" in out
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "run")
    assert a["step"] == b["step"] == 40
    assert a["task_state"]["paths_digest"] == b["task_state"]["paths_digest"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_sigterm_checkpoints_and_exits_0(tmp_path):
    p = cli(tmp_path, "max_steps=100000", "ckpt_every=100000", "eval.every=0")
    deadline = time.time() + 120
    while not (tmp_path / "tb").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "stopped by signal at step" in out
    step = _final(tmp_path)["step"]
    assert 0 < step < 100000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_ARGS = ["max_steps=12", "eval.every=12", "ckpt_every=12", "optim.lr=1.6e-2", "optim.warmup_epochs=0.005",
            "device=cpu", "data.augment=false"]  # no augmentation: its draws are per rank, the images would differ


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.train import train

    res = train(make_cfg(Path(run_dir), *DDP_ARGS, "data.batch_size=16"))
    torch.save({"model": res.model.state_dict(), "losses": res.losses, "grad_norms": res.grad_norms,
                "val": res.val, "digest": res.paths_digest}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch(tmp_path):
    """2 ranks x 16 images train what 1 rank x 32 trains: the same paths, the same mean loss and gradient norm
    every step and the same weights (up to float summation order), and the two ranks agree bit for bit."""
    from supernet.train import train

    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path)),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["digest"] == r1["digest"]
    assert r0["losses"] == r1["losses"] and r0["grad_norms"] == r1["grad_norms"]  # all-reduced on both ranks
    assert r0["val"] == r1["val"]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert _final(tmp_path / "run")["step"] == 12

    one = train(make_cfg(tmp_path / "one", *DDP_ARGS, "data.batch_size=32"))
    assert one.paths_digest == r0["digest"]
    assert len(one.grad_norms) == len(r0["grad_norms"]) == 12
    # a gradient summed instead of averaged over ranks doubles the norm; AdamW alone would barely notice
    assert one.grad_norms == pytest.approx(r0["grad_norms"], rel=1e-4)
    assert one.losses == pytest.approx(r0["losses"], rel=1e-4)
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(v, r0["model"][k], rtol=1e-4, atol=1e-5, msg=k)


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
            d = hashlib.sha256((d + sampler(t).to_json()).encode()).hexdigest()
        return d

    space = SearchSpace.from_config(cfg.space)
    assert res.paths_digest == digest(FlopsBinsSampler(space, cfg.seed, 5))
    assert res.paths_digest != digest(UniformSampler(space, cfg.seed))


def test_unknown_sampler_is_a_user_error(tmp_path):
    from supernet.train import train

    with pytest.raises(UserError, match=r"sampler: unknown sampler 'foo' \(allowed: uniform, flops_bins\)"):
        train(make_cfg(tmp_path, "max_steps=1", "sampler=foo"))
    assert not (tmp_path / "last.ckpt").exists()
