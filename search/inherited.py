"""Inherited-weight evaluation: top-1 of a subnet using the trained supernet's weights on a fixed subset of
the held-out validation split (never the test split). The only torch in search/.

Under torchrun, each rank evaluates every ``world_size``-th candidate of a batch on the whole subset and the
scores are summed across ranks, so a distributed search gets exactly the scores of a single process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from space.arch import ArchSpec
from space.errors import UserError
from supernet.data import build_data
from supernet.engine.distributed import DistEnv, autocast
from supernet.model.supernet import Supernet


def validation_batches(data_cfg: dict[str, Any], images: int, batch_size: int, device: torch.device,
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``images`` images of the held-out validation split, as batches kept in memory."""
    cfg = {**data_cfg, "eval_batch_size": batch_size}
    data = build_data(cfg, rank=0, world_size=1, device=device)  # every rank holds the whole subset
    if data.val is None:
        raise UserError("data.val_size: the supernet was trained without a validation split; search needs one")
    out, n = [], 0
    for x, y in data.val:
        take = min(len(y), images - n)
        out.append((x[:take], y[:take]))
        n += take
        if n >= images:
            break
    return out


class SupernetEvaluator:
    """``evaluate(archs) -> top-1 accuracies`` with inherited supernet weights."""

    def __init__(self, net: Supernet, batches: list[tuple[torch.Tensor, torch.Tensor]], env: DistEnv,
                 amp: bool = True):
        self.net, self.batches, self.env, self.amp = net, batches, env, amp
        self.images = sum(len(y) for _, y in batches)
        self.calls = 0  # architectures evaluated by this rank

    @torch.inference_mode()
    def accuracy(self, arch: ArchSpec) -> float:
        self.calls += 1
        correct = 0
        for x, y in self.batches:
            with autocast(self.env.device, self.amp):
                correct += int((self.net(x, arch).argmax(-1) == y).sum())
        return correct / self.images

    def __call__(self, archs: Sequence[ArchSpec]) -> list[float]:
        env = self.env
        mine = range(env.rank, len(archs), env.world_size)
        scores = torch.zeros(len(archs), dtype=torch.float64)
        for i in mine:
            scores[i] = self.accuracy(archs[i])
        if env.distributed:
            scores = scores.to(env.device)
            dist.all_reduce(scores)  # each slot is non-zero on exactly one rank: the sum is that rank's score
        return scores.cpu().tolist()
