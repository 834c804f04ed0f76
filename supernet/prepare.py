"""`python -m supernet.prepare`: decode an ImageNet-style folder ONCE into the uint8 store that
``data=imagenet_prepared`` trains from, so that no JPEG is decoded per epoch (supernet/data/store.py has the
format, supernet/data/prepared.py the loaders).

    python -m supernet.prepare src=/data/imagenet out=/data/imagenet_224 workers=32
    python -m supernet.train data=imagenet_prepared data.root=/data/imagenet_224 recipe=deit ...

``train/`` images are stored as the centre square of the image resized to ``short_side`` (default
floor(img_size / 0.875) = 256 for 224), the store's one difference from decoding the full image: training crops
are drawn from that square instead of the whole photo. ``val/`` images are stored as the evaluation transform
produces them (resize to floor(img_size / 0.875), centre crop img_size). The store appears complete or not at all;
user errors print one ``error: ...`` line on stderr, exit with status 2 and write nothing (see conf/prepare.yaml).
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
from supernet.data.store import StoreMeta, eval_resize, list_images, write_store


def prepare(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Write the store ``cfg.out`` decoded from the folder ``cfg.src``; returns the line the app prints."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_config(cfg, PREPARE)
    for key, example in (("src", "/data/imagenet"), ("out", "/data/imagenet_224")):
        if not cfg[key]:
            raise UserError(f"{key}: required (e.g. {key}={example})")
    img_size = int(cfg["img_size"])
    short_side = int(cfg["short_side"] or eval_resize(img_size))
    if short_side < img_size:
        raise UserError(f"short_side: {short_side} is smaller than img_size {img_size} (allowed: at least "
                        f"{img_size}; null = {eval_resize(img_size)})")
    src, out = Path(cfg["src"]), Path(cfg["out"])
    if out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"out: {out} is inside src {src} (it would be read as images; choose a directory elsewhere)")
    workers = (os.cpu_count() or 1) if cfg["workers"] is None else int(cfg["workers"])
    listing = list_images(src)  # the folder's problems before anything is created
    metas: list[StoreMeta] = []
    atomic_dir(out, lambda tmp: metas.append(write_store(src, listing, tmp, img_size, short_side,
                                                         cfg["interpolation"], int(cfg["shards"]), workers,
                                                         bool(cfg["progress"]))))
    meta = metas[0]
    train, val = meta.splits["train"], meta.splits["val"]
    gb = sum(s.count * 3 * s.side ** 2 for s in (train, val)) / 1e9
    return (f"{src} -> {out}: {len(meta.classes)} classes, train {train.count} images as {train.side}x{train.side} "
            f"squares, val {val.count} as {val.side}x{val.side} crops ({gb:.2f} GB, {len(train.shards)} shards); "
            f"train with data=imagenet_prepared data.root={out} data.img_size={img_size} "
            f"recipe.interpolation={meta.interpolation}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    print(run_app(lambda: prepare(cfg)))


if __name__ == "__main__":
    check_overrides("prepare")
    main()
