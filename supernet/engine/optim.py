"""The optimizer recipe shared by supernet training and retraining (DeiT's, conf/optim/adamw.yaml): AdamW with
the peak lr scaled linearly with the global batch, no weight decay on biases, norms and the parameters the
model names in ``no_weight_decay()``, linear warmup then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_optimizer(model: nn.Module, optim: Any, global_batch: int, steps_per_epoch: int, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its per-step schedule for ``model`` from the ``optim`` config group.

    Args:
        optim: ``lr`` (peak for a global batch of 256), ``min_lr``, ``warmup_epochs``, ``weight_decay``, ``betas``.
        global_batch: images per optimizer step over all ranks.
        steps_per_epoch: converts ``warmup_epochs`` to steps.
        total_steps: where the cosine reaches ``min_lr``.
    """
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr * global_batch / 256,
                            betas=tuple(optim.betas), fused=device.type == "cuda" or None)
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup, optim.min_lr / optim.lr))
