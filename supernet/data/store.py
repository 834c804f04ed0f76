"""The prepared store: an ImageNet-style class folder decoded ONCE into memory-mappable uint8 arrays, so training
reads pixels instead of decoding JPEGs every epoch (``python -m supernet.prepare`` writes it, supernet/prepare.py;
``data=imagenet_prepared`` reads it, supernet/data/prepared.py).

Layout of a store ``out/`` (format ``psvit-prepared/2``)::

    meta.json                               format version, sizes, classes, counts, shard sizes, source digest
    train/images-00000-of-00004.npy ...     flat uint8: every training image WHOLE, (3, h, w) after (3, h, w)
    train/sizes.npy                         (N, 2) int32: each training image's stored (h, w)
    train/labels.npy                        (N,) int32
    train/heldout.npy                       (val_size, 3, img_size, img_size) uint8: the evaluation crops of the
                                            training images held out with (val_size, split_seed), in index order
    val/images-00000-of-00004.npy ...       (m_k, 3, img_size, img_size) uint8: the evaluation crops
    val/labels.npy

Images keep the order of torchvision's ``ImageFolder`` (sorted classes, sorted files), so the held-out validation
indices drawn with ``split_seed`` are the same images as with ``data=imagenet_folder``. ``train`` holds each image
whole, as timm's random-resized crop sees it, downscaled (PIL, antialiased) so that its short side is at most
``short_side`` (default floor(img_size / 0.7) = 320 for 224) and its long side at most ``MAX_ASPECT`` times that;
none is upscaled. Random-resized crops are drawn from the whole stored image as timm draws them, at a resolution
where most are not upscaled (docs/real_scale.md measures it against timm's). The evaluation pixels are the folder
pipeline's exactly, whatever ``short_side``: ``val`` and the held-out training images are stored as the evaluation
transform makes them from the original file (resize to ``floor(img_size / crop_pct)``, centre crop ``img_size``);
the held-out ones for the (val_size, split_seed) given at prepare time, which a run must use. Each split is cut
into ``shards`` files of consecutive images, so a node can copy or read its share.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supernet.data.config import DataError

FORMAT = "psvit-prepared/2"
# Formats this version refuses, and why (one line each: the store must be prepared again).
OLD_FORMATS = {"psvit-prepared/1": "its training images are centre squares, from which no crop reaches the sides "
                                   "of the photo as timm's do"}
CROP_PCT = 0.875  # timm's default eval crop, the folder pipeline's (supernet/data/folder.py)
TRAIN_PCT = 0.7  # the default short side of the stored training images: floor(img_size / 0.7), 320 for 224
MAX_ASPECT = 2.0  # a stored training image's long side is at most this many times short_side (a panorama shrinks)
SPLITS = ("train", "val")
PREPARE_HINT = "prepare the store again: python -m supernet.prepare src=FOLDER out=DIR"


@dataclass(frozen=True)
class SplitMeta:
    """One split of a store: ``count`` images in ``len(shards)`` files, either ``(count, 3, side, side)`` crops, or
    (``side`` None) whole images of their own sizes, at most ``max_h`` x ``max_w``."""

    count: int
    shards: tuple[int, ...]  # images per shard file, in order
    side: int | None  # the crops' side; None: whole images (train/sizes.npy)
    max_h: int = 0  # whole images: the largest stored height and width (the reader's batch buffers)
    max_w: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"count": self.count, "shards": list(self.shards), "side": self.side}
        return d if self.side is not None else {**d, "max_h": self.max_h, "max_w": self.max_w}


@dataclass(frozen=True)
class StoreMeta:
    """What meta.json records."""

    img_size: int  # the evaluation crop of ``val`` and of the held-out training images
    short_side: int  # the largest short side of the stored training images
    interpolation: str  # of every resize: bilinear or bicubic (PIL, antialiased)
    classes: tuple[str, ...]
    splits: dict[str, SplitMeta]
    val_size: int  # the training images held out with split_seed, whose evaluation crops train/heldout.npy holds
    split_seed: int
    source: str  # the image folder it was decoded from
    digest: str  # sha256 over every source file's relative path and bytes
    crop_pct: float = CROP_PCT
    format: str = FORMAT

    @property
    def eval_resize(self) -> int:
        """The short side the evaluation transform resizes to before its centre crop."""
        return eval_resize(self.img_size, self.crop_pct)

    @property
    def identity(self) -> str:
        """What a run's identity records of the store (data.source_digest): the images it was made from and the
        settings that shape the training pixels; ``data.root`` may move."""
        return f"{self.digest} {self.format} short_side={self.short_side}"

    def to_json(self) -> str:
        d = {"format": self.format, "img_size": self.img_size, "short_side": self.short_side,
             "crop_pct": self.crop_pct, "interpolation": self.interpolation, "classes": list(self.classes),
             "splits": {k: s.to_dict() for k, s in self.splits.items()},
             "heldout": {"val_size": self.val_size, "split_seed": self.split_seed},
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
            found = d.get("format") if isinstance(d, dict) else None
            if found in OLD_FORMATS:
                raise DataError(f"data.root: {path} is format {found!r}: {OLD_FORMATS[found]}; {PREPARE_HINT} "
                                f"(format {FORMAT!r})")
            if found != FORMAT:
                raise DataError(f"data.root: {path} is format {found!r} (allowed: {FORMAT!r}, this version's); "
                                f"{PREPARE_HINT}")
            splits = {k: SplitMeta(int(s["count"]), tuple(int(n) for n in s["shards"]),
                                   None if s["side"] is None else int(s["side"]), int(s.get("max_h", 0)),
                                   int(s.get("max_w", 0))) for k, s in d["splits"].items()}
            meta = cls(int(d["img_size"]), int(d["short_side"]), str(d["interpolation"]),
                       tuple(str(c) for c in d["classes"]), splits, int(d["heldout"]["val_size"]),
                       int(d["heldout"]["split_seed"]), str(d["source"]["root"]), str(d["source"]["digest"]),
                       float(d["crop_pct"]))
        except DataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise DataError(f"data.root: {path} is not a valid store description ({type(e).__name__}); "
                            f"{PREPARE_HINT}") from None
        if set(splits) != set(SPLITS) or any(sum(s.shards) != s.count for s in splits.values()) \
                or splits["train"].side is not None or splits["val"].side != meta.img_size:
            raise DataError(f"data.root: {path} lists splits or shard sizes that do not add up; {PREPARE_HINT}")
        return meta


def eval_resize(img_size: int, crop_pct: float = CROP_PCT) -> int:
    """timm's ``scale_size``: the evaluation transform resizes the short side to this, then centre-crops."""
    return math.floor(img_size / crop_pct)


def default_short_side(img_size: int) -> int:
    """The default short side of the stored training images: floor(img_size / 0.7), 320 for 224."""
    return math.floor(img_size / TRAIN_PCT)


def stored_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """The (h, w) a training image of (h, w) is stored at: short side at most ``short_side``, long side at most
    ``MAX_ASPECT`` times that, the aspect kept (torchvision's Resize arithmetic); never larger than it is."""
    short, long = min(h, w), max(h, w)
    scale = min(1.0, short_side / short, MAX_ASPECT * short_side / long)
    if scale >= 1.0:
        return h, w
    if short_side / short <= MAX_ASPECT * short_side / long:  # the short side decides, as Resize(short_side)
        new_short, new_long = short_side, int(short_side * long / short)
    else:
        new_long = int(MAX_ASPECT * short_side)
        new_short = max(1, int(new_long * short / long))
    return (new_short, new_long) if h <= w else (new_long, new_short)


def shard_name(k: int, shards: int) -> str:
    return f"images-{k:05d}-of-{shards:05d}.npy"


class CropArrays:
    """Fixed-size crops of a store, memory-mapped: ``(count, 3, side, side)`` in shard files; ``labels`` in memory.

    Raises:
        DataError: a file is missing, truncated or of another shape than meta.json says.
    """

    def __init__(self, files: list[Path], shards: tuple[int, ...], side: int, labels: np.ndarray) -> None:
        self.count, self.labels = int(sum(shards)), labels
        self.shards = [_load(f, (n, 3, side, side), np.uint8, mmap=True) for f, n in zip(files, shards)]
        self.bounds = np.cumsum([0, *shards])  # shard k holds images bounds[k]..bounds[k+1]-1
        self.max_h = self.max_w = side

    def batch_shape(self, rows: np.ndarray) -> tuple[int, int]:
        """(height, width) of the batch of ``rows``."""
        return self.max_h, self.max_w

    def read_into(self, out: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        """``out[positions[k]] = image rows[k]``, one copy per image; pass the rows sorted, so that they are read
        in the order they lie on disk."""
        shard = np.searchsorted(self.bounds, rows, side="right") - 1
        for row, s, p in zip(rows.tolist(), shard.tolist(), positions.tolist()):
            out[p] = self.shards[s][row - self.bounds[s]]


class ImageArrays:
    """The whole training images of a store, memory-mapped: each shard a flat uint8 array of (3, h, w) images one
    after the other, ``sizes`` (N, 2) their (h, w), ``labels`` in memory.

    Raises:
        DataError: a file is missing, truncated or of another length than the sizes say.
    """

    def __init__(self, root: Path, meta: SplitMeta, num_classes: int) -> None:
        self.count, self.max_h, self.max_w = meta.count, meta.max_h, meta.max_w
        self.labels = _labels(root / "train" / "labels.npy", meta.count, num_classes)
        self.sizes = _load(root / "train" / "sizes.npy", (meta.count, 2), np.int32, mmap=False)
        self.bounds = np.cumsum([0, *meta.shards])
        nbytes = 3 * self.sizes[:, 0].astype(np.int64) * self.sizes[:, 1]
        if meta.count and (self.sizes.min() < 1 or self.sizes[:, 0].max() > meta.max_h
                           or self.sizes[:, 1].max() > meta.max_w):
            raise DataError(f"data.root: {root / 'train' / 'sizes.npy'} holds sizes outside 1..{meta.max_h} x "
                            f"1..{meta.max_w}; {PREPARE_HINT}")
        self.offsets = np.zeros(meta.count, np.int64)  # of each image in its shard
        self.shards = []
        for k in range(len(meta.shards)):
            a, b = self.bounds[k], self.bounds[k + 1]
            self.offsets[a:b] = np.cumsum(nbytes[a:b]) - nbytes[a:b]
            self.shards.append(_load(root / "train" / shard_name(k, len(meta.shards)), (int(nbytes[a:b].sum()),),
                                     np.uint8, mmap=True))

    def batch_shape(self, rows: np.ndarray) -> tuple[int, int]:
        """(height, width) of the batch of ``rows``: the largest of their heights and widths."""
        sizes = self.sizes[rows]
        return int(sizes[:, 0].max()), int(sizes[:, 1].max())

    def read_into(self, out: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        """``out[positions[k], :, :h, :w] = image rows[k]`` (the rest of ``out[p]`` is left as it is: crops never
        read it); pass the rows sorted, so that they are read in the order they lie on disk."""
        shard = np.searchsorted(self.bounds, rows, side="right") - 1
        for row, s, p in zip(rows.tolist(), shard.tolist(), positions.tolist()):
            h, w = self.sizes[row]
            start = self.offsets[row]
            out[p, :, :h, :w] = self.shards[s][start:start + 3 * h * w].reshape(3, h, w)


def _labels(path: Path, count: int, num_classes: int) -> np.ndarray:
    labels = _load(path, (count,), np.int32, mmap=False)
    if count and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(f"data.root: {path} holds labels outside 0..{num_classes - 1}; {PREPARE_HINT}")
    return labels


def crop_split(root: Path, name: str, meta: SplitMeta, num_classes: int) -> CropArrays:
    """The ``val`` split of a store: its evaluation crops and labels."""
    files = [root / name / shard_name(k, len(meta.shards)) for k in range(len(meta.shards))]
    assert meta.side is not None
    return CropArrays(files, meta.shards, meta.side, _labels(root / name / "labels.npy", meta.count, num_classes))


def heldout_split(root: Path, meta: StoreMeta, train_labels: np.ndarray, rows: np.ndarray) -> CropArrays:
    """The evaluation crops of the held-out training images ``rows`` (sorted: the store's held-out set)."""
    return CropArrays([root / "train" / "heldout.npy"], (meta.val_size,), meta.img_size, train_labels[rows])


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


def _filter(interpolation: str) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]


def open_rgb(data: bytes) -> Any:
    """JPEG (or any PIL format) bytes as an RGB PIL image: the folder pipeline's ``pil_loader``."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def decode(data: bytes, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """Image bytes -> ``(3, crop, crop)`` uint8: RGB, short side resized to ``resize``, centre crop; the folder
    pipeline's ``pil_loader`` and evaluation transform."""
    img = center_crop(resize_short(open_rgb(data), resize, _filter(interpolation)), crop)
    return np.asarray(img).transpose(2, 0, 1)


def decode_whole(data: bytes, h: int, w: int, interpolation: str) -> np.ndarray:
    """Image bytes -> ``(3, h, w)`` uint8: the whole RGB image, resized (PIL, antialiased) to (h, w) if it differs."""
    img = open_rgb(data)
    if img.size != (w, h):
        img = img.resize((w, h), _filter(interpolation))
    return np.asarray(img).transpose(2, 0, 1)
