"""Retraining an exported architecture: result.json on the official test split, inherited init equals the
supernet path, 2 ranks through `make retrain NPROC=2`'s launcher train what one process trains, and one-line
errors for bad input (interrupted runs: test_interrupt.py; DeiT-like baselines:
test_baselines.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from space.cost import macs, params
from space.errors import UserError

REPO = Path(__file__).resolve().parents[1]
QUICK = ["data.batch_size=64", "data.val_size=512", "progress=false", "log_every=5"]


def make_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=[*QUICK, *overrides])


@pytest.fixture(scope="module")
def supernet_ckpt(tmp_path_factory) -> Path:
    from supernet.train import train

    run = tmp_path_factory.mktemp("supernet")
    train(make_cfg("supernet", f"run_dir={run}", "max_steps=15", "eval.every=0"))
    return run / "last.ckpt"


@pytest.mark.fmnist
def test_retrain_writes_test_accuracy(tmp_path):
    from supernet.retrain import retrain

    from space.space import SearchSpace
    from omegaconf import OmegaConf

    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))
    arch = space.sample(random.Random(14))  # 1.9 M MACs, basic and shared cells: the 10,000 test images are quick
    arch.save(tmp_path / "arch.json")
    res = retrain(make_cfg("retrain", f"arch={tmp_path / 'arch.json'}", "max_steps=25", "eval.every=25",
                           "optim.lr=8e-3", "optim.warmup_epochs=0.01"))
    out = json.loads((tmp_path / "retrain_arch" / "result.json").read_text())
    assert out == json.loads(json.dumps(res))
    assert out["test_images"] == 10_000 and out["dataset"] == "fashion_mnist"
    assert out["params"] == params(arch) and out["flops_macs"] == macs(arch)
    assert out["test_top1"] > 0.3  # 25 steps already beat chance (0.1) by far
    assert (tmp_path / "retrain_arch" / "last.ckpt").exists()


@pytest.mark.fmnist
def test_inherit_starts_from_the_supernet_path(tmp_path, supernet_ckpt):
    """With zero steps, the retrained model *is* the extracted path: same test accuracy as the supernet."""
    from supernet.engine.checkpoint import load_supernet
    from supernet.data import build_data
    from supernet.engine.loop import top1
    from supernet.retrain import retrain
    from supernet.engine.distributed import setup_distributed

    sck = load_supernet(supernet_ckpt, torch.device("cpu"))
    net = sck.net
    arch = net.space.sample(random.Random(14))  # 1.9 M MACs, basic and shared cells
    arch.save(tmp_path / "a.json")
    res = retrain(make_cfg("retrain", f"arch={tmp_path / 'a.json'}", "init=inherit", f"supernet={supernet_ckpt}",
                           "max_steps=0", "eval.every=0"))
    data = build_data(sck.data, test=True)
    expected = top1(lambda x: net(x, arch), data.test, setup_distributed("cpu"))
    assert res["test_top1"] == expected


@pytest.mark.fmnist
@pytest.mark.parametrize("override, field", [("data.split_seed=1", "split_seed"), ("data.val_size=5000", "val_size")])
def test_inherit_on_another_split_is_one_line_and_writes_nothing(tmp_path, supernet_ckpt, override, field):
    """Inherited weights validated on another held-out split would be scored on images the supernet trained on."""
    from supernet.retrain import retrain

    sck_data = torch.load(supernet_ckpt, map_location="cpu", weights_only=False)["config"]["data"]
    arch = random_path_json(supernet_ckpt, tmp_path)
    cfg = make_cfg("retrain", f"arch={arch}", "init=inherit", f"supernet={supernet_ckpt}", "max_steps=0",
                   f"data.val_size={sck_data['val_size']}", override, f"run_dir={tmp_path / 'run'}")
    with pytest.raises(UserError) as e:
        retrain(cfg)
    assert str(e.value).startswith(f"data.{field}: ") and "init=inherit needs the supernet's split" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def random_path_json(supernet_ckpt: Path, tmp_path: Path) -> Path:
    from supernet.engine.checkpoint import load_supernet

    arch = load_supernet(supernet_ckpt, torch.device("cpu")).net.space.sample(random.Random(14))
    arch.save(tmp_path / "path.json")
    return tmp_path / "path.json"


@pytest.mark.slow
def test_make_retrain_on_two_ranks_trains_what_one_process_trains(tmp_path, fake_root, make_recipe, forkserver):
    """`make retrain NPROC=2` launches 2 gloo workers through supernet.engine.launch: each takes half of every
    global batch (half the steps of one process at the per-rank batch), the gradients are averaged, and the
    weights are those of one process at the same global batch (up to summation order, as AdamW allows:
    test_train.py's 2-ranks test); the test split is scored in full, once."""
    from supernet.retrain import retrain

    arch = REPO / "conf" / "baselines" / "deit_fmnist.json"
    # 50 training images, global batch 16: 3 steps; no augmentation (its draws are per rank)
    common = [f"data.root={fake_root}", "data.val_size=10", "data.augment=false", "optim.epochs=1",
              "optim.warmup_epochs=0", "progress=false", "device=cpu"]
    cmd = make_recipe("retrain", NPROC="2", ARCH=str(arch),
                      ARGS=" ".join([f"run_dir={tmp_path / 'two'}", "data.batch_size=8", *common]))
    assert cmd[1:7] == ["-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2", "-m", "supernet.retrain"]
    r = forkserver.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (two["world_size"], two["steps"], two["test_images"]) == (2, 3, 20)

    torch.set_num_threads(1)
    one = retrain(make_cfg("retrain", f"arch={arch}", f"run_dir={tmp_path / 'one'}", "data.batch_size=16", *common))
    assert (one["world_size"], one["steps"], one["test_images"]) == (1, 3, 20)
    w1, w2 = (torch.load(tmp_path / d / "last.ckpt", weights_only=True)["model"] for d in ("one", "two"))
    for k, v in w1.items():
        off = ~torch.isclose(v, w2[k], rtol=1e-4, atol=1e-5)
        assert off.float().mean() <= 1e-3 and (v - w2[k]).abs().max() <= 2e-3, (k, int(off.sum()))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory, fake_fmnist) -> Path:
    """Generated IDX files: the errors below need a dataset to compare with, not the real one."""
    return fake_fmnist(tmp_path_factory.mktemp("fmnist"))


def test_a_new_run_leaves_no_stale_result_and_a_result_names_its_checkpoint(tmp_path, fake_root, monkeypatch):
    """A finished run's result.json names its checkpoint (path and sha256) and the whole recipe; a new run in the
    same run_dir (another seed, resume=never) removes it with its first step, so a kill after the new run's first
    checkpoint leaves no result of seed 0 next to seed 1's checkpoint (it used to stay); a result that does not
    match the checkpoint is never read as current."""
    import hashlib

    from space.errors import UserError
    from supernet.engine.loop import Trainer
    from supernet.retrain import read_result, retrain

    run = tmp_path / "run"
    common = [f"arch={REPO / 'conf' / 'baselines' / 'deit_fmnist.json'}", f"run_dir={run}", f"data.root={fake_root}",
              "data.val_size=10", "data.batch_size=16", "device=cpu", "eval.every=0"]
    first = retrain(make_cfg("retrain", *common, "max_steps=2"))
    sha = hashlib.sha256((run / "last.ckpt").read_bytes()).hexdigest()
    assert read_result(run) == json.loads(json.dumps(first))
    assert (first["checkpoint"], first["checkpoint_sha256"], first["steps"], first["total_steps"]) == (
        str(run / "last.ckpt"), sha, 2, 2)
    assert first["recipe"] == "light" and first["recipe_config"] == {
        "name": "light", "rand_augment": None, "interpolation": "bilinear", "reprob": 0.0, "mixup": 0.0,
        "cutmix": 0.0, "mix_switch_prob": 0.5, "repeated_aug": 1, "ema": False, "ema_decay": 0.99996}
    assert retrain(make_cfg("retrain", *common, "max_steps=2")) == first | {"train_seconds_this_run": pytest.approx(
        first["train_seconds_this_run"], abs=60)}  # a rerun of the finished run writes it again
    save = Trainer.save

    def killed_after_the_first_checkpoint(self):
        save(self)
        self.checkpoints.wait()
        raise KeyboardInterrupt  # as a kill would stop it: nothing after this checkpoint runs

    monkeypatch.setattr(Trainer, "save", killed_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        retrain(make_cfg("retrain", *common, "seed=1", "resume=never", "max_steps=3", "ckpt_every=1"))
    assert torch.load(run / "last.ckpt", weights_only=True)["step"] == 1
    assert not (run / "result.json").exists()
    (run / "result.json").write_text(json.dumps(first))  # as an older version left it next to the new checkpoint
    with pytest.raises(UserError, match=r"result.json: stale, it was not measured on .*/last.ckpt"):
        read_result(run)


@pytest.mark.parametrize("case,fragment", [
    ("malformed", "malformed JSON"),
    ("deit_tiny", "arch.img_size: 224 but dataset fashion_mnist has 28"),
    ("missing", "cannot read architecture file"),
    ("no_arch", "arch: required"),
    ("inherit_no_supernet", "supernet: init=inherit needs supernet="),
])
def test_bad_input_is_one_line_exit_2(tmp_path, fake_root, run_module, case, fragment):
    (tmp_path / "bad.json").write_text('{"format": "psvit-arch/1", ')
    args = {"malformed": [f"arch={tmp_path / 'bad.json'}"],
            "deit_tiny": [f"arch={REPO / 'conf' / 'baselines' / 'deit_tiny.json'}"],
            "missing": [f"arch={tmp_path / 'nope.json'}"],
            "no_arch": [],
            "inherit_no_supernet": [f"arch={REPO / 'conf' / 'baselines' / 'deit_fmnist.json'}", "init=inherit"]}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_module("supernet.retrain", *args, f"data.root={fake_root}", "data.val_size=10", "data.batch_size=16",
                   "max_steps=1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
