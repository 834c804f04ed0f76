"""The training recipe (the ``recipe`` config group): which augmentations a training split gets, built from timm,
the field's library, not re-implemented.

* ``light`` (conf/recipe/light.yaml): random crop + flip only (in memory: crop after zero padding; image
  folders: random-resized crop). Adds nothing to a run's identity, so runs from before the recipe group resume.
* ``deit`` (conf/recipe/deit.yaml): DeiT's (Touvron et al. 2021) as timm implements it: RandAugment
  ``rand-m9-mstd0.5-inc1`` with bicubic interpolation in the decoding workers (image folders), random erasing
  0.25, Mixup 0.8 / CutMix 1.0 with soft targets (label smoothing ``optim.label_smoothing`` moves into the
  mixed targets), repeated augmentation x3 (timm's ``RepeatAugSampler``) and optionally an EMA of the weights.

Determinism. Every random draw comes from the seeds, never from a generator's running state, so a resumed run
replays an uninterrupted one exactly and nothing but the EMA needs checkpointing:
- a decoded image's augmentation (crop, flip, RandAugment), drawn in a worker, is seeded from
  ``(data.seed, epoch, rank, position in the epoch)`` (:class:`SeededItems`);
- the batch-level ones (erasing, Mixup/CutMix), drawn on the training device after normalization as timm's
  prefetching loader does, from ``(data.seed, epoch, rank, batch)`` (:class:`BatchAugment`).
Each draw runs inside :func:`seeded`, which restores the global generators (Python, NumPy, torch) afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from supernet.data.config import DataError, mix_seed

TIMM_HINT = "install it with pip install -e '.[imagenet]'"


@dataclass(frozen=True)
class RecipeConfig:
    """The ``recipe`` config group; :data:`LIGHT` is the default."""

    name: str = "light"  # a label: the fields below say what is applied
    rand_augment: str | None = None  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (image folders only)
    interpolation: str = "bilinear"  # resize interpolation of the crops (image folders): bilinear or bicubic
    reprob: float = 0.0  # random erasing probability per image (timm RandomErasing, mode pixel)
    mixup: float = 0.0  # Mixup alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    mix_switch_prob: float = 0.5  # with both on: probability of CutMix for a batch
    repeated_aug: int = 1  # repeated augmentation: each image this many times per epoch, spread over ranks
    ema: bool = False  # keep an exponential moving average of the weights (retraining only)
    ema_decay: float = 0.99996  # DeiT's

    @classmethod
    def from_cfg(cls, cfg: RecipeConfig | DictConfig | Mapping[str, Any] | None) -> RecipeConfig:
        """From the Hydra group (``None``: light); values were range-checked by the app's schema."""
        if cfg is None or isinstance(cfg, RecipeConfig):
            return cfg or LIGHT
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        allowed = [f.name for f in fields(cls)]
        for key in cfg:
            if key not in allowed:
                raise DataError(f"recipe.{key}: unknown key (allowed: {', '.join(allowed)})")
        return cls(**cfg)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def is_light(self) -> bool:
        """Whether the recipe does no more than ``light`` (crop and flip)."""
        return (self.rand_augment is None and self.interpolation == "bilinear" and not self.reprob
                and not self.mixes and self.repeated_aug == 1 and not self.ema)

    def for_evaluation(self) -> RecipeConfig:
        """The part of the recipe that shapes evaluation pixels (the crops' interpolation), with every training
        augmentation off: what a consumer that only evaluates (the search, inherited scores) builds its data
        with, so its held-out images are the ones training validated on."""
        return replace(LIGHT, name=self.name, interpolation=self.interpolation)

    def identity(self) -> dict[str, Any] | None:
        """What a run's identity records: nothing for a light recipe, else every field but the name."""
        if self.is_light:
            return None
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}

    def check(self, in_memory: bool, batch_size: int, world_size: int) -> None:
        """Settings that do not fit the data, one line each.

        Raises:
            DataError: RandAugment or bicubic crops asked of an in-memory dataset, Mixup on an odd batch, a
                RandAugment spec timm cannot parse, timm missing, or repeated augmentation on one process.
        """
        if in_memory and self.rand_augment is not None:
            raise DataError(f"recipe.rand_augment: {self.rand_augment} needs decoded images of an image folder "
                            "(data=imagenet_folder); in-memory datasets augment on the device: set "
                            "recipe.rand_augment=null")
        if in_memory and self.interpolation != "bilinear":
            raise DataError(f"recipe.interpolation: {self.interpolation} applies to image folders only (in-memory "
                            "datasets crop without resizing); set recipe.interpolation=bilinear")
        if self.mixes and batch_size % 2:
            raise DataError(f"data.batch_size: {batch_size} is odd, and Mixup/CutMix mix a batch with its mirror "
                            "(allowed: an even batch size, or recipe.mixup=0 recipe.cutmix=0)")
        if self.rand_augment is not None or self.reprob or self.mixes:
            import_timm()
        if self.rand_augment is not None:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.rand_augment, {})
            except Exception as e:  # noqa: BLE001 - timm asserts or raises on a malformed spec
                raise DataError(f"recipe.rand_augment: {self.rand_augment!r} is not a timm RandAugment spec "
                                f"({type(e).__name__}; e.g. rand-m9-mstd0.5-inc1)") from None
        if self.repeated_aug > 1 and world_size == 1:
            # timm's RepeatAugSampler on one replica: [a, a, a, b, b, b, ...] cut to the dataset's length
            raise DataError(f"recipe.repeated_aug: {self.repeated_aug} on one process puts each image's "
                            f"{self.repeated_aug} copies in one batch and shows 1/{self.repeated_aug} of the images "
                            "per epoch (timm refuses it too; DeiT samples without repeats on one process): set "
                            "recipe.repeated_aug=1, or train on several ranks (torchrun, NPROC=N)")


LIGHT = RecipeConfig()


def import_timm() -> Any:
    """The timm module, or a one-line :class:`DataError`."""
    try:
        import timm
    except Exception as e:  # ImportError, or a timm whose torchvision does not fit this torch
        raise DataError(f"recipe: the augmentations come from timm, which failed to import ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]}); {TIMM_HINT}") from e
    return timm


@contextmanager
def seeded(key: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's global generators (CPU, and ``device`` if CUDA) seeded
    from ``key``, restoring their states afterwards; libraries that draw from the global generators (timm,
    torchvision) then draw the same values for the same key, whatever ran before."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        random.seed(key)
        np.random.seed(key % 2**32)
        torch.manual_seed(key)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededItems:
    """A map-style dataset indexed by ``(index, key)``: item ``index`` of ``dataset``, transformed with the
    global generators seeded from ``key``, so the augmentation a worker draws depends on the key alone (not
    on the worker, nor on what it decoded before). A sample that cannot be read is a :class:`DataError`
    naming its file."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, key = item
        try:
            with seeded(key):
                return self.dataset[index]
        except Exception as e:  # noqa: BLE001 - PIL's errors vary by format; name the file instead
            path = _source(self.dataset, index)
            reason = (str(e).splitlines() or [""])[0][:120]
            raise DataError(f"data.root: cannot read image {path} ({type(e).__name__}: {reason}); remove or "
                            "replace the file") from None


def _source(dataset: Any, index: int) -> str:
    """The file of item ``index`` of an ImageFolder, or of a ``Subset`` of one."""
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"item {index}"


class BatchAugment:
    """The recipe's batch-level augmentations on normalized training batches: random erasing (per image),
    then Mixup / CutMix (one draw per batch, DeiT's mode) turning labels into soft targets."""

    def __init__(self, recipe: RecipeConfig, num_classes: int, label_smoothing: float,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.erase = self.mix = None
        if recipe.reprob:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(recipe.reprob, mode="pixel", max_count=1, device=self.device)
        if recipe.mixes:
            from timm.data.mixup import Mixup

            self.mix = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, switch_prob=recipe.mix_switch_prob,
                             mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)

    @classmethod
    def build(cls, recipe: RecipeConfig, num_classes: int, label_smoothing: float,
              device: torch.device | str) -> BatchAugment | None:
        """The augmenter, or ``None`` when the recipe has no batch-level augmentation."""
        return cls(recipe, num_classes, label_smoothing, device) if recipe.reprob or recipe.mixes else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, C, H, W) normalized float, ``y`` (B,) labels -> the augmented batch and its targets
        ((B, classes) probabilities when mixing); in place on ``x``."""
        with seeded(key, self.device):
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None:
                x, y = self.mix(x, y)
        return x, y


def posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's ``posterize`` op, with 0 bits kept giving a black image (TensorFlow's and older Pillow's meaning):
    Pillow 13 raises for 0 bits, which ``PosterizeIncreasing`` asks for at magnitude 10 -- with DeiT's
    ``rand-m9-mstd0.5-inc1`` about 1 image in 660, each then reported as unreadable."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def fix_posterize(transform: Any) -> Any:
    """``transform`` (timm's composed training transform) with its RandAugment's posterize ops using
    :func:`posterize`."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def _repeat_sampler(n: int, repeats: int, world_size: int, rank: int) -> Any:
    from timm.data.distributed_sampler import RepeatAugSampler

    return RepeatAugSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats)


def repeated_order(n: int, repeats: int, world_size: int, rank: int, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for one epoch with repeated augmentation (timm's ``RepeatAugSampler``: each
    image ``repeats`` times, the copies on different ranks, about ``n / world_size`` samples per rank);
    shuffled from ``(seed, epoch)``, the same permutation on every rank."""
    sampler = _repeat_sampler(n, repeats, world_size, rank)
    sampler.set_epoch(mix_seed(seed, epoch))  # timm seeds its permutation with the epoch alone: fold the seed in
    return list(sampler)


def repeated_plan(n: int, repeats: int, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(batches, examples)`` of one rank's epoch with repeated augmentation: the sampler's share of the
    repeated epoch, in whole batches (the same on every rank).

    Raises:
        DataError: the batch is larger than that share.
    """
    share = len(_repeat_sampler(n, repeats, world_size, rank))
    if share < batch_size:
        raise DataError(f"data.batch_size: {batch_size} exceeds the {share}-image share of each rank with "
                        f"recipe.repeated_aug={repeats} (allowed: at most {share})")
    return share // batch_size, share // batch_size * batch_size


def batch_key(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one training batch's device-side augmentation."""
    return mix_seed(seed, epoch, rank, batch, 3)
