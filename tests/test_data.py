"""Tests of supernet/data/: readers, splits, the in-memory loader's sharding/determinism/resume, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from supernet.data import (
    DATASETS,
    ArrayDataset,
    DataConfig,
    DataError,
    TensorLoader,
    build_data,
    crop_flip,
    load_cifar,
    load_fashion_mnist,
    split_train_val,
)
from space.errors import UserError
from supernet.data.readers import FMNIST_FILES

FMNIST_ROOT = Path(DATASETS["fashion_mnist"].root)


# ---------------------------------------------------------------------------------------------- fakes

def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str, bytes_keys: bool = False,
                      numpy1_names: bool = False) -> None:
    """A batch laid out like the originals: {'data': uint8 (N, 3072), label_key: [int], ...}."""
    batch = {"batch_label": "fake", "data": data, label_key: labels, "filenames": [f"{i}.png" for i in labels]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    blob = pickle.dumps(batch, protocol=2)
    if numpy1_names:  # the original files were written by numpy 1.x, naming numpy.core (protocol 2 GLOBAL is text)
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


def fake_cifar10(root: Path, per_batch: int = 6, n_test: int = 4) -> Path:
    rng = np.random.default_rng(1)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        labels = [(i * per_batch + k) % 10 for k in range(n)]
        write_cifar_batch(base / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels, "labels",
                          bytes_keys=i == 1, numpy1_names=True)
    return root


def synthetic(n: int = 103, chans: int = 1, side: int = 8) -> ArrayDataset:
    """Random images whose label is their index, so every batch says which examples it holds."""
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (n, chans, side, side), dtype=torch.uint8, generator=g), torch.arange(n))


def loader(data: ArrayDataset, train: bool = True, **kw) -> TensorLoader:
    kw.setdefault("batch_size", 8)
    return TensorLoader(data, mean=(0.5,) * data.images.shape[1], std=(0.25,) * data.images.shape[1], train=train,
                        **kw)


def batches(it) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in it]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- real Fashion-MNIST

@pytest.fixture(scope="module")
def fmnist():
    return build_data({"name": "fashion_mnist"}, test=True)


@pytest.mark.fmnist
def test_fashion_mnist_real_shapes_and_labels(fmnist) -> None:
    assert (fmnist.img_size, fmnist.in_chans, fmnist.num_classes) == (28, 1, 10)
    for split, n in ((fmnist.train, 50_000), (fmnist.val, 10_000), (fmnist.test, 10_000)):
        assert split.images.shape == (n, 1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and set(split.labels.tolist()) == set(range(10))
    assert len(fmnist.train) == 50_000 // 256
    x, y = next(iter(fmnist.train))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (256,)


@pytest.mark.fmnist
def test_fashion_mnist_test_split_untouched_and_val_carved_from_train(fmnist) -> None:
    train, test = load_fashion_mnist(FMNIST_ROOT)
    assert torch.equal(fmnist.test.images, test.images) and torch.equal(fmnist.test.labels, test.labels)
    train_idx, val_idx = split_train_val(60_000, 10_000, 0, train.labels)
    assert torch.equal(fmnist.val.images, train.images[val_idx])
    # the same held-out images as the sorted split, in the class-interleaved order of the fitness set
    assert torch.equal(val_idx.sort().values, split_train_val(60_000, 10_000, 0)[1])
    assert torch.equal(fmnist.train.images, train.images[train_idx])


@pytest.mark.fmnist
def test_normalization_zero_mean_unit_std(fmnist) -> None:
    x, _ = next(iter(fmnist.val))  # eval loader: no augmentation
    assert x.shape[0] == 1024
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    x_all = torch.cat([x for x, _ in fmnist.val])
    assert abs(x_all.mean().item()) < 0.01 and abs(x_all.std().item() - 1) < 0.01


def test_normalization_is_exact_affine_map() -> None:
    data = ArrayDataset(torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone(),
                        torch.arange(3))
    x, _ = next(iter(loader(data, train=False, batch_size=3)))
    expected = (torch.tensor([0.0, 0.2, 1.0]) - 0.5) / 0.25
    assert torch.allclose(x[:, 0, 0, 0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- IDX errors

def test_missing_fmnist_names_files_dir_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_data({"name": "fashion_mnist", "root": str(tmp_path)}, test=True)
    msg = one_line(e)
    assert str(tmp_path) in msg and all(name in msg for name in FMNIST_FILES)
    assert "apt-get install dataset-fashion-mnist, or pass data.root=DIR holding the four IDX files" in msg


@pytest.mark.parametrize("app", ["supernet.train", "supernet.retrain"])
def test_missing_dataset_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, app: str, forkserver) -> None:
    """Through the real CLI of both training apps (the check runs before a run directory exists)."""
    repo = Path(__file__).resolve().parents[1]
    arch = [f"arch={repo / 'conf' / 'baselines' / 'deit_fmnist.json'}"] if app == "supernet.retrain" else []
    r = forkserver.run([sys.executable, "-m", app, *arch, f"run_dir={tmp_path / 'run'}",
                        f"data.root={tmp_path / 'nowhere'}", "max_steps=1"], cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path / "nowhere") in lines[0] and "apt-get install dataset-fashion-mnist" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run_dir, no Hydra output


def test_incomplete_fmnist_names_the_missing_file(tmp_path: Path, fake_fmnist) -> None:
    fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    assert "(missing t10k-labels-idx1-ubyte);" in one_line(e)


def test_test_split_files_are_only_opened_when_asked_for(tmp_path: Path, fake_fmnist) -> None:
    """Supernet training and search (test=False) run without the t10k files; retraining (test=True) needs them."""
    fake_fmnist(tmp_path, n_train=60, n_test=20)
    for name in FMNIST_FILES[2:]:
        (tmp_path / f"{name}.gz").unlink()
    data = build_data({"name": "fashion_mnist", "root": str(tmp_path), "val_size": 12, "batch_size": 16})
    assert data.test is None and len(data.train) == 3
    with pytest.raises(DataError) as e:
        build_data({"name": "fashion_mnist", "root": str(tmp_path)}, test=True)
    assert "(missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte);" in one_line(e)


def test_uncompressed_idx_files_load(tmp_path: Path, fake_fmnist) -> None:
    fake_fmnist(tmp_path, n_train=60, n_test=20, gz=False)
    data = build_data({"name": "fashion_mnist", "root": str(tmp_path), "val_size": 12, "batch_size": 16}, test=True)
    assert data.train.images.shape == (48, 1, 28, 28) and data.val.images.shape == (12, 1, 28, 28)
    assert torch.equal(data.test.labels, torch.arange(20) % 10) and len(data.train) == 3
    everything = build_data({"name": "fashion_mnist", "root": str(tmp_path), "val_size": 0, "batch_size": 16})
    assert everything.val is None and everything.train.images.shape[0] == 60  # retraining on the full train set


@pytest.mark.parametrize("damage, expected", [
    ("short_payload", "the file is truncated or corrupt"),
    ("cut_gzip", "unreadable, truncated or corrupt"),
    ("not_gzip", "unreadable, truncated or corrupt"),
    ("bad_magic", "not a 3-dim uint8 IDX file"),
])
def test_corrupt_idx_raises(tmp_path: Path, damage: str, expected: str, fake_fmnist) -> None:
    fake_fmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "short_payload":
        path.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "cut_gzip":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "not_gzip":
        path.write_bytes(b"<html>404 not found</html>")
    else:
        path.write_bytes(gzip.compress(raw[:3] + bytes([1]) + raw[4:]))
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    msg = one_line(e)
    assert str(path) in msg and expected in msg and "apt-get install dataset-fashion-mnist" in msg


# ---------------------------------------------------------------------------------------------- CIFAR

def test_cifar10_pickles_parse_with_channel_planes(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    train, test = load_cifar("cifar10", tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="latin1")[b"data"]  # written with bytes keys
    # Row = red plane, green plane, blue plane, each 32x32 row-major.
    assert torch.equal(train.images[6, 1], torch.from_numpy(raw[0, 1024:2048].reshape(32, 32)))
    assert train.labels.tolist() == [k % 10 for k in range(30)]
    data = build_data({"name": "cifar10", "root": str(tmp_path), "val_size": 5, "batch_size": 4}, test=True)
    assert (data.img_size, data.in_chans, data.num_classes) == (32, 3, 10)
    assert len(data.val.labels) == 5 and len(data.train) == 25 // 4 and torch.equal(data.test.images, test.images)


def test_cifar100_fine_labels_in_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for name, n in (("train", 12), ("test", 3)):
        write_cifar_batch(tmp_path / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                          [99 - k for k in range(n)], "fine_labels")
    data = build_data({"name": "cifar100", "root": str(tmp_path), "val_size": 2, "batch_size": 5}, test=True)
    assert data.num_classes == 100 and data.test.labels.tolist() == [99, 98, 97]
    x, _ = next(iter(data.train))
    assert x.shape == (5, 3, 32, 32)


@pytest.mark.parametrize("preset", ["cifar_2d", "cifar_1d"])
def test_cifar_presets_fit_cifar10_and_with_100_classes_cifar100(preset: str) -> None:
    from space.app import check_fits
    from space.space import SearchSpace

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "space" / f"{preset}.yaml")
    cifar10, cifar100 = (SimpleNamespace(name=n, **_shape(DATASETS[n])) for n in ("cifar10", "cifar100"))
    check_fits("space", SearchSpace.from_config(cfg), cifar10)
    with pytest.raises(UserError, match="space.num_classes: 10 but dataset cifar100 has 100"):
        check_fits("space", SearchSpace.from_config(cfg), cifar100)
    cfg.num_classes = 100  # space.num_classes=100 on the command line
    check_fits("space", SearchSpace.from_config(cfg), cifar100)


def _shape(info) -> dict[str, int]:
    return {"img_size": info.img_size, "in_chans": info.in_chans, "num_classes": info.num_classes}


def test_cifar_missing_or_unset_root_explains_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_data({"name": "cifar10", "root": str(tmp_path)}, test=True)
    msg = one_line(e)
    assert "data_batch_1" in msg and "test_batch" in msg and "cifar-10-python.tar.gz" in msg
    assert "data.root=DIR holding cifar-10-batches-py/" in msg
    yaml_cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "data" / "cifar100.yaml")  # root: ???
    with pytest.raises(DataError) as e:
        build_data(yaml_cfg)
    assert one_line(e).startswith("data.root: not set for cifar100;") and "cifar-100-python" in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": _Evil()}))
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", tmp_path)
    assert "refusing to load global" in one_line(e) and "system" in str(e.value)


# ---------------------------------------------------------------------------------------------- splits and loader

def test_split_disjoint_deterministic_and_sized() -> None:
    train, val = split_train_val(1000, 150, split_seed=3)
    assert len(val) == 150 and len(train) == 850
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    again = split_train_val(1000, 150, split_seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, split_train_val(1000, 150, split_seed=4)[1])
    with pytest.raises(DataError, match=r"data.val_size: 1000 .* \(allowed: 0..999\)"):
        split_train_val(1000, 1000, 0)


def test_train_iterator_deterministic_in_seed_and_epoch() -> None:
    data = synthetic()
    kw = dict(seed=5, crop_pad=2, hflip=True)
    a = batches(loader(data, **kw).epoch(3))
    assert same(a, batches(loader(data, **kw).epoch(3)))  # a fresh loader replays the same epoch
    assert not same(a, batches(loader(data, **kw).epoch(4)))
    assert not same(a, batches(loader(data, **{**kw, "seed": 6}).epoch(3)))
    assert len(a) == len(loader(data, **kw)) == 103 // 8 and all(len(y) == 8 for _, y in a)


def test_train_shards_disjoint_with_equal_batch_counts() -> None:
    data = synthetic(n=103)
    ranks = [loader(data, rank=r, world_size=2, seed=1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 103 // 2 // 8
    seen = [torch.cat([y for _, y in r.epoch(7)]) for r in ranks]
    assert all(len(s) == len(ranks[0]) * 8 for s in seen)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_example_exactly_once(world_size: int) -> None:
    data = synthetic(n=103)
    shards = [loader(data, train=False, rank=r, world_size=world_size, batch_size=10) for r in range(world_size)]
    labels = torch.cat([y for s in shards for _, y in s])
    assert torch.equal(labels, torch.arange(103))  # contiguous blocks in rank order, no padding
    assert sum(s.num_examples for s in shards) == 103
    x, _ = next(iter(shards[0]))
    assert torch.allclose(x, (data.images[:10].float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_resume_mid_epoch_yields_the_remaining_batches() -> None:
    lo = loader(synthetic(), seed=2, crop_pad=3, hflip=True, rank=1, world_size=2, batch_size=4)
    full = batches(lo.epoch(4))
    for start in (0, 1, 5, len(lo)):
        assert same(full[start:], batches(lo.epoch(4, start=start)))
    with pytest.raises(DataError, match="start: batch 13"):
        lo.epoch(4, start=len(lo) + 1)
    ev = loader(synthetic(), train=False, batch_size=10)
    assert same(batches(ev)[3:], batches(ev.epoch(0, start=3)))


def test_crop_flip_matches_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=g)
    pad = 2
    dy, dx = torch.randint(0, 2 * pad + 1, (16,), generator=g), torch.randint(0, 2 * pad + 1, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = crop_flip(x, pad, dy, dx, flip)
    padded = F.pad(x, (pad,) * 4)
    for b in range(16):
        ref = padded[b, :, dy[b]:dy[b] + 7, dx[b]:dx[b] + 9]
        assert torch.equal(out[b], ref.flip(-1) if flip[b] else ref)


def test_augmentation_config_reaches_the_loader(tmp_path: Path, fake_fmnist) -> None:
    fake_fmnist(tmp_path)
    base = {"name": "fashion_mnist", "root": str(tmp_path), "val_size": 10, "batch_size": 8}
    on = build_data(base).train
    assert (on.crop_pad, on.hflip) == (2, True)
    off = build_data({**base, "augment": False}).train
    assert (off.crop_pad, off.hflip) == (0, False)
    plain = TensorLoader(ArrayDataset(off.images, off.labels), 8, (0.2860,), (0.3530,), train=True, seed=0)
    assert same(batches(off.epoch(1)), batches(plain.epoch(1)))  # no augmentation: just shuffle + normalize


def test_batch_larger_than_shard_is_an_error() -> None:
    with pytest.raises(DataError, match=r"data.batch_size: 60 on 2 rank\(s\) exceeds the 103-image"):
        loader(synthetic(), batch_size=60, world_size=2)


# ---------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "imagenet_folder", "imagenet_prepared"])
def test_config_files_compose_and_validate(conf_dir: Path, name: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        cfg = compose(overrides=[f"+data={name}"])
    c = DataConfig.from_cfg(cfg.data)
    assert c.name == name and c.val_size == DATASETS[name].val_size
    assert c.resolved().crop_pad == DATASETS[name].crop_pad


def test_config_errors_name_the_field() -> None:
    with pytest.raises(DataError, match=r"data.batch_sz: unknown key \(allowed: name, root,"):
        DataConfig.from_cfg({"name": "cifar10", "batch_sz": 4})
    with pytest.raises(DataError, match=r"data.name: unknown dataset 'mnist' \(allowed: fashion_mnist,"):
        DataConfig.from_cfg({"name": "mnist"})
    with pytest.raises(DataError, match=r"data.eval_batch_size: 0 is not allowed \(an integer >= 1\)"):
        DataConfig(name="cifar10", eval_batch_size=0)
    with pytest.raises(DataError, match=r"data.img_size: 64 for cifar10 \(allowed: null or its native 32\)"):
        DataConfig(name="cifar10", img_size=64)


# ---------------------------------------------------------------------------------------------- ImageNet folder

def test_imagenet_without_torchvision_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(DataError) as e:
        build_data({"name": "imagenet_folder", "root": str(tmp_path)})
    msg = one_line(e)
    assert "needs torchvision" in msg and msg.endswith("install it with pip install -e '.[imagenet]'")


# `make install` installs torchvision with the torch build it was made for, so this runs (never skips) in `make test`.
def test_imagenet_folder_splits_and_batches(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("val", 2)):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{i}.png")
    cfg = {"name": "imagenet_folder", "root": str(tmp_path), "val_size": 4, "img_size": 16, "batch_size": 3,
           "eval_batch_size": 3, "num_workers": 0}
    data = build_data(cfg, test=True)
    assert (data.img_size, data.in_chans, data.num_classes) == (16, 3, 2)
    assert len(data.train) == 10 // 3 and len(data.val) == 2 and len(data.test) == 2
    x, y = next(iter(data.train))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.cat([y for _, y in data.test]).tolist() == [0, 0, 1, 1]
    shards = [build_data(cfg, rank=r, world_size=2, test=True) for r in range(2)]
    assert len(shards[0].train) == len(shards[1].train) == 5 // 3
    assert sorted(torch.cat([y for s in shards for _, y in s.test]).tolist()) == [0, 0, 1, 1]
    order = [[y.tolist() for _, y in data.train.epoch(2)] for _ in range(2)]
    assert order[0] == order[1] and [y.tolist() for _, y in data.train.epoch(2, start=1)] == order[0][1:]
