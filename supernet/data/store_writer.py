"""Writing a prepared store (supernet/data/store.py has the format): an image folder listed in ``ImageFolder``'s
order, every image's size read first (so each shard file is allocated whole before decoding), then decoded in
parallel processes straight into the shard files: every training image whole at its stored size, the held-out
training images' evaluation crops, and ``val/``'s evaluation crops. ``python -m supernet.prepare`` (supernet/prepare.py)
makes the directory appear atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from supernet.data.config import DataError, split_train_val
from supernet.data.store import (SPLITS, SplitMeta, StoreMeta, decode, decode_whole, eval_resize, shard_name,
                                 stored_size)

CHUNK = 32  # images per task: big enough to amortise the task, small enough for a smooth progress bar
Listing = tuple[list[str], dict[str, list[tuple[str, int]]]]


def list_images(src: Path) -> Listing:
    """The classes and, per split, ``(file, label)`` in ``ImageFolder``'s order; one-line errors for a missing
    split, no class folder, an empty class folder, or class folders that differ between the splits."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not src.is_dir():
        raise DataError(f"src: {src} is not a directory (pass src=DIR holding train/<class>/* and val/<class>/*)")
    classes: list[str] | None = None
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        root = src / split
        if not root.is_dir():
            raise DataError(f"src: no directory {root} (src needs train/<class>/* and val/<class>/*)")
        try:
            names, index = find_classes(str(root))
        except FileNotFoundError:
            raise DataError(f"src: no class folder in {root} (it needs one folder per class)") from None
        if classes is not None and names != classes:
            raise DataError(f"src: train/ has {len(classes)} class folders, val/ {len(names)}, and they differ; "
                            "both need the same class folders")
        classes = names
        samples[split] = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
        counts = np.bincount([label for _, label in samples[split]], minlength=len(names))
        if (counts == 0).any():
            empty = root / names[int(np.argmin(counts))]
            raise DataError(f"src: class folder {empty} holds no image ({', '.join(IMG_EXTENSIONS)}); add images or "
                            "remove the folder from both splits")
    assert classes is not None
    return classes, samples


def _unreadable(path: str, e: Exception) -> DataError:
    reason = (str(e).splitlines() or [""])[0][:120]
    return DataError(f"src: cannot read image {path} ({type(e).__name__}: {reason}); remove or replace the file")


def _sizes(files: tuple[str, ...]) -> list[tuple[int, int]]:
    """(h, w) of each image, from its header (PIL reads no pixels for it)."""
    from PIL import Image

    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception as e:  # noqa: BLE001 - PIL's errors vary by format; name the file instead
            raise _unreadable(path, e) from None
        out.append((h, w))
    return out


@dataclass(frozen=True)
class _Task:
    """A chunk of consecutive images of one split, decoded by one worker into preallocated files."""

    files: tuple[str, ...]
    out: str  # the shard file
    offsets: tuple[int, ...]  # byte offset of each image in it
    sizes: tuple[tuple[int, int], ...] | None  # (h, w) each is stored at, whole; None: evaluation crops
    crop: int  # the evaluation crop's side
    resize: int  # the evaluation transform's short side
    interpolation: str
    heldout: str = ""  # the held-out crops' file (train only)
    heldout_offsets: tuple[int, ...] = ()  # byte offset of each image's evaluation crop in it; -1: not held out


def _decode_chunk(task: _Task) -> list[str]:
    """Decode the chunk into its place in the files (plain writes at the right offset: a full disk is an OSError,
    where writing through a memory map would be a SIGBUS); returns the sha256 of each source file."""
    digests = []
    heldout = open(task.heldout, "r+b") if task.heldout else None  # noqa: SIM115 - closed below
    try:
        with open(task.out, "r+b") as f:
            for k, path in enumerate(task.files):
                try:
                    data = Path(path).read_bytes()
                    if task.sizes is None:
                        pixels = decode(data, task.resize, task.crop, task.interpolation)
                    else:
                        pixels = decode_whole(data, *task.sizes[k], task.interpolation)
                    crop = None
                    if heldout is not None and task.heldout_offsets[k] >= 0:
                        crop = decode(data, task.resize, task.crop, task.interpolation)
                except Exception as e:  # noqa: BLE001 - PIL's errors vary by format; name the file instead
                    raise _unreadable(path, e) from None
                os.pwrite(f.fileno(), np.ascontiguousarray(pixels).tobytes(), task.offsets[k])
                if crop is not None:
                    os.pwrite(heldout.fileno(), np.ascontiguousarray(crop).tobytes(), task.heldout_offsets[k])
                digests.append(hashlib.sha256(data).hexdigest())
    finally:
        if heldout is not None:
            heldout.close()
    return digests


def _allocate(path: Path, shape: tuple[int, ...]) -> int:
    """A .npy file of ``shape`` uint8, its space reserved up front (a full disk shows before decoding); returns the
    offset of its data."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset, size = mm.offset, mm.offset + mm.nbytes
    del mm
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without fallocate
                raise
    return offset


class _Pool:
    """``map(fn, items)`` in ``workers`` forked processes (0: in this one), in order, with a tqdm bar counting
    ``weight(item)`` per item."""

    def __init__(self, workers: int, progress: bool) -> None:
        self.workers, self.progress = workers, progress

    def map(self, fn: Callable[[Any], list[Any]], items: list[Any], desc: str,
            weight: Callable[[Any], int]) -> list[Any]:
        from tqdm import tqdm

        bar = tqdm(total=sum(map(weight, items)), desc=desc, unit="img", disable=not self.progress)
        out: list[Any] = []
        if self.workers == 0:
            for item in items:
                out += fn(item)
                bar.update(weight(item))
            bar.close()
            return out
        # fork: the workers need only PIL and numpy, and start at once without importing torch again
        pool = ProcessPoolExecutor(self.workers, mp_context=get_context("fork"))
        try:
            for item, part in zip(items, pool.map(fn, items)):
                out += part
                bar.update(weight(item))
        except BrokenProcessPool:
            raise DataError(f"workers: a decoding process died (killed, or out of memory?) with "
                            f"workers={self.workers}; try fewer workers") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return out


def _chunks(n: int, shards: int) -> list[tuple[int, int, int]]:
    """``(shard, first, end)`` of each task: consecutive images, at most CHUNK, never across a shard's end."""
    bounds = [k * n // shards for k in range(shards + 1)]
    return [(k, a, min(a + CHUNK, bounds[k + 1])) for k in range(shards) for a in range(bounds[k], bounds[k + 1],
                                                                                          CHUNK)]


def _train_tasks(tmp: Path, files: list[str], sizes: np.ndarray, heldout: np.ndarray, shards: int, img_size: int,
                 interpolation: str) -> tuple[list[_Task], SplitMeta]:
    """The training split's files (flat shards, sizes.npy, heldout.npy) and its decoding tasks."""
    np.save(tmp / "train" / "sizes.npy", sizes.astype(np.int32))
    nbytes = 3 * sizes[:, 0].astype(np.int64) * sizes[:, 1]
    bounds = [k * len(files) // shards for k in range(shards + 1)]
    base = [_allocate(tmp / "train" / shard_name(k, shards), (int(nbytes[bounds[k]:bounds[k + 1]].sum()),))
            for k in range(shards)]
    crop_bytes = 3 * img_size * img_size
    held = np.full(len(files), -1, np.int64)
    held_base = _allocate(tmp / "train" / "heldout.npy", (len(heldout), 3, img_size, img_size))
    held[heldout] = held_base + np.arange(len(heldout)) * crop_bytes
    tasks = []
    for k, a, b in _chunks(len(files), shards):
        first = bounds[k]
        offsets = base[k] + np.cumsum(nbytes[first:b]) - nbytes[first:b]
        tasks.append(_Task(tuple(files[a:b]), str(tmp / "train" / shard_name(k, shards)),
                           tuple(int(o) for o in offsets[a - first:]), tuple(map(tuple, sizes[a:b].tolist())),
                           img_size, eval_resize(img_size), interpolation, str(tmp / "train" / "heldout.npy"),
                           tuple(int(o) for o in held[a:b])))
    counts = tuple(bounds[k + 1] - bounds[k] for k in range(shards))
    max_h, max_w = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(files) else (0, 0)
    return tasks, SplitMeta(len(files), counts, None, max_h, max_w)


def _val_tasks(tmp: Path, files: list[str], shards: int, img_size: int,
               interpolation: str) -> tuple[list[_Task], SplitMeta]:
    """The evaluation crops of ``val/`` and their decoding tasks."""
    bounds = [k * len(files) // shards for k in range(shards + 1)]
    row = 3 * img_size * img_size
    base = [_allocate(tmp / "val" / shard_name(k, shards), (bounds[k + 1] - bounds[k], 3, img_size, img_size))
            for k in range(shards)]
    tasks = [_Task(tuple(files[a:b]), str(tmp / "val" / shard_name(k, shards)),
                   tuple(base[k] + (i - bounds[k]) * row for i in range(a, b)), None, img_size, eval_resize(img_size),
                   interpolation) for k, a, b in _chunks(len(files), shards)]
    return tasks, SplitMeta(len(files), tuple(bounds[k + 1] - bounds[k] for k in range(shards)), img_size)


def write_store(src: Path, listing: Listing, tmp: Path, img_size: int, short_side: int, interpolation: str,
                shards: int, workers: int, progress: bool, val_size: int, split_seed: int) -> StoreMeta:
    """Decode the folder ``src`` (``listing``: its :func:`list_images`) into the empty directory ``tmp``, holding
    the evaluation crops of the ``val_size`` training images held out with ``split_seed``; the caller makes it
    appear atomically.

    Raises:
        DataError: an unreadable image, or a val_size the training images cannot give.
    """
    classes, samples = listing
    files = {split: [f for f, _ in samples[split]] for split in SPLITS}
    _, heldout = split_train_val(len(files["train"]), val_size, split_seed)
    pool = _Pool(workers, progress)
    for split in SPLITS:
        (tmp / split).mkdir()
        np.save(tmp / split / "labels.npy", np.asarray([y for _, y in samples[split]], np.int32))
    header = [tuple(files["train"][a:a + CHUNK]) for a in range(0, len(files["train"]), CHUNK)]
    raw = pool.map(_sizes, header, "sizes", len)
    sizes = np.asarray([stored_size(h, w, short_side) for h, w in raw], np.int64).reshape(-1, 2)
    n_shards = {split: max(1, min(shards, len(files[split]))) for split in SPLITS}
    train_tasks, train_meta = _train_tasks(tmp, files["train"], sizes, heldout.numpy(), n_shards["train"], img_size,
                                           interpolation)
    val_tasks, val_meta = _val_tasks(tmp, files["val"], n_shards["val"], img_size, interpolation)
    digests = pool.map(_decode_chunk, train_tasks + val_tasks, "prepare", lambda t: len(t.files))
    names = [str(Path(split) / Path(f).relative_to(src / split)) for split in SPLITS for f in files[split]]
    digest = hashlib.sha256("".join(f"{n}\t{d}\n" for n, d in zip(names, digests, strict=True)).encode())
    for path in tmp.rglob("*.npy"):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes the store visible
    meta = StoreMeta(img_size, short_side, interpolation, tuple(classes), {"train": train_meta, "val": val_meta},
                     val_size, split_seed, str(src.resolve()), f"sha256:{digest.hexdigest()}")
    (tmp / "meta.json").write_text(meta.to_json())
    return meta
