"""The prepared store (supernet/data/store.py, store_writer.py, supernet/prepare.py) and its loaders
(supernet/data/prepared.py, supernet/data/device_aug.py) on a tiny generated folder of non-square JPEGs: the store
holds every training image whole as PIL decodes and resizes it, and the folder pipeline's evaluation pixels for the
held-out and test images; the loaders keep the folder loader's contract, order and sharding, draw every
augmentation from the batch's key (resume = uninterrupted); the device augmentation is timm's (crop boxes on the
whole image, PIL's resampling, RandAugment ops against timm's PIL ops); the validation split is decoded once; search
and fidelity see the pixels training validated on; and every bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from space.errors import UserError
from supernet.data import DataError, build_data
from supernet.data.device_aug import (AFFINE, BLEND, LUT, DeviceAugment, RandAugmentSpec, affine_theta, blend_op,
                                      lut_op, resample, resized_crop, rrc_boxes)
from supernet.data.store import CropArrays, ImageArrays

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
IMG = 32  # evaluation crop; the evaluation transform resizes the short side to floor(32 / 0.875) = 36 first
SHORT = 34  # the stored training images' short side: every test image (short side 36 or 37) is downscaled
# on one process, without repeated augmentation (refused there, as timm does)
DEIT = {**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "recipe" / "deit.yaml")), "repeated_aug": 1}
MEAN = (0.485, 0.456, 0.406)
LIGHT = {"interpolation": "bicubic"}  # recipe=light with the store's interpolation


def write_folder(root: Path, train: int = 6, val: int = 2) -> Path:
    """``root/{train,val}/<class>/*.jpg``, landscape and portrait JPEGs whose class tints a channel; some need no
    resize but a centre crop at an offset of x.5 (5.5 and 6.5: torchvision rounds half to even)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = ((50, 37), (36, 47), (49, 36))[i % 3]
                image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image[..., c] //= 3
                Image.fromarray(image).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def prepare_args(src: Path, out: Path, **kw) -> dict:
    return {"src": str(src), "out": str(out), "img_size": IMG, "short_side": SHORT, "interpolation": "bicubic",
            "shards": 2, "workers": 0, "progress": False, "val_size": 6, "split_seed": 0, **kw}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def store(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from supernet.prepare import prepare

    out = tmp_path_factory.mktemp("stores") / "store"
    prepare(prepare_args(folder, out))
    return out


def cfg(root: Path, **kw) -> dict:
    # 18 training images - 6 held out = 12: 2 batches of 3 per rank on 2 ranks, every image once
    return {"name": "imagenet_prepared", "root": str(root), "img_size": IMG, "val_size": 6, "batch_size": 3,
            "eval_batch_size": 4, "num_workers": 0, **kw}


def arrays(store: Path, split: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((store / split).glob("images-*.npy"))])


# ----------------------------------------------------------------------------------------------------- the store
def test_store_holds_whole_images_and_the_folders_evaluation_crops(folder, store):
    from PIL import Image
    from timm.data import create_transform
    from torchvision import datasets

    from supernet.data import split_train_val
    from supernet.data.store import stored_size

    meta = json.loads((store / "meta.json").read_text())
    assert (meta["format"], meta["img_size"], meta["short_side"], meta["classes"]) == ("psvit-prepared/2", 32, SHORT,
                                                                                      list(CLASSES))
    assert meta["splits"]["train"] == {"count": 18, "shards": [9, 9], "side": None, "max_h": 46, "max_w": 44}
    assert meta["splits"]["val"] == {"count": 6, "side": 32, "shards": [3, 3]}
    assert meta["heldout"] == {"val_size": 6, "split_seed": 0}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", meta["source"]["digest"])
    evaluation = create_transform(IMG, is_training=False, crop_pct=0.875, interpolation="bicubic", use_prefetcher=True)
    train = ImageArrays(store, _split_meta(store, "train"), 3)
    folder_set = datasets.ImageFolder(str(folder / "train"))
    assert train.labels.tolist() == folder_set.targets  # ImageFolder's order: the same held-out indices
    for k, (path, _) in enumerate(folder_set.samples):  # whole, as PIL resizes it: (50, 37) -> (45, 34), ...
        image = Image.open(path).convert("RGB")
        h, w = stored_size(image.height, image.width, SHORT)
        assert (h, w) == tuple(train.sizes[k]) and min(h, w) == SHORT
        out = np.zeros((1, 3, 46, 44), np.uint8)
        train.read_into(out, np.array([k]), np.array([0]))
        assert np.array_equal(out[0, :, :h, :w], np.asarray(image.resize((w, h), Image.BICUBIC)).transpose(2, 0, 1))
    _, heldout = split_train_val(18, 6, 0)
    crops = np.load(store / "train" / "heldout.npy")
    for k, row in enumerate(heldout.tolist()):  # the folder's evaluation pixels of the held-out images
        assert np.array_equal(crops[k], evaluation(Image.open(folder_set.samples[row][0]).convert("RGB")))
    val_set = datasets.ImageFolder(str(folder / "val"))
    assert np.load(store / "val" / "labels.npy").tolist() == val_set.targets
    for k, (path, _) in enumerate(val_set.samples):
        assert np.array_equal(arrays(store, "val")[k], evaluation(Image.open(path).convert("RGB"))), path


def _split_meta(store: Path, split: str):
    from supernet.data.store import StoreMeta

    return StoreMeta.read(store).splits[split]


def test_stored_sizes_downscale_only_and_cap_the_long_side():
    from supernet.data.store import default_short_side, stored_size

    assert default_short_side(224) == 320 and default_short_side(32) == 45
    assert stored_size(375, 500, 320) == (320, 426)  # torchvision's Resize(320): int(320 * 500 / 375)
    assert stored_size(500, 333, 320) == (480, 320)
    assert stored_size(200, 300, 320) == (200, 300)  # smaller images are kept as they are
    assert stored_size(300, 1000, 320) == (192, 640)  # a panorama: the long side at most 2 x 320
    assert stored_size(100, 900, 320) == (71, 640)  # even when its short side is below 320


def test_decoding_processes_write_the_in_process_store_and_the_digest_follows_the_bytes(folder, store, tmp_path,
                                                                                       run_module):
    from supernet.prepare import prepare

    prepare(prepare_args(folder, tmp_path / "pool", workers=2, shards=4))
    assert len(list((tmp_path / "pool" / "train").glob("images-*-of-00004.npy"))) == 4
    for split in ("train", "val"):
        assert np.array_equal(arrays(store, split), arrays(tmp_path / "pool", split))
    assert np.array_equal(np.load(store / "train" / "heldout.npy"),
                          np.load(tmp_path / "pool" / "train" / "heldout.npy"))
    digest = lambda root: json.loads((root / "meta.json").read_text())["source"]["digest"]  # noqa: E731
    assert digest(tmp_path / "pool") == digest(store)
    copy = shutil.copytree(folder, tmp_path / "copy")  # the same bytes elsewhere: the same digest
    res = run_module("supernet.prepare", f"src={copy}", f"out={tmp_path / 'copy_store'}", f"img_size={IMG}",
                     "workers=0", "progress=false", "val_size=6", f"short_side={SHORT}")
    assert res.returncode == 0, res.stderr
    assert ("3 classes, train 18 whole images (short side at most 34, up to 46x44) and the 6 held out as 32x32 "
            "evaluation crops, val 6 as 32x32 crops") in res.stdout
    assert digest(tmp_path / "copy_store") == digest(store)
    (copy / "val" / "bee" / "1.jpg").write_bytes((copy / "val" / "bee" / "0.jpg").read_bytes())
    prepare(prepare_args(copy, tmp_path / "changed_store"))
    assert digest(tmp_path / "changed_store") != digest(store)


# ---------------------------------------------------------------------------------------------------- the loaders
def test_store_and_folder_serve_the_same_images_in_the_same_batches(folder, store):
    for recipe in (LIGHT, {**LIGHT, "repeated_aug": 3}):
        for rank in range(2):
            prepared = build_data(cfg(store), rank=rank, world_size=2, test=True, recipe=recipe)
            decoded = build_data(cfg(folder, name="imagenet_folder"), rank=rank, world_size=2, test=True,
                                 recipe=recipe)
            assert len(prepared.train) == len(decoded.train) and prepared.num_classes == 3
            assert [y.tolist() for _, y in prepared.train.epoch(1)] == [y.tolist() for _, y in decoded.train.epoch(1)]
            for split in ("val", "test"):  # the evaluation pixels, exactly
                pairs = list(zip(getattr(prepared, split), getattr(decoded, split), strict=True))
                assert pairs and all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in pairs)


def test_ranks_shards_are_disjoint_and_cover_the_split(store):
    from supernet.data import split_train_val

    train_idx, val_idx = (i.numpy() for i in split_train_val(18, 6, 0))
    shards = [build_data(cfg(store), rank=r, world_size=2, recipe=LIGHT) for r in range(2)]
    assert len(shards[0].train) == len(shards[1].train) == 2 and shards[0].train.num_examples == 6
    rows = [s.train.plan(3).ravel() for s in shards]
    assert not set(rows[0]) & set(rows[1]) and sorted([*rows[0], *rows[1]]) == sorted(train_idx)
    assert not np.array_equal(shards[0].train.plan(3), shards[0].train.plan(4))  # reshuffled per epoch
    blocks = [s.val.rows for s in shards]  # positions in the store's held-out crops, which are val_idx's images
    rows = np.concatenate(blocks)  # contiguous blocks of the split's class-interleaved order: each image once
    assert sorted(rows.tolist()) == list(range(len(val_idx)))
    assert sum(s.val.num_examples for s in shards) == 6 and len(shards[0].val) == 1


def test_shuffles_are_seeded_with_a_mix_of_seed_and_epoch(store, folder):
    """DistributedSampler seeds its permutation with seed + epoch, which made seed 0's epoch 1 seed 1's epoch 0
    (and every epoch of seed s the next one of seed s - 1); the store and the folder mix the two instead."""
    plans = {seed: build_data(cfg(store, seed=seed), recipe=LIGHT).train for seed in (0, 1)}
    assert not np.array_equal(plans[0].plan(1), plans[1].plan(0))
    assert not np.array_equal(plans[0].plan(2), plans[1].plan(1))
    folders = {seed: build_data(cfg(folder, name="imagenet_folder", seed=seed, augment=False), recipe=LIGHT).train
               for seed in (0, 1)}
    labels = {(seed, e): [y.tolist() for _, y in folders[seed].epoch(e)] for seed, e in ((0, 1), (1, 0))}
    assert labels[0, 1] != labels[1, 0]


def test_batches_are_a_function_of_their_key_so_a_resume_replays_them(store):
    data = build_data(cfg(store, num_workers=3, batch_size=4), recipe=DEIT, label_smoothing=0.1)
    state = torch.random.get_rng_state()
    full = list(data.train.epoch(2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generators are left alone
    again = list(data.train.epoch(2))
    tail = list(data.train.epoch(2, start=1))
    single = list(build_data(cfg(store, batch_size=4), recipe=DEIT, label_smoothing=0.1).train.epoch(2))
    for a, b, c in zip(full, again, single, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])  # any reader threads
    assert len(tail) == len(full) - 1 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                              for a, b in zip(full[1:], tail, strict=True))
    other = next(iter(data.train.epoch(3)))
    assert not torch.equal(other[0], full[0][0])


def test_device_augmentation_shapes_and_value_ranges(store):
    deit = build_data(cfg(store, batch_size=4), recipe=DEIT, label_smoothing=0.1)
    lo = (0 - torch.tensor(MEAN)) / torch.tensor((0.229, 0.224, 0.225))
    hi = (1 - torch.tensor(MEAN)) / torch.tensor((0.229, 0.224, 0.225))
    for x, y in deit.train.epoch(0):
        assert x.shape == (4, 3, IMG, IMG) and x.dtype == torch.float32 and torch.isfinite(x).all()
        # erasing writes N(0, 1) noise; everything else stays on the normalized pixel scale
        inside = ((x >= lo.view(1, 3, 1, 1) - 1e-5) & (x <= hi.view(1, 3, 1, 1) + 1e-5)).float().mean()
        assert inside > 0.6
        assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4)) and y.min() >= 0.1 / 3 - 1e-6
    light = build_data(cfg(store, batch_size=4), recipe=LIGHT)
    x, y = next(iter(light.train))
    assert x.shape == (4, 3, IMG, IMG) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert (x >= lo.view(1, 3, 1, 1) - 1e-5).all() and (x <= hi.view(1, 3, 1, 1) + 1e-5).all()
    flat = build_data(cfg(store, batch_size=4, augment=False), recipe=LIGHT)  # no augmentation: the evaluation frame
    rows = flat.train.plan(0)[0]
    u8, _ = next(flat.train.prefetch([rows]))
    expected = flat.train.view(u8, flat.train.prefetch.split.sizes[rows])
    assert expected.shape == (4, 3, IMG, IMG)
    assert torch.equal(next(iter(flat.train))[0], torch.addcmul(flat.train._shift, expected.float(),
                                                                flat.train._scale))


# -------------------------------------------------------------------------------------- the device augmentation
def test_resized_crops_are_pils_crop_and_resize_within_two_levels():
    """The device crop is torchvision's resized_crop of a PIL image (crop, then PIL's antialiased resize) within two
    levels, for boxes smaller and larger than the output, both interpolations; a box of the output's size is an exact
    crop."""
    from PIL import Image

    rng = np.random.default_rng(3)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).resize((57, 41),
                                                                                                  Image.BICUBIC))
    pixels = np.clip(smooth.astype(int) + rng.integers(-25, 25, smooth.shape), 0, 255).astype(np.uint8)  # (41, 57)
    x = torch.zeros(2, 3, 48, 60, dtype=torch.uint8)  # a batch canvas larger than the image: never read
    x[:, :, :41, :57] = torch.from_numpy(pixels).permute(2, 0, 1)
    x[1, :, 41:, :] = 255
    for mode, filt in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        for top, left, h, w in ((3, 5, 30, 40), (10, 20, 9, 13), (0, 0, 41, 57), (0, 1, 41, 30)):
            box = torch.tensor([[top, left, h, w]] * 2, dtype=torch.float32)
            ours = resized_crop(x, box, 24, mode)
            crop = Image.fromarray(pixels).crop((left, top, left + w, top + h))
            want = np.array(crop.resize((24, 24), filt))
            diff = (ours[0].permute(1, 2, 0).int() - torch.from_numpy(want).int()).abs()
            # PIL's weights are fixed-point, and Pillow 13 runs the vertical pass first when it costs less: two
            # levels at most (0 for most boxes)
            assert diff.max() <= 2 and diff.float().mean() < 0.4, (mode, top, left, h, w, diff.max())
            assert torch.equal(ours[0], ours[1])
        exact = resized_crop(x, torch.tensor([[2.0, 7.0, 24.0, 24.0]]), 24, mode)
        assert torch.equal(exact[0], x[0, :, 2:26, 7:31])


def test_random_resized_crop_boxes_follow_timm():
    """On whole images of any shape, as timm draws them on the image (no longer on a centre square): the same
    distributions of area, ratio and position, and timm's fallback for an image too elongated for 10 tries."""
    import random

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)
    for h, w in ((256, 256), (375, 500), (480, 320), (40, 400)):
        top, left, bh, bw = rrc_boxes(np.random.default_rng(0), np.full(4000, h), np.full(4000, w))
        assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
        image = Image.new("RGB", (w, h))
        ref = np.array([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(4000)], dtype=float)
        for ours, theirs in ((bh * bw / (h * w), ref[:, 2] * ref[:, 3] / (h * w)), (bw / bh, ref[:, 3] / ref[:, 2]),
                             ((top + bh / 2) / h, (ref[:, 0] + ref[:, 2] / 2) / h),
                             ((left + bw / 2) / w, (ref[:, 1] + ref[:, 3] / 2) / w)):
            assert abs(ours.mean() - theirs.mean()) < 0.02 and abs(ours.std() - theirs.std()) < 0.02, (h, w)
    # (40, 400) mostly fails all 10 tries: timm's fallback, the full height at the widest ratio, centred
    centred = lambda t, lf, hh, ww: np.mean((hh == 40) & (ww == 53) & (lf == 173) & (t == 0))  # noqa: E731
    assert centred(top, left, bh, bw) > 0.5 and abs(centred(top, left, bh, bw) - centred(*ref.T)) < 0.03


def _pil_reference(name: str, image, arg: float, resample_filter):
    from timm.data import auto_augment as aa

    fn = {"AutoContrast": aa.auto_contrast, "Equalize": aa.equalize, "Invert": aa.invert, "Posterize": aa.posterize,
          "Solarize": aa.solarize, "SolarizeAdd": aa.solarize_add, "Color": aa.color, "Contrast": aa.contrast,
          "Brightness": aa.brightness, "Sharpness": aa.sharpness, "Rotate": aa.rotate, "ShearX": aa.shear_x,
          "ShearY": aa.shear_y, "TranslateX": aa.translate_x_abs, "TranslateY": aa.translate_y_abs}[name]
    if name in ("AutoContrast", "Equalize", "Invert"):
        return fn(image)
    if name in AFFINE:
        return fn(image, arg, fillcolor=(124, 116, 104), resample=resample_filter)
    return fn(image, arg)


@pytest.mark.parametrize("name, arg", [("AutoContrast", 0), ("Equalize", 0), ("Invert", 0), ("Posterize", 2),
                                       ("Solarize", 100), ("SolarizeAdd", 80), ("Color", 0.3), ("Contrast", 1.7),
                                       ("Brightness", 0.4), ("Sharpness", 1.9), ("Rotate", -25.0), ("ShearX", 0.23),
                                       ("ShearY", -0.17), ("TranslateX", 7.0), ("TranslateY", -5.0)])
def test_randaugment_ops_match_timms_pil_ops(name, arg):
    from PIL import Image

    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32),
                                                                                                  Image.BICUBIC))
    pixels = np.clip(smooth.astype(int) + rng.integers(-20, 20, smooth.shape), 5, 250).astype(np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    fill = torch.tensor((124.0, 116.0, 104.0))
    modes = ("nearest", "bicubic") if name in AFFINE else ("",)
    for mode in modes:
        filt = Image.NEAREST if mode == "nearest" else Image.BICUBIC
        expected = torch.from_numpy(np.asarray(_pil_reference(name, Image.fromarray(pixels), arg, filt)).copy())
        expected = expected.permute(2, 0, 1)[None].int()
        if name in AFFINE:
            ours = resample(x, torch.from_numpy(affine_theta(name, np.array([arg]), 32)), 32, mode, fill)
        elif name in LUT:
            ours = lut_op(name, x, torch.tensor([float(arg)]))
        else:
            ours = blend_op(name, x, torch.tensor([float(arg)]))
        diff = (ours.int() - expected).abs()
        if mode == "bicubic":  # PIL's bicubic kernel has a = -0.5, torch's a = -0.75
            assert diff.float().mean() < 1.5 and diff.max() <= 12, (diff.float().mean(), diff.max())
        else:
            assert diff.max() == 0, (mode, diff.max())


def test_randaugment_draws_follow_timms_parameters():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    spec = RandAugmentSpec.parse("rand-m9-mstd0.5-inc1", 224, MEAN)
    assert spec.ops == tuple(_RAND_INCREASING_TRANSFORMS) and set(spec.ops) <= set(AFFINE + LUT + BLEND)
    assert (spec.num_layers, spec.prob, spec.magnitude, spec.magnitude_std, spec.magnitude_max) == (2, 0.5, 9, 0.5, 10)
    assert (spec.fill, spec.translate_const) == ((124, 116, 104), 100.0)
    aug = DeviceAugment(224, "bicubic", True, spec, "cpu")
    n = 6000
    steps = aug.plan(np.random.default_rng(0), n)
    applied = sum(len(idx) for _, idx, _ in steps)
    assert abs(applied / (2 * n) - 0.5) < 0.02  # each of 2 layers applies its op with p 0.5
    counts = Counter()
    for name, idx, _ in steps:
        counts[name] += len(idx)
    assert len(counts) == 15 - 5 + 1  # a layer's 5 geometric ops are one step
    assert all(abs(counts[name] / (2 * n * 0.5 / 15) - 1) < 0.2 for name in counts if name != "affine")
    assert abs(counts["affine"] / (2 * n * 0.5 * 5 / 15) - 1) < 0.1  # Rotate, ShearX/Y, TranslateX/YRel
    bits = np.concatenate([arg for name, _, arg in steps if name == "PosterizeIncreasing"])
    # 4 - floor(0.4 level) bits of N(9, 0.5) clipped to [0, 10]: 1 bit mostly, 0 when clipped (P = 2.3%)
    assert set(np.unique(bits)) <= {0.0, 1.0, 2.0} and (bits == 1).mean() > 0.9 and 0.01 < (bits == 0).mean() < 0.04
    sizes = np.array([[36, 36], [30, 40], [40, 30], [36, 50], [20, 36]])
    assert aug.draws(7, sizes)[0].tolist() == aug.draws(7, sizes)[0].tolist()


def test_posterize_to_zero_bits_is_black_on_both_paths_not_an_error(folder):
    """timm asks Pillow 13 for 0 bits at magnitude 10, which it refuses: the folder's workers would report the image
    as unreadable (about 1 in 660 with DeiT's recipe); both paths give a black image instead."""
    from PIL import Image

    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    data = build_data(cfg(folder, name="imagenet_folder", batch_size=4), recipe=DEIT, label_smoothing=0.1)
    ra = next(t for t in data.train.subset.dataset.transform.transforms if hasattr(t, "ops"))
    op = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # bits = 4 - int(10 / 10 * 4) = 0
    assert np.asarray(op(image)).max() == 0
    x = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    assert lut_op("PosterizeIncreasing", x, torch.tensor([0.0])).max() == 0


# ------------------------------------------------------------------------------------------ decoded once, kept
def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    reads: list[int] = []
    original = CropArrays.read_into

    def counting(self, out, rows, positions):
        reads.append(len(rows))
        original(self, out, rows, positions)
    monkeypatch.setattr(CropArrays, "read_into", counting)
    return reads


def test_validation_is_read_once_and_kept_on_the_device(store, folder, monkeypatch):
    reads = _count_reads(monkeypatch)
    data = build_data(cfg(store, eval_batch_size=2), recipe=LIGHT)
    first = next(iter(data.val))  # a pass cut short (eval.max_batches) keeps the batch it used
    assert list(data.val.cache) == [0] and data.val.cache[0][0].dtype == torch.uint8
    reads.clear()
    full = list(data.val)
    assert reads == [2, 2] and torch.equal(full[0][0], first[0]) and len(full) == 3  # batches 1 and 2 only
    again = list(data.val)
    assert reads == [2, 2] and all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    uncached = build_data(cfg(store, cache_val=False), recipe=LIGHT)
    list(uncached.val), list(uncached.val)
    assert reads == [2, 2] + [4, 2] * 2 and uncached.val.cache is None

    decoded = build_data(cfg(folder, name="imagenet_folder"), recipe=LIGHT)
    kept = list(decoded.val)
    images = decoded.val.subset.dataset

    def unreadable(path):
        raise OSError(f"{path} is gone")
    monkeypatch.setattr(images, "loader", unreadable)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kept, decoded.val, strict=True))  # no decoding
    fresh = build_data(cfg(folder, name="imagenet_folder", cache_val=False), recipe=LIGHT)
    list(fresh.val)
    monkeypatch.setattr(fresh.val.subset.dataset, "loader", unreadable)
    with pytest.raises(DataError, match="cannot read image"):
        list(fresh.val)


def test_a_reader_error_reaches_the_training_thread(store, monkeypatch):
    data = build_data(cfg(store), recipe=LIGHT)

    def broken(self, out, rows, positions):
        raise OSError("Input/output error")
    monkeypatch.setattr(ImageArrays, "read_into", broken)
    with pytest.raises(OSError, match="Input/output error"):
        list(data.train.epoch(0))


# ---------------------------------------------------------------------------------------------- user errors
def test_settings_the_store_cannot_serve_are_refused_in_one_line(store):
    with pytest.raises(DataError, match=r"^recipe.rand_augment: rand-m9-t3a uses Desaturate, GaussianBlur, which "
                                        r"data=imagenet_prepared does not apply on the device"):
        build_data(cfg(store, batch_size=4), recipe={**DEIT, "rand_augment": "rand-m9-t3a"})
    with pytest.raises(DataError, match=r"^recipe.interpolation: bilinear but the store .* holds evaluation crops "
                                        r"resized with bicubic \(set recipe.interpolation=bicubic, or prepare"):
        build_data(cfg(store))  # recipe=light crops bilinearly
    with pytest.raises(DataError, match=r"^data.img_size: 224 but the store .* was prepared for 32 \(set "
                                        r"data.img_size=32, or prepare a store with img_size=224\)$"):
        build_data(cfg(store, img_size=224), recipe={"interpolation": "bicubic"})
    for other in ({"val_size": 5}, {"split_seed": 1}):  # the store holds the crops of 6 images held out with seed 0
        with pytest.raises(DataError, match=r"^data.val_size: .* but the store .* holds the evaluation crops of the 6 "
                                            r"training images held out with split_seed 0 \(set data.val_size=6 "
                                            r"data.split_seed=0, or prepare a store with"):
            build_data(cfg(store, **other), recipe=LIGHT)
    assert build_data(cfg(store, val_size=0), recipe=LIGHT).val is None  # no held-out images: nothing to match


def _broken_folder(tmp_path: Path, folder: Path, how: str) -> Path:
    src = tmp_path / "src"
    if how != "missing_src":
        shutil.copytree(folder, src)
    if how == "no_val":
        shutil.rmtree(src / "val")
    if how == "empty_class":
        for image in (src / "train" / "bee").iterdir():
            image.unlink()
    if how == "classes_differ":
        (src / "val" / "cat").rename(src / "val" / "dog")
    if how == "unreadable":  # the last file decoded: everything before it was written to the temp directory
        (src / "val" / "cat" / "1.jpg").write_bytes(b"not a jpeg")
    return src


@pytest.mark.parametrize("how, args, expected", [
    ("missing_src", [], r"^error: src: .*/src is not a directory \(pass src=DIR holding train/<class>/\* and "),
    ("no_val", [], r"^error: src: no directory .*/src/val \(src needs train/<class>/\* and val/<class>/\*\)$"),
    ("empty_class", [], r"^error: src: class folder .*/src/train/bee holds no image \(\.jpg, .*\); add images or "),
    ("classes_differ", [], r"^error: src: train/ has 3 class folders, val/ 3, and they differ"),
    ("unreadable", [], r"^error: src: cannot read image .*/src/val/cat/1\.jpg \(UnidentifiedImageError: .*\); "
                       r"remove or replace the file$"),
    ("unreadable", ["workers=2"], r"^error: src: cannot read image .*/val/cat/1\.jpg \(UnidentifiedImageError"),
    ("ok", ["short_side=30"], r"^error: short_side: 30 is smaller than img_size 32 \(allowed: at least 32; null = "
                              r"45\)$"),
    ("ok", ["val_size=18"], r"^error: val_size: 18 for a 18-image training set \(allowed: 0..17; the runs on the "
                            r"store hold out this many training images, data.val_size\)$"),
    ("ok", ["out=null"], r"^error: out: required \(e.g. out=/data/imagenet_224\)$"),
    ("ok", ["shards=0"], r"^error: shards: 0 is not allowed \(allowed: an integer >= 1\)$"),
    ("exists", [], r"^error: .*/out: already exists \(remove it or choose another path\); nothing was written$"),
])
def test_prepare_failures_are_one_line_exit_2_and_write_nothing(run_module, tmp_path, folder, how, args, expected):
    src = _broken_folder(tmp_path, folder, how)
    (tmp_path / "stores").mkdir()
    out = tmp_path / "stores" / "out"
    if how == "exists":
        out.mkdir()
    before = sorted(p.name for p in (tmp_path / "stores").iterdir())
    given = {"src": str(src), "out": str(out), "img_size": IMG, "progress": "false", "workers": 0, "val_size": 6,
             **dict(a.split("=", 1) for a in args)}
    res = run_module("supernet.prepare", *(f"{k}={v}" for k, v in given.items()))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert re.match(expected, res.stderr.strip()), res.stderr
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == before  # no store, no temp directory


def _broken_store(tmp_path: Path, store: Path, how: str) -> Path:
    root = shutil.copytree(store, tmp_path / how)
    meta = root / "meta.json"
    if how in ("old_format", "format_1"):
        version = 0 if how == "old_format" else 1
        meta.write_text(meta.read_text().replace("psvit-prepared/2", f"psvit-prepared/{version}"))
    if how == "truncated":
        shard = root / "train" / "images-00001-of-00002.npy"
        shard.write_bytes(shard.read_bytes()[:-1000])
    if how == "no_meta":
        meta.unlink()
    if how == "bad_json":
        meta.write_text("{not json")
    return root


@pytest.mark.parametrize("how, expected", [
    ("old_format", r"^error: data.root: .*/meta.json is format 'psvit-prepared/0' \(allowed: 'psvit-prepared/2', "
                   r"this version's\); prepare the store again: python -m supernet.prepare src=FOLDER out=DIR$"),
    ("format_1", r"^error: data.root: .*/meta.json is format 'psvit-prepared/1': its training images are centre "
                 r"squares, from which no crop reaches the sides of the photo as timm's do; prepare the store again: "
                 r"python -m supernet.prepare src=FOLDER out=DIR \(format 'psvit-prepared/2'\)$"),
    ("truncated", r"^error: data.root: .*/train/images-00001-of-00002.npy is truncated or not a \.npy array \("),
    ("no_meta", r"^error: data.root: no prepared store at .*/no_meta \(meta.json missing\); prepare the store again"),
    ("bad_json", r"^error: data.root: .*/meta.json is not a valid store description \(JSONDecodeError\); "),
])
def test_bad_store_is_one_line_exit_2_and_writes_nothing(run_module, tmp_path, store, how, expected):
    root = _broken_store(tmp_path, store, how)
    res = run_module("supernet.train", "space=cifar_2d", "space.num_classes=3", "data=imagenet_prepared",
                     f"data.root={root}", f"data.img_size={IMG}", "data.val_size=6", "data.batch_size=4",
                     "recipe.interpolation=bicubic", f"run_dir={tmp_path / 'run'}", "max_steps=2", "progress=false")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert re.match(expected, res.stderr.strip()), res.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ training resumes exactly
SMALL = "space.stages=[{cells:2,tokens:[64],dims:[32,64]},{cells:2,tokens:[64,16],dims:[64]}]"  # a small supernet

def _train_args(run_dir: Path, store: Path, *more: str) -> list[str]:
    return ["space=cifar_2d", "space.num_classes=3", SMALL, "data=imagenet_prepared", f"data.root={store}",
            f"data.img_size={IMG}", "data.val_size=6", "data.batch_size=4", "data.eval_batch_size=6",
            "data.num_workers=2", "recipe=deit", f"run_dir={run_dir}", "max_steps=4", "ckpt_every=2",
            "eval.every=4", "eval.n_random=0", "progress=false", "device=cpu", *more]


def _train_cfg(run_dir: Path, store: Path, *more: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=_train_args(run_dir, store, *more))


ONE = "recipe.repeated_aug=1"  # one process: no repeats (refused there, as timm does)
# 2 ranks x 2 images, 3 batches an epoch per rank; one checkpoint at step 5, mid-epoch, before the end at 9
TWO_RANKS = ["data.batch_size=2", "max_steps=9", "ckpt_every=5", "eval.every=9"]


def _store_rank(rank: int, port: int, run_dir: str, store: str) -> None:
    """One rank of an uninterrupted 2-rank run on the store, with the environment torchrun gives it."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.train import train

    train(_train_cfg(Path(run_dir), Path(store), *TWO_RANKS))


@pytest.mark.slow
def test_two_ranks_on_the_store_resume_exactly_after_kill_9_through_the_launcher(store, tmp_path, fork_ranks,
                                                                                 free_port, forkserver):
    """`make supernet NPROC=2` on a prepared store, the whole job killed with SIGKILL after a mid-epoch checkpoint
    (the prefetching thread and the device augmentation mid-flight), then the same command: the run ends with the
    weights of an uninterrupted 2-rank run, bit for bit."""
    import os
    import sys

    from forkserver import kill_job, wait_for

    ref = tmp_path / "ref"
    fork_ranks(_store_rank, (free_port(), str(ref), str(store)))
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2", "-m",
            "supernet.train", *_train_args(run, store, *TWO_RANKS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = forkserver.popen(argv, cwd=REPO, env=env)
    wait_for(p, run / "last.ckpt")
    kill_job(p.pid)  # the launcher and both ranks, their prefetching threads with them
    p.communicate(timeout=60)
    at = torch.load(run / "last.ckpt", weights_only=True)["step"]
    assert at == 5
    rerun = forkserver.popen(argv, cwd=REPO, env=env)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert f"resumed from {run / 'last.ckpt'} at step 5/9" in out
    a, b = (torch.load(d / "last.ckpt", weights_only=True) for d in (ref, run))
    assert b["step"] == 9 and a["task_state"] == b["task_state"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_supernet_training_on_the_store_resumes_exactly_after_a_crash(store, folder, tmp_path, monkeypatch):
    """A crashed run resumes exactly, from the same store moved elsewhere (data.root is not part of a run's
    identity); a store made from other images (one JPEG changed) is refused by its source digest."""
    import shutil

    from space.errors import UserError
    from supernet.engine.loop import Trainer
    from supernet.prepare import prepare
    from supernet.train import train

    torch.set_num_threads(1)
    ref = train(_train_cfg(tmp_path / "ref", store, ONE))
    save = Trainer.save

    def crash_after_first_checkpoint(self):
        save(self)
        if self.step == 2:
            raise RuntimeError("crash")  # mid-epoch: 3 batches per epoch
    monkeypatch.setattr(Trainer, "save", crash_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="crash"):
        train(_train_cfg(tmp_path / "run", store, ONE))
    monkeypatch.setattr(Trainer, "save", save)
    other = shutil.copytree(folder, tmp_path / "other")
    shutil.copy(other / "train" / CLASSES[0] / "1.jpg", other / "train" / CLASSES[0] / "0.jpg")
    prepare(prepare_args(other, tmp_path / "other_store"))
    with pytest.raises(UserError, match=r"^resume: .* trained with other settings: data.source_digest \("):
        train(_train_cfg(tmp_path / "run", tmp_path / "other_store", ONE))
    res = train(_train_cfg(tmp_path / "run", shutil.copytree(store, tmp_path / "moved"), ONE))
    assert res.losses == ref.losses[2:] and res.val == ref.val
    a, b = (torch.load(p / "last.ckpt", weights_only=True)["model"] for p in (tmp_path / "ref", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------- search and fidelity see training's pixels
@pytest.fixture(scope="module")
def store_supernet(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A supernet trained 4 steps on the store with recipe=deit (bicubic crops; one process: no repeats)."""
    from supernet.train import train

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("store_supernet")
    train(_train_cfg(run, store, ONE))
    return run / "last.ckpt"


def test_a_search_on_a_deit_recipe_store_scores_the_images_training_validated_on(store, store_supernet, tmp_path):
    """The search rebuilt its held-out images with the light recipe, whatever the supernet trained with: on a store
    prepared for recipe=deit (bicubic, the default) it stopped at once ("recipe.interpolation: bilinear but the
    store ... bicubic", and conf/evolve.yaml has no recipe key); on a folder it scored bilinear crops of a net
    validated on bicubic ones. The recipe now comes from the checkpoint: the search runs, on exactly the images
    training's validation used; a store of other images at data_root= is refused."""
    from search.evolve import evolve
    from search.inherited import validation_batches
    from supernet.engine.checkpoint import load_supernet

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        search = compose("evolve", overrides=[f"checkpoint={store_supernet}", f"run_dir={tmp_path / 'search'}",
                                              "eval_images=6", "eval_batch_size=4", "evolution.population=2",
                                              "evolution.topk=1", "evolution.mutations=1", "evolution.crossovers=1",
                                              "evolution.generations=1", "progress=false", "device=cpu"])
    summary = evolve(search)
    assert summary["scored"] >= 2 and (tmp_path / "search" / "best_arch.json").is_file()
    sck = load_supernet(store_supernet, torch.device("cpu"))
    assert sck.recipe["name"] == "deit" and sck.recipe["interpolation"] == "bicubic"
    scored = validation_batches(sck.data, None, 4, torch.device("cpu"), sck.recipe, sck.source_digest)
    validated = list(build_data(sck.data, recipe=DEIT).val)  # what training's validation saw
    for k in (0, 1):  # images, labels: the same 6, in batches of 4 and 6
        assert torch.equal(torch.cat([b[k] for b in scored]), torch.cat([b[k] for b in validated]))
    other = shutil.copytree(store, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    meta["source"]["digest"] = "sha256:" + "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"^data_root: .*/other holds a store prepared from other images"):
        validation_batches({**sck.data, "root": str(other)}, None, 4, torch.device("cpu"), sck.recipe,
                           sck.source_digest)


def test_folder_search_images_follow_the_checkpoints_recipe(folder):
    """On an image folder nothing failed: the search decoded bilinear crops (max 0.245 off in normalized units
    on ImageNet images) of a net trained and validated on bicubic ones."""
    from search.inherited import validation_batches

    data = cfg(folder, name="imagenet_folder", eval_batch_size=6, batch_size=4)
    scored = validation_batches(data, None, 6, torch.device("cpu"), DEIT)
    validated = list(build_data(data, recipe=DEIT).val)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(scored, validated, strict=True))
    bilinear = validation_batches(data, None, 6, torch.device("cpu"), None)  # what the old search used
    assert not torch.equal(bilinear[0][0], scored[0][0])


def test_fidelity_trains_its_stand_alone_runs_with_the_supernets_recipe(store_supernet, tmp_path):
    """Stand-alone runs trained with the light recipe whatever the supernet used (and the inherited scores could not
    read a bicubic store at all); now with the supernet's recipe, without its repeats (one process per run), and
    recipe@standalone.recipe=NAME picks another."""
    from search.fidelity import fidelity

    def run(*more: str) -> dict:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            c = compose("fidelity", overrides=[f"checkpoint={store_supernet}", "archs=3", "seeds=1", "bootstrap=100",
                                               "standalone.max_steps=1", "eval_batch_size=6", "progress=false",
                                               "device=cpu", *more])
        return fidelity(c)

    res = run(f"run_dir={tmp_path / 'a'}")
    deit = {k: v for k, v in DEIT.items()}
    assert res["standalone"]["recipe"] == deit and len(res["archs"]) == 3
    saved = [json.loads(p.read_text()) for p in (tmp_path / "a" / "standalone").glob("*/result.json")]
    assert len(saved) == 3 and all(r["setup"]["recipe"]["rand_augment"] == DEIT["rand_augment"] for r in saved)
    ck = torch.load(next((tmp_path / "a" / "standalone").glob("*/last.ckpt")), weights_only=True)
    assert ck["identity"]["recipe"]["reprob"] == DEIT["reprob"] and ck["identity"]["recipe"]["repeated_aug"] == 1
    light = run(f"run_dir={tmp_path / 'b'}", "recipe@standalone.recipe=light",
                "standalone.recipe.interpolation=bicubic")  # the store's interpolation
    assert light["standalone"]["recipe"]["name"] == "light" and light["standalone"]["recipe"]["mixup"] == 0.0
