"""Datasets and batch loaders for supernet training, evolutionary search and retraining.

Three splits: ``train`` is the official training set minus ``val_size`` images held out with
``split_seed``; ``val`` is those held-out *training* images (supernet validation, the search's fitness;
``None`` when ``val_size`` is 0); ``test`` is the official test split, untouched and in file order, reserved
for the final evaluation of a retrained architecture -- supernet training and search never read it.

Fashion-MNIST (IDX files) and CIFAR-10/100 (python pickles) live in memory as uint8 ``(N, C, H, W)``
tensors served by :class:`TensorLoader` (no DataLoader, no workers). An ImageNet-style class folder goes
through torchvision, imported only when asked for (``supernet/data_imagenet.py``).

Usage (every loader has the same small contract: ``len()``, ``epoch(epoch, start)``, iteration)::

    data = build_data(cfg.data, rank=rank, world_size=world_size, device=device)
    model = PSViT(arch, img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes)
    for epoch in range(start_epoch, epochs):
        first = start_batch if epoch == start_epoch else 0          # exact resume mid-epoch
        for step, (x, y) in enumerate(data.train.epoch(epoch, start=first), first):
            ...  # x: (B, C, H, W) float32 normalized, y: (B,) int64, both already on `device`
    correct = total = 0
    for x, y in data.val:                 # this rank's share only: all-reduce correct and total
        correct += (model(x).argmax(-1) == y).sum().item(); total += y.numel()

DDP sharding. Training shuffles with a generator seeded from ``(seed, epoch)`` -- the same permutation on
every rank -- and global batch ``i`` is the slice ``perm[i*W*B:(i+1)*W*B]`` dealt out to the ``W`` ranks,
so every rank runs exactly ``len(data.train)`` batches of ``B`` (the remainder is dropped). Evaluation
gives each rank one contiguous block: every example exactly once, no padding, so blocks (and batch
counts) may differ by one image between ranks and the caller must all-reduce sums, not average means.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf


class DataError(Exception):
    """A missing, corrupt or misconfigured dataset; the message is one line saying what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the framework needs to know about a dataset, and its defaults."""

    in_chans: int
    img_size: int  # native side; imagenet_folder: the default crop
    num_classes: int  # 0 = read from the class folders
    mean: tuple[float, ...]  # per channel, on the [0, 1] pixel scale
    std: tuple[float, ...]
    val_size: int  # the defaults of the DataConfig fields of the same names
    crop_pad: int
    hflip: bool
    root: str | None  # None: the user must give data.root


# Normalization constants: per-channel pixel mean/std over the full official training set (all its
# pixels, /255). Fashion-MNIST measured from the Debian IDX files (0.28604, 0.35302); CIFAR values are the
# usual ones (torchvision references, kuangliu/pytorch-cifar); ImageNet's are torchvision's.
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(1, 28, 10, (0.2860,), (0.3530,), 10_000, 2, True,
                                 "/usr/share/datasets/fashion-mnist"),
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 5_000, 4, True, None),
    "cifar100": DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 5_000, 4, True, None),
    "imagenet_folder": DatasetInfo(3, 224, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10_000, 0, True, None),
}


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` config group (conf/data/*.yaml); ``None`` fields take the dataset's default."""

    name: str  # a key of DATASETS
    root: str | None = None  # dataset directory
    val_size: int | None = None  # images held out of TRAIN as the validation split
    split_seed: int = 0  # which images are held out; keep it fixed across supernet/search/retrain
    seed: int = 0  # shuffling and augmentation; epoch e draws from (seed, e)
    batch_size: int = 256  # per-process training batch; the global batch is batch_size * world_size
    eval_batch_size: int = 1024  # per-process evaluation batch
    augment: bool = True  # master switch for training augmentation
    crop_pad: int | None = None  # random crop after zero-padding this many pixels (0 = off); small datasets
    hflip: bool | None = None  # random horizontal flip with p = 0.5
    img_size: int | None = None  # imagenet_folder only: training/eval crop side
    num_workers: int = 8  # imagenet_folder only: JPEG decoding processes per rank

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise DataError(f"data.name: unknown dataset {self.name!r} (allowed: {', '.join(DATASETS)})")
        for key, low in (("val_size", 0), ("split_seed", 0), ("seed", 0), ("batch_size", 1),
                         ("eval_batch_size", 1), ("crop_pad", 0), ("img_size", 1), ("num_workers", 0)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise DataError(f"data.{key}: {value!r} is not allowed (an integer >= {low})")
        native = DATASETS[self.name].img_size
        if self.name != "imagenet_folder" and self.img_size not in (None, native):
            raise DataError(f"data.img_size: {self.img_size} for {self.name} (allowed: null or its native {native})")

    @classmethod
    def from_cfg(cls, cfg: DataConfig | DictConfig | Mapping[str, Any]) -> DataConfig:
        """Builds from the Hydra ``data`` group (or a plain mapping), rejecting unknown keys."""
        if isinstance(cfg, DataConfig):
            return cfg
        if isinstance(cfg, DictConfig):  # a `???` (required, e.g. CIFAR's root) left unset reads as None
            cfg = {k: None if OmegaConf.is_missing(cfg, k) else v
                   for k, v in OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False).items()}
        if not isinstance(cfg, Mapping) or "name" not in cfg:
            raise DataError("data: expected a mapping with at least a name (e.g. data=fashion_mnist)")
        allowed = [f.name for f in fields(cls)]
        for key in cfg:
            if key not in allowed:
                raise DataError(f"data.{key}: unknown key (allowed: {', '.join(allowed)})")
        return cls(**cfg)

    def resolved(self) -> DataConfig:
        """A copy with every ``None`` default replaced by the dataset's value."""
        info = DATASETS[self.name]
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return replace(self, root=pick(self.root, info.root), val_size=pick(self.val_size, info.val_size),
                       crop_pad=pick(self.crop_pad, info.crop_pad), hflip=pick(self.hflip, info.hflip),
                       img_size=pick(self.img_size, info.img_size))


@dataclass(frozen=True)
class ArrayDataset:
    """A small dataset held in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index])


class Loader(Protocol):
    """What training, search and retraining rely on; :class:`TensorLoader` and ``FolderLoader`` provide it."""

    num_examples: int  # examples this rank sees per epoch

    def __len__(self) -> int: ...  # batches per epoch on this rank
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # = epoch(0)
    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class DataBundle:
    """What :func:`build_data` returns: three loaders and what a model needs to know."""

    name: str
    train: Loader  # shuffled, augmented, sharded, remainder dropped
    val: Loader | None  # held out of TRAIN; model selection and search fitness
    test: Loader  # official test split; only retraining's final evaluation
    img_size: int
    in_chans: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. ``(seed, epoch)``."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def split_train_val(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, disjoint indices ``(train, val)`` covering ``range(n)``; ``val`` has ``val_size`` of them."""
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size: {val_size} for a {n}-image training set (allowed: 0..{n - 1})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(scale, shift)`` such that ``u8 * scale + shift == (u8 / 255 - mean) / std``, each (1, C, 1, 1)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).to(device), (-m / s).to(device)


def crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch and optional mirror, as one gather.

    Args:
        x: (B, C, H, W) batch, any dtype.
        pad: zero padding on every side (black, like torchvision's ``RandomCrop(padding=pad)``).
        dy, dx: (B,) crop offsets in ``0..2*pad``.
        flip: (B,) bool, mirror left-right.
    """
    B, C, H, W = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    Hp, Wp = H + 2 * pad, W + 2 * pad
    rows = dy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = torch.arange(W, device=x.device).expand(B, W)
    cols = torch.where(flip[:, None], W - 1 - cols, cols) + dx[:, None]  # (B, W)
    index = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return x.reshape(B, C, Hp * Wp).gather(2, index).view(B, C, H, W)


def shard_plan(n: int, batch_size: int, rank: int, world_size: int, train: bool) -> tuple[int, int, int, int]:
    """Batches and examples per epoch on ``rank``, and its eval block ``[lo, hi)``.

    Training: equal batch counts on every rank, remainder dropped. Evaluation: one contiguous block per
    rank, every example exactly once, the last batch possibly short.
    """
    if train:
        batches = n // world_size // batch_size
        if batches == 0:
            raise DataError(f"data.batch_size: {batch_size} on {world_size} rank(s) exceeds the {n}-image "
                            f"training split (allowed: at most {n // world_size})")
        return batches, batches * batch_size, 0, 0
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return math.ceil((hi - lo) / batch_size), hi - lo, lo, hi


class TensorLoader:
    """One split of an in-memory uint8 dataset as normalized float batches on ``device``, sharded over ranks.

    The split is copied to ``device`` once (at most 47 MB of uint8 for Fashion-MNIST, 154 MB for CIFAR), so a
    batch is gathered, augmented and normalized where the model runs and nothing crosses PCIe per step: no
    pinned staging buffer or worker process is needed.

    Args:
        data: the whole split; every rank passes the same one and keeps only its share.
        batch_size: images per batch on this rank.
        mean, std: per-channel constants on the [0, 1] pixel scale.
        train: shuffle per epoch, augment and drop the remainder (equal batch counts on every rank);
            otherwise run in order over this rank's contiguous block, the last batch possibly short.
        rank, world_size: this process among the DDP processes.
        seed: with the epoch, seeds the shuffle (same on every rank) and the augmentation (per rank).
        crop_pad: training random crop after zero-padding by this many pixels; 0 = off.
        hflip: training random horizontal flip.
        device: where batches are produced.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                 train: bool, rank: int = 0, world_size: int = 1, seed: int = 0, crop_pad: int = 0,
                 hflip: bool = False, device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank: {rank} with world_size {world_size} (allowed: 0..{world_size - 1})")
        if len(mean) != data.images.shape[1] or len(std) != len(mean):
            raise DataError(f"mean/std: {len(mean)}/{len(std)} values for {data.images.shape[1]} channels")
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.seed, self.crop_pad, self.hflip = seed, crop_pad, hflip
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # (N, C, H, W) uint8
        self.labels = data.labels.to(self.device)  # (N,) int64
        self._scale, self._shift = normalizer(mean, std, self.device)
        self._batches, self.num_examples, self._lo, self._hi = shard_plan(len(data), batch_size, rank, world_size,
                                                                         train)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``start, start+1, ...`` of ``epoch``; the same ones on every call.

        Args:
            epoch: selects the shuffle and augmentation draws; ignored for evaluation loaders.
            start: first batch index, to resume exactly where a checkpoint left off.
        """
        if not 0 <= start <= len(self):
            raise DataError(f"start: batch {start} (allowed: 0..{len(self)} for this {len(self)}-batch epoch)")
        return self._train_batches(epoch, start) if self.train else self._eval_batches(start)

    def _eval_batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(start, len(self)):
            a = self._lo + i * self.batch_size
            b = min(a + self.batch_size, self._hi)
            yield self._normalize(self.images[a:b]), self.labels[a:b]

    def _train_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nb, B, W = len(self), self.batch_size, self.world_size
        # All draws for the whole epoch up front on the CPU: identical on any device, and resuming at
        # `start` just skips rows. The permutation ignores the rank; the augmentation does not.
        perm = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        index = perm[: nb * W * B].view(nb, W, B)[:, self.rank].to(self.device)  # (nb, B)
        aug = None
        if self.crop_pad or self.hflip:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, 1))
            dy = torch.randint(0, 2 * self.crop_pad + 1, (nb, B), generator=g)
            dx = torch.randint(0, 2 * self.crop_pad + 1, (nb, B), generator=g)
            flip = torch.rand(nb, B, generator=g) < (0.5 if self.hflip else 0.0)
            aug = dy.to(self.device), dx.to(self.device), flip.to(self.device)
        for i in range(start, nb):
            x = self.images[index[i]]  # (B, C, H, W) uint8
            if aug is not None:
                x = crop_flip(x, self.crop_pad, aug[0][i], aug[1][i], aug[2][i])
            yield self._normalize(x), self.labels[index[i]]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, x.float(), self._scale)  # (B, C, H, W) float32


# ---------------------------------------------------------------------------------------------- readers

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
FMNIST_HINT = "apt-get install dataset-fashion-mnist, or pass data.root=DIR holding the four IDX files"


def _read_bytes(path: Path, hint: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DataError(f"{path}: unreadable, truncated or corrupt ({e}); {hint}") from e


def read_idx(path: Path, ndim: int, hint: str = FMNIST_HINT) -> np.ndarray:
    """Reads a uint8 IDX file (the MNIST format: magic ``0x0000 08 <ndim>``, big-endian int32 dims, data)."""
    buf = _read_bytes(path, hint)
    magic = int.from_bytes(buf[:4], "big")
    header = 4 + 4 * ndim
    if len(buf) < header or magic != 0x0800 + ndim:
        raise DataError(f"{path}: not a {ndim}-dim uint8 IDX file (magic {magic:#010x}, expected "
                        f"{0x0800 + ndim:#010x}, {len(buf)} bytes); {hint}")
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(buf) - header != math.prod(shape):
        raise DataError(f"{path}: {len(buf) - header} data bytes but the header says {shape} "
                        f"({math.prod(shape)}); the file is truncated or corrupt; {hint}")
    return np.frombuffer(buf, np.uint8, offset=header).reshape(shape)


def _to_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str, hint: str) -> ArrayDataset:
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; {hint}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}; {hint}")
    return ArrayDataset(torch.from_numpy(np.array(images)), torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(root: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """The official ``(train, test)`` sets from the four IDX files (``.gz`` or uncompressed) in ``root``."""
    root = Path(root)
    paths = {f: next((p for p in (root / f"{f}.gz", root / f) if p.is_file()), None) for f in FMNIST_FILES}
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        raise DataError(f"Fashion-MNIST not found: looked in {root} for {', '.join(f + '[.gz]' for f in FMNIST_FILES)}"
                        f" (missing {', '.join(missing)}); {FMNIST_HINT}")
    sets = []
    for images_file, labels_file in (FMNIST_FILES[:2], FMNIST_FILES[2:]):
        images = read_idx(paths[images_file], 3)  # (N, H, W)
        labels = read_idx(paths[labels_file], 1)  # (N,)
        sets.append(_to_dataset(images[:, None], labels, 10, str(paths[images_file]), FMNIST_HINT))
    if sets[0].images.shape[1:] != sets[1].images.shape[1:]:
        raise DataError(f"Fashion-MNIST in {root}: train and test images differ in size; {FMNIST_HINT}")
    return sets[0], sets[1]


# name: (subdirectory in the archive, train files, test files, label key, classes, download address)
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run code when loaded."""

    ALLOWED = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}
    # numpy 2 renamed numpy.core to numpy._core; the original files name the former, new pickles the latter.
    MULTIARRAY = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"

    def find_class(self, module: str, name: str) -> Any:
        short = "multiarray" if module in ("numpy.core.multiarray", "numpy._core.multiarray") else module
        if (short, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(self.MULTIARRAY if short == "multiarray" else module, name)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int, hint: str) -> ArrayDataset:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the originals are Python 2 pickles
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR python batch ({e}); {hint}") from e
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: expected a dict with 'data' and {label_key!r}; {hint}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {hint}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return _to_dataset(data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key]), num_classes, str(path), hint)


def load_cifar(name: str, root: str | Path | None) -> tuple[ArrayDataset, ArrayDataset]:
    """The official ``(train, test)`` sets of ``cifar10``/``cifar100`` from the python-pickle batches."""
    subdir, train_files, test_files, label_key, num_classes, url = CIFAR_FILES[name]
    hint = f"download and extract {url} and pass data.root=DIR holding {subdir}/ (or its batch files)"
    if root is None:
        raise DataError(f"data.root: not set for {name}; {hint}")
    base = Path(root) / subdir if (Path(root) / subdir).is_dir() else Path(root)
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(f"{name} not found: looked in {base} for {', '.join(train_files + test_files)} "
                        f"(missing {', '.join(missing)}); {hint}")
    out = []
    for files in (train_files, test_files):
        parts = [_read_cifar_batch(base / f, label_key, num_classes, hint) for f in files]
        out.append(ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- entry point

def build_data(cfg: DataConfig | DictConfig | Mapping[str, Any], rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu") -> DataBundle:
    """Loads the dataset named by the ``data`` config group and returns its three sharded loaders.

    Args:
        cfg: the ``data`` group (``cfg.data`` of the app), a plain mapping, or a :class:`DataConfig`.
        rank, world_size: this process among the DDP processes (``RANK``, ``WORLD_SIZE``).
        device: where batches are delivered (and where in-memory datasets are kept).

    Raises:
        DataError: the dataset is missing, corrupt, or the config is invalid.
    """
    c = DataConfig.from_cfg(cfg).resolved()
    if not 0 <= rank < world_size:
        raise DataError(f"rank: {rank} with world_size {world_size} (allowed: 0..{world_size - 1})")
    if c.name == "imagenet_folder":
        from supernet.data_imagenet import build_imagenet_folder  # torchvision only on demand

        return build_imagenet_folder(c, rank, world_size, device)
    info = DATASETS[c.name]
    full_train, test = load_fashion_mnist(c.root) if c.name == "fashion_mnist" else load_cifar(c.name, c.root)
    train_idx, val_idx = split_train_val(len(full_train), c.val_size, c.split_seed)
    common = dict(mean=info.mean, std=info.std, rank=rank, world_size=world_size, device=device)
    train = TensorLoader(full_train.subset(train_idx), c.batch_size, train=True, seed=c.seed,
                         crop_pad=c.crop_pad if c.augment else 0, hflip=bool(c.hflip and c.augment), **common)
    val = TensorLoader(full_train.subset(val_idx), c.eval_batch_size, train=False, **common) if c.val_size else None
    return DataBundle(c.name, train, val, TensorLoader(test, c.eval_batch_size, train=False, **common),
                      info.img_size, info.in_chans, info.num_classes, info.mean, info.std)
