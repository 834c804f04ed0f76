"""The image-folder path end to end on CPU: a class-folder dataset of JPEGs written here with PIL, supernet
training on 2 gloo ranks through the launcher with a DataLoader worker per rank and ``recipe=deit`` (timm's
RandAugment, random erasing, Mixup/CutMix, repeated augmentation), a kill -9 of the whole job then a rerun that
ends with the weights of an uninterrupted run, the search on the folder's validation split, and retraining
with the EMA; and the folder's bad inputs, each one line and exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from forkserver import kill_job, wait_for
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
STEPS = 8


def write_folder(root: Path, train: int = 20, val: int = 4, size: int = 32) -> Path:
    """``root/{train,val}/<class>/*.jpg``: noise images whose class tints one channel, so they can be learnt."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image[..., c] //= 3
                Image.fromarray(image).save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


def data_args(root: Path) -> list[str]:
    # 60 training images - 12 held out = 48; repeated x3 over 2 ranks: 24 per rank, 3 batches of 8 per epoch
    return ["data=imagenet_folder", f"data.root={root}", "data.img_size=32", "data.val_size=12", "data.batch_size=8",
            "data.eval_batch_size=12", "data.num_workers=1", "device=cpu"]


# cifar_2d's code path (32x32 RGB, 2D pooling, both ops) at a fraction of its width and depth
SPACE = ["space=cifar_2d", f"space.num_classes={len(CLASSES)}", "space.head_dim=16",
         "space.stages=[{cells:2,tokens:[64],dims:[32]},{cells:2,tokens:[64,16],dims:[32,48]},"
         "{cells:2,tokens:[16,4],dims:[48,64]}]"]


def supernet_args(root: Path) -> list[str]:
    return [*SPACE, *data_args(root), "recipe=deit", f"max_steps={STEPS}", "ckpt_every=4", "eval.every=8",
            "eval.n_random=1", "progress=false"]


def launch(forkserver, run_dir: Path, root: Path):
    """``make supernet NPROC=2``'s command: the launcher forked from conftest.py's ``forkserver``, its ranks
    started by torchrun through the server's client (forked too: tests/forkserver.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return forkserver.popen([sys.executable, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2",
                             "-m", "supernet.train", f"run_dir={run_dir}", *supernet_args(root)], cwd=REPO, env=env)


def ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", weights_only=True)


def _rank(rank: int, port: int, run_dir: str, root: str) -> None:
    """One rank of the uninterrupted run, with the environment torchrun gives it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.train import train

    train(_compose("supernet", f"run_dir={run_dir}", *supernet_args(Path(root))))


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory, fork_ranks, free_port) -> Path:
    """The uninterrupted 2-rank run (its ranks forked from this process: the launcher's part is the test's)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    fork_ranks(_rank, (free_port(), str(run), str(folder)))
    return run


@pytest.mark.slow
def test_two_ranks_with_workers_and_the_deit_recipe_resume_exactly_after_kill_9(folder, reference, tmp_path,
                                                                               forkserver):
    ref = ckpt(reference)
    assert ref["step"] == STEPS and ref["identity"]["recipe"]["repeated_aug"] == 3
    assert ref["identity"]["world_size"] == 2 and ref["config"]["data"]["num_workers"] == 1
    run = tmp_path / "run"
    p = launch(forkserver, run, folder)
    wait_for(p, run / "last.ckpt")
    kill_job(p.pid)  # the launcher, both ranks and their decoding workers
    p.communicate()
    assert ckpt(run)["step"] == 4
    rerun = launch(forkserver, run, folder)
    out, err = rerun.communicate(timeout=280)
    assert rerun.returncode == 0, err
    assert f"resumed from {run / 'last.ckpt'} at step 4/{STEPS}" in out
    final = ckpt(run)
    assert final["task_state"] == ref["task_state"]  # the same paths
    for k, v in ref["model"].items():
        assert torch.equal(v, final["model"][k]), k  # the same images, augmentations, mixes and updates


def _compose(app: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(app, overrides=list(overrides))


@pytest.mark.slow
def test_search_and_retraining_on_the_folder(folder, reference, tmp_path):
    from search.evolve import evolve
    from supernet.retrain import retrain

    torch.set_num_threads(1)
    search = tmp_path / "search"
    evolve(_compose("evolve", f"checkpoint={reference / 'last.ckpt'}", f"run_dir={search}", "eval_images=12",
                    "evolution.population=4", "evolution.topk=2", "evolution.mutations=2", "evolution.crossovers=1",
                    "evolution.generations=2", "progress=false", "show_top=2", "device=cpu"))
    best = search / "best_arch.json"
    assert json.loads(best.read_text())["num_classes"] == len(CLASSES)
    result = retrain(_compose("retrain", f"arch={best}", f"run_dir={tmp_path / 'retrain'}", *data_args(folder),
                              "recipe=deit", "recipe.repeated_aug=1", "recipe.ema=true", "max_steps=3", "eval.every=3",
                              "progress=false"))
    assert result["test_images"] == 3 * 4 and result["dataset"] == "imagenet_folder" and result["recipe"] == "deit"
    assert 0 <= result["test_top1"] <= 1 and 0 <= result["test_top1_ema"] <= 1


# ----------------------------------------------------------------------------- bad folders
def _broken(tmp_path: Path, how: str) -> Path:
    root = tmp_path / how
    if how == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    else:
        write_folder(root, train=5, val=1, size=8)
    if how == "classes_differ":
        (root / "val" / "cat").rename(root / "val" / "dog")
    if how == "unreadable":
        for image in (root / "train" / "bee").iterdir():  # read for sure: 3 steps of 4 cover all 12 training images
            image.write_bytes(b"not a jpeg")
    return root


@pytest.mark.parametrize("how, expected", [
    ("no_classes", r"^error: imagenet_folder in .*/no_classes: Couldn't find any class folder in .*/train"),
    ("classes_differ", r"^error: imagenet_folder in .*: train/ has 3 class folders, val/ 3, and they differ"),
    ("unreadable", r"^error: data.root: cannot read image .*/train/bee/\d\.jpg \(UnidentifiedImageError: .*\); "
                   r"remove or replace the file$"),
])
def test_bad_image_folder_is_one_line_exit_2(run_module, tmp_path, how, expected):
    import re

    root = _broken(tmp_path, how)
    args = [*SPACE, *data_args(root), "data.val_size=3", "data.batch_size=4", f"run_dir={tmp_path / 'run'}",
            "max_steps=3", "progress=false"]
    res = run_module("supernet.train", *args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert re.match(expected, res.stderr.strip()), res.stderr


def test_the_fitness_set_of_a_class_sorted_folder_holds_every_class(tmp_path):
    """ImageFolder lists images class by class and the held-out split was sorted: the search's first 40 fitness
    images of a 20-class folder covered 5 classes. The held-out split is now class-interleaved: any prefix holds
    each class in proportion to its share of the split (within one image), the same images on every build."""
    from collections import Counter

    from PIL import Image

    from search.inherited import validation_batches

    rng = np.random.default_rng(0)
    classes = [f"c{k:02d}" for k in range(20)]
    for name in classes:
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "val" / name / "0.png")
        for i in range(10):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "train" / name / f"{i}.png")
    cfg = {"name": "imagenet_folder", "root": str(tmp_path), "img_size": 16, "val_size": 100, "num_workers": 0,
           "batch_size": 50}
    every = torch.cat([y for _, y in validation_batches(cfg, None, 25, torch.device("cpu"))])
    first = torch.cat([y for _, y in validation_batches(cfg, 40, 25, torch.device("cpu"))])
    share = Counter(every.tolist())
    assert len(share) == 20 and sorted(share.elements()) != every.tolist()  # not in class order any more
    got = Counter(first.tolist())
    assert set(got) == set(range(20)) and all(abs(got[c] - 40 * share[c] / 100) <= 1 for c in share)
    again = torch.cat([y for _, y in validation_batches(cfg, 40, 25, torch.device("cpu"))])
    assert torch.equal(first, again)
