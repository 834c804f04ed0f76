"""`python -m supernet.prepare`: decode an ImageNet-style folder ONCE into the uint8 store that
``data=imagenet_prepared`` trains from, so that no JPEG is decoded per epoch (supernet/data/store.py has the
format, supernet/data/prepared.py the loaders).

    python -m supernet.prepare src=/data/imagenet out=/data/imagenet_224 workers=32
    python -m supernet.train data=imagenet_prepared data.root=/data/imagenet_224 recipe=deit ...

``train/`` images are stored whole (no centre square), downscaled so that the short side is at most ``short_side``
(default floor(img_size / 0.7) = 320 for 224; none is upscaled): training crops are drawn from the whole image as
timm's random-resized crop draws them. The evaluation crops (resize to floor(img_size / 0.875), centre crop img_size)
of ``val/`` and of the ``val_size`` training images held out with ``split_seed`` are stored as the folder pipeline
makes them, so the evaluation pixels are the folder's exactly; runs on the store use that val_size and split_seed.
The store appears complete or not at all; user errors print one ``error: ...`` line on stderr, exit with status 2
and write nothing (see conf/prepare.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from space.app import CONF_DIR, atomic_dir, check_overrides, run_app
from space.errors import UserError
from space.schema import PREPARE, check_config
from supernet.data.store import StoreMeta, default_short_side
from supernet.data.store_writer import list_images, write_store


def prepare(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Write the store ``cfg.out`` decoded from the folder ``cfg.src``; returns the line the app prints."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_config(cfg, PREPARE)
    for key, example in (("src", "/data/imagenet"), ("out", "/data/imagenet_224")):
        if not cfg[key]:
            raise UserError(f"{key}: required (e.g. {key}={example})")
    img_size = int(cfg["img_size"])
    short_side = int(cfg["short_side"] or default_short_side(img_size))
    if short_side < img_size:
        raise UserError(f"short_side: {short_side} is smaller than img_size {img_size} (allowed: at least "
                        f"{img_size}; null = {default_short_side(img_size)})")
    src, out = Path(cfg["src"]), Path(cfg["out"])
    if out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"out: {out} is inside src {src} (it would be read as images; choose a directory elsewhere)")
    workers = (os.cpu_count() or 1) if cfg["workers"] is None else int(cfg["workers"])
    listing = list_images(src)  # the folder's problems before anything is created
    n_train, val_size = len(listing[1]["train"]), int(cfg["val_size"])
    if not 0 <= val_size < n_train:
        raise UserError(f"val_size: {val_size} for a {n_train}-image training set (allowed: 0..{n_train - 1}; the "
                        "runs on the store hold out this many training images, data.val_size)")
    metas: list[StoreMeta] = []
    atomic_dir(out, lambda tmp: metas.append(write_store(src, listing, tmp, img_size, short_side,
                                                         cfg["interpolation"], int(cfg["shards"]), workers,
                                                         bool(cfg["progress"]), val_size, int(cfg["split_seed"]))))
    meta = metas[0]
    train, val = meta.splits["train"], meta.splits["val"]
    gb = sum(f.stat().st_size for f in out.rglob("*.npy")) / 1e9
    return (f"{src} -> {out}: {len(meta.classes)} classes, train {train.count} whole images (short side at most "
            f"{meta.short_side}, up to {train.max_h}x{train.max_w}) and the {val_size} held out as {img_size}x"
            f"{img_size} evaluation crops, val {val.count} as {val.side}x{val.side} crops ({gb:.2f} GB, "
            f"{len(train.shards)} shards); train with data=imagenet_prepared data.root={out} data.img_size={img_size} "
            f"data.val_size={val_size} data.split_seed={meta.split_seed} recipe.interpolation={meta.interpolation}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    print(run_app(lambda: prepare(cfg)))


if __name__ == "__main__":
    check_overrides("prepare")
    main()
