"""Image-folder loading vs the model's appetite, measured on this machine's CPU with a folder of JPEGs it writes:

1. images/s of one decoding worker of the folder pipeline (supernet/data/folder.py) at 224x224 with
   ``recipe=deit`` (conf/recipe/deit.yaml): JPEG decode, random-resized crop, flip and RandAugment in the worker;
   normalization, random erasing and Mixup/CutMix in the training process (on the GPU in training, here the CPU);
2. images/s of a supernet training step of the ImageNet presets (the engine's ``Trainer.train_step`` with the
   supernet task) on one thread of this CPU, fed with that pipeline's batches;
3. how many decoding workers feed 2., and how many feed ``GPU_ESTIMATE`` img/s, the rate one H100 is ESTIMATED
   (not measured) to train imagenet_tiny_2d at; `make gpu-check` measures it on a GPU;
4. the same folder decoded once into a prepared store (``python -m supernet.prepare``, supernet/data/store.py):
   img/s of one decoding process doing that once, and the CPU's share of ``data=imagenet_prepared`` per core
   (copying memory-mapped whole uint8 images into the batch, drawing the crop and RandAugment parameters), next to
   the folder's worker; the rest (crop, flip, RandAugment, normalization, erasing, Mixup/CutMix) runs on the
   device, timed here on the CPU.

Both rates are per core, so their ratio carries over to machines whose cores are alike; a loaded machine (the
load average is printed) slows both.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from bench.timing import interleaved
from bench.train_speed import CONF, _compose
from space.cost import fmt_macs, macs
from space.space import SearchSpace
from supernet.data import DATASETS, DataBundle, build_data, normalizer
from supernet.data.prepared import PreparedLoader
from supernet.prepare import prepare
from supernet.engine.distributed import DistEnv
from supernet.engine.loop import Trainer
from supernet.model.supernet import Supernet
from supernet.train import SupernetTask

GPU_ESTIMATE = 7000  # img/s: one H100 training imagenet_tiny_2d in bf16, an ESTIMATE, not a measurement
PHOTO = (500, 375)  # ImageNet's typical photo (width, height)
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LoaderFigures:
    """What the section measures for one preset; the two rates are per core."""

    preset: str
    batch_size: int
    per_worker: float  # img/s of one decoding worker (the training process consuming its batches)
    device_ms: float  # ms per batch of normalization + erasing + Mixup/CutMix on this CPU
    model: float  # img/s of the preset's supernet training step, one thread
    path_macs: float  # mean MACs per image of the timed steps' paths
    space_macs: float  # mean MACs per image over the space's uniform paths

    @property
    def workers_for_model(self) -> int:
        """Decoding workers that keep up with the measured training step."""
        return workers_needed(self.model, self.per_worker)


@dataclass(frozen=True)
class PreparedFigures:
    """The prepared store's rates on this CPU, one core each (supernet/data/prepared.py)."""

    batch_size: int
    max_h: int  # the stored training images' largest height and width (whole images, short side at most 320)
    max_w: int
    images: int  # in the store
    prepare: float  # img/s of one decoding process of `python -m supernet.prepare`, once per store
    read: float  # img/s of one reading thread: memory-mapped whole uint8 images into the batch buffer
    draws_ms: float  # ms per batch of the crop, flip and RandAugment draws (on the CPU in training too)
    device_ms: float  # ms per batch of the device side, here on this CPU

    @property
    def per_core(self) -> float:
        """img/s one core delivers when the device side runs on a GPU: reading plus the draws."""
        return 1.0 / (1.0 / self.read + self.draws_ms / 1e3 / self.batch_size)


def workers_needed(rate: float, per_worker: float) -> int:
    """Workers of ``per_worker`` img/s each that deliver at least ``rate`` img/s."""
    return math.ceil(rate / per_worker)


def _picture(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG (quality 90) of smooth random structure at four scales plus grain: white noise compresses far
    worse than photos, a plain upsampled one far better; this lands at ~110 KB for 500x375, ImageNet's size."""
    from PIL import Image

    acc = np.zeros((height, width, 3), np.float32)
    for div, weight in ((64, 1.0), (16, 0.6), (4, 0.6), (2, 0.6)):
        low = rng.integers(0, 256, (max(1, height // div), max(1, width // div), 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
        acc += weight * (up - 127.5)
    acc = 127.5 + acc * (1.2 / 2.8) + rng.standard_normal(acc.shape, dtype=np.float32) * 14
    out = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_image_folder(root: Path, images: int, classes: int = 4, size: tuple[int, int] = PHOTO,
                       distinct: int = 8, seed: int = 0) -> float:
    """``root/train/<class>/*.jpg`` (``images`` files) and ``root/val/<class>/0.jpg``; returns the mean JPEG
    size in bytes. The files cycle through ``distinct`` pictures: decoding a file costs the same whether or not
    another holds the same bytes, and encoding is slow here."""
    rng = np.random.default_rng(seed)
    pictures = [_picture(rng, *size) for _ in range(min(distinct, images))]
    for c in range(classes):
        for split in ("train", "val"):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"class{c}" / "0.jpg").write_bytes(pictures[c % len(pictures)])
    for i in range(images):
        (root / "train" / f"class{i % classes}" / f"{i}.jpg").write_bytes(pictures[i % len(pictures)])
    return statistics.mean(len(pictures[i % len(pictures)]) for i in range(images))


def folder_config(root: Path, preset: str, batch_size: int, workers: int) -> DictConfig:
    """The supernet app's config for ``preset`` on the folder with ``recipe=deit``, crops at the preset's size."""
    img_size = OmegaConf.load(CONF / "space" / f"{preset}.yaml").img_size
    return _compose(f"space={preset}", "data=imagenet_folder", f"data.root={root}", "data.val_size=0",
                    f"data.img_size={img_size}",
                    f"data.batch_size={batch_size}", f"data.num_workers={workers}", "recipe=deit",
                    "recipe.repeated_aug=1",  # one process: repeats are refused (timm too); same cost per image
                    "max_steps=100000", "device=cpu")


def _folder_data(cfg: DictConfig) -> DataBundle:
    return build_data(cfg.data, recipe=cfg.recipe, label_smoothing=cfg.optim.label_smoothing)


def _endless(data: DataBundle) -> Iterator[Batch]:
    return itertools.chain.from_iterable(data.train.epoch(e) for e in itertools.count())


def decode_rate(data: DataBundle, batches: int) -> tuple[float, list[Batch]]:
    """Images/s the training process receives over ``batches`` batches after a warm-up batch (worker start-up),
    and the batches. Workers prefetch, so once the first batch is in they never wait: the time to the last
    batch is the workers' time for ``batches`` batches, unless the training process's own share is slower."""
    feed = _endless(data)
    got = [next(feed)]
    t = time.perf_counter()
    got += [next(feed) for _ in range(batches)]
    return batches * data.train.batch_size / (time.perf_counter() - t), got


def device_side_ms(data: DataBundle, reps: int) -> float:
    """Milliseconds per batch of what the training process adds to a decoded uint8 batch: normalization, then
    the recipe's random erasing and Mixup/CutMix (``BatchAugment``), on this CPU."""
    B, augment = data.train.batch_size, getattr(data.train, "augment", None)
    info = DATASETS["imagenet_folder"]
    scale, shift = normalizer(info.mean, info.std, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (B, 3, data.img_size, data.img_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, data.num_classes, (B,), generator=g)
    keys = itertools.count()

    def one() -> None:
        x = torch.addcmul(shift, u8.float(), scale)  # what FolderLoader does to a decoded batch
        if augment is not None:
            augment(x, labels, next(keys))

    (t,) = interleaved([one], reps=reps)
    return t * 1e3


def model_rate(cfg: DictConfig, data: DataBundle, batches: list[Batch], steps: int) -> tuple[float, float, float]:
    """Images/s of the supernet training step on ``batches`` (one thread), the timed paths' mean MACs and the
    space's uniform mean MACs.

    The timed steps are the first ``steps`` whose path lies within 10% of the space's mean MACs, so that a few
    steps stand for a long run's average step (paths range from a few to several times the mean); the trainer's
    step counter is pinned to each, as `make bench`'s training section does. The folder's few classes' soft
    targets are padded with zeros to the preset's classes, so the model is the preset's own.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, like a decoding worker; 2 threads beside a busy core run slower than 1
    try:
        space = SearchSpace.from_config(cfg.space)
        rng = random.Random(0)
        space_macs = statistics.fmean(macs(space.sample(rng)) for _ in range(2000))
        env = DistEnv(0, 1, 0, torch.device("cpu"))
        torch.manual_seed(cfg.seed)
        task = SupernetTask(Supernet(space), cfg, data, env)
        trainer = Trainer(task, data, cfg, env)
        task.net.train()
        typical = list(itertools.islice((t for t in itertools.count() if abs(macs(task.sampler(t)) / space_macs - 1)
                                         <= 0.1), steps + 1))
        feed = [(x, F.pad(y, (0, space.num_classes - y.shape[1])) if y.is_floating_point() else y) for x, y in batches]
        trainer.step = typical[0]
        trainer.train_step(feed[0][0][:2], feed[0][1][:2])  # warm-up: AdamW state, allocator
        t = time.perf_counter()
        for i, step in enumerate(typical[1:]):
            trainer.step = step
            trainer.train_step(*feed[i % len(feed)])
        elapsed = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    path_macs = statistics.fmean(macs(task.sampler(s)) for s in typical[1:])
    return steps * data.train.batch_size / elapsed, path_macs, space_macs


def measure(root: Path, preset: str, batch_size: int, batches: int, steps: int, reps: int) -> LoaderFigures:
    """One decoding worker's rate over ``batches`` batches, the device side's cost, and ``preset``'s supernet
    step over ``steps`` steps fed with those batches (the folder must hold at least one batch)."""
    cfg = folder_config(root, preset, batch_size, 1)
    data = _folder_data(cfg)
    per_worker, got = decode_rate(data, batches)
    device_ms = device_side_ms(data, reps)
    model, path_macs, space_macs = model_rate(cfg, data, got[-2:], steps)
    return LoaderFigures(preset, batch_size, per_worker, device_ms, model, path_macs, space_macs)


def measure_prepared(root: Path, out: Path, img_size: int, batch_size: int, batches: int,
                     reps: int) -> PreparedFigures:
    """Decode the folder ``root`` once into the store ``out`` (one process) and time the prepared loader's parts:
    the reader over ``batches`` batches of an epoch, the draws and the device side over ``reps`` batches."""
    import torchvision.datasets.folder  # noqa: F401 - its import (seconds here) is not decoding time

    t = time.perf_counter()
    prepare({"src": str(root), "out": str(out), "img_size": img_size, "short_side": None, "interpolation": "bicubic",
             "shards": 1, "workers": 0, "progress": False, "val_size": 0, "split_seed": 0})
    elapsed = time.perf_counter() - t
    images = sum(1 for p in root.rglob("*.jpg"))
    cfg = _compose("data=imagenet_prepared", f"data.root={out}", "data.val_size=0", f"data.img_size={img_size}",
                   f"data.batch_size={batch_size}", "data.num_workers=0", "recipe=deit", "recipe.repeated_aug=1",
                   "device=cpu")
    loader = build_data(cfg.data, recipe=cfg.recipe, label_smoothing=cfg.optim.label_smoothing).train
    assert isinstance(loader, PreparedLoader) and loader.augment is not None
    rows = list(itertools.islice(itertools.cycle(loader.plan(0)), batches + 1))
    split = loader.prefetch.split
    buf = np.empty((batch_size, 3, split.max_h, split.max_w), np.uint8)
    loader.prefetch.gather(rows[0], buf)  # warm-up: page cache, allocator
    t = time.perf_counter()
    for r in rows[1:]:
        loader.prefetch.gather(r, buf)
    read = batches * batch_size / (time.perf_counter() - t)
    x, y = torch.from_numpy(buf), torch.from_numpy(split.labels[rows[0]].astype(np.int64))
    sizes, keys = split.sizes[rows[0]], itertools.count()
    draws, device = interleaved([lambda: loader.augment.draws(next(keys), sizes),
                                 lambda: loader.augmented(x, y, sizes, 0, next(keys))], reps=reps)
    return PreparedFigures(batch_size, split.max_h, split.max_w, images, images / elapsed, read, draws * 1e3,
                           device * 1e3)


def report_prepared(p: PreparedFigures, per_worker: float, gpu_rate: float) -> None:
    """The prepared store's lines, next to the folder's ``per_worker`` img/s."""
    print(f"  prepared store (python -m supernet.prepare, once): {p.prepare:.1f} img/s per decoding process, "
          f"{p.images} images")
    print(f"    1 core reading it (memory-mapped whole uint8 images up to {p.max_h}x{p.max_w} -> batch: {p.read:.0f} "
          f"img/s; crop, "
          f"flip and RandAugment draws: {p.draws_ms:.1f} ms/batch of {p.batch_size}): {p.per_core:.0f} img/s per core, "
          f"x{p.per_core / per_worker:.1f} the folder's {per_worker:.1f}")
    print(f"    device side on this CPU (crop + flip + RandAugment + normalize + erasing + Mixup/CutMix): "
          f"{p.device_ms:.0f} ms/batch (on the GPU in training)")
    print(f"    cores to feed {gpu_rate:.0f} img/s (ESTIMATE): ceil({gpu_rate:.0f} / {p.per_core:.0f}) = "
          f"{workers_needed(gpu_rate, p.per_core)} with the store, against "
          f"{workers_needed(gpu_rate, per_worker)} decoding the folder")


def report(f: LoaderFigures, gpu_rate: float | None) -> None:
    """The preset's lines; with ``gpu_rate``, also the workers that feed that (estimated) GPU rate."""
    print(f"  {f.preset} supernet train step (Trainer.train_step: fwd+bwd+clip+AdamW), batch {f.batch_size}, "
          f"1 thread, paths of {fmt_macs(f.path_macs)} MACs/img on average (the space's mean "
          f"{fmt_macs(f.space_macs)}): {f.model:.1f} img/s")
    print(f"    decoding workers to feed it: ceil({f.model:.1f} / {f.per_worker:.1f}) = {f.workers_for_model}")
    if gpu_rate is not None:
        print(f"    decoding workers to feed {gpu_rate:.0f} img/s, one H100 training {f.preset} in bf16 (an ESTIMATE, "
              f"not a measurement; `make gpu-check` measures it): ceil({gpu_rate:.0f} / {f.per_worker:.1f}) = "
              f"{workers_needed(gpu_rate, f.per_worker)} cores of this CPU's speed")


def main(quick: bool = False) -> None:
    batch, images, batches, steps, reps = (16, 128, 6, 2, 3) if quick else (32, 256, 6, 4, 5)
    presets = ("imagenet_tiny_2d",) if quick else ("imagenet_tiny_2d", "imagenet_tiny_1d", "imagenet_small_2d")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(f"== loader speed (CPU, image folder at 224x224 with recipe=deit; load average {load:.1f} on {cores} cores; "
          "FLOPs are MACs)")
    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        root = Path(tmp)
        size = write_image_folder(root, images)
        print(f"  folder: {images} JPEGs of {PHOTO[0]}x{PHOTO[1]}, quality 90, {size / 1e3:.0f} KB on average, "
              "4 classes, in the page cache (disk reads not measured)")
        first = measure(root, presets[0], batch, batches, steps, reps)
        print(f"  1 decoding worker (decode + random-resized crop + flip + RandAugment rand-m9-mstd0.5-inc1, bicubic), "
              f"batch {batch}: {first.per_worker:.1f} img/s, {batches} batches after a warm-up batch")
        print(f"    training-process side on this CPU (normalize + random erasing + Mixup/CutMix): "
              f"{first.device_ms:.0f} ms/batch (on the GPU in training)")
        if not quick:
            two, _ = decode_rate(_folder_data(folder_config(root, presets[0], batch, 2)), 2 * batches)
            print(f"    2 decoding workers: {two:.1f} img/s, {two / 2:.1f} per worker (x{two / first.per_worker:.2f} "
                  f"of one; {cores} cores shared with the training process)")
        report(first, GPU_ESTIMATE)
        for preset in presets[1:]:
            cfg = folder_config(root, preset, batch, 1)
            data = _folder_data(cfg)
            model, path_macs, space_macs = model_rate(cfg, data, list(itertools.islice(_endless(data), 2)), steps)
            report(LoaderFigures(preset, batch, first.per_worker, first.device_ms, model, path_macs, space_macs),
                   None)
        print(f"    conf/data/imagenet_folder.yaml's num_workers: 8 deliver ~{8 * first.per_worker:.0f} img/s per "
              "rank at this per-worker rate")
        img_size = OmegaConf.load(CONF / "space" / f"{presets[0]}.yaml").img_size
        with tempfile.TemporaryDirectory(prefix="loader_store_") as store:  # not inside the folder it decodes
            prepared = measure_prepared(root, Path(store) / "store", img_size, batch, batches, reps)
        report_prepared(prepared, first.per_worker, GPU_ESTIMATE)


if __name__ == "__main__":
    import sys

    main(quick="quick" in sys.argv[1:])
