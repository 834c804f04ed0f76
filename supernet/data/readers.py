"""Readers of the datasets that live in memory: Fashion-MNIST IDX files and CIFAR-10/100 python pickles,
each returning the official ``(train, test)`` sets as uint8 :class:`ArrayDataset` tensors.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supernet.data.config import DataError


@dataclass(frozen=True)
class ArrayDataset:
    """A small dataset held in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index])


FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
FMNIST_HINT = "apt-get install dataset-fashion-mnist, or pass data.root=DIR holding the four IDX files"


def _read_bytes(path: Path, hint: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DataError(f"{path}: unreadable, truncated or corrupt ({e}); {hint}") from e


def read_idx(path: Path, ndim: int, hint: str = FMNIST_HINT) -> np.ndarray:
    """Reads a uint8 IDX file (the MNIST format: magic ``0x0000 08 <ndim>``, big-endian int32 dims, data)."""
    buf = _read_bytes(path, hint)
    magic = int.from_bytes(buf[:4], "big")
    header = 4 + 4 * ndim
    if len(buf) < header or magic != 0x0800 + ndim:
        raise DataError(f"{path}: not a {ndim}-dim uint8 IDX file (magic {magic:#010x}, expected "
                        f"{0x0800 + ndim:#010x}, {len(buf)} bytes); {hint}")
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(buf) - header != math.prod(shape):
        raise DataError(f"{path}: {len(buf) - header} data bytes but the header says {shape} "
                        f"({math.prod(shape)}); the file is truncated or corrupt; {hint}")
    return np.frombuffer(buf, np.uint8, offset=header).reshape(shape)


def _to_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str, hint: str) -> ArrayDataset:
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; {hint}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}; {hint}")
    return ArrayDataset(torch.from_numpy(np.array(images)), torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(root: str | Path, test: bool = True) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The official ``(train, test)`` sets from the IDX files (``.gz`` or uncompressed) in ``root``; with
    ``test=False`` the two t10k files are neither needed nor opened and ``test`` is None."""
    root = Path(root)
    wanted = FMNIST_FILES if test else FMNIST_FILES[:2]
    paths = {f: next((p for p in (root / f"{f}.gz", root / f) if p.is_file()), None) for f in wanted}
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        raise DataError(f"Fashion-MNIST not found: looked in {root} for {', '.join(f + '[.gz]' for f in wanted)}"
                        f" (missing {', '.join(missing)}); {FMNIST_HINT}")
    sets = []
    for images_file, labels_file in zip(wanted[0::2], wanted[1::2]):
        images = read_idx(paths[images_file], 3)  # (N, H, W)
        labels = read_idx(paths[labels_file], 1)  # (N,)
        sets.append(_to_dataset(images[:, None], labels, 10, str(paths[images_file]), FMNIST_HINT))
    if test and sets[0].images.shape[1:] != sets[1].images.shape[1:]:
        raise DataError(f"Fashion-MNIST in {root}: train and test images differ in size; {FMNIST_HINT}")
    return sets[0], sets[1] if test else None


# name: (subdirectory in the archive, train files, test files, label key, classes, download address)
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run code when loaded."""

    ALLOWED = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}
    # numpy 2 renamed numpy.core to numpy._core; the original files name the former, new pickles the latter.
    MULTIARRAY = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"

    def find_class(self, module: str, name: str) -> Any:
        short = "multiarray" if module in ("numpy.core.multiarray", "numpy._core.multiarray") else module
        if (short, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(self.MULTIARRAY if short == "multiarray" else module, name)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int, hint: str) -> ArrayDataset:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the originals are Python 2 pickles
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR python batch ({e}); {hint}") from e
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: expected a dict with 'data' and {label_key!r}; {hint}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {hint}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return _to_dataset(data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key]), num_classes, str(path), hint)


def load_cifar(name: str, root: str | Path | None, test: bool = True) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The official ``(train, test)`` sets of ``cifar10``/``cifar100`` from the python-pickle batches; with
    ``test=False`` the test batch is neither needed nor opened and ``test`` is None."""
    subdir, train_files, test_files, label_key, num_classes, url = CIFAR_FILES[name]
    test_files = test_files if test else []
    hint = f"download and extract {url} and pass data.root=DIR holding {subdir}/ (or its batch files)"
    if root is None:
        raise DataError(f"data.root: not set for {name}; {hint}")
    base = Path(root) / subdir if (Path(root) / subdir).is_dir() else Path(root)
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(f"{name} not found: looked in {base} for {', '.join(train_files + test_files)} "
                        f"(missing {', '.join(missing)}); {hint}")
    out = []
    for files in (train_files, test_files) if test else (train_files,):
        parts = [_read_cifar_batch(base / f, label_key, num_classes, hint) for f in files]
        out.append(ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])))
    return out[0], out[1] if test else None

