"""The in-memory loader: one split of a uint8 dataset served as normalized, augmented, sharded batches on
the training device, with no DataLoader and no worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from supernet.data.config import DataError, mix_seed, normalizer, shard_plan
from supernet.data.readers import ArrayDataset
from supernet.data.recipe import BatchAugment, batch_key, repeated_order, repeated_plan


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
        augment: the recipe's batch-level augmentation of training batches (erasing, Mixup/CutMix), or None.
        repeats: repeated augmentation, each image this many times per epoch (timm's RepeatAugSampler); 1 = off.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                 train: bool, rank: int = 0, world_size: int = 1, seed: int = 0, crop_pad: int = 0,
                 hflip: bool = False, device: torch.device | str = "cpu", augment: BatchAugment | None = None,
                 repeats: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank: {rank} with world_size {world_size} (allowed: 0..{world_size - 1})")
        if len(mean) != data.images.shape[1] or len(std) != len(mean):
            raise DataError(f"mean/std: {len(mean)}/{len(std)} values for {data.images.shape[1]} channels")
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.seed, self.crop_pad, self.hflip, self.augment, self.repeats = seed, crop_pad, hflip, augment, repeats
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # (N, C, H, W) uint8
        self.labels = data.labels.to(self.device)  # (N,) int64
        self._scale, self._shift = normalizer(mean, std, self.device)
        self._batches, self.num_examples, self._lo, self._hi = shard_plan(len(data), batch_size, rank, world_size,
                                                                         train)
        if train and repeats > 1:
            self._batches, self.num_examples = repeated_plan(len(data), repeats, batch_size, world_size, rank)

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
        if self.repeats > 1:
            order = repeated_order(len(self.labels), self.repeats, W, self.rank, self.seed, epoch)
            index = torch.tensor(order[: nb * B]).view(nb, B).to(self.device)
        else:
            perm = torch.randperm(len(self.labels),
                                  generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
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
            x, y = self._normalize(x), self.labels[index[i]]
            if self.augment is not None:
                x, y = self.augment(x, y, batch_key(self.seed, epoch, self.rank, i))
            yield x, y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, x.float(), self._scale)  # (B, C, H, W) float32

