"""Random-resized-crop statistics of the prepared store against timm's on the same images: which share of the
crops is upscaled (drawn from fewer pixels than it is resized to), how much objects are magnified relative to the
original photo, and how many crops reach the sides of the photo outside its centre square (what the format-1
store dropped). The boxes are geometry only, so an image is its size: timm's own ``get_params`` on the original,
the format-1 store's draws on its 256-px centre square, and this store's on each image as stored at a short side of
256, 288 and 320 (``python -m supernet.prepare short_side=...``).

    .venv/bin/python scripts/crop_stats.py                     # -> docs/real_scale/crop_stats.json, docs/real_scale.md
    .venv/bin/python scripts/crop_stats.py --src /data/imagenet --out runs/crop_stats.json --no-render

Without ``--src`` the images are six shapes common in ImageNet's training set (each measured alone, then all six
with equal weight); with it, every training image of that folder (its header gives the size), with equal weight.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supernet.data.device_aug import rrc_boxes  # noqa: E402
from supernet.data.store import stored_size  # noqa: E402

IMG = 224  # the crop's output side
V1_SQUARE = 256  # the format-1 store's training square: floor(224 / 0.875)
SHORT_SIDES = (256, 288, 320, 352)  # this store's short sides measured (320: the default for 224)
SHAPES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (300, 225))  # (width, height)
OUT = REPO / "docs" / "real_scale" / "crop_stats.json"
PAGE = REPO / "docs" / "real_scale.md"


def timm_boxes(w: int, h: int, n: int, seed: int) -> np.ndarray:
    """(n, 4) boxes ``(top, left, height, width)`` in original pixels, drawn by timm's own code."""
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    state = random.getstate()
    random.seed(seed)
    try:
        image = Image.new("L", (w, h))
        return np.array([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                         for _ in range(n)], dtype=np.float64)
    finally:
        random.setstate(state)


def store_boxes(w: int, h: int, n: int, seed: int, short_side: int | None) -> tuple[np.ndarray, float]:
    """(n, 4) boxes in the pixels the store draws them from, and those pixels' size relative to the original's:
    ``short_side`` None is the format-1 store (the centre square resized to 256)."""
    g = np.random.default_rng(seed)
    if short_side is None:
        side = np.full(n, V1_SQUARE)
        return np.stack(rrc_boxes(g, side, side), -1), V1_SQUARE / min(w, h)
    sh, sw = stored_size(h, w, short_side)
    return np.stack(rrc_boxes(g, np.full(n, sh), np.full(n, sw)), -1), sw / w


def stats(boxes: np.ndarray, scale: float, w: int, h: int, square: bool) -> dict[str, float]:
    """The three figures of ``boxes`` drawn from pixels ``scale`` times the original's; ``square``: drawn on the
    centre square (whose corner is then the offset into the original)."""
    top, left, bh, bw = boxes.T
    upscaled = float(np.mean(bh * bw < IMG * IMG))  # fewer source pixels than output pixels
    oh, ow = bh / scale, bw / scale  # the box in original pixels
    magnification = IMG / np.sqrt(oh * ow)  # output pixels per original pixel, along a side
    short = min(w, h)
    x0, y0 = (w - short) / 2, (h - short) / 2  # the centre square in the original
    if square:
        top, left = top / scale + y0, left / scale + x0
    else:
        top, left = top / scale, left / scale
    outside = (left < x0 - 1e-9) | (left + ow > x0 + short + 1e-9) | (top < y0 - 1e-9) | (top + oh > y0 + short + 1e-9)
    return {"upscaled": upscaled, "magnification": float(np.mean(magnification)),
            "outside_centre_square": float(np.mean(outside))}


def measure(sizes: list[tuple[int, int]], n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each pipeline's figures over ``sizes`` (width, height), each image with ``n`` crops and equal weight."""
    parts: dict[str, list[dict[str, float]]] = {}
    for k, (w, h) in enumerate(sizes):
        parts.setdefault("timm", []).append(stats(timm_boxes(w, h, n, seed + k), 1.0, w, h, False))
        boxes, scale = store_boxes(w, h, n, seed + k, None)
        parts.setdefault("store_v1", []).append(stats(boxes, scale, w, h, True))
        for s in SHORT_SIDES:
            boxes, scale = store_boxes(w, h, n, seed + k, s)
            parts.setdefault(f"store_{s}", []).append(stats(boxes, scale, w, h, False))
    return {name: {key: float(np.mean([p[key] for p in rows])) for key in rows[0]} for name, rows in parts.items()}


def folder_sizes(src: Path) -> list[tuple[int, int]]:
    """(width, height) of every training image of the folder ``src`` (read from the headers)."""
    from PIL import Image

    from supernet.data.store_writer import list_images

    return [Image.open(path).size for path, _ in list_images(src)[1]["train"]]


def collect(n: int, src: Path | None) -> dict[str, Any]:
    """What the JSON holds: per shape (without ``src``) and over all the images."""
    out: dict[str, Any] = {"img_size": IMG, "crops_per_image": n, "v1_square": V1_SQUARE,
                           "short_sides": list(SHORT_SIDES)}
    if src is None:
        out["shapes"] = [{"size": [w, h], "figures": measure([(w, h)], n)} for w, h in SHAPES]
        out["all"] = {"images": f"the {len(SHAPES)} shapes, equal weight", "figures": measure(list(SHAPES), n)}
    else:
        sizes = folder_sizes(src)
        out["all"] = {"images": f"{len(sizes)} training images of {src}", "figures": measure(sizes, n)}
    return out


NAMES = {"timm": "timm (folder): the original photo", "store_v1": "store format 1: centre square at 256",
         **{f"store_{s}": f"store format 2: whole image, short side {s}" + (" (default)" if s == 320 else "")
            for s in SHORT_SIDES}}


def render(result: dict[str, Any]) -> str:
    """The markdown table of the page, from the JSON alone."""
    lines = [f"Crops of {result['img_size']} px, {result['crops_per_image']:,} per image shape; "
             f"{result['all']['images']}.", "",
             "| crops drawn from | upscaled | points above timm | magnification vs the photo | x timm's | "
             "reach outside the centre square |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    figures = result["all"]["figures"]
    base = figures["timm"]
    for name, f in figures.items():
        extra = 100 * (f["upscaled"] - base["upscaled"])
        lines.append(f"| {NAMES[name]} | {100 * f['upscaled']:.1f}% | {extra:+.1f} | "
                     f"{f['magnification']:.3f} | {f['magnification'] / base['magnification']:.3f} | "
                     f"{100 * f['outside_centre_square']:.1f}% |")
    if "shapes" in result:
        lines += ["", "Upscaled crops per image shape (width x height):", "",
                  "| shape | " + " | ".join(NAMES[k].split(":")[0] + (f" {k[6:]}" if k[6:].isdigit() else "")
                                            for k in figures) + " |",
                  "| --- |" + " ---: |" * len(figures)]
        for row in result["shapes"]:
            w, h = row["size"]
            lines.append(f"| {w}x{h} | " + " | ".join(f"{100 * row['figures'][k]['upscaled']:.1f}%"
                                                    for k in figures) + " |")
    return "\n".join(lines)


def write_page() -> None:
    """Re-render the page's table:crop_stats block from OUT (scripts/docs.py renders it)."""
    from scripts.docs import render as render_tables

    render_tables([PAGE])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=None, help="an image folder (train/<class>/*): its images' sizes")
    p.add_argument("--crops", type=int, default=20_000, help="crops drawn per image shape (per image with --src)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-render", action="store_true", help=f"leave {PAGE.relative_to(REPO)} alone")
    args = p.parse_args(argv)
    n = args.crops if args.src is None else max(1, min(args.crops, 200))
    result = collect(n, args.src)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_render and args.out.resolve() == OUT.resolve():
        write_page()
    print(render(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
