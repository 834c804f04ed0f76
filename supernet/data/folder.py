"""ImageNet-style class-folder data through torchvision (the optional ``imagenet`` extra).

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with the same class folders (the
ILSVRC-2012 validation images sorted into class folders). ``val_size`` images carved out of ``train``
with ``split_seed`` are the validation split; the official ``val`` folder is the ``test`` split, reserved
for retraining's final evaluation. Training uses RandomResizedCrop + horizontal flip, evaluation
Resize(img_size / 0.875) + CenterCrop, the DeiT recipe without its heavy augmentations; images stay uint8
through the workers and are normalized with the ImageNet mean/std on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from supernet.data.config import (DATASETS, DataBundle, DataConfig, DataError, mix_seed, normalizer, shard_plan,
                                  split_train_val)

INSTALL_HINT = "install it with pip install -e '.[imagenet]'"


def import_torchvision() -> tuple[Any, Any]:
    """``(torchvision.datasets, torchvision.transforms)``, or a one-line :class:`DataError` on failure."""
    try:
        from torchvision import datasets, transforms
    except Exception as e:  # ImportError, or a torchvision built for another torch (RuntimeError, OSError)
        reason = (str(e).splitlines() or [""])[0]
        raise DataError(f"data.name=imagenet_folder needs torchvision, which failed to import "
                        f"({type(e).__name__}: {reason}); {INSTALL_HINT}") from e
    return datasets, transforms


class _Plan:
    """The DataLoader's batch sampler: whatever index batches :meth:`FolderLoader.epoch` planned last."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader:
    """A split of an image folder as normalized float batches on ``device``, sharded over ranks.

    Same contract and sharding as :class:`supernet.data.memory.TensorLoader`: training draws a
    ``DistributedSampler`` permutation seeded from ``(seed, epoch)`` (same on all ranks, remainder dropped,
    equal batch counts), evaluation gives each rank a contiguous block without padding. One persistent
    DataLoader per split is reused across epochs, so repeated evaluations do not respawn workers; iterate
    one epoch of a loader at a time.

    Args:
        dataset: the image folder with the split's transform (uint8 output).
        indices: which of its images form the split; ``None`` for all.
        batch_size: images per batch on this rank.
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel std on the [0, 1] scale.
        train: shuffle, drop the remainder; otherwise in order over this rank's block.
        rank: this process's rank.
        world_size: number of DDP processes.
        seed: shuffle seed (with the epoch) and worker seed.
        num_workers: decoding processes.
        device: where batches are delivered.
    """

    def __init__(self, dataset: Any, indices: list[int] | None, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], *, train: bool, rank: int, world_size: int, seed: int, num_workers: int,
                 device: torch.device | str) -> None:
        self.subset = Subset(dataset, indices if indices is not None else range(len(dataset)))
        self.batch_size, self.train, self.device = batch_size, train, torch.device(device)
        self._scale, self._shift = normalizer(mean, std, self.device)
        # DistributedSampler(drop_last=True) gives each rank n // world_size indices: the same plan as TensorLoader.
        self._batches, self.num_examples, self._lo, self._hi = shard_plan(len(self.subset), batch_size, rank,
                                                                         world_size, train)
        if train:
            self.sampler = DistributedSampler(self.subset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=seed, drop_last=True)
        self._plan = _Plan()
        self._loader = DataLoader(self.subset, batch_sampler=self._plan, num_workers=num_workers,
                                  pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                                  generator=torch.Generator().manual_seed(mix_seed(seed, rank, 2)))

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``start, start+1, ...`` of ``epoch`` (the order is exact on resume; the
        random crops are drawn in the workers and are not)."""
        if not 0 <= start <= len(self):
            raise DataError(f"start: batch {start} (allowed: 0..{len(self)} for this {len(self)}-batch epoch)")
        B = self.batch_size
        if self.train:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            batches = [order[i * B:(i + 1) * B] for i in range(start, len(self))]
        else:
            ends = [(self._lo + i * B, min(self._lo + (i + 1) * B, self._hi)) for i in range(start, len(self))]
            batches = [list(range(a, b)) for a, b in ends]
        return self._run(batches)

    def _run(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._plan.batches = batches
        for x, y in self._loader:  # x: (B, 3, S, S) uint8
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield torch.addcmul(self._shift, x.float(), self._scale), y


def build_imagenet_folder(c: DataConfig, rank: int, world_size: int, device: torch.device | str,
                          test: bool = False) -> DataBundle:
    """The three loaders of an ImageNet-style folder; ``c`` is resolved (no ``None`` defaults left)."""
    datasets, T = import_torchvision()
    hint = "pass data.root=DIR holding train/<class>/*.jpg and val/<class>/*.jpg"
    if c.root is None:
        raise DataError(f"data.root: not set for imagenet_folder; {hint}")
    root = Path(c.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet_folder not found: no directory {root / split}; {hint}")
    size = int(c.img_size)
    eval_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.PILToTensor()])
    train_tf = T.Compose([T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if c.hflip else [])
                         + [T.PILToTensor()]) if c.augment else eval_tf
    try:
        train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        test_set = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagenet_folder in {root}: {(str(e).splitlines() or [''])[0]}; {hint}") from e
    if train_set.classes != test_set.classes:
        raise DataError(f"imagenet_folder in {root}: train/ has {len(train_set.classes)} class folders, val/ "
                        f"{len(test_set.classes)}, and they differ; both need the same class folders")
    val_set = copy.copy(train_set)  # shares the file list, evaluates without augmentation
    val_set.transform = eval_tf
    train_idx, val_idx = split_train_val(len(train_set), int(c.val_size), c.split_seed)
    info = DATASETS["imagenet_folder"]
    common: dict[str, Any] = dict(mean=info.mean, std=info.std, rank=rank, world_size=world_size, seed=c.seed,
                                  num_workers=c.num_workers, device=device)
    train = FolderLoader(train_set, train_idx.tolist(), c.batch_size, train=True, **common)
    val = FolderLoader(val_set, val_idx.tolist(), c.eval_batch_size, train=False, **common) if c.val_size else None
    test_loader = FolderLoader(test_set, None, c.eval_batch_size, train=False, **common) if test else None
    return DataBundle(c.name, train, val, test_loader, size, 3, len(train_set.classes))
