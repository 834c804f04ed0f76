"""The prepared store: an ImageNet-style class folder decoded ONCE into memory-mappable uint8 arrays, so training
reads pixels instead of decoding JPEGs every epoch (``python -m supernet.prepare`` writes it, supernet/prepare.py;
``data=imagenet_prepared`` reads it, supernet/data/prepared.py).

Layout of a store ``out/``::

    meta.json                               format version, sizes, classes, counts, shard sizes, source digest
    train/images-00000-of-00004.npy ...     (n_k, 3, S, S) uint8: every training image's centre square
    train/labels.npy                        (N,) int32
    val/images-00000-of-00004.npy ...       (m_k, 3, img_size, img_size) uint8: the evaluation crops
    val/labels.npy

Images keep the order of torchvision's ``ImageFolder`` (sorted classes, sorted files), so the held-out validation
indices drawn with ``split_seed`` are the same images as with ``data=imagenet_folder``. ``train`` holds each image
resized (short side to ``short_side``) and centre-cropped to a square: the store's ONE difference from decoding the
full image is that random-resized crops are drawn from this square, not from the whole (usually 4:3) photo. ``val``
holds exactly what the evaluation transform produces (resize to ``floor(img_size / crop_pct)``, centre crop
``img_size``), the pixels ``data=imagenet_folder`` evaluates on. Each split is cut into ``shards`` files of
consecutive images, so a node can copy or read its share.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from supernet.data.config import DataError

FORMAT = "psvit-prepared/1"
CROP_PCT = 0.875  # timm's default eval crop, the folder pipeline's (supernet/data/folder.py)
SPLITS = ("train", "val")
CHUNK = 32  # images per decoding task: big enough to amortise the task, small enough for a smooth progress bar
PREPARE_HINT = "prepare the store again: python -m supernet.prepare src=FOLDER out=DIR"


@dataclass(frozen=True)
class SplitMeta:
    """One split of a store: its images are ``(count, 3, side, side)`` uint8 in ``len(shards)`` files."""

    count: int
    side: int
    shards: tuple[int, ...]  # images per shard file, in order


@dataclass(frozen=True)
class StoreMeta:
    """What meta.json records."""

    img_size: int  # the evaluation crop of ``val`` (and of the held-out validation images)
    short_side: int  # the side of the ``train`` squares
    interpolation: str  # of every resize: bilinear or bicubic (PIL, antialiased)
    classes: tuple[str, ...]
    splits: dict[str, SplitMeta]
    source: str  # the image folder it was decoded from
    digest: str  # sha256 over every source file's relative path and bytes
    crop_pct: float = CROP_PCT
    format: str = FORMAT

    @property
    def eval_resize(self) -> int:
        """The short side the evaluation transform resizes to before its centre crop."""
        return eval_resize(self.img_size, self.crop_pct)

    def to_json(self) -> str:
        d = {"format": self.format, "img_size": self.img_size, "short_side": self.short_side,
             "crop_pct": self.crop_pct, "interpolation": self.interpolation, "classes": list(self.classes),
             "splits": {k: {"count": s.count, "side": s.side, "shards": list(s.shards)}
                        for k, s in self.splits.items()},
             "source": {"root": self.source, "digest": self.digest}}
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def read(cls, root: Path) -> StoreMeta:
        """meta.json of the store at ``root``, or a one-line :class:`DataError` saying what is wrong."""
        path = root / "meta.json"
        if not path.is_file():
            raise DataError(f"data.root: no prepared store at {root} ({path.name} missing); {PREPARE_HINT}")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                found = d.get("format") if isinstance(d, dict) else None
                raise DataError(f"data.root: {path} is format {found!r} (allowed: {FORMAT!r}, this version's); "
                                f"{PREPARE_HINT}")
            splits = {k: SplitMeta(int(s["count"]), int(s["side"]), tuple(int(n) for n in s["shards"]))
                      for k, s in d["splits"].items()}
            meta = cls(int(d["img_size"]), int(d["short_side"]), str(d["interpolation"]),
                       tuple(str(c) for c in d["classes"]), splits, str(d["source"]["root"]),
                       str(d["source"]["digest"]), float(d["crop_pct"]))
        except DataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise DataError(f"data.root: {path} is not a valid store description ({type(e).__name__}); "
                            f"{PREPARE_HINT}") from None
        if set(splits) != set(SPLITS) or any(sum(s.shards) != s.count for s in splits.values()):
            raise DataError(f"data.root: {path} lists splits or shard sizes that do not add up; {PREPARE_HINT}")
        return meta


def eval_resize(img_size: int, crop_pct: float = CROP_PCT) -> int:
    """timm's ``scale_size``: the evaluation transform resizes the short side to this, then centre-crops."""
    return math.floor(img_size / crop_pct)


def shard_name(k: int, shards: int) -> str:
    return f"images-{k:05d}-of-{shards:05d}.npy"


class SplitArrays:
    """One split of a store, memory-mapped: ``labels`` in memory, the images read on demand by :meth:`read`.

    Raises:
        DataError: a file is missing, truncated or of another shape than meta.json says.
    """

    def __init__(self, root: Path, name: str, meta: SplitMeta, num_classes: int) -> None:
        self.name, self.side, self.count = name, meta.side, meta.count
        self.labels = _load(root / name / "labels.npy", (meta.count,), np.int32, mmap=False)
        if meta.count and not (0 <= self.labels.min() and self.labels.max() < num_classes):
            raise DataError(f"data.root: {root / name / 'labels.npy'} holds labels outside 0..{num_classes - 1}; "
                            f"{PREPARE_HINT}")
        self.shards = [_load(root / name / shard_name(k, len(meta.shards)), (n, 3, meta.side, meta.side), np.uint8,
                             mmap=True) for k, n in enumerate(meta.shards)]
        self.bounds = np.cumsum([0, *meta.shards])  # shard k holds images bounds[k]..bounds[k+1]-1

    def read_into(self, out: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        """``out[positions[k]] = image rows[k]``, one copy per image; pass the rows sorted, so that they are read
        in the order they lie on disk."""
        shard = np.searchsorted(self.bounds, rows, side="right") - 1
        for row, s, p in zip(rows.tolist(), shard.tolist(), positions.tolist()):
            out[p] = self.shards[s][row - self.bounds[s]]


def _load(path: Path, shape: tuple[int, ...], dtype: type, mmap: bool) -> np.ndarray:
    """One array of the store, checked against the shape meta.json gives."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"data.root: {path} is missing; {PREPARE_HINT}") from None
    except (ValueError, OSError, EOFError) as e:  # a truncated file: shorter than its header says
        reason = (str(e).splitlines() or [""])[0][:80]
        raise DataError(f"data.root: {path} is truncated or not a .npy array ({reason}); {PREPARE_HINT}") from None
    if a.shape != shape or a.dtype != np.dtype(dtype):
        raise DataError(f"data.root: {path} holds {a.dtype} {tuple(a.shape)} but meta.json says "
                        f"{np.dtype(dtype)} {shape}; {PREPARE_HINT}")
    return a


# ---------------------------------------------------------------------------------------------------- decoding
def resize_short(img: Any, size: int, resample: int) -> Any:
    """torchvision's ``Resize(size)`` of a PIL image: the short side to ``size``, the long one in proportion."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return img if new == (w, h) else img.resize(new, resample)


def center_crop(img: Any, size: int) -> Any:
    """torchvision's ``CenterCrop(size)`` of a PIL image at least ``size`` on each side."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode(data: bytes, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """JPEG (or any PIL format) bytes -> ``(3, crop, crop)`` uint8: RGB, short side resized to ``resize``,
    centre crop; the folder pipeline's ``pil_loader`` and evaluation transform."""
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(center_crop(resize_short(img, resize, resample), crop)).transpose(2, 0, 1)


@dataclass(frozen=True)
class _Task:
    """A chunk of consecutive images of one shard, decoded by one worker."""

    shard: str  # the shard file, preallocated
    offset: int  # of its first image, after the .npy header
    row: int  # the chunk's first row in it
    files: tuple[str, ...]
    resize: int
    crop: int
    interpolation: str


def _decode_chunk(task: _Task) -> list[str]:
    """Decode the chunk into its rows of the shard file (plain writes at the right offset: a full disk is an
    OSError, where writing through a memory map would be a SIGBUS); returns the sha256 of each source file."""
    digests = []
    row_bytes = 3 * task.crop * task.crop
    with open(task.shard, "r+b") as f:
        for k, path in enumerate(task.files):
            try:
                data = Path(path).read_bytes()
                pixels = decode(data, task.resize, task.crop, task.interpolation)
            except Exception as e:  # noqa: BLE001 - PIL's errors vary by format; name the file instead
                reason = (str(e).splitlines() or [""])[0][:120]
                raise DataError(f"src: cannot read image {path} ({type(e).__name__}: {reason}); remove or replace "
                                "the file") from None
            os.pwrite(f.fileno(), np.ascontiguousarray(pixels).tobytes(), task.offset + (task.row + k) * row_bytes)
            digests.append(hashlib.sha256(data).hexdigest())
    return digests


def list_images(src: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
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


def _tasks(tmp: Path, split: str, files: list[str], side: int, resize: int, shards: int,
           interpolation: str) -> list[_Task]:
    """Preallocate the split's shard files (space reserved up front, so a full disk shows before decoding) and
    cut its files into decoding tasks."""
    bounds = [k * len(files) // shards for k in range(shards + 1)]
    tasks = []
    for k in range(shards):
        path = tmp / split / shard_name(k, shards)
        n = bounds[k + 1] - bounds[k]
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, side, side))
        offset, size = mm.offset, mm.offset + mm.nbytes
        del mm
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without fallocate
                    raise
        tasks += [_Task(str(path), offset, a - bounds[k], tuple(files[a:min(a + CHUNK, bounds[k + 1])]), resize, side,
                        interpolation) for a in range(bounds[k], bounds[k + 1], CHUNK)]
    return tasks


def _run(tasks: list[_Task], workers: int, progress: bool) -> list[str]:
    """Every task's digests in task order, decoded by ``workers`` processes (0: in this process)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t.files) for t in tasks), desc="prepare", unit="img", disable=not progress)
    out: list[str] = []
    if workers == 0:
        for t in tasks:
            out += _decode_chunk(t)
            bar.update(len(t.files))
        bar.close()
        return out
    # fork: the workers need only PIL and numpy, and start at once without importing torch again
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"))
    try:
        for t, digests in zip(tasks, pool.map(_decode_chunk, tasks)):
            out += digests
            bar.update(len(t.files))
    except BrokenProcessPool:
        raise DataError(f"workers: a decoding process died (killed, or out of memory?) with workers={workers}; "
                        "try fewer workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return out


def write_store(src: Path, listing: tuple[list[str], dict[str, list[tuple[str, int]]]], tmp: Path, img_size: int,
                short_side: int, interpolation: str, shards: int, workers: int, progress: bool) -> StoreMeta:
    """Decode the folder ``src`` (``listing``: its :func:`list_images`) into the empty directory ``tmp``; the caller
    makes it appear atomically."""
    classes, samples = listing
    sides = {"train": (short_side, short_side), "val": (eval_resize(img_size), img_size)}
    splits, tasks = {}, []
    for split in SPLITS:
        files, labels = [f for f, _ in samples[split]], [y for _, y in samples[split]]
        (tmp / split).mkdir()
        np.save(tmp / split / "labels.npy", np.asarray(labels, np.int32))
        n_shards = max(1, min(shards, len(files)))
        resize, side = sides[split]
        tasks += _tasks(tmp, split, files, side, resize, n_shards, interpolation)
        splits[split] = SplitMeta(len(files), side, tuple((k + 1) * len(files) // n_shards - k * len(files) //
                                                          n_shards for k in range(n_shards)))
    digests = _run(tasks, workers, progress)
    names = [str(Path(split) / Path(f).relative_to(src / split)) for split in SPLITS for f, _ in samples[split]]
    digest = hashlib.sha256("".join(f"{n}\t{d}\n" for n, d in zip(names, digests, strict=True)).encode())
    for path in (tmp / split / shard_name(k, len(splits[split].shards)) for split in SPLITS
                 for k in range(len(splits[split].shards))):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes the store visible
    meta = StoreMeta(img_size, short_side, interpolation, tuple(classes), splits, str(src.resolve()),
                     f"sha256:{digest.hexdigest()}")
    (tmp / "meta.json").write_text(meta.to_json())
    return meta
