"""Inherited-weight accuracy, the search's score: top-1 of a subnet that uses the trained supernet's weights,
on a fixed, class-balanced subset of the held-out validation split (never the test split), decoded as training
validated on it (the checkpoint's data config and recipe). The only torch in search/.

:class:`InheritedAccuracy` is an ``evaluate(archs) -> scores`` for :class:`search.evolution.Search`. Under
torchrun, the candidates of a batch are dealt to the ranks balanced by MACs (an evaluation's cost; a batch can
span 31.7 M to 5.48 G MACs in imagenet_tiny_2d, which round-robin can pile onto one rank), each rank scores
its share on the whole subset, and the scores are summed across ranks, so a distributed search gets exactly
the scores of a single process.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from space.arch import ArchSpec
from space.cost import macs
from space.errors import UserError
from supernet.data import RecipeConfig, build_data
from supernet.engine.compile import compile_cells
from supernet.engine.distributed import DistEnv, autocast, balance
from supernet.model.supernet import Supernet

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (images (B, C, H, W), labels (B,)) kept on the device


def validation_batches(data_cfg: dict[str, Any], images: int | None, batch_size: int, device: torch.device,
                       recipe: dict[str, Any] | None = None, source: str | None = None) -> Batches:
    """The first ``images`` images (None: all) of the held-out validation split, as batches kept in memory: built
    with the training run's data config and recipe (``recipe``: its ``recipe`` group; only what shapes evaluation
    pixels is used, its interpolation), so they are the images training validated on. The split is in a fixed
    class-interleaved order (supernet/data/config.py: ``split_train_val``), so the first ``images`` are a fixed
    subset that holds every class in proportion, identical for every candidate, rank and resume. ``source``: the
    digest of the prepared store the supernet was trained on, which the store read now must have.

    Raises:
        UserError: no validation split, fewer images than asked for, or a store of other images.
    """
    val = validation_loader(data_cfg, batch_size, device, recipe, source)  # every rank: the whole subset
    if images is None:
        images = val.num_examples
    if images > val.num_examples:  # scoring fewer images than asked for would go unnoticed
        raise UserError(f"eval_images: {images} but the validation split holds {val.num_examples} images "
                        f"(allowed: 1..{val.num_examples})")
    out, n = [], 0
    for x, y in val:
        take = min(len(y), images - n)
        out.append((x[:take], y[:take]))
        n += take
        if n >= images:
            break
    return out


def validation_loader(data_cfg: dict[str, Any], batch_size: int, device: torch.device,
                      recipe: dict[str, Any] | None = None, source: str | None = None, rank: int = 0,
                      world_size: int = 1) -> Any:
    """The held-out validation split's loader as training validated on it (its data config, the evaluation part
    of its recipe; ``source``: the store's digest), this rank's block of it.

    Raises:
        UserError: no validation split, or a store of other images.
    """
    cfg = {**data_cfg, "eval_batch_size": batch_size}
    evaluation = RecipeConfig.from_cfg(recipe).for_evaluation()
    data = build_data(cfg, rank=rank, world_size=world_size, device=device, recipe=evaluation)
    if source is not None and data.source != source:
        raise UserError(f"data_root: {cfg.get('root')} holds a store prepared from other images or with other "
                        f"settings ({data.source}) than the one the supernet was trained on ({source}); point "
                        "data_root= at that store")
    if data.val is None:
        raise UserError("data.val_size: the supernet was trained without a validation split; search needs one")
    return data.val


def fitness_digest(batches: Batches) -> str:
    """sha256 of the scored images as the model sees them (pixels after preprocessing, labels, order): two
    scores compare only if they were computed on the same digest."""
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
        h.update(y.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


class InheritedAccuracy:
    """``evaluate(archs) -> top-1 accuracies`` with inherited supernet weights; counts what it does, so a
    caller (the search app's summary, the benchmark) can report evaluations and time without wrapping it."""

    def __init__(self, net: Supernet, batches: Batches, env: DistEnv, amp: bool = True,
                 compile: bool | str = False) -> None:
        self.net, self.batches, self.env, self.amp = net, batches, env, amp
        compile_cells(net, compile, env.device, announce=env.is_main)  # the apps' ``compile`` setting
        self.images = sum(len(y) for _, y in batches)
        self.digest = fitness_digest(batches)
        self.evaluations = 0  # architectures scored by this rank
        self.seconds = 0.0  # wall time inside __call__ on this rank, the all-reduce included

    @torch.inference_mode()
    def accuracy(self, arch: ArchSpec) -> float:
        """Top-1 of ``arch`` on the whole subset (on this rank alone)."""
        self.evaluations += 1
        correct = 0
        for x, y in self.batches:
            with autocast(self.env.device, self.amp):
                correct += int((self.net(x, arch).argmax(-1) == y).sum())
        return correct / self.images

    @torch.inference_mode()
    def correct(self, arch: ArchSpec) -> np.ndarray:
        """0/1 per image of the subset, in its order (on this rank alone)."""
        self.evaluations += 1
        bits = []
        for x, y in self.batches:
            with autocast(self.env.device, self.amp):
                bits.append((self.net(x, arch).argmax(-1) == y).to(torch.uint8).cpu())
        return torch.cat(bits).numpy()

    def share(self, archs: Sequence[ArchSpec]) -> list[int]:
        """Indices of the candidates this rank scores: every rank computes the same split by MACs, largest
        first onto the least-loaded rank, so each candidate is scored by exactly one rank."""
        if not self.env.distributed:
            return list(range(len(archs)))
        return sorted(balance([macs(a) for a in archs], self.env.world_size)[self.env.rank])

    def __call__(self, archs: Sequence[ArchSpec]) -> list[float]:
        start = time.perf_counter()
        env = self.env
        scores = torch.zeros(len(archs), dtype=torch.float64)
        for i in self.share(archs):
            scores[i] = self.accuracy(archs[i])
        if env.distributed:
            scores = scores.to(env.device)
            dist.all_reduce(scores)  # each slot is non-zero on exactly one rank: the sum is that rank's score
        out = scores.cpu().tolist()
        self.seconds += time.perf_counter() - start
        return out


class WholeSplit:
    """``correct(archs) -> one 0/1 vector per architecture`` over the whole held-out validation split, with
    inherited weights: the finalist re-scoring's measure (search/finalists.py). Under torchrun each rank scores
    every architecture on its own block of the split and the blocks are gathered in rank order, so every rank
    returns the vectors a single process would."""

    def __init__(self, net: Supernet, loader: Any, env: DistEnv, amp: bool = True) -> None:
        self.net, self.loader, self.env, self.amp = net, loader, env, amp
        self.evaluations = 0
        self.seconds = 0.0

    @torch.inference_mode()
    def __call__(self, archs: Sequence[ArchSpec]) -> list[Any]:
        from supernet.engine.distributed import gather_objects

        start = time.perf_counter()
        mine = []
        for arch in archs:
            self.evaluations += 1
            bits = []
            for x, y in self.loader:
                with autocast(self.env.device, self.amp):
                    bits.append((self.net(x, arch).argmax(-1) == y).to(torch.uint8).cpu())
            mine.append(torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8))
        blocks = gather_objects([b.numpy() for b in mine], self.env)
        out = [np.concatenate([blocks[r][i] for r in range(len(blocks))]) for i in range(len(archs))]
        self.seconds += time.perf_counter() - start
        return out
