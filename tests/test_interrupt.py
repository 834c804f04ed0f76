"""Interrupted runs of both training apps (`supernet.train`, `supernet.retrain`) through the real CLI: SIGTERM and
SIGINT stop at the next sync point, checkpoint at the step they print and exit 0; a rerun of the same command after
a signal or a SIGKILL (also one that lands while a checkpoint is being written in the background) resumes from the
checkpoint's exact step and ends with the weights (and, for retraining, the result.json) of an uninterrupted run.
Runs on small generated IDX files, so it needs no dataset."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from forkserver import own_lines, wait_for
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = 24  # a signal sent at the first checkpoint (step 4 or 5) lands well before the end
# batch 16 of 360 generated training images: 22 steps an epoch, so a resume also crosses an epoch boundary
COMMON = ["data.batch_size=16", "data.val_size=40", "eval.every=0", "progress=false", "log_every=5", "device=cpu",
          f"max_steps={STEPS}"]
SUPERNET = [*COMMON, "eval.n_random=1"]
RETRAIN = [*COMMON, f"arch={REPO / 'conf' / 'baselines' / 'deit_fmnist.json'}"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory, fake_fmnist) -> Path:
    return fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=400, n_test=100)


def _cfg(app: str, run_dir: Path, root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(app, overrides=[f"run_dir={run_dir}", f"data.root={root}", *overrides])


# `python -m MODULE ARGS` whose torch.save lingers 2 s once the temp file is written: a checkpoint is in flight
# (written in the background, not yet renamed into place) long enough for a test to kill the process then
SLOW_WRITES = ("import runpy, sys, time, torch\n"
               "real = torch.save\n"
               "def slow(obj, f, *a, **k):\n    real(obj, f, *a, **k)\n    time.sleep(2)\n"
               "torch.save = slow\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _cli(forkserver, module: str, run_dir: Path, root: Path, *overrides: str, slow_writes: bool = False):
    """The app's own process (forked from conftest.py's ``forkserver``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = ["-c", SLOW_WRITES, module] if slow_writes else ["-m", module]
    return forkserver.popen([sys.executable, *start, f"run_dir={run_dir}", f"data.root={root}", *overrides],
                       cwd=run_dir.parent, env=env)


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", weights_only=True)


def _interrupt_at_first_checkpoint(p: subprocess.Popen, run_dir: Path, sig: signal.Signals) -> tuple[str, str]:
    """Send ``sig`` as soon as ``run_dir/last.ckpt`` appears (written atomically), then wait for the exit."""
    wait_for(p, run_dir / "last.ckpt")
    p.send_signal(sig)
    return p.communicate(timeout=240)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _paths_digest(cfg, steps: int) -> str:
    """The digest SupernetTask keeps of the first ``steps`` trained paths, recomputed from the sampler."""
    from space.samplers import make_sampler
    from space.space import SearchSpace

    sampler, d = make_sampler(cfg.sampler, SearchSpace.from_config(cfg.space), cfg.seed, cfg.flops_bins), ""
    for t in range(steps):
        for path in sampler.paths(t):
            d = hashlib.sha256((d + path.to_json()).encode()).hexdigest()
    return d


# ----------------------------------------------------------------------------- supernet training
@pytest.fixture(scope="module")
def supernet_refs(tmp_path_factory: pytest.TempPathFactory, data_root: Path, one_thread: None):
    """``ref(*overrides)``: the final checkpoint of the uninterrupted run with those overrides, trained once."""
    from supernet.train import train

    done: dict[tuple[str, ...], dict] = {}

    def ref(*overrides: str) -> dict:
        if overrides not in done:
            run = tmp_path_factory.mktemp("supernet_ref")
            assert train(_cfg("supernet", run, data_root, *SUPERNET, *overrides)).step == STEPS
            done[overrides] = _ckpt(run)
        return done[overrides]

    return ref


@pytest.fixture
def supernet_ref(supernet_refs) -> dict:
    """The uninterrupted run's final checkpoint."""
    return supernet_refs()


def _stopped_by(forkserver, sig: signal.Signals, run: Path, root: Path) -> int:
    """Stop a supernet run with ``sig`` at its first checkpoint (step 7); check the stop contract and return the
    step it stopped at: the next sync point (a multiple of log_every=5, or of ckpt_every=7). At a multiple of 5
    only (10, typically), only the stop itself can have written the checkpoint of that step."""
    p = _cli(forkserver, "supernet.train", run, root, *SUPERNET, "ckpt_every=7")
    out, err = _interrupt_at_first_checkpoint(p, run, sig)
    assert p.returncode == 0 and err.strip() == "", err  # no traceback, no KeyboardInterrupt
    ck = _ckpt(run)
    at = ck["step"]
    assert 7 < at < STEPS and (at % 5 == 0 or at % 7 == 0), at
    assert f"stopped by signal at step {at}/{STEPS}; checkpoint {run / 'last.ckpt'}" in out, out
    # whole steps only: as many scheduler steps as steps, and exactly the paths of steps 0 .. at-1
    assert ck["scheduler"]["last_epoch"] == at
    assert ck["task_state"]["paths_digest"] == _paths_digest(_cfg("supernet", run, root, *SUPERNET), at)
    return at


def test_sigint_finishes_the_step_checkpoints_and_exits_0(forkserver, tmp_path, data_root):
    _stopped_by(forkserver, signal.SIGINT, tmp_path / "run", data_root)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_exits_0_and_a_rerun_completes(forkserver, tmp_path, data_root,
                                                                            supernet_ref):
    run = tmp_path / "run"
    at = _stopped_by(forkserver, signal.SIGTERM, run, data_root)
    _rerun_equals_reference(forkserver, run, data_root, at, supernet_ref, "ckpt_every=5")


@pytest.mark.parametrize("sig, nproc", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_a_signal_to_the_launcher_stops_every_rank_at_a_checkpoint_and_exits_0(forkserver, tmp_path, data_root, sig,
                                                                                nproc):
    """`make supernet` is torchrun (supernet.engine.launch): SIGTERM or Ctrl-C's SIGINT sent to it reaches every
    worker, which finishes its step, checkpoints and exits 0; the launcher exits 0 with no report of its own."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = forkserver.popen([sys.executable, "-m", "supernet.engine.launch", "--standalone", f"--nproc_per_node={nproc}",
                          "-m", "supernet.train", f"run_dir={run}", f"data.root={data_root}", *SUPERNET,
                          "ckpt_every=7"], cwd=tmp_path, env=env)
    out, err = _interrupt_at_first_checkpoint(p, run, sig)
    assert p.returncode == 0 and own_lines(err) == [], err
    ck = _ckpt(run)
    at = ck["step"]
    assert 7 < at < STEPS and (at % 5 == 0 or at % 7 == 0), at
    assert f"stopped by signal at step {at}/{STEPS}; checkpoint {run / 'last.ckpt'}" in out, out
    assert ck["scheduler"]["last_epoch"] == at


def test_a_signal_that_kills_the_workers_is_not_a_clean_stop(forkserver, tmp_path):
    """Workers that die of the launcher's SIGTERM instead of checkpointing (here: a program without a handler)
    make the launcher exit 1 with one line naming them, not 0."""
    (tmp_path / "sleeper.py").write_text("import os, time\nos.write(1, b'ready\\n')\ntime.sleep(60)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = forkserver.popen([sys.executable, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2",
                          "-m", "sleeper"], cwd=tmp_path, env={**env, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    deadline = time.time() + 60
    while b"".join(p._chunks[p._out]).count(b"ready\n") < 2:
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and own_lines(err) == [
        "error: stopped by SIGTERM, but not every worker finished its step and checkpoint (rank 0: SIGTERM, rank 1: "
        "SIGTERM); rerun the same command to resume from the last checkpoint on disk"], err


@pytest.mark.slow
@pytest.mark.parametrize("entangle", ["dense", "slice"])
def test_supernet_sigkill_during_a_background_write_then_rerun_equals_uninterrupted_run(forkserver, tmp_path, data_root,
                                                                                      supernet_refs, entangle):
    """Killed after the first checkpoint (step 4) is on disk, while the second one's write is in flight: step 4's
    file is intact, and the rerun clears the dead writer's temp file and ends as the uninterrupted run; in both
    entangle modes."""
    run, mode = tmp_path / "run", () if entangle == "dense" else (f"entangle={entangle}",)  # dense: the default
    killed = _cli(forkserver, "supernet.train", run, data_root, *SUPERNET, "ckpt_every=4", *mode, slow_writes=True)
    deadline = time.time() + 240
    while not ((run / "last.ckpt").exists() and list(run.glob(".last.ckpt.tmp*"))):
        assert killed.poll() is None, killed.communicate()
        assert time.time() < deadline, "no second checkpoint write within 240 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL
    assert _ckpt(run)["step"] == 4 and list(run.glob(".last.ckpt.tmp*"))  # killed mid-write
    _rerun_equals_reference(forkserver, run, data_root, 4, supernet_refs(*mode), "ckpt_every=4", *mode)
    assert not list(run.glob(".last.ckpt.tmp*"))


def _rerun_equals_reference(forkserver, run: Path, data_root: Path, at: int, ref: dict, *args: str) -> None:
    """The same command again resumes at step ``at`` and ends where the uninterrupted run ended."""
    rerun = _cli(forkserver, "supernet.train", run, data_root, *SUPERNET, *args)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert f"resumed from {run / 'last.ckpt'} at step {at}/{STEPS}" in out
    final = _ckpt(run)
    assert final["step"] == STEPS and final["task_state"] == ref["task_state"]
    _assert_same_weights(final["model"], ref["model"])


# ----------------------------------------------------------------------------- retraining
@pytest.fixture(scope="module")
def retrain_ref(tmp_path_factory: pytest.TempPathFactory, data_root: Path, one_thread: None) -> tuple[dict, dict]:
    """The uninterrupted retraining's final checkpoint and result.json."""
    from supernet.retrain import retrain

    run = tmp_path_factory.mktemp("retrain_ref")
    res = retrain(_cfg("retrain", run, data_root, *RETRAIN))
    assert json.loads((run / "result.json").read_text()) == res and res["steps"] == STEPS
    return _ckpt(run), res


def _same_result(ours: dict, ref: dict) -> None:
    ours, ref = dict(ours), dict(ref)
    ours.pop("train_seconds_this_run"), ref.pop("train_seconds_this_run")
    for run in (ours, ref):  # each names its own checkpoint, whose bytes hold its run_dir
        assert run.pop("checkpoint").endswith("last.ckpt") and len(run.pop("checkpoint_sha256")) == 64
    assert ours == ref and ours["test_images"] == 100


@pytest.mark.slow
def test_retrain_sigkill_then_rerun_equals_uninterrupted_run(forkserver, tmp_path, data_root, retrain_ref):
    run = tmp_path / "run"
    killed = _cli(forkserver, "supernet.retrain", run, data_root, *RETRAIN, "ckpt_every=4")
    _interrupt_at_first_checkpoint(killed, run, signal.SIGKILL)
    at = _ckpt(run)["step"]
    assert 4 <= at < STEPS and not (run / "result.json").exists()
    rerun = _cli(forkserver, "supernet.retrain", run, data_root, *RETRAIN, "ckpt_every=4")
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert f"resumed from {run / 'last.ckpt'} at step {at}/{STEPS}" in out
    ref_ck, ref_res = retrain_ref
    _assert_same_weights(_ckpt(run)["model"], ref_ck["model"])
    _same_result(json.loads((run / "result.json").read_text()), ref_res)


@pytest.mark.slow
def test_retrain_sigterm_writes_no_result_and_a_rerun_completes(forkserver, tmp_path, data_root, retrain_ref):
    run = tmp_path / "run"
    p = _cli(forkserver, "supernet.retrain", run, data_root, *RETRAIN, "ckpt_every=5")
    out, err = _interrupt_at_first_checkpoint(p, run, signal.SIGTERM)
    assert p.returncode == 0 and err.strip() == "", err
    at = _ckpt(run)["step"]
    assert 5 < at < STEPS and f"stopped by signal at step {at}/{STEPS}" in out, out
    assert not (run / "result.json").exists() and "test top-1" not in out  # no test-split evaluation either
    rerun = _cli(forkserver, "supernet.retrain", run, data_root, *RETRAIN, "ckpt_every=5")
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert f"resumed from {run / 'last.ckpt'} at step {at}/{STEPS}" in out and "test top-1" in out
    ref_ck, ref_res = retrain_ref
    _assert_same_weights(_ckpt(run)["model"], ref_ck["model"])
    _same_result(json.loads((run / "result.json").read_text()), ref_res)
