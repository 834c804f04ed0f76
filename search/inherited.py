"""Inherited-weight accuracy, the search's score: top-1 of a subnet that uses the trained supernet's weights,
on a fixed subset of the held-out validation split (never the test split), decoded as training validated on it
(the checkpoint's data config and recipe). The only torch in search/.

:class:`InheritedAccuracy` is an ``evaluate(archs) -> scores`` for :class:`search.evolution.Search`. Under
torchrun, the candidates of a batch are dealt to the ranks balanced by MACs (an evaluation's cost; a batch can
span 31.7 M to 5.48 G MACs in imagenet_tiny_2d, which round-robin can pile onto one rank), each rank scores
its share on the whole subset, and the scores are summed across ranks, so a distributed search gets exactly
the scores of a single process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

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
    pixels is used, its interpolation), so they are the images training validated on. ``source``: the digest of
    the prepared store the supernet was trained on, which the store read now must have.

    Raises:
        UserError: no validation split, fewer images than asked for, or a store of other images.
    """
    cfg = {**data_cfg, "eval_batch_size": batch_size}
    evaluation = RecipeConfig.from_cfg(recipe).for_evaluation()
    data = build_data(cfg, rank=0, world_size=1, device=device, recipe=evaluation)  # every rank: the whole subset
    if source is not None and data.source != source:
        raise UserError(f"data_root: {cfg.get('root')} holds a store prepared from other images or with other "
                        f"settings ({data.source}) than the one the supernet was trained on ({source}); point "
                        "data_root= at that store")
    if data.val is None:
        raise UserError("data.val_size: the supernet was trained without a validation split; search needs one")
    if images is None:
        images = data.val.num_examples
    if images > data.val.num_examples:  # scoring fewer images than asked for would go unnoticed
        raise UserError(f"eval_images: {images} but the validation split holds {data.val.num_examples} images "
                        f"(allowed: 1..{data.val.num_examples})")
    out, n = [], 0
    for x, y in data.val:
        take = min(len(y), images - n)
        out.append((x[:take], y[:take]))
        n += take
        if n >= images:
            break
    return out


class InheritedAccuracy:
    """``evaluate(archs) -> top-1 accuracies`` with inherited supernet weights; counts what it does, so a
    caller (the search app's summary, the benchmark) can report evaluations and time without wrapping it."""

    def __init__(self, net: Supernet, batches: Batches, env: DistEnv, amp: bool = True,
                 compile: bool | str = False) -> None:
        self.net, self.batches, self.env, self.amp = net, batches, env, amp
        compile_cells(net, compile, env.device, announce=env.is_main)  # the apps' ``compile`` setting
        self.images = sum(len(y) for _, y in batches)
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
