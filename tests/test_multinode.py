"""Resuming on many nodes: rank 0 decides whether there is a run to resume, and every rank checks it reads the
very checkpoint rank 0 resumes. With node-local run dirs (one rank sees no checkpoint, or another one) every
rank refuses with the same one line instead of training from different steps, which would hang the gradient
all-reduce or mix unrelated gradients. Two gloo ranks whose run_dir differs stand for two nodes."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from space.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=[f"run_dir={run_dir}", f"data.root={root}", "data.batch_size=8",
                                              "data.val_size=20", "max_steps=1", "eval.every=0", "progress=false",
                                              "device=cpu", *overrides])


def _worker(rank: int, ports: list[int], tmp: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from supernet.train import train

    for node_dirs, port in zip(("missing", "differ"), ports):
        # a port per run: a rank done with the first run must not join the other rank's store of it
        os.environ["MASTER_PORT"] = str(port)
        try:
            train(_cfg(Path(tmp) / f"{node_dirs}{rank}", Path(root)))
            message = "trained"
        except UserError as e:
            message = str(e)
        (Path(tmp) / f"{node_dirs}{rank}.txt").write_text(message)


def test_node_local_run_dirs_are_refused_on_every_rank(tmp_path, fake_fmnist, fork_ranks):
    from supernet.train import train

    root = fake_fmnist(tmp_path / "data", n_train=60, n_test=10)
    torch.set_num_threads(1)
    train(_cfg(tmp_path / "one", root))
    ckpt = tmp_path / "one" / "last.ckpt"
    for d in ("missing0", "differ0", "differ1"):
        (tmp_path / d).mkdir()
        shutil.copy(ckpt, tmp_path / d / "last.ckpt")
    other = torch.load(ckpt, weights_only=True)
    other["step"] = 0  # another checkpoint of the same run
    torch.save(other, tmp_path / "differ1" / "last.ckpt")
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = [a.getsockname()[1], b.getsockname()[1]]
    fork_ranks(_worker, (ports, str(tmp_path), str(root)))

    hint = "run_dir must be one directory that every node sees (a shared file system), not node-local copies"
    missing = [(tmp_path / f"missing{r}.txt").read_text() for r in (0, 1)]
    assert missing[0] == missing[1]
    assert missing[0].startswith(f"resume: rank 0 resumes {tmp_path / 'missing0' / 'last.ckpt'} but rank 1 cannot "
                                 f"read it (checkpoint: {tmp_path / 'missing1' / 'last.ckpt'} does not exist); {hint}")
    differ = [(tmp_path / f"differ{r}.txt").read_text() for r in (0, 1)]
    assert differ[0] == differ[1]
    assert differ[0].startswith("resume: ranks hold different ") and "(rank 0: step 1, sha256 " in differ[0]
    assert "rank 1: step 0, sha256 " in differ[0] and hint in differ[0]
    assert not (tmp_path / "missing1" / "last.ckpt").exists()  # nothing trained, nothing written


def test_two_nodes_through_the_launchers_c10d_rendezvous_train_as_one_job(tmp_path, fake_fmnist, forkserver,
                                                                         free_port):
    """README's several-machines command on one machine: two launchers (`--nnodes=2 --rdzv_backend=c10d`), one
    worker each, a shared run_dir. They meet, train as one 2-rank job whose checkpoint rank 0 writes, and the same
    command again finds the finished run on both nodes."""
    root = fake_fmnist(tmp_path / "data", n_train=60, n_test=10)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(port: int) -> list[tuple[int, str, str]]:
        nodes = [forkserver.popen([sys.executable, "-m", "supernet.engine.launch", "--nnodes=2",
                                   "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                   "--rdzv_id=psvit-test", "-m", "supernet.train", f"run_dir={run}",
                                   f"data.root={root}", "data.batch_size=8", "data.val_size=20", "max_steps=2",
                                   "eval.every=0", "progress=false", "device=cpu", "log_every=1"],
                                  cwd=tmp_path, env=env) for _ in range(2)]
        outputs = [p.communicate(timeout=240) for p in nodes]
        return [(p.returncode, out, err) for p, (out, err) in zip(nodes, outputs)]

    first = launch(free_port())
    assert [code for code, _, _ in first] == [0, 0], first
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["step"] == 2 and ck["identity"]["world_size"] == 2
    second = launch(free_port())
    assert [code for code, _, _ in second] == [0, 0], second
    assert sum(f"resumed from {run / 'last.ckpt'} at step 2/2" in out for _, out, _ in second) == 1  # rank 0 says so
    assert torch.load(run / "last.ckpt", weights_only=True)["step"] == 2
