"""The training augmentation of a prepared store, on the device in batches: what timm's training transform does to
one PIL image in a decoding worker (random-resized crop, horizontal flip, RandAugment), done to a whole uint8 batch
where the model runs.

* Random-resized crop + flip: boxes drawn per image as timm's ``RandomResizedCropAndInterpolation`` draws them on
  the whole image (scale (0.08, 1) of its area, log-uniform ratio (3/4, 4/3), 10 tries, then timm's fallback: the
  central crop of the ratio-clamped image), then cropped and resized as torchvision does to a PIL image: PIL's
  separable, antialiased resampling (its bicubic a = -0.5 or bilinear kernel, widened by the downscaling factor,
  the box's edge pixels repeated, horizontal pass then vertical, rounded to uint8 after each), here two batched
  matrix products per batch (:func:`resized_crop`): PIL's pixels within two levels (its weights are fixed-point, and
  Pillow 13 runs the vertical pass first where that costs less; most boxes come out exact).
* RandAugment: timm's, parsed by timm from the recipe's spec (``rand-m9-mstd0.5-inc1``: 2 ops per image out of 15,
  each applied with p 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10]), each op re-implemented on uint8 batches
  with per-image magnitudes after PIL's definitions: the lookup-table ops (auto-contrast, equalize, invert,
  posterize, solarize, solarize-add) give PIL's pixels exactly; the blends (colour, contrast, brightness,
  sharpness) too (tested against timm's PIL ops); the geometric ops (rotate, shear, translate) go through one
  ``grid_sample`` per layer with the recipe's interpolation and timm's fill colour: exactly PIL's pixels with nearest
  sampling, and with bicubic a few levels off (at most 7 of 255 on a test image) since PIL's bicubic kernel has
  a = -0.5 and torch's a = -0.75. Posterize to 0 bits (magnitude 10 of ``PosterizeIncreasing``) gives a black
  image, the TensorFlow and older-Pillow meaning, where Pillow 13 raises. Op sets outside timm's standard and
  increasing ones (``t3a``'s blur and desaturation) are refused.

Every draw comes from a NumPy generator on the CPU seeded with the batch's key, so the batch is a function of the key
on any device, and the parameters cross to the device in one pinned, non-blocking copy per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from supernet.data.config import DataError

RRC_SCALE = (0.08, 1.0)  # timm's create_transform defaults, DeiT's
RRC_RATIO = (3 / 4, 4 / 3)
_LEVEL_DENOM = 10.0  # timm's magnitude scale: level / 10 is the fraction of an op's range
AFFINE = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
LUT = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
       "SolarizeIncreasing", "SolarizeAdd")
BLEND = ("Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
         "Sharpness", "SharpnessIncreasing")
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment as parsed by timm: the ops, how many per image and their magnitude distribution."""

    ops: tuple[str, ...]
    num_layers: int
    prob: float  # each chosen op is applied with this probability
    magnitude: float
    magnitude_std: float  # 0: fixed; inf: uniform in [0, magnitude]; else normal
    magnitude_max: float  # upper clip of the magnitude
    weights: tuple[float, ...] | None  # choice weights (ops then drawn without replacement), None = uniform
    translate_const: float  # pixels per unit level of TranslateX/Y
    translate_pct: float  # fraction of the side per unit level of TranslateXRel/YRel
    fill: tuple[int, int, int]  # colour of the pixels an affine op uncovers (timm: the mean, 0..255)

    @classmethod
    def parse(cls, spec: str, img_size: int, mean: tuple[float, ...]) -> RandAugmentSpec:
        """timm's ``rand_augment_transform(spec, hparams)`` with the hparams ``create_transform`` passes, read back.

        Raises:
            DataError: the spec picks ops the device implementation does not have.
        """
        from timm.data.auto_augment import rand_augment_transform

        fill = tuple(min(255, round(255 * m)) for m in mean)
        ra = rand_augment_transform(spec, {"translate_const": int(img_size * 0.45), "img_mean": fill})
        names = tuple(op.name for op in ra.ops)
        unknown = [n for n in names if n not in AFFINE + LUT + BLEND]
        if unknown:
            raise DataError(f"recipe.rand_augment: {spec} uses {', '.join(unknown)}, which data=imagenet_prepared "
                            "does not apply on the device (allowed: timm's standard and increasing op sets, e.g. "
                            "rand-m9-mstd0.5-inc1; or data=imagenet_folder)")
        op = ra.ops[0]
        weights = None if ra.choice_weights is None else tuple(float(w) for w in ra.choice_weights)
        return cls(names, int(ra.num_layers), float(op.prob), float(op.magnitude), float(op.magnitude_std),
                   float(op.magnitude_max or _LEVEL_DENOM), weights, float(op.hparams["translate_const"]),
                   float(op.hparams.get("translate_pct", 0.45)), fill)


def rrc_boxes(g: np.random.Generator, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, ...]:
    """timm's random-resized-crop boxes ``(top, left, height, width)`` (each (n,) float64, whole pixels) on images of
    ``heights`` x ``widths``: ``RandomResizedCropAndInterpolation.get_params`` per image, vectorised."""
    H, W = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    n = len(H)
    target = g.uniform(*RRC_SCALE, (n, 10)) * (H * W)[:, None]
    ratio = np.exp(g.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), (n, 10)))
    w, h = np.round(np.sqrt(target * ratio)), np.round(np.sqrt(target / ratio))
    ok = (w <= W[:, None]) & (h <= H[:, None])
    first = ok.argmax(1)  # the first try that fits
    found, rows = ok.any(1), np.arange(n)
    # no try fits: timm's fallback, the central crop of the image with its ratio clamped to RRC_RATIO
    in_ratio = W / H
    fw = np.where(in_ratio > RRC_RATIO[1], np.round(H * RRC_RATIO[1]), W)
    fh = np.where(in_ratio < RRC_RATIO[0], np.round(W / RRC_RATIO[0]), H)
    w = np.where(found, w[rows, first], fw)
    h = np.where(found, h[rows, first], fh)
    u = g.random((n, 2))
    top = np.where(found, np.minimum(np.floor(u[:, 0] * (H - h + 1)), H - h), (H - h) // 2)  # random.randint
    left = np.where(found, np.minimum(np.floor(u[:, 1] * (W - w + 1)), W - w), (W - w) // 2)
    return top, left, h, w


def _kernel(x: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's resampling filters: bicubic with a = -0.5 (support 2), bilinear (support 1)."""
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, out: int,
                   size: int, mode: str) -> torch.Tensor:
    """(n, out, size) weights of PIL's resampling along one axis: output ``j`` of image ``i`` is the weighted sum of
    source pixels ``[start_i, start_i + length_i)`` scaled to ``out`` (PIL's ``precompute_coeffs``: the kernel
    widened by the scale when it shrinks, taps limited to ``[lo_i, hi_i)`` and renormalised)."""
    dev = start.device
    scale = (length / out).view(-1, 1, 1)
    support = (2.0 if mode == "bicubic" else 1.0) * scale.clamp(min=1.0)
    center = start.view(-1, 1, 1) + (torch.arange(out, device=dev, dtype=scale.dtype).view(1, -1, 1) + 0.5) * scale
    first = torch.maximum(torch.floor(center - support + 0.5), lo.view(-1, 1, 1))
    last = torch.minimum(torch.floor(center + support + 0.5), hi.view(-1, 1, 1))
    x = torch.arange(size, device=dev, dtype=scale.dtype).view(1, 1, -1)
    w = _kernel((x + 0.5 - center) / scale.clamp(min=1.0), mode) * ((x >= first) & (x < last))
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, mode: str,
                 clip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, C, size, size): each image's box ``(top, left, height, width)`` resized as
    PIL resizes it, horizontally then vertically, rounded after each pass. ``clip`` (n, 4) ``(top, left, bottom,
    right)``: the pixels its taps may reach; None: the box's own (torchvision's crop-then-resize)."""
    b = boxes.float()
    top, left, h, w = b.unbind(-1)
    c = torch.stack([top, left, top + h, left + w], -1) if clip is None else clip.float()
    wx = resize_weights(left, w, c[:, 1], c[:, 3], size, x.shape[-1], mode)  # (n, size, W)
    wy = resize_weights(top, h, c[:, 0], c[:, 2], size, x.shape[-2], mode)  # (n, size, H)
    rows = torch.einsum("nchw,nsw->nchs", x.float(), wx).add_(0.5).floor_().clamp_(0, 255)  # (n, C, H, size)
    out = torch.einsum("nrh,nchs->ncrs", wy, rows).add_(0.5).floor_().clamp_(0, 255)  # (n, C, size, size)
    return out.to(torch.uint8)


def resample(x: torch.Tensor, theta: torch.Tensor, size: int, mode: str, fill: torch.Tensor | None) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, C, size, size) through ``affine_grid``/``grid_sample``, reading the nearest
    border pixel for taps past the edge; with ``fill`` (C,), output pixels whose centre maps outside the source
    take that colour, as PIL's transforms do."""
    grid = F.affine_grid(theta.to(torch.float32), [x.shape[0], x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    if fill is not None:
        outside = ((grid < -1) | (grid >= 1)).any(-1).unsqueeze(1)  # PIL: outside when x < 0 or x >= width
        out = torch.where(outside, fill.view(1, -1, 1, 1).to(torch.uint8), out)
    return out


# ------------------------------------------------------------------------------------------------ RandAugment ops
def level_arg(name: str, level: np.ndarray, negate: np.ndarray, ra: RandAugmentSpec, size: int) -> np.ndarray:
    """timm's ``LEVEL_TO_ARG[name]`` of per-image levels: the op's argument for each image."""
    frac = level / _LEVEL_DENOM
    sign = np.where(negate, -1.0, 1.0)
    if name == "Rotate":
        return frac * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return frac * 0.3 * sign
    if name in ("TranslateX", "TranslateY"):
        return frac * ra.translate_const * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return frac * ra.translate_pct * size * sign  # in pixels, as timm's translate_*_rel computes them
    if name.startswith("Posterize"):
        bits = np.floor(frac * 4)
        return {"Posterize": bits, "PosterizeIncreasing": 4 - bits, "PosterizeOriginal": bits + 4}[name]
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = np.minimum(np.floor(frac * 256), 256)
        return thresh if name == "Solarize" else 256 - thresh
    if name == "SolarizeAdd":
        return np.minimum(np.floor(frac * 110), 128)
    if name.endswith("Increasing"):  # the blends, 1 = unchanged: 1 +- 0.9 level
        return np.maximum(1.0 + frac * 0.9 * sign, 0.1)
    if name in BLEND:
        return frac * 1.8 + 0.1
    return np.zeros_like(level)  # AutoContrast, Equalize, Invert


def affine_theta(name: str, arg: np.ndarray, size: int) -> np.ndarray:
    """(n, 2, 3) matrices of PIL's affine transforms (output -> input, pixel centres at +0.5) in the normalized
    coordinates of ``affine_grid``: ``u_in = A u_out + A 1 + 2 t / size - 1`` for PIL's ``(A, t)``."""
    theta = np.zeros((len(arg), 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if name == "Rotate":  # PIL rotates about the centre, counter-clockwise for positive degrees
        a = -np.deg2rad(arg)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = np.cos(a), np.sin(a), -np.sin(a), np.cos(a)
    elif name == "ShearX":  # (1, f, 0, 0, 1, 0): x_in = x + f y about the top-left corner
        theta[:, 0, 1] = theta[:, 0, 2] = arg
    elif name == "ShearY":
        theta[:, 1, 0] = theta[:, 1, 2] = arg
    elif name.startswith("TranslateX"):
        theta[:, 0, 2] = 2 * arg / size
    else:
        theta[:, 1, 2] = 2 * arg / size
    return theta


def _luminance(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, in integers: (19595 R + 38470 G + 7471 B + 0x8000) >> 16; (n, 1, H, W) int32."""
    x = x.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: computed in float32, clipped, truncated to uint8."""
    d = degenerate.float()
    out = d + factor.view(-1, 1, 1, 1).float() * (x.float() - d)
    return out.clamp_(0, 255).to(torch.uint8)


def blend_op(name: str, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance's Color / Contrast / Brightness / Sharpness with per-image factors on uint8 (n, 3, H, W)."""
    if name.startswith("Brightness"):
        return _blend(torch.zeros_like(x), x, factor)
    if name.startswith("Color"):
        return _blend(_luminance(x).expand_as(x), x, factor)
    if name.startswith("Contrast"):
        mean = _luminance(x).float().mean((1, 2, 3), keepdim=True)  # ImageStat's mean of the L histogram
        return _blend(torch.floor(mean + 0.5).expand_as(x), x, factor)
    # Sharpness: PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1) / 13 inside, the image's own border pixels around
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(x.float(), kernel / 13.0, groups=3).round_()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.to(torch.uint8)
    return _blend(degenerate, x, factor)


def lut_op(name: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """The lookup-table ops of PIL's ImageOps with per-image arguments, exactly: uint8 (n, 3, H, W)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).long()
    levels = torch.arange(256, device=x.device).view(1, 1, 256)
    if name in ("AutoContrast", "Equalize"):
        lut = _auto_contrast_lut(flat) if name == "AutoContrast" else _equalize_lut(flat)
    else:
        a = arg.view(-1, 1, 1)
        if name == "Invert":
            lut = 255 - levels.expand(n, 1, 256)
        elif name.startswith("Posterize"):  # keep the top `bits` bits; 8 or more keeps everything
            mask = (0xFF << (8 - a.clamp(max=8)).long()) & 0xFF
            lut = levels & mask
        elif name == "SolarizeAdd":
            lut = torch.where(levels < 128, (levels + a).clamp(max=255), levels)
        else:  # Solarize*
            lut = torch.where(levels < a, levels, 255 - levels)
        lut = lut.expand(n, c, 256)
    return lut.gather(2, flat).to(torch.uint8).view_as(x)


def _auto_contrast_lut(flat: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast's per-channel tables: [lo, hi] stretched to [0, 255] with ``int()``, in float64."""
    lo = flat.amin(2, keepdim=True).double()
    hi = flat.amax(2, keepdim=True).double()
    levels = torch.arange(256, device=flat.device, dtype=torch.float64).view(1, 1, 256)
    scale = 255.0 / (hi - lo).clamp(min=1)
    stretched = torch.trunc(levels * scale - lo * scale).clamp(0, 255)
    return torch.where(hi > lo, stretched, levels).long()


def _equalize_lut(flat: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize's per-channel tables: ``(step // 2 + pixels below) // step`` with ``step`` the pixel count
    outside the last non-empty bin over 255; identity when that is 0."""
    n, c, _ = flat.shape
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=flat.device).scatter_add_(2, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=flat.device).view(1, 1, 256)
    last = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)  # the last non-empty bin
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last.clamp(min=0))) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, levels.expand(n, c, 256))


# ------------------------------------------------------------------------------------------------ the whole chain
Step = tuple[str, np.ndarray, np.ndarray]  # (op name or "affine", image indices (k,), per-image arguments)
DeviceStep = tuple[str, torch.Tensor, torch.Tensor]  # the same on the device


class DeviceAugment:
    """timm's training transform on a batch: uint8 images of their own sizes on the device -> uint8
    ``(B, 3, img_size, img_size)``: random-resized crop of the whole image and flip, then RandAugment.

    Args:
        img_size: output side.
        interpolation: of the crop and of RandAugment's geometric ops: bilinear or bicubic.
        hflip: mirror half of the images.
        rand_augment: the parsed RandAugment, or None.
        device: where the batches are.
    """

    def __init__(self, img_size: int, interpolation: str, hflip: bool, rand_augment: RandAugmentSpec | None,
                 device: torch.device | str) -> None:
        self.size, self.mode, self.hflip, self.ra = img_size, interpolation, hflip, rand_augment
        self.device = torch.device(device)
        self.fill = None if rand_augment is None else torch.tensor(rand_augment.fill, dtype=torch.float32,
                                                                    device=self.device)

    def draws(self, key: int, sizes: np.ndarray) -> tuple[np.ndarray, list[Step]]:
        """Every random choice for a batch of images of ``sizes`` (n, 2) (h, w), on the CPU from ``key`` alone: the
        crop boxes and flips (n, 5) ``(top, left, height, width, flip)`` and the RandAugment steps."""
        n = len(sizes)
        g = np.random.default_rng(key)
        flip = g.random(n) < (0.5 if self.hflip else 0.0)
        boxes = np.stack([*rrc_boxes(g, sizes[:, 0], sizes[:, 1]), flip.astype(np.float64)], -1)
        return boxes, self.plan(g, n) if self.ra is not None else []

    def __call__(self, x: torch.Tensor, sizes: np.ndarray, key: int) -> torch.Tensor:
        """uint8 images (n, 3, H, W), image ``i`` in ``x[i, :, :h_i, :w_i]`` for ``sizes[i] = (h_i, w_i)`` ->
        uint8 (n, 3, img_size, img_size): cropped, resized, flipped and RandAugment-ed."""
        boxes, steps = self._to_device(*self.draws(key, np.asarray(sizes)))
        x = resized_crop(x, boxes[:, :4], self.size, self.mode)
        x = torch.where(boxes[:, 4].view(-1, 1, 1, 1) > 0.5, x.flip(-1), x)
        for name, idx, arg in steps:
            part = x.index_select(0, idx)
            if name == "affine":
                part = resample(part, arg, self.size, self.mode, self.fill)
            elif name in LUT:
                part = lut_op(name, part, arg)
            else:
                part = blend_op(name, part, arg)
            x.index_copy_(0, idx, part)
        return x

    def plan(self, g: np.random.Generator, n: int) -> list[Step]:
        """RandAugment's draws for ``n`` images, as timm's ``RandAugment`` / ``AugmentOp`` make them per image: per
        layer, an op each (uniform with replacement, or weighted without), applied with ``prob``, magnitude noise,
        a random sign. One step per op and layer with the images it applies to; a layer's geometric ops are one
        ``affine`` step."""
        ra = self.ra
        assert ra is not None
        K, L = len(ra.ops), ra.num_layers
        if ra.weights is None:
            choice = g.integers(0, K, (n, L))
        else:
            p = np.asarray(ra.weights) / sum(ra.weights)
            choice = np.stack([g.choice(K, L, replace=False, p=p) for _ in range(n)]).reshape(n, L)
        apply = g.random((n, L)) <= ra.prob
        if math.isinf(ra.magnitude_std):
            mag = g.random((n, L)) * ra.magnitude
        else:
            mag = ra.magnitude + ra.magnitude_std * g.standard_normal((n, L))
        mag = np.clip(mag, 0.0, ra.magnitude_max)
        negate = g.random((n, L)) > 0.5
        steps: list[Step] = []
        for layer in range(L):
            images = np.flatnonzero(apply[:, layer])
            images = images[np.argsort(choice[images, layer], kind="stable")]  # grouped by op
            ops, starts = np.unique(choice[images, layer], return_index=True)
            moved, thetas = [], []
            for k, idx in zip(ops.tolist(), np.split(images, starts[1:])):
                name = ra.ops[k]
                arg = level_arg(name, mag[idx, layer], negate[idx, layer], ra, self.size)
                if name in AFFINE:
                    moved.append(idx)
                    thetas.append(affine_theta(name, arg, self.size))
                else:
                    steps.append((name, idx, arg))
            if moved:
                steps.append(("affine", np.concatenate(moved), np.concatenate(thetas)))
        return steps

    def _to_device(self, theta: np.ndarray, steps: list[Step]) -> tuple[torch.Tensor, list[DeviceStep]]:
        """Everything the batch's ops need (``theta``: the boxes and flips), in two copies (pinned and non-blocking
        on CUDA: a pageable copy would wait for the device to drain its queue)."""
        sizes = [theta.size, *(arg.size for _, _, arg in steps)]
        floats = torch.from_numpy(np.concatenate([theta.ravel(), *(arg.ravel() for _, _, arg in steps)])).float()
        longs = torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *(idx for _, idx, _ in steps)]))
        if self.device.type != "cpu":
            floats = floats.pin_memory().to(self.device, non_blocking=True)
            longs = longs.pin_memory().to(self.device, non_blocking=True)
        parts = floats.split(sizes)
        idx = longs.split([len(i) for _, i, _ in steps])
        return parts[0].view(theta.shape), [(name, i, part.view(arg.shape))
                                            for (name, _, arg), i, part in zip(steps, idx, parts[1:], strict=True)]
