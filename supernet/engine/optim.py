"""The optimizer recipe shared by supernet training and retraining (DeiT's, conf/optim/adamw.yaml): AdamW with
the peak lr scaled linearly with the global batch, no weight decay on biases, norms and the parameters the
model names in ``no_weight_decay()``, linear warmup then cosine decay to ``min_lr`` (not scaled with the batch).
A supernet with ``entangle=slice`` gets :class:`SliceAdamW`: the same AdamW, applied to the slices a step trained.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from supernet.model.entangle import SliceLeaves, lead, oriented


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


class SliceAdamW(torch.optim.AdamW):
    """AdamW over the slices a step trained (model/entangle.py, ``entangle=slice``): for every weight of
    ``slices.trained()``, torch's own AdamW update (``torch.optim.adamw.adamw``) runs on the views of that box of the
    weight and of its two moments (in the orientation of the weight's storage, as the leaf), with the slice's
    gradient; the rest of the tensor, moments included, is left as it is. The state is AdamW's, full-size per
    weight (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints keep AdamW's layout; ``step`` counts the steps
    that trained any slice of the weight (lazy Adam's bias correction).

    Never fused: torch's fused kernel writes wrong values through strided views (seen on the CPU: the moments of
    a box narrower than its tensor were written outside it), so it runs the for-each (CUDA) or per-tensor (CPU)
    implementation that ``foreach=None`` picks, with ``step`` on the host, as AdamW does then. In place on
    strided views, each of its elementwise passes costs more than on the packed tensors of an extracted subnet
    (docs/benchmarks.md).
    """

    def __init__(self, slices: SliceLeaves, params: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.defaults["fused"] or self.defaults["capturable"] or self.defaults["differentiable"]:
            raise ValueError("SliceAdamW: fused, capturable and differentiable are not supported")
        self.slices = slices
        self._group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        # (id(weight), box) -> what _box returns, made once: a step's few hundred boxes cost no slicing (checked
        # against the state, which load_state_dict replaces)
        self._views: dict[tuple[int, torch.Size], _Box] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the parameters' gradients and ends the step of the slices."""
        super().zero_grad(set_to_none)
        self.slices.zero_grad()

    def _box(self, weight: Tensor, box: torch.Size) -> _Box:
        """``weight``'s group, step count and views at ``box``; its state made as AdamW makes it (whole tensors)."""
        key = (id(weight), box)
        found = self._views.get(key)
        state = self.state[weight]
        if found is not None and state and found.exp_avg_whole is state["exp_avg"]:
            return found
        group = self._group_of[id(weight)]
        amsgrad = self.param_groups[group]["amsgrad"]
        if not state:  # AdamW's lazy initialization
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
            for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                state[name] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        sizes = tuple(box)  # in the storage's orientation, as the leaf (model/entangle.py); the state shares it

        def view(t: Tensor) -> Tensor:
            return lead(oriented(t), sizes)

        found = self._views[key] = _Box(group, state["step"], view(weight.detach()), view(state["exp_avg"]),
                                        view(state["exp_avg_sq"]), view(state["max_exp_avg_sq"]) if amsgrad else None,
                                        state["exp_avg"])
        return found

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102 - AdamW's
        if closure is not None:
            raise ValueError("SliceAdamW.step takes no closure")
        lists = [([], [], [], [], [], []) for _ in self.param_groups]  # params, grads, avgs, sqs, maxes, steps
        for weight, leaf in self.slices.trained():
            b = self._box(weight, leaf.shape)
            params, grads, avgs, sqs, maxes, steps = lists[b.group]
            params.append(b.param)
            grads.append(leaf.grad)
            avgs.append(b.exp_avg)
            sqs.append(b.exp_avg_sq)
            if b.max_exp_avg_sq is not None:
                maxes.append(b.max_exp_avg_sq)
            steps.append(b.step)
        for group, (params, grads, avgs, sqs, maxes, steps) in zip(self.param_groups, lists):
            if params:
                beta1, beta2 = group["betas"]
                adamw(params, grads, avgs, sqs, maxes, steps, foreach=group["foreach"], amsgrad=group["amsgrad"],
                      beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                      maximize=group["maximize"])


class _Box(NamedTuple):
    """What :class:`SliceAdamW` updates of one weight at one box."""

    group: int  # index of the weight's param group
    step: Tensor  # the weight's step count (state)
    param: Tensor  # the weight's box, a view
    exp_avg: Tensor  # views of the state's box
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None  # amsgrad only
    exp_avg_whole: Tensor  # the state tensor the views were taken of (load_state_dict replaces it)


def build_optimizer(model: nn.Module, optim: Any, global_batch: int, steps_per_epoch: int, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its per-step schedule for ``model`` from the ``optim`` config group.

    Args:
        optim: ``lr`` (peak for a global batch of 256), ``min_lr`` (the floor, whatever the batch),
            ``warmup_epochs``, ``weight_decay``, ``betas``.
        model: the model; a supernet with ``entangle=slice`` (a ``slices`` store) gets :class:`SliceAdamW`.
        global_batch: images per optimizer step over all ranks.
        steps_per_epoch: converts ``warmup_epochs`` to steps.
        total_steps: where the cosine reaches ``min_lr``.
    """
    peak = optim.lr * global_batch / 256
    groups = param_groups(model, optim.weight_decay)
    slices: SliceLeaves | None = getattr(model, "slices", None)  # a supernet with entangle=slice
    if slices is None:
        opt = torch.optim.AdamW(groups, lr=peak, betas=tuple(optim.betas), fused=device.type == "cuda" or None)
    else:
        opt = SliceAdamW(slices, groups, lr=peak, betas=tuple(optim.betas))
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    schedule = WarmupCosine(total_steps, warmup, floor_ratio(optim.min_lr, peak))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [schedule] * len(opt.param_groups))
