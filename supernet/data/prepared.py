"""``data=imagenet_prepared``: the loaders of a store written once by ``python -m supernet.prepare``
(supernet/data/store.py), so that no JPEG is decoded while training.

A background thread per loader gathers each batch's images from the memory-mapped shards (rows visited in sorted
order, ``data.num_workers`` threads copying) into pinned uint8 buffers a few batches ahead, each whole image in the
top-left corner of a batch as high and wide as its largest; the batch crosses to the device with a non-blocking
copy and is augmented there (supernet/data/device_aug.py: timm's random-resized crop of the whole image, resized as
PIL does, and flip, RandAugment), normalized, then erased and mixed by the recipe's :class:`BatchAugment` like the
other loaders. Sharding and the sample order are the folder loader's (``DistributedSampler``, or timm's
``RepeatAugSampler`` for repeated augmentation), so a store and its folder see the same images in the same batches.
Every random draw is seeded from ``(data.seed, epoch, rank, batch)``, so a resumed run replays an uninterrupted one
exactly.

Evaluation crops come from the store ready-made, the folder's evaluation pixels exactly: the held-out validation
images' from ``train/heldout.npy`` (the run must hold out the store's val_size with its split_seed), the test
split's from ``val/``; the held-out ones are kept on the device as uint8 after the first pass (``data.cache_val``).
With ``data.augment=false`` the training images are centre crops of the stored images, resized on the device as the
evaluation transform frames them (close to, not exactly, the folder's pixels: the stored image is smaller).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from supernet.data.config import (DATASETS, Batch, DataBundle, DataConfig, DataError, cached_batches, mix_seed,
                                  normalizer, shard_plan, split_train_val)
from supernet.data.device_aug import DeviceAugment, RandAugmentSpec, resized_crop
from supernet.data.recipe import LIGHT, BatchAugment, RecipeConfig, batch_key, repeated_order, repeated_plan
from supernet.data.store import PREPARE_HINT, CropArrays, ImageArrays, StoreMeta, crop_split, heldout_split

PREFETCH = 2  # batches read ahead of the one being trained on


def crop_key(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one training batch's crop, flip and RandAugment draws (batch_key seeds erasing and mixing)."""
    return mix_seed(seed, epoch, rank, batch, 5)


def center_view(x: torch.Tensor, sizes: np.ndarray, img_size: int, resize: int, mode: str) -> torch.Tensor:
    """The evaluation transform's frame of stored images (``x[i, :, :h, :w]``, ``sizes`` (n, 2)): the centre square
    that resizing the short side to ``resize`` and cropping ``img_size`` keeps, resized to ``img_size`` as PIL
    resizes a box (its taps may reach the pixels around it)."""
    hw = torch.as_tensor(np.asarray(sizes), dtype=torch.float32, device=x.device)
    side = img_size * hw.min(1).values / resize
    top, left = (hw[:, 0] - side) / 2, (hw[:, 1] - side) / 2
    clip = torch.stack([torch.zeros_like(top), torch.zeros_like(top), hw[:, 0], hw[:, 1]], -1)
    return resized_crop(x, torch.stack([top, left, side, side], -1), img_size, mode, clip)


Arrays = CropArrays | ImageArrays


class Prefetcher:
    """Batches of store rows as uint8 images and int64 labels on ``device``, read by a background thread into
    pinned buffers ``PREFETCH`` batches ahead (``threads`` threads copying each batch; 0 or 1: the reader alone).
    A batch is ``(n, 3, H, W)`` with H and W its largest image's (a crop split's side), image ``k`` in its top-left
    corner.

    A buffer is refilled only once the device has finished copying out of it (a CUDA event the reader waits for),
    so the training thread never waits for a copy.
    """

    def __init__(self, split: Arrays, batch_size: int, device: torch.device, threads: int) -> None:
        self.split, self.batch_size, self.device, self.threads = split, batch_size, device, threads

    def __call__(self, batches: list[np.ndarray]) -> Iterator[Batch]:
        cuda = self.device.type == "cuda"
        capacity = self.batch_size * 3 * self.split.max_h * self.split.max_w
        slots = [torch.empty(capacity, dtype=torch.uint8, pin_memory=cuda) for _ in range(PREFETCH + 1)]
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for k in range(len(slots)):
            free.put((k, None))
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(batches, slots, free, ready, stop), daemon=True)
        reader.start()
        try:
            for _ in batches:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                k, shape, labels = item
                view = slots[k][:math.prod(shape)].view(shape)
                done = None
                if cuda:
                    x = view.to(self.device, non_blocking=True)
                    y = labels.to(self.device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                else:  # the buffer is refilled: the batch needs its own memory
                    x, y = view.to(self.device, copy=True), labels.to(self.device)
                free.put((k, done))
                yield x, y
        finally:
            stop.set()
            free.put((None, None))  # wakes the reader if it waits for a buffer
            reader.join()

    def _read(self, batches: list[np.ndarray], slots: list[torch.Tensor], free: queue.Queue, ready: queue.Queue,
              stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            for rows in batches:
                k, done = free.get()
                if k is None or stop.is_set():
                    return
                if done is not None:
                    done.synchronize()  # the device has copied the previous batch out of this buffer
                shape = (len(rows), 3, *self.split.batch_shape(rows))
                self.gather(rows, slots[k][:math.prod(shape)].numpy().reshape(shape), pool)
                labels = torch.from_numpy(self.split.labels[rows].astype(np.int64))
                ready.put((k, shape, labels.pin_memory() if self.device.type == "cuda" else labels))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            ready.put(e)
        finally:
            if pool is not None:
                pool.shutdown()

    def gather(self, rows: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
        """``out[k] = image rows[k]``: the reader's work for one batch."""
        order = np.argsort(rows, kind="stable")  # sorted: each thread reads one stretch of the files in order
        if pool is None:
            self.split.read_into(out, rows[order], order)
            return
        parts = np.array_split(order, self.threads)
        list(pool.map(lambda part: self.split.read_into(out, rows[part], part), parts))


class PreparedLoader:
    """The training split of a store as augmented, normalized float batches on ``device``, sharded over ranks:
    :class:`supernet.data.folder.FolderLoader`'s contract, sample order and batch-level augmentation.

    Args:
        split: the store's training images.
        indices: which of its images are trained on (the rest is the held-out validation split).
        batch_size: images per batch on this rank.
        mean, std: per-channel constants on the [0, 1] pixel scale.
        rank, world_size: this process among the DDP processes.
        seed: with the epoch, seeds the order (same on every rank) and every augmentation draw (per rank).
        device: where batches are delivered and augmented.
        augment: crop, flip and RandAugment on the device; None trains on the evaluation crop.
        view: ``view(x, sizes)``, the evaluation frame, used when ``augment`` is None.
        batch_augment: the recipe's erasing and Mixup/CutMix, or None.
        repeats: repeated augmentation (timm's RepeatAugSampler), 1 = off.
        threads: reading threads.
    """

    def __init__(self, split: ImageArrays, indices: np.ndarray, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], *, rank: int, world_size: int, seed: int, device: torch.device | str,
                 augment: DeviceAugment | None, view: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
                 batch_augment: BatchAugment | None = None, repeats: int = 1, threads: int = 1) -> None:
        self.indices, self.batch_size, self.train = indices, batch_size, True
        self.rank, self.world_size, self.seed, self.repeats = rank, world_size, seed, repeats
        self.device = torch.device(device)
        self.augment, self.view, self.batch_augment = augment, view, batch_augment
        self._scale, self._shift = normalizer(mean, std, self.device)
        self._batches, self.num_examples, _, _ = shard_plan(len(indices), batch_size, rank, world_size, True)
        if repeats > 1:
            self._batches, self.num_examples = repeated_plan(len(indices), repeats, batch_size, world_size, rank)
        else:  # the folder loader's sampler, over positions in the split
            self.sampler = DistributedSampler(range(len(indices)), num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=0, drop_last=True)  # seeded per epoch: mix_seed(seed, epoch)
        self.prefetch = Prefetcher(split, batch_size, self.device, threads)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches ``start, start+1, ...`` of ``epoch``, the same ones (images and augmentations) on
        every call."""
        if not 0 <= start <= len(self):
            raise DataError(f"start: batch {start} (allowed: 0..{len(self)} for this {len(self)}-batch epoch)")
        return self._run(list(self.plan(epoch)[start:]), epoch, start)

    def plan(self, epoch: int) -> np.ndarray:
        """(batches, batch_size) store rows of this rank's epoch, in the sampler's order."""
        if self.repeats > 1:
            order = repeated_order(len(self.indices), self.repeats, self.world_size, self.rank, self.seed, epoch)
        else:
            self.sampler.set_epoch(mix_seed(self.seed, epoch))
            order = list(self.sampler)
        return self.indices[np.asarray(order[:len(self) * self.batch_size])].reshape(len(self), self.batch_size)

    def augmented(self, x: torch.Tensor, y: torch.Tensor, sizes: np.ndarray, epoch: int, batch: int) -> Batch:
        """What the device does to batch ``batch`` of ``epoch`` (uint8 images of ``sizes``, labels): crop, flip and
        RandAugment (or the evaluation frame), normalization, erasing and mixing."""
        if self.augment is not None:
            x = self.augment(x, sizes, crop_key(self.seed, epoch, self.rank, batch))
        else:
            x = self.view(x, sizes)
        x = torch.addcmul(self._shift, x.float(), self._scale)
        if self.batch_augment is not None:
            x, y = self.batch_augment(x, y, batch_key(self.seed, epoch, self.rank, batch))
        return x, y

    def _run(self, batches: list[np.ndarray], epoch: int, start: int) -> Iterator[Batch]:
        for i, (rows, (x, y)) in enumerate(zip(batches, self.prefetch(batches)), start):
            yield self.augmented(x, y, self.prefetch.split.sizes[rows], epoch, i)


class StoreEvalLoader:
    """An evaluation split of a store: this rank's contiguous block in order, every image once (the last batch
    possibly short), as normalized float batches of the stored evaluation crops; with ``cache``, the uint8 crops stay
    on ``device`` after the first pass and are never read again."""

    def __init__(self, split: CropArrays, indices: np.ndarray, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], *, rank: int, world_size: int, device: torch.device | str, cache: bool,
                 threads: int = 1) -> None:
        self.batch_size, self.train = batch_size, False
        self.device = torch.device(device)
        self._scale, self._shift = normalizer(mean, std, self.device)
        self._batches, self.num_examples, lo, hi = shard_plan(len(indices), batch_size, rank, world_size, False)
        self.rows = indices[lo:hi]
        self.cache: dict[int, Batch] | None = {} if cache else None
        self.prefetch = Prefetcher(split, batch_size, self.device, threads)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """This rank's batches from ``start``; ``epoch`` is ignored (evaluation is in order)."""
        if not 0 <= start <= len(self):
            raise DataError(f"start: batch {start} (allowed: 0..{len(self)} for this {len(self)}-batch epoch)")
        return self._normalized(cached_batches(self.cache, start, len(self), self._produce))

    def _produce(self, which: list[int]) -> Iterator[Batch]:
        B = self.batch_size
        yield from self.prefetch([self.rows[i * B:(i + 1) * B] for i in which])

    def _normalized(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for x, y in batches:
            yield torch.addcmul(self._shift, x.float(), self._scale), y


def check_store(c: DataConfig, meta: StoreMeta, recipe: RecipeConfig, root: Path) -> None:
    """The run's settings against the store's, one line each."""
    if c.img_size != meta.img_size:
        raise DataError(f"data.img_size: {c.img_size} but the store {root} was prepared for {meta.img_size} (set "
                        f"data.img_size={meta.img_size}, or prepare a store with img_size={c.img_size})")
    if recipe.interpolation != meta.interpolation:
        raise DataError(f"recipe.interpolation: {recipe.interpolation} but the store {root} holds evaluation crops "
                        f"resized with {meta.interpolation} (set recipe.interpolation={meta.interpolation}, or "
                        f"prepare a store with interpolation={recipe.interpolation})")
    if c.val_size and (c.val_size, c.split_seed) != (meta.val_size, meta.split_seed):
        raise DataError(f"data.val_size: {c.val_size} with data.split_seed {c.split_seed}, but the store {root} holds "
                        f"the evaluation crops of the {meta.val_size} training images held out with split_seed "
                        f"{meta.split_seed} (set data.val_size={meta.val_size} data.split_seed={meta.split_seed}, "
                        f"or prepare a store with val_size={c.val_size} split_seed={c.split_seed})")


def build_imagenet_prepared(c: DataConfig, rank: int, world_size: int, device: torch.device | str,
                            test: bool = False, recipe: RecipeConfig = LIGHT,
                            label_smoothing: float = 0.0) -> DataBundle:
    """The three loaders of a prepared store; ``c`` is resolved. The test split's files are opened only when
    ``test``."""
    if c.root is None:
        raise DataError(f"data.root: not set for imagenet_prepared (the store's directory); {PREPARE_HINT}")
    root = Path(c.root)
    meta = StoreMeta.read(root)
    check_store(c, meta, recipe, root)
    size, info, classes = int(c.img_size), DATASETS[c.name], len(meta.classes)
    train_split = ImageArrays(root, meta.splits["train"], classes)
    train_idx, val_idx = (i.numpy() for i in split_train_val(train_split.count, int(c.val_size), c.split_seed,
                                                                      train_split.labels))
    view = lambda x, sizes: center_view(x, sizes, size, meta.eval_resize, recipe.interpolation)  # noqa: E731
    augment = batch_augment = None
    if c.augment:
        spec = RandAugmentSpec.parse(recipe.rand_augment, size, info.mean) if recipe.rand_augment else None
        augment = DeviceAugment(size, recipe.interpolation, bool(c.hflip), spec, device)
        batch_augment = BatchAugment.build(recipe, classes, label_smoothing, device)
    common: dict[str, Any] = dict(mean=info.mean, std=info.std, rank=rank, world_size=world_size, device=device,
                                  threads=c.num_workers)
    train = PreparedLoader(train_split, train_idx, c.batch_size, seed=c.seed, augment=augment, view=view,
                           batch_augment=batch_augment, repeats=recipe.repeated_aug, **common)
    val = None
    if c.val_size:
        stored = np.sort(val_idx)  # train/heldout.npy holds the held-out crops by image index
        heldout = heldout_split(root, meta, train_split.labels, stored)
        # read in the split's class-interleaved order (split_train_val), so every prefix is a fitness set
        val = StoreEvalLoader(heldout, np.searchsorted(stored, val_idx), c.eval_batch_size,
                              cache=c.cache_val is not False, **common)
    test_loader = None
    if test:
        test_split = crop_split(root, "val", meta.splits["val"], classes)
        test_loader = StoreEvalLoader(test_split, np.arange(test_split.count), c.eval_batch_size, cache=False,
                                      **common)
    return DataBundle(c.name, train, val, test_loader, size, 3, classes, source=meta.identity)
