"""No silent wrong runs: a lock per run_dir, partial files of killed writers cleared, full disks reported in one
line, Hydra composition errors and bad values as one line with exit 2 before any work, unreadable inputs
(architecture JSON, checkpoint, search state) as one-line user errors, result.json completed by a rerun, and a
property-based fuzz of every app's config keys and of every file input. Runs on generated IDX files."""

from __future__ import annotations

import copy
import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from forkserver import own_lines
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from space.app import run_dir_lock
from space.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.val_size=12", "data.batch_size=16", "progress=false", "eval.every=0", "device=cpu"]


def compose_app(name: str, *overrides: str):
    return copy.deepcopy(_composed(name, overrides))


@functools.lru_cache(maxsize=None)
def _composed(name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def run_cli(forkserver, module: str, *args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    """``python -m module *args``, the app's own process (forked from conftest.py's ``forkserver``), ``env`` added
    to its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return forkserver.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr)
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


@pytest.fixture
def data_root(tmp_path, fake_fmnist) -> Path:
    return fake_fmnist(tmp_path / "fmnist")


# ----------------------------------------------------------------------------- run_dir lock and partial files
def test_a_second_run_on_a_locked_run_dir_is_refused_and_a_killed_holder_leaves_no_lock(forkserver, tmp_path,
                                                                                         data_root):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from space.app import run_dir_lock\n"
                               f"with run_dir_lock({str(run)!r}):\n    print('locked', flush=True); time.sleep(300)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    args = [f"run_dir={run}", f"data.root={data_root}", "max_steps=1", *TINY]
    line = one_error_line(run_cli(forkserver, "supernet.train", *args))
    assert f"run_dir: {run} is in use by another run (pid {holder.pid})" in line
    assert not (run / "last.ckpt").exists()
    holder.kill()
    holder.wait()
    (run / ".last.ckpt.tmp4242").write_bytes(b"half a checkpoint of a killed run")
    p = run_cli(forkserver, "supernet.train", *args)
    assert p.returncode == 0, p.stderr
    assert (run / "last.ckpt").exists() and not (run / ".last.ckpt.tmp4242").exists()


def test_lock_in_one_process(tmp_path):
    with run_dir_lock(tmp_path):
        with pytest.raises(UserError, match=f"is in use by another run \\(pid {os.getpid()}\\)"):
            with run_dir_lock(tmp_path):
                pass
    with run_dir_lock(tmp_path):  # released on exit
        pass


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data_root, monkeypatch):
    import supernet.engine.checkpoint as C
    from supernet.train import train

    cfg = compose_app("supernet", f"run_dir={tmp_path}", f"data.root={data_root}", "max_steps=2", "ckpt_every=1",
                      *TINY)
    real_save, saves = torch.save, {"n": 0}

    def save_until_full(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 1:
            return real_save(obj, f, *a, **k)
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch, "save", save_until_full)
    with pytest.raises(UserError) as e:
        train(cfg)
    msg = str(e.value)
    assert msg == f"{tmp_path / 'last.ckpt'}: no space left on device writing it; the previous last.ckpt is intact"
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp*"))


# ----------------------------------------------------------------------------- one line, exit 2, before any work
@pytest.mark.parametrize("module, args, fragment", [
    ("supernet.train", ["space=bogus"], "error: config: In 'supernet': Could not find 'space/bogus'"),
    ("supernet.train", ["foo=1"], "error: config: Could not override 'foo'."),
    ("supernet.train", ["optim.lr=0"], "error: optim.lr: 0 is not allowed (allowed: a number > 0)"),
    ("supernet.retrain", ["arch=conf/baselines/deit_fmnist.json", "max_steps=0"], "error: max_steps: 0 trains nothing"),
    ("search.evolve", ["checkpoint=x.ckpt", "eval_images=0"], "error: eval_images: 0 is not allowed"),
    ("space.info", ["space=nope"], "error: config: In 'info': Could not find 'space/nope'"),
])
def test_bad_command_lines_are_one_line_exit_2(tmp_path, run_module, module, args, fragment):
    line = one_error_line(run_module(module, *args, cwd=REPO))
    assert line.startswith(fragment), line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("space, field", [("cifar_2d", "space.img_size: 32"),
                                          ("imagenet_tiny_2d", "space.img_size: 224")])
def test_a_supernet_space_that_does_not_fit_the_dataset_is_one_line_exit_2(tmp_path, run_module, data_root, space,
                                                                             field):
    line = one_error_line(run_module("supernet.train", f"space={space}", f"data.root={data_root}",
                                     "data.val_size=10", "data.batch_size=8", f"run_dir={tmp_path / 'run'}",
                                     "max_steps=1", cwd=REPO))
    assert line.startswith(f"error: {field} but dataset fashion_mnist has 28"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("ckpt_every=0", "ckpt_every: 0 is not allowed (allowed: an integer >= 1)"),
    ("log_every=0", "log_every: 0 is not allowed (allowed: an integer >= 1)"),
    ("seed=abc", "seed: 'abc' is not allowed (allowed: an integer >= 0)"),
    ("optim.grad_clip=-1", "optim.grad_clip: -1 is not allowed (allowed: a number >= 0)"),
    ("optim.betas=[0.9]", "optim.betas: [0.9] is not allowed (allowed: two numbers in [0, 1), e.g. [0.9, 0.999])"),
    ("run_dir=''", "run_dir: '' is not allowed (allowed: a non-empty string without NUL characters)"),
    ("max_steps=0", "max_steps: 0 is not allowed (allowed: an integer >= 1, or null)"),
    ("optim.epochs=0", "optim.epochs: 0 is not allowed (allowed: an integer >= 1)"),
    ("resume=maybe", "resume: 'maybe' is not allowed (allowed: auto, never)"),
    ("entangle=sparse", "entangle: 'sparse' is not allowed (allowed: dense, slice)"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, override, message):
    from supernet.train import train

    with mock.patch("supernet.train.distributed", side_effect=AssertionError("got past the checks")):
        with pytest.raises(UserError) as e:
            train(compose_app("supernet", f"run_dir={tmp_path / 'run'}", override))
    assert str(e.value) == message and not (tmp_path / "run").exists()


def test_retrain_refuses_a_checkpoint_as_architecture(tmp_path, run_module):
    ck = tmp_path / "last.ckpt"
    torch.save({"model": {}}, ck)
    line = one_error_line(run_module("supernet.retrain", f"arch={ck}", f"run_dir={tmp_path / 'r'}"))
    assert "not a text file (an architecture JSON is UTF-8 text" in line
    assert not (tmp_path / "r").exists()


def test_result_json_is_completed_by_a_rerun(tmp_path, data_root):
    from supernet.retrain import retrain

    cfg = compose_app("retrain", "arch=conf/baselines/deit_fmnist.json", f"run_dir={tmp_path}",
                      f"data.root={data_root}", "max_steps=2", "data.val_size=12", "data.batch_size=16",
                      "progress=false", "device=cpu", "eval.every=1")
    first = retrain(cfg)
    (tmp_path / "result.json").unlink()  # killed between the last checkpoint and result.json
    again = retrain(cfg)
    assert again["val_top1"] is not None and again["val_top1"] == first["val_top1"]
    assert json.loads((tmp_path / "result.json").read_text())["test_top1"] == first["test_top1"]


# ----------------------------------------------------------------------------- fuzz: config values
class _Reached(Exception):
    """The app got past its checks."""


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.floats(allow_nan=True), max_size=3))


def _fuzz_app(app: str, base: list[str], schema: dict, run_fn, patch_target: str, data, tmp_path: Path) -> None:
    key = data.draw(st.sampled_from(sorted(schema)))
    value = data.draw(VALUES)
    cfg = compose_app(app, *base)
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, force_add=True)
    before = snapshot(tmp_path)
    with mock.patch(patch_target, side_effect=_Reached):
        try:
            run_fn(cfg)
        except _Reached:
            pass
        except UserError as e:
            assert "\n" not in str(e) and str(e).strip(), repr(e)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "last.ckpt").write_bytes(b"an existing run's checkpoint")
    (d / "state.json").write_text("{}")
    return d


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_supernet_config(data, fuzz_dir):
    from space.schema import SUPERNET
    from supernet.train import train

    _fuzz_app("supernet", [f"run_dir={fuzz_dir}"], SUPERNET, train, "supernet.train.distributed", data, fuzz_dir)


@FUZZ
@given(data=st.data())
def test_fuzz_retrain_config(data, fuzz_dir):
    from space.schema import RETRAIN
    from supernet.retrain import retrain

    _fuzz_app("retrain", ["arch=conf/baselines/deit_fmnist.json", f"run_dir={fuzz_dir}"], RETRAIN, retrain,
              "supernet.retrain.distributed", data, fuzz_dir)


@FUZZ
@given(data=st.data())
def test_fuzz_evolve_config(data, fuzz_dir):
    from search.evolve import evolve
    from space.schema import EVOLVE

    _fuzz_app("evolve", [f"checkpoint={fuzz_dir / 'last.ckpt'}", f"run_dir={fuzz_dir}"], EVOLVE, evolve,
              "search.evolve.distributed", data, fuzz_dir)


# ----------------------------------------------------------------------------- fuzz: file inputs
def _valid_arch_text() -> str:
    return (REPO / "conf" / "baselines" / "deit_fmnist.json").read_text()


def _corruptions(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300),
                     st.integers(0, len(valid)).map(lambda n: valid[:n]),
                     st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255))
                     .map(lambda t: valid[:t[0]] + bytes([t[1]]) + valid[t[0] + 1:]))


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_corruptions(_valid_arch_text().encode()) | JSONISH.map(lambda v: json.dumps(v).encode())
       | st.just(b"[" * 100_000) | st.just(b"1" * 5000))
def test_fuzz_arch_json(blob, tmp_path):
    from space.arch import ArchSpec

    path = tmp_path / "arch.json"
    path.write_bytes(blob)
    try:
        ArchSpec.load(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from space.space import SearchSpace
    from supernet.model.supernet import Supernet

    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    path = tmp_path_factory.mktemp("ck") / "last.ckpt"
    torch.save({"model": Supernet(space).state_dict(), "space": space.to_config(), "space_hash": "x",
                "config": {"data": {"name": "fashion_mnist"}}, "step": 1, "total_steps": 1}, path)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_checkpoint(data, tmp_path, checkpoint_bytes):
    from supernet.engine.checkpoint import load_supernet

    path = tmp_path / "last.ckpt"
    kind = data.draw(st.sampled_from(["bytes", "object"]))
    if kind == "bytes":
        path.write_bytes(data.draw(_corruptions(checkpoint_bytes)))
    else:
        obj = data.draw(st.one_of(JSONISH, st.just(torch.zeros(3)),
                                  st.dictionaries(st.sampled_from(["model", "space", "space_hash", "config", "step"]),
                                                  JSONISH, max_size=5)))
        torch.save(obj, path)
    try:
        load_supernet(path, torch.device("cpu"))
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=JSONISH.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
       searches=JSONISH)
def test_fuzz_search_state(blob, searches, tmp_path):
    import random

    from search.evolution import Evolution
    from search.evolve import load_searches, read_state
    from space.space import SearchSpace

    path = tmp_path / "state.json"
    path.write_bytes(blob)
    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    search = Evolution(space, lambda archs: [0.5] * len(archs), random.Random(0))
    for step in (lambda: read_state(path), lambda: load_searches([search], searches, path),
                 lambda: load_searches([search], [searches], path)):
        try:
            step()
        except UserError as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize("nproc", [1, 2])
def test_user_error_under_the_launcher_is_one_line_exit_2(forkserver, make_recipe, tmp_path, nproc):
    """`make supernet`'s own command line (supernet.engine.launch, torchrun): no launcher report, the worker's
    status. The 1-process case starts its worker as a fresh interpreter, as outside the tests (the suite's other
    launcher runs fork theirs: tests/forkserver.py)."""
    argv = make_recipe("supernet", NPROC=str(nproc), ARGS=f"optim.lr=0 run_dir={tmp_path / 'run'}")
    assert argv[2:4] == ["supernet.engine.launch", "--standalone"] and f"--nproc_per_node={nproc}" in argv
    fresh = {"PYTHON_EXEC": sys.executable} if nproc == 1 else {}
    p = run_cli(forkserver, *argv[2:], **fresh)
    assert p.returncode == 2, p.stderr
    assert own_lines(p.stderr) == ["error: optim.lr: 0 is not allowed (allowed: a number > 0)"], p.stderr


def test_divergence_under_the_launcher_is_one_line_exit_1(forkserver, make_recipe, tmp_path, data_root):
    """`make supernet NPROC=2` with a learning rate that diverges: one line, exit 1, no launcher report, no
    checkpoint."""
    run = tmp_path / "run"
    argv = make_recipe("supernet", NPROC="2", ARGS=f"run_dir={run} data.root={data_root} data.val_size=10 "
                       "data.batch_size=8 max_steps=4 eval.every=0 optim.lr=1e30 optim.warmup_epochs=0 "
                       "progress=false device=cpu")
    p = run_cli(forkserver, *argv[2:])
    lines = own_lines(p.stderr)
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: non-finite "), p.stderr
    assert "no checkpoint was written; start over with a lower optim.lr" in lines[0]
    assert not (run / "last.ckpt").exists()


@pytest.mark.parametrize("path", ["\n", "a\nb.json", "runs\r\n/x.json"])
def test_a_value_with_line_breaks_is_quoted_on_one_line(tmp_path, path):
    """Found by test_export.py's fuzz: ``arch='\\n'`` printed a two-line error. Any UserError now shows a line
    break of the value it quotes as ``\\n``."""
    from space.arch import ArchSpec

    with pytest.raises(UserError) as e:
        ArchSpec.load(tmp_path / path)
    assert "\n" not in str(e.value) and "\r" not in str(e.value)
    assert str(e.value).endswith(": cannot read architecture file (No such file or directory)")
    assert repr(path)[1:-1] in str(e.value)


def test_a_path_with_a_nul_character_is_one_line(tmp_path):
    """No file name holds a NUL character; the OS call's ValueError ("embedded null byte") is a UserError."""
    from space.arch import ArchSpec

    with pytest.raises(UserError) as e:
        ArchSpec.load(tmp_path / "a\x00b.json")
    assert str(e.value) == (f"{tmp_path}/a\\x00b.json: cannot read architecture file (a path cannot hold a NUL "
                            "character)")
