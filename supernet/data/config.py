"""The data config and the contract every loader keeps: dataset table, ``DataConfig``, ``DataBundle``,
the ``Loader`` protocol, and the sharding / splitting / normalization arithmetic both loaders share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from space.errors import UserError


class DataError(UserError):
    """A missing, corrupt or misconfigured dataset; the message is one line saying what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the framework needs to know about a dataset, and its defaults."""

    in_chans: int
    img_size: int  # native side; image folders and prepared stores: the default crop
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
    "imagenet_prepared": DatasetInfo(3, 224, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10_000, 0, True, None),
}
FILE_DATASETS = ("imagenet_folder", "imagenet_prepared")  # read from files per batch, not held in memory


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
    img_size: int | None = None  # image folders and prepared stores only: training/eval crop side
    num_workers: int = 8  # imagenet_folder: JPEG decoding processes per rank; imagenet_prepared: reading threads
    # image folders and prepared stores: keep the validation split's uint8 batches on the device after the first
    # pass (img_size 224: 150 KB per image, 1.5 GB for 10,000 images, split over the ranks); None = on
    cache_val: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise DataError(f"data.name: unknown dataset {self.name!r} (allowed: {', '.join(DATASETS)})")
        for key, low in (("val_size", 0), ("split_seed", 0), ("seed", 0), ("batch_size", 1),
                         ("eval_batch_size", 1), ("crop_pad", 0), ("img_size", 1), ("num_workers", 0)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise DataError(f"data.{key}: {value!r} is not allowed (an integer >= {low})")
        if self.cache_val is not None and not isinstance(self.cache_val, bool):
            raise DataError(f"data.cache_val: {self.cache_val!r} is not allowed (true or false)")
        native = DATASETS[self.name].img_size
        if self.name not in FILE_DATASETS and self.img_size not in (None, native):
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
    test: Loader | None  # official test split, loaded for retraining's final evaluation only (test=True)
    img_size: int
    in_chans: int
    num_classes: int
    source: str | None = None  # digest of the images it serves, where the format records one (a prepared store)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. ``(seed, epoch)``."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def split_train_val(n: int, val_size: int, split_seed: int, labels: torch.Tensor | np.ndarray | Sequence[int] | None
                    = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint indices ``(train, val)`` covering ``range(n)``; ``val`` has ``val_size`` of them.

    ``train`` is sorted. ``val`` is in the class-interleaved order of :func:`interleave_classes` when the
    labels of all ``n`` images are given (every loader gives them), else sorted: the search's fitness set
    (its first ``eval_images``) and supernet validation under ``eval.max_batches`` read a prefix of it, and a
    prefix of a class-sorted image folder's indices would hold its first classes only."""
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size: {val_size} for a {n}-image training set (allowed: 0..{n - 1})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    train, val = perm[val_size:].sort().values, perm[:val_size].sort().values
    if labels is not None and val_size:
        val = interleave_classes(val, torch.as_tensor(np.asarray(labels)[val.numpy()]), split_seed)
    return train, val


def interleave_classes(index: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``index`` reordered so that every prefix holds each class in proportion to its share of the whole,
    within one image, in a fixed order drawn from ``seed`` (``labels[i]`` is ``index[i]``'s class).

    Each class's images are shuffled and spread evenly over [0, 1) from a random phase: image ``j`` of the
    ``n_c`` of class ``c`` sits at ``(j + u_c) / n_c``; sorting by position interleaves the classes."""
    g = torch.Generator().manual_seed(mix_seed(seed, 29))
    shuffle = torch.randperm(len(index), generator=g)
    index, labels = index[shuffle], labels[shuffle].long()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    phase = torch.rand(len(classes), generator=g, dtype=torch.float64)
    order = torch.argsort(inverse, stable=True)  # images grouped by class, shuffled within it
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    position = (rank.double() + phase[inverse]) / counts[inverse].double()
    return index[torch.argsort(position, stable=True)]


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(scale, shift)`` such that ``u8 * scale + shift == (u8 / 255 - mean) / std``, each (1, C, 1, 1)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).to(device), (-m / s).to(device)


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



Batch = tuple[torch.Tensor, torch.Tensor]


def cached_batches(cache: dict[int, Batch] | None, start: int, n: int,
                   produce: Callable[[list[int]], Iterator[Batch]]) -> Iterator[Batch]:
    """Batches ``start..n-1`` of an evaluation split: from ``cache`` where there, the others from ``produce``
    (given their numbers, in order) and kept in ``cache``; ``cache=None`` produces them all every time. A pass cut
    short (``eval.max_batches``) keeps what it produced, and the next pass produces only the rest."""
    if cache is None:
        yield from produce(list(range(start, n)))
        return
    missing = [i for i in range(start, n) if i not in cache]
    fresh = produce(missing) if missing else iter(())
    try:
        for i in range(start, n):
            if i not in cache:
                cache[i] = next(fresh)
            yield cache[i]
    finally:
        close = getattr(fresh, "close", None)
        if close is not None:
            close()  # stops a background reader or a DataLoader iterator now, not when collected
