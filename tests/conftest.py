"""Shared pytest fixtures and hooks: repository paths, a Hypothesis profile that suits CI, small generated
Fashion-MNIST IDX files for plumbing tests, the commands the Makefile's targets run, and the `fmnist` marker: a
test that needs the real dataset fails (never silently skips) when it is missing, unless
PSVIT_ALLOW_MISSING_DATA=1."""

from __future__ import annotations

import gzip
import json
import os
import runpy
import shlex
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from forkserver import RUNNING, ForkServer

# No deadline: the first example of a test pays for imports and torch warm-up on a 2-core machine.
settings.register_profile("ci", deadline=None, max_examples=50)
settings.load_profile("ci")

_REPO_ROOT = Path(__file__).resolve().parent.parent
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, the default data.root
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def have_fmnist() -> bool:
    """Whether the four Fashion-MNIST IDX files (gzipped or not) are in FMNIST_ROOT."""
    return all((FMNIST_ROOT / f"{n}.gz").is_file() or (FMNIST_ROOT / n).is_file() for n in FMNIST_FILES)


# The longest files first (measured; test_compile.py's inductor build takes about a minute with a cold cache, which
# every new virtual environment has, so CI's fresh clone too): `make test` hands whole files to 2 pytest-xdist
# workers, and a long file started last would leave one core idle.
LONGEST_FIRST = ("test_search_app.py", "test_compile.py", "test_train.py", "test_export.py", "test_fidelity.py",
                 "test_interrupt.py", "test_reliability.py", "test_retrain.py", "test_model.py", "test_folder.py",
                 "test_convert.py", "test_bench_latency.py", "test_sandwich.py", "test_engine.py",
                 "test_bench_gpu_check.py", "test_data.py", "test_prepared.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture runs: an `fmnist` test without the dataset fails with one line saying how to get it
    (PSVIT_ALLOW_MISSING_DATA=1 turns that into a skip, for machines that cannot install it)."""
    if item.get_closest_marker("fmnist") is None or have_fmnist():
        return
    msg = (f"needs the real Fashion-MNIST in {FMNIST_ROOT}: run `make install` (as root) or "
           "`apt-get install dataset-fashion-mnist`; PSVIT_ALLOW_MISSING_DATA=1 skips such tests instead")
    if os.environ.get("PSVIT_ALLOW_MISSING_DATA") == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the directory holding setup.cfg)."""
    return _REPO_ROOT


@pytest.fixture(scope="session")
def conf_dir(repo_root: Path) -> Path:
    """The Hydra config directory, for `initialize_config_dir(config_dir=str(conf_dir))`."""
    return repo_root / "conf"


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Writes ``array`` (uint8) as an IDX file, gzipped to ``path.gz`` when ``gz``."""
    payload = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _fake_fmnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, gz)
    return root


@pytest.fixture(scope="session")
def fake_fmnist() -> Callable[..., Path]:
    """``fake_fmnist(root, n_train=60, n_test=20, gz=True) -> root``: random 28x28 images labelled ``i % 10``
    written as the four Fashion-MNIST IDX files, for tests of plumbing that runs on any machine."""
    return _fake_fmnist


@pytest.fixture
def run_module(monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """``run_module(module, *args, cwd=None) -> CompletedProcess``: what ``python -m module *args`` does, in this
    process. ``runpy`` runs the module as ``__main__``, so the same override check, Hydra composition, app and
    exit-code policy run, without the seconds a fresh interpreter spends importing torch. Each app keeps tests
    that start a real process too (exit statuses through the launcher, signals, 2 ranks)."""

    def run(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        from hydra.core.global_hydra import GlobalHydra

        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [module, *args])
        capsys.readouterr()
        code = 0
        try:
            with warnings.catch_warnings():  # runpy warns that the module was imported before: harmless here
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return run


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests, like the CLI runs (OMP_NUM_THREADS=1) and the gloo ranks: results
    are then bit-comparable across processes, and two threads per run would oversubscribe a shared 2-core machine
    (about 3x slower). A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """``forkserver.popen(argv, cwd, env)`` / ``forkserver.run(argv, cwd, env, timeout)``: the app's real process, as
    ``subprocess.Popen`` / ``subprocess.run`` with captured text output would start it, forked from one
    interpreter that has imported torch already (tests/forkserver.py): signals, kill -9 and exit statuses are
    the process's own, without the seconds of imports each fresh interpreter spends."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reap_forked_processes() -> Iterator[None]:
    """What a test forked and left running (a hung launcher after a timeout, say) is killed when the test ends, so
    that it does not load the machine under the tests after it; a test that left any gets a warning."""
    yield
    for server in RUNNING:
        if left := server.reap():
            warnings.warn(f"{left} forked process(es) still running at the end of the test: killed", stacklevel=1)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port() -> int``: a TCP port of 127.0.0.1 that was free a moment ago (a gloo rendezvous port)."""

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


# A rank of fork_ranks: the test module's worker function, called in a process forked from the fork server
RANK = ("import importlib, json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(int(sys.argv[4]), *json.loads(sys.argv[5]))\n")


@pytest.fixture(scope="session")
def fork_ranks(forkserver: ForkServer) -> Callable[..., None]:
    """``fork_ranks(fn, args, nprocs=2)``: ``torch.multiprocessing.spawn``'s contract (``fn(rank, *args)`` in
    ``nprocs`` processes, joined; a failing rank fails the test with its stderr and the others are killed), each
    rank forked from the fork server instead of started as a fresh interpreter, so it skips the seconds spent
    importing torch. ``fn`` is a module-level function of a test module, ``args`` JSON values. (Not forked from
    the test process itself: after a backward pass there, autograd's threads make a fork unsafe.)"""

    def fork(fn: Callable[..., None], args: tuple = (), nprocs: int = 2) -> None:
        tests = str(Path(fn.__code__.co_filename).parent)
        ranks = [forkserver.popen([sys.executable, "-c", RANK, tests, fn.__module__, fn.__name__, str(r),
                                   json.dumps(list(args))], cwd=_REPO_ROOT, env=dict(os.environ))
                 for r in range(nprocs)]
        failed = None
        while failed is None and any(p.poll() is None for p in ranks):
            failed = next((p for p in ranks if p.poll() not in (None, 0)), None)
            time.sleep(0.05)
        failed = failed or next((p for p in ranks if p.returncode != 0), None)
        for p in ranks:
            p.kill()
        if failed is not None:
            err = failed.communicate()[1]
            pytest.fail(f"rank {ranks.index(failed)} of {fn.__name__} exited {failed.returncode}:\n{err[-4000:]}")
        for p in ranks:
            p.communicate()

    return fork


@pytest.fixture(scope="session")
def make_recipe(repo_root: Path) -> Callable[..., list[str]]:
    """``make_recipe(target, **variables) -> argv``: the app command ``make <target>`` runs (read with
    ``make -n``, nothing executed), with this interpreter in place of ``.venv/bin/python``, so a test runs
    exactly the Makefile's launch line without an install."""

    def recipe(target: str, **variables: str) -> list[str]:
        out = subprocess.run(["make", "-n", "--no-print-directory", target,
                              *(f"{k}={v}" for k, v in variables.items())],
                             cwd=repo_root, capture_output=True, text=True, check=True).stdout
        lines = [line for line in out.splitlines() if line.startswith(".venv/bin/python -m ")]
        assert lines, out
        return [sys.executable, *shlex.split(lines[-1])[1:]]

    return recipe
