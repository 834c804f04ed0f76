"""The optimizer recipe shared by supernet training and retraining (DeiT's, conf/optim/adamw.yaml): AdamW with
the peak lr scaled linearly with the global batch, no weight decay on biases, norms and the parameters the
model names in ``no_weight_decay()``, linear warmup then cosine decay to ``min_lr`` (not scaled with the batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices and conv kernels only: not on 1-dim parameters (biases, norms) nor on the
    names the model lists in ``no_weight_decay()`` (timm's convention: position embedding, CLS token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """The lr as a factor of the peak: linear warmup to 1, then cosine down to ``min_ratio`` at ``total``. An
    object rather than a closure so that ``LambdaLR.state_dict`` keeps ``min_ratio``, which a restart with another
    peak (``resume_lr``) changes to keep the floor at ``optim.min_lr``."""

    def __init__(self, total: int, warmup: int, min_ratio: float) -> None:
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def floor_ratio(min_lr: float, peak: float) -> float:
    """``min_lr`` as a factor of the peak lr (at most 1: the floor never lies above the peak)."""
    return min(1.0, min_lr / peak) if peak > 0 else 1.0


def build_optimizer(model: nn.Module, optim: Any, global_batch: int, steps_per_epoch: int, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its per-step schedule for ``model`` from the ``optim`` config group.

    Args:
        optim: ``lr`` (peak for a global batch of 256), ``min_lr`` (the floor, whatever the batch),
            ``warmup_epochs``, ``weight_decay``, ``betas``.
        global_batch: images per optimizer step over all ranks.
        steps_per_epoch: converts ``warmup_epochs`` to steps.
        total_steps: where the cosine reaches ``min_lr``.
    """
    peak = optim.lr * global_batch / 256
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=peak, betas=tuple(optim.betas),
                            fused=device.type == "cuda" or None)
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    schedule = WarmupCosine(total_steps, warmup, floor_ratio(optim.min_lr, peak))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [schedule] * len(opt.param_groups))
