"""The training recipe (supernet/data/recipe.py, conf/recipe/*.yaml): timm's augmentations drawn from the seeds
alone (same key, same batch; global generators untouched), Mixup/CutMix soft targets not smoothed twice,
repeated augmentation's order, the EMA checkpointed so a crashed retraining resumes exactly, and every bad
setting one line. Runs on small generated IDX files; the image-folder path end to end is tests/test_folder.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from supernet.data import DataError, RecipeConfig, build_data
from supernet.data.recipe import BatchAugment, repeated_order, seeded

REPO = Path(__file__).resolve().parents[1]
DEIT = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "recipe" / "deit.yaml"))
IN_MEMORY_DEIT = {**DEIT, "rand_augment": None, "interpolation": "bilinear"}


def test_shipped_recipes_are_light_and_deits():
    light = RecipeConfig.from_cfg(OmegaConf.load(REPO / "conf" / "recipe" / "light.yaml"))
    assert light.is_light and light.identity() is None and light == RecipeConfig()
    deit = RecipeConfig.from_cfg(DEIT)
    # DeiT's main.py defaults: --aa rand-m9-mstd0.5-inc1, bicubic, --reprob 0.25, --mixup 0.8, --cutmix 1.0,
    # --mixup-switch-prob 0.5, --repeated-aug (3 repeats), --model-ema-decay 0.99996
    assert (deit.rand_augment, deit.interpolation, deit.reprob, deit.mixup, deit.cutmix, deit.mix_switch_prob,
            deit.repeated_aug, deit.ema_decay) == ("rand-m9-mstd0.5-inc1", "bicubic", 0.25, 0.8, 1.0, 0.5, 3, 0.99996)
    assert deit.identity()["reprob"] == 0.25 and "name" not in deit.identity()


def test_seeded_draws_depend_on_the_key_alone_and_restore_the_global_generators():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws = []
    for key in (7, 7, 8):
        with seeded(key):
            draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1] != draws[2]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before  # as if nothing had run


def test_batch_augmentation_is_a_function_of_its_key():
    aug = BatchAugment(RecipeConfig.from_cfg(IN_MEMORY_DEIT), num_classes=10, label_smoothing=0.1, device="cpu")
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    out = [aug(x.clone(), y, key) for key in (5, 5, 6)]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not torch.equal(out[0][0], out[2][0])
    targets = out[0][1]
    assert targets.shape == (8, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() == pytest.approx(0.1 / 10)  # smoothing spreads 0.1 over the 10 classes
    assert not torch.equal(out[0][0], x)


def test_mixed_targets_are_not_smoothed_a_second_time():
    from supernet.engine.loop import LossBackward

    logits = torch.randn(4, 5, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 5), -1)
    loss, _ = LossBackward(torch.device("cpu"), False, 0.1)(lambda: logits, soft)
    assert loss.item() == pytest.approx(-(soft * logits.log_softmax(-1)).sum(1).mean().item(), rel=1e-6)
    hard = torch.tensor([0, 1, 2, 3])
    loss, _ = LossBackward(torch.device("cpu"), False, 0.1)(lambda: logits, hard)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, hard, label_smoothing=0.1).item(), rel=1e-6)


def test_repeated_augmentation_spreads_the_copies_over_ranks():
    n, repeats = 12, 3
    ranks = [repeated_order(n, repeats, 2, r, seed=4, epoch=1) for r in range(2)]
    assert ranks == [repeated_order(n, repeats, 2, r, seed=4, epoch=1) for r in range(2)]  # a function of the seeds
    assert len(ranks[0]) == len(ranks[1]) == n // 2
    # timm's RepeatAugSampler deals [a, a, a, b, b, b, ...] out round-robin: copies of an image land on different
    # ranks; each rank's list runs over the first half of the repeated order
    merged = [i for pair in zip(*ranks) for i in pair]
    assert all(merged.count(i) in (0, repeats) for i in set(merged[:-repeats]))
    assert repeated_order(n, repeats, 2, 0, seed=4, epoch=2) != ranks[0]
    assert repeated_order(n, repeats, 2, 0, seed=5, epoch=1) != ranks[0]


def test_in_memory_loader_with_the_recipe_resumes_mid_epoch_exactly(fake_fmnist, tmp_path):
    root = fake_fmnist(tmp_path, n_train=100, n_test=10)
    cfg = {"name": "fashion_mnist", "root": str(root), "val_size": 20, "batch_size": 8}
    shards = [build_data(cfg, rank=r, world_size=2, recipe=IN_MEMORY_DEIT, label_smoothing=0.1) for r in range(2)]
    assert len(shards[0].train) == len(shards[1].train) == 40 // 8  # 80 images x 3 repeats: 40 per rank
    full = list(shards[1].train.epoch(3))
    tail = list(shards[1].train.epoch(3, start=2))
    for (a, ya), (b, yb) in zip(full[2:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert full[0][1].shape == (8, 10)  # Mixup/CutMix soft targets


def test_settings_that_do_not_fit_the_data_are_one_line(fake_fmnist, tmp_path):
    root = fake_fmnist(tmp_path, n_train=40, n_test=10)
    cfg = {"name": "fashion_mnist", "root": str(root), "val_size": 10, "batch_size": 8}
    with pytest.raises(DataError, match=r"^recipe.rand_augment: rand-m9-mstd0.5-inc1 needs decoded images of an "
                                        r"image folder .*set recipe.rand_augment=null$"):
        build_data(cfg, recipe=DEIT)
    with pytest.raises(DataError, match=r"^recipe.interpolation: bicubic applies to image folders only"):
        build_data(cfg, recipe={**DEIT, "rand_augment": None})
    with pytest.raises(DataError, match=r"^data.batch_size: 7 is odd, and Mixup/CutMix mix a batch with its mirror"):
        build_data({**cfg, "batch_size": 7}, recipe=IN_MEMORY_DEIT)
    with pytest.raises(DataError, match=r"^recipe.rand_augment: 'rand-zz9' is not a timm RandAugment spec"):
        build_data({**cfg, "name": "imagenet_folder"}, recipe={**DEIT, "rand_augment": "rand-zz9"})
    with pytest.raises(DataError, match=r"^recipe.mixups: unknown key \(allowed: name, rand_augment,"):
        build_data(cfg, recipe={**IN_MEMORY_DEIT, "mixups": 1.0})
    # timm's RepeatAugSampler on one replica: each image's 3 copies in one batch, a third of the images per epoch
    # (timm refuses it); it used to run
    with pytest.raises(DataError, match=r"^recipe.repeated_aug: 3 on one process puts each image's 3 copies in one "
                                        r"batch and shows 1/3 of the images per epoch .*set recipe.repeated_aug=1, "
                                        r"or train on several ranks"):
        build_data(cfg, recipe=IN_MEMORY_DEIT)
    assert len(build_data(cfg, rank=1, world_size=2, recipe=IN_MEMORY_DEIT).train) == 1  # 15 of 30 a rank
    assert len(build_data(cfg, recipe={**IN_MEMORY_DEIT, "repeated_aug": 1}).train) == 30 // 8


@pytest.mark.parametrize("app, args, expected", [
    ("supernet.train", ["recipe=nope"], "error: config: In 'supernet': Could not find 'recipe/nope'"),
    ("supernet.retrain", ["recipe.reprob=1.5"],
     "error: recipe.reprob: 1.5 is not allowed (allowed: a number in [0, 1])"),
    ("supernet.train", ["recipe.ema=true"], "error: recipe.ema: the search reads the supernet's trained weights"),
    ("supernet.train", ["recipe.repeated_aug=0"],
     "error: recipe.repeated_aug: 0 is not allowed (allowed: an integer >= 1)"),
])
def test_bad_recipe_on_the_command_line_is_one_line_exit_2(run_module, tmp_path, app, args, expected):
    arch = [f"arch={REPO / 'conf' / 'baselines' / 'deit_fmnist.json'}"] if app == "supernet.retrain" else []
    res = run_module(app, f"run_dir={tmp_path / 'run'}", *arch, *args)
    code, err = res.returncode, res.stderr
    assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- EMA through retraining
ARCH = REPO / "conf" / "baselines" / "deit_fmnist.json"


def _retrain_cfg(run_dir: Path, root: Path):
    overrides = [f"arch={ARCH}", f"run_dir={run_dir}", f"data.root={root}", "data.batch_size=16", "data.val_size=40",
                 "max_steps=6", "ckpt_every=3", "eval.every=6", "progress=false", "device=cpu", "recipe=deit",
                 "recipe.repeated_aug=1",
                 "recipe.rand_augment=null", "recipe.interpolation=bilinear", "recipe.ema=true",
                 "recipe.ema_decay=0.9"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("retrain", overrides=overrides)


def test_ema_is_checkpointed_and_a_crashed_retraining_resumes_exactly(fake_fmnist, tmp_path, monkeypatch):
    from supernet.engine.loop import Trainer
    from supernet.retrain import retrain

    root = fake_fmnist(tmp_path / "data", n_train=200, n_test=30)
    torch.set_num_threads(1)
    ref = retrain(_retrain_cfg(tmp_path / "ref", root))
    assert 0 <= ref["test_top1_ema"] <= 1 and ref["recipe"] == "deit" and ref["val_top1_ema"] is not None
    ref_ck = torch.load(tmp_path / "ref" / "last.ckpt", weights_only=True)
    assert ref_ck["identity"]["recipe"]["ema_decay"] == 0.9
    ema, model = ref_ck["ema"], ref_ck["model"]
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # an average, not a copy of the weights

    save = Trainer.save

    def crash_after_first_checkpoint(self):
        save(self)
        if self.step == 3:
            raise RuntimeError("crash")
    monkeypatch.setattr(Trainer, "save", crash_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="crash"):
        retrain(_retrain_cfg(tmp_path / "run", root))
    monkeypatch.setattr(Trainer, "save", save)
    assert retrain(_retrain_cfg(tmp_path / "run", root))["test_top1_ema"] == ref["test_top1_ema"]
    ck = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    for part in ("model", "ema"):
        for k, v in ref_ck[part].items():
            assert torch.equal(v, ck[part][k]), (part, k)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["test_top1"] == ref["test_top1"]
