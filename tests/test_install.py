"""The installed torch is the one asked for, and a run notices when it is not: `make install`'s stamp covers the
torch requirement (the same TORCH_REQ twice installs once, another one reinstalls, and the package's dependencies
are resolved with torch and torchvision pinned to it: the real Makefile in a scratch directory whose
`.venv/bin/python` only records how it was called); and a run on a machine whose GPUs torch cannot use refuses in
one line instead of training on the CPU (a fake `nvidia-smi` stands for the GPUs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from space.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def make_install(work: Path, torch_req: str) -> list[str]:
    """Run the install recipe with ``TORCH_REQ``; the pip command lines it ran."""
    log = work / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    subprocess.run(["make", "--no-print-directory", ".venv/.installed", f"TORCH_REQ={torch_req}"], cwd=work,
                   check=True, capture_output=True, text=True)
    return log.read_text().splitlines()[len(before):] if log.exists() else []


def test_install_stamp_follows_torch_req_and_pins_the_pair(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "setup.cfg").touch()
    (tmp_path / "pyproject.toml").touch()
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.log"}\n')
    python.chmod(0o755)

    cpu = "torch==2.14.1 torchvision==0.29.1"
    assert make_install(tmp_path, cpu) == ["-m pip install torch==2.14.1 torchvision==0.29.1",
                                           "-m pip install -c .venv/torch-constraints.txt -e .[dev,imagenet,export]"]
    assert (tmp_path / ".venv" / "torch-constraints.txt").read_text().split() == cpu.split()
    assert make_install(tmp_path, cpu) == []  # up to date
    cuda = "torch==2.14.1+cu128 torchvision==0.29.1+cu128 --index-url https://download.pytorch.org/whl/cu128"
    calls = make_install(tmp_path, cuda)
    assert calls[0] == f"-m pip install {cuda}" and len(calls) == 2
    assert (tmp_path / ".venv" / "torch-constraints.txt").read_text().split() == cuda.split()[:2]
    assert make_install(tmp_path, cuda) == []


@pytest.fixture
def two_gpus_visible(tmp_path, monkeypatch):
    """A `nvidia-smi` listing two GPUs first on PATH; torch (this machine's) still sees none."""
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpus_that_torch_cannot_use_are_refused_in_one_line(two_gpus_visible, monkeypatch):
    from supernet.engine.distributed import setup_distributed, visible_gpus

    assert visible_gpus() == 2
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build
    with pytest.raises(UserError, match=r"^device: auto but 2 NVIDIA GPU\(s\) are visible \(nvidia-smi\) and torch "
                                        r".* is a build without CUDA; install a CUDA build \(make install TORCH_REQ="):
        setup_distributed("auto")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build the driver cannot serve
    with pytest.raises(UserError, match=r"cannot use them \(built for CUDA 12.8\): check the NVIDIA driver"):
        setup_distributed("cuda")
    assert setup_distributed("cpu").device.type == "cpu"  # asked for explicitly: allowed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: a CPU run
    assert visible_gpus() == 0 and setup_distributed("auto").device.type == "cpu"


# ----------------------------------------------------------------------------- the Makefile's other promises
def test_make_help_lists_every_target_with_its_description():
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    phony = {t for line in (REPO / "Makefile").read_text().splitlines() if line.startswith(".PHONY:")
             for t in line.split(":", 1)[1].split()} - {"FORCE"}
    assert set(listed) == phony and all(len(text) > 10 for text in listed.values()), (set(listed) ^ phony)


@pytest.mark.parametrize("visible, gpus, nproc", [(None, 0, "1"), (None, 2, "2"), ("0,3,5", 2, "3"), ("1", 2, "1"),
                                                  ("", 2, "1"), ("-1", 2, "1")])
def test_nproc_is_one_worker_per_visible_gpu(tmp_path, make_recipe, monkeypatch, visible, gpus, nproc):
    """`make supernet`'s NPROC: the devices CUDA_VISIBLE_DEVICES names when it is set (none when empty or -1, as
    for CUDA and the apps' own GPU check: one worker), else the GPUs `nvidia-smi -L` lists, else 1."""
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
                   + ("" if gpus else "exit 9\n"))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    argv = make_recipe("supernet")
    assert argv[1:6] == ["-m", "supernet.engine.launch", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    assert argv[6:] == ["supernet.train"]


def test_make_info_prints_the_space_summary(make_recipe, run_module):
    argv = make_recipe("info", ARGS="space=fmnist_1d")
    assert argv[1:] == ["-m", "space.info", "space=fmnist_1d"]
    r = run_module(*argv[2:], cwd=REPO)
    assert r.returncode == 0 and "fmnist_1d" in r.stdout, r


@pytest.mark.parametrize("space", [None, "fmnist_1d"])
def test_make_supernet_writes_runs_supernet_of_its_space_by_default(make_recipe, space):
    """`make supernet` runs in the repository with no run_dir: the checkpoint goes to runs/supernet_<space>/."""
    from hydra import compose, initialize_config_dir

    argv = make_recipe("supernet", NPROC="1", **({"ARGS": f"space={space}"} if space else {}))
    overrides = argv[argv.index("supernet.train") + 1:]
    assert not any(a.startswith("run_dir=") for a in overrides)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("supernet", overrides=overrides)
    assert cfg.run_dir == f"runs/supernet_{space or 'fmnist_2d'}"


def test_make_clean_keeps_the_venv_and_the_runs_and_distclean_removes_the_venv(tmp_path):
    """In a scratch copy of the Makefile: `make clean` removes build and test artefacts only."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = ["build/x", "dist/x", "psvit.egg-info/x", ".pytest_cache/x", ".hypothesis/x", "space/__pycache__/x.pyc",
            "tests/__pycache__/y.pyc"]
    kept = ["runs/demo/summary.json", "docs/results.md", "space/space.py", ".venv/bin/python",
            ".venv/lib/__pycache__/z.pyc"]
    for f in made + kept:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    subprocess.run(["make", "--no-print-directory", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert [f for f in made if (tmp_path / f).exists()] == [] and all((tmp_path / f).exists() for f in kept)
    assert not (tmp_path / "space" / "__pycache__").exists() and not (tmp_path / "build").exists()
    subprocess.run(["make", "--no-print-directory", "distclean"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / ".venv").exists() and (tmp_path / "runs" / "demo" / "summary.json").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_make_export_writes_the_checked_file(tmp_path, make_recipe, run_module):
    """`make export ARCH=...`'s own command line: the DeiT-like Fashion-MNIST baseline as TorchScript, checked."""
    import torch

    out = tmp_path / "deit_fmnist.pt"
    argv = make_recipe("export", ARCH=str(REPO / "conf" / "baselines" / "deit_fmnist.json"),
                       ARGS=f"format=torchscript out={out}")
    assert argv[1:3] == ["-m", "supernet.export"]
    r = run_module(*argv[2:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert torch.jit.load(str(out))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit_fmnist.pt"]


def test_make_export_without_arch_says_so(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()  # the install is up to date: only the target's own check runs
    r = subprocess.run(["make", "--no-print-directory", "-o", "install", "export"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.splitlines()[0] == "make export: set ARCH=path/to/arch.json", r.stderr
