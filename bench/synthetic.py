"""Synthetic training data for benchmarks on spaces without their dataset on this machine (ImageNet): a few fixed
batches of random pixels, normalized as the real pipeline normalizes, behind the loader contract."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from space.space import SearchSpace
from supernet.data import DATASETS, DataBundle, normalizer

Batch = tuple[Tensor, Tensor]


class SyntheticLoader:
    """The loader contract (supernet/data/config.py, ``Loader``) over a few fixed batches kept on the device. A
    step's speed depends on shapes alone; the Trainer reads only the length (steps per epoch, for the lr schedule)."""

    def __init__(self, batches: list[Batch], length: int) -> None:
        self.batches, self.length = batches, length
        self.batch_size = len(batches[0][1])
        self.num_examples = length * self.batch_size

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        return (self.batches[i % len(self.batches)] for i in range(start, self.length))


def synthetic_batches(sizes: list[int], space: SearchSpace, device: torch.device, seed: int) -> list[Batch]:
    """Batches of ``sizes`` images for ``space``, made on ``device``: random uint8 pixels normalized as the folder
    pipeline normalizes decoded images (ImageNet's mean/std), random labels."""
    info = DATASETS["imagenet_folder" if space.in_chans == 3 else "fashion_mnist"]
    scale, shift = normalizer(info.mean, info.std, device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for n in sizes:
        u8 = torch.randint(0, 256, (n, space.in_chans, space.img_size, space.img_size), dtype=torch.uint8,
                           device=device, generator=g)
        out.append((torch.addcmul(shift, u8.float(), scale),
                    torch.randint(0, space.num_classes, (n,), device=device, generator=g)))
    return out


def synthetic_data(space: SearchSpace, batch: int, device: torch.device, length: int) -> DataBundle:
    """A training split of ``length`` steps cycling through two synthetic batches of ``batch`` images, no
    validation or test split."""
    loader = SyntheticLoader(synthetic_batches([batch] * 2, space, device, seed=0), length)
    return DataBundle("synthetic", loader, None, None, space.img_size, space.in_chans, space.num_classes)
