"""The data package: ``build_data`` returns the datasets and batch loaders of supernet training, evolutionary
search and retraining (config.py: the config and loader contract, readers.py: IDX / CIFAR files, memory.py: the
in-memory loader, folder.py: the ImageNet-style folder pipeline, store.py / store_writer.py / prepared.py /
device_aug.py: a folder decoded once into uint8 arrays, read and augmented on the device, recipe.py: the training
augmentation recipe).

Three splits: ``train`` is the official training set minus ``val_size`` images held out with
``split_seed``; ``val`` is those held-out *training* images (supernet validation, the search's fitness;
``None`` when ``val_size`` is 0); ``test`` is the official test split, untouched and in file order, reserved
for the final evaluation of a retrained architecture -- supernet training and search never read it.

Fashion-MNIST (IDX files) and CIFAR-10/100 (python pickles) live in memory as uint8 ``(N, C, H, W)``
tensors served by :class:`TensorLoader` (no DataLoader, no workers). An ImageNet-style class folder goes
through torchvision, imported only when asked for (``supernet/data/folder.py``), or is decoded once by
``python -m supernet.prepare`` into a store that ``data=imagenet_prepared`` reads (``supernet/data/prepared.py``).

Usage (every loader has the same small contract: ``len()``, ``epoch(epoch, start)``, iteration)::

    data = build_data(cfg.data, rank=rank, world_size=world_size, device=device)
    check_fits("arch", arch, data)           # img_size, in_chans, num_classes agree (space/app.py)
    model = PSViT(arch)
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

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from supernet.data.config import (DATASETS, FILE_DATASETS, DataBundle, DataConfig, DataError, DatasetInfo, Loader,
                                  mix_seed, normalizer, shard_plan, split_train_val)
from supernet.data.memory import TensorLoader, crop_flip
from supernet.data.readers import ArrayDataset, load_cifar, load_fashion_mnist, read_idx
from supernet.data.recipe import BatchAugment, RecipeConfig

__all__ = ["DATASETS", "FILE_DATASETS", "ArrayDataset", "DataBundle", "DataConfig", "DataError", "DatasetInfo",
           "Loader", "RecipeConfig", "TensorLoader", "build_data", "crop_flip", "load_cifar", "load_fashion_mnist",
           "mix_seed", "normalizer", "read_idx", "shard_plan", "split_train_val"]


def build_data(cfg: DataConfig | DictConfig | Mapping[str, Any], rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu", test: bool = False,
               recipe: RecipeConfig | DictConfig | Mapping[str, Any] | None = None,
               label_smoothing: float = 0.0) -> DataBundle:
    """Loads the dataset named by the ``data`` config group and returns its sharded loaders.

    Args:
        cfg: the ``data`` group (``cfg.data`` of the app), a plain mapping, or a :class:`DataConfig`.
        rank, world_size: this process among the DDP processes (``RANK``, ``WORLD_SIZE``).
        device: where batches are delivered (and where in-memory datasets are kept).
        test: also load the official test split; only retraining's final evaluation asks for it, so
            supernet training and search never open its files.
        recipe: the training split's augmentation (the ``recipe`` group, supernet/data/recipe.py); None = light.
        label_smoothing: of the mixed soft targets, when the recipe mixes (Mixup/CutMix).

    Raises:
        DataError: the dataset is missing, corrupt, or the config is invalid.
    """
    c = DataConfig.from_cfg(cfg).resolved()
    r = RecipeConfig.from_cfg(recipe)
    if not 0 <= rank < world_size:
        raise DataError(f"rank: {rank} with world_size {world_size} (allowed: 0..{world_size - 1})")
    r.check(in_memory=c.name not in FILE_DATASETS, batch_size=c.batch_size, world_size=world_size)
    if c.name == "imagenet_folder":
        from supernet.data.folder import build_imagenet_folder  # torchvision only on demand

        return build_imagenet_folder(c, rank, world_size, device, test, r, label_smoothing)
    if c.name == "imagenet_prepared":
        from supernet.data.prepared import build_imagenet_prepared

        return build_imagenet_prepared(c, rank, world_size, device, test, r, label_smoothing)
    info = DATASETS[c.name]
    full_train, test_set = (load_fashion_mnist(c.root, test) if c.name == "fashion_mnist"
                            else load_cifar(c.name, c.root, test))
    train_idx, val_idx = split_train_val(len(full_train), c.val_size, c.split_seed, full_train.labels)
    common = dict(mean=info.mean, std=info.std, rank=rank, world_size=world_size, device=device)
    augment = BatchAugment.build(r, info.num_classes, label_smoothing, device) if c.augment else None
    train = TensorLoader(full_train.subset(train_idx), c.batch_size, train=True, seed=c.seed,
                         crop_pad=c.crop_pad if c.augment else 0, hflip=bool(c.hflip and c.augment), augment=augment,
                         repeats=r.repeated_aug, **common)
    val = TensorLoader(full_train.subset(val_idx), c.eval_batch_size, train=False, **common) if c.val_size else None
    test_loader = TensorLoader(test_set, c.eval_batch_size, train=False, **common) if test else None
    return DataBundle(c.name, train, val, test_loader, info.img_size, info.in_chans, info.num_classes)
