"""ImageNet-style class-folder data through torchvision and timm (the optional ``imagenet`` extra).

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with the same class folders (the
ILSVRC-2012 validation images sorted into class folders). ``val_size`` images carved out of ``train``
with ``split_seed`` are the validation split; the official ``val`` folder is the ``test`` split, reserved
for retraining's final evaluation. The transforms are timm's ``create_transform``: training a random-resized
crop, horizontal flip and, with ``recipe=deit``, RandAugment; evaluation Resize(img_size / 0.875) +
CenterCrop; both with the recipe's interpolation. Images stay uint8 through the workers (timm's prefetcher
layout) and are normalized with the ImageNet mean/std on the device, where the recipe's random erasing and
Mixup/CutMix run (supernet/data/recipe.py). Every image's augmentation is seeded from its position in the
epoch, so a resumed run decodes exactly the batches of an uninterrupted one, with any number of workers. The
validation split is decoded once: its uint8 batches stay on the device after the first pass (``data.cache_val``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from supernet.data.config import (DATASETS, Batch, DataBundle, DataConfig, DataError, cached_batches, mix_seed,
                                  normalizer, shard_plan, split_train_val)
from supernet.data.recipe import (LIGHT, BatchAugment, RecipeConfig, SeededItems, batch_key, fix_posterize,
                                  repeated_order, repeated_plan)

INSTALL_HINT = "install it with pip install -e '.[imagenet]'"


def import_folder_libs() -> tuple[Any, Any]:
    """``(torchvision.datasets, timm.data.create_transform)``, or a one-line :class:`DataError` on failure."""
    try:
        from torchvision import datasets
        from timm.data import create_transform
    except Exception as e:  # ImportError, or a torchvision built for another torch (RuntimeError, OSError)
        reason = (str(e).splitlines() or [""])[0]
        raise DataError(f"data.name=imagenet_folder needs torchvision and timm, which failed to import "
                        f"({type(e).__name__}: {reason}); {INSTALL_HINT}") from e
    return datasets, create_transform


class _Plan:
    """The DataLoader's batch sampler: whatever ``(index, key)`` batches :meth:`FolderLoader.epoch` planned last."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader:
    """A split of an image folder as normalized float batches on ``device``, sharded over ranks.

    Same contract and sharding as :class:`supernet.data.memory.TensorLoader`: training draws a
    ``DistributedSampler`` permutation seeded from ``mix_seed(seed, epoch)`` (same on all ranks, remainder dropped,
    equal batch counts), or timm's ``RepeatAugSampler`` with repeated augmentation; evaluation gives each rank
    a contiguous block without padding. One persistent DataLoader per split is reused across epochs, so
    repeated evaluations do not respawn workers; iterate one epoch of a loader at a time.

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
        augment: the recipe's batch-level augmentation of training batches, or None.
        repeats: repeated augmentation (timm's RepeatAugSampler), 1 = off.
        cache: evaluation only: keep the decoded uint8 batches on ``device`` after the first pass.
    """

    def __init__(self, dataset: Any, indices: list[int] | None, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], *, train: bool, rank: int, world_size: int, seed: int, num_workers: int,
                 device: torch.device | str, augment: BatchAugment | None = None, repeats: int = 1,
                 cache: bool = False) -> None:
        self.subset = Subset(dataset, indices if indices is not None else range(len(dataset)))
        self.batch_size, self.train, self.device = batch_size, train, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.augment, self.repeats = augment, repeats
        self._scale, self._shift = normalizer(mean, std, self.device)
        # DistributedSampler(drop_last=True) gives each rank n // world_size indices: the same plan as TensorLoader.
        self._batches, self.num_examples, self._lo, self._hi = shard_plan(len(self.subset), batch_size, rank,
                                                                         world_size, train)
        if train and repeats > 1:
            self._batches, self.num_examples = repeated_plan(len(self.subset), repeats, batch_size, world_size, rank)
        elif train:
            # seeded per epoch with mix_seed(seed, epoch) (set_epoch below), not torch's seed + epoch, which makes
            # seed 0's epoch 1 seed 1's epoch 0
            self.sampler = DistributedSampler(self.subset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=0, drop_last=True)
        self.cache: dict[int, Batch] | None = {} if cache and not train else None
        self._plan = _Plan()
        self._loader = DataLoader(SeededItems(self.subset), batch_sampler=self._plan, num_workers=num_workers,
                                  pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                                  generator=torch.Generator().manual_seed(mix_seed(seed, rank, 2)))

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``start, start+1, ...`` of ``epoch``, the same ones (images and augmentations)
        on every call."""
        if not 0 <= start <= len(self):
            raise DataError(f"start: batch {start} (allowed: 0..{len(self)} for this {len(self)}-batch epoch)")
        B = self.batch_size
        if self.train:
            if self.repeats > 1:
                order = repeated_order(len(self.subset), self.repeats, self.world_size, self.rank, self.seed, epoch)
            else:
                self.sampler.set_epoch(mix_seed(self.seed, epoch))
                order = list(self.sampler)
            keys = [mix_seed(self.seed, epoch, self.rank, p, 4) for p in range(start * B, len(self) * B)]
            batches = [list(zip(order[i * B:(i + 1) * B], keys[(i - start) * B:(i - start + 1) * B]))
                       for i in range(start, len(self))]
            return self._run(batches, epoch, start)
        return self._normalized(cached_batches(self.cache, start, len(self), self._decode_eval))

    def _decode_eval(self, which: list[int]) -> Iterator[Batch]:
        B = self.batch_size
        return self._decoded([[(j, 0) for j in range(self._lo + i * B, min(self._lo + (i + 1) * B, self._hi))]
                              for i in which])

    def _decoded(self, batches: list[list[tuple[int, int]]]) -> Iterator[Batch]:
        """The planned batches as uint8 images (B, 3, S, S) and labels on the device."""
        self._plan.batches = batches
        try:
            for x, y in self._loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as e:  # from a worker, wrapped in its traceback (line breaks escaped as for any UserError):
            # keep the line it was raised with
            lines = str(e).replace("\\n", "\n").strip().splitlines()
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None

    def _normalized(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for x, y in batches:
            yield torch.addcmul(self._shift, x.float(), self._scale), y

    def _run(self, batches: list[list[tuple[int, int]]], epoch: int, start: int) -> Iterator[Batch]:
        for i, (x, y) in enumerate(self._normalized(self._decoded(batches)), start):
            if self.augment is not None:
                x, y = self.augment(x, y, batch_key(self.seed, epoch, self.rank, i))
            yield x, y


def build_imagenet_folder(c: DataConfig, rank: int, world_size: int, device: torch.device | str,
                          test: bool = False, recipe: RecipeConfig = LIGHT,
                          label_smoothing: float = 0.0) -> DataBundle:
    """The three loaders of an ImageNet-style folder; ``c`` is resolved (no ``None`` defaults left)."""
    datasets, create_transform = import_folder_libs()
    hint = "pass data.root=DIR holding train/<class>/*.jpg and val/<class>/*.jpg"
    if c.root is None:
        raise DataError(f"data.root: not set for imagenet_folder; {hint}")
    root = Path(c.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet_folder not found: no directory {root / split}; {hint}")
    size, info = int(c.img_size), DATASETS["imagenet_folder"]
    # use_prefetcher: uint8 tensors out of the workers; normalization and erasing happen on the device
    common_tf: dict[str, Any] = dict(input_size=size, interpolation=recipe.interpolation, mean=info.mean,
                                     std=info.std, use_prefetcher=True)
    eval_tf = create_transform(is_training=False, crop_pct=0.875, **common_tf)
    train_tf = fix_posterize(create_transform(is_training=True, hflip=0.5 if c.hflip else 0.0,
                                              auto_augment=recipe.rand_augment, color_jitter=None, re_prob=0.0,
                                              **common_tf)) if c.augment else eval_tf
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
    train_idx, val_idx = split_train_val(len(train_set), int(c.val_size), c.split_seed, train_set.targets)
    common: dict[str, Any] = dict(mean=info.mean, std=info.std, rank=rank, world_size=world_size, seed=c.seed,
                                  num_workers=c.num_workers, device=device)
    augment = BatchAugment.build(recipe, len(train_set.classes), label_smoothing, device) if c.augment else None
    train = FolderLoader(train_set, train_idx.tolist(), c.batch_size, train=True, augment=augment,
                         repeats=recipe.repeated_aug, **common)
    val = (FolderLoader(val_set, val_idx.tolist(), c.eval_batch_size, train=False, cache=c.cache_val is not False,
                        **common) if c.val_size else None)
    test_loader = FolderLoader(test_set, None, c.eval_batch_size, train=False, **common) if test else None
    return DataBundle(c.name, train, val, test_loader, size, 3, len(train_set.classes))
