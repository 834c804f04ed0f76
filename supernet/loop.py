"""The training loop shared by supernet training and retraining: AdamW + warmup/cosine, label smoothing,
grad clipping, bf16 autocast on CUDA, gradient all-reduce across ranks, atomic resumable checkpoints,
SIGTERM/SIGINT handling, NaN stop, tqdm on rank 0 and TensorBoard scalars.

What differs between the two apps is a small :class:`Task`: how a step computes logits (a sampled path or
the fixed model), what is validated, and what identifies a run so a resume with other settings is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from supernet.data import DataBundle
from supernet.runtime import (DistEnv, NonFiniteLoss, StopFlag, UserError, allreduce_gradients, allreduce_sum,
                              atomic_save, autocast, broadcast_parameters, load_checkpoint)

CKPT = "last.ckpt"


@dataclass
class Task:
    """What a training run is, beyond the shared loop."""

    name: str  # progress-bar label
    net: nn.Module
    forward: Callable[[Tensor, int], Tensor]  # (x, step) -> logits
    validate: Callable[[], dict[str, float]]  # name -> top-1 on the validation split
    identity: dict[str, Any]  # stored in the checkpoint; a resume must match it exactly
    identity_hint: str  # what differs, for the refusal message
    step_info: Callable[[int], dict[str, float]] = lambda step: {}  # extra TensorBoard scalars of a step
    state: dict[str, Any] = field(default_factory=dict)  # extra checkpointed state, updated by the task
    on_step: Callable[[int], None] = lambda step: None  # after each optimizer step


@dataclass
class FitResult:
    step: int
    total_steps: int
    losses: list[float]  # mean loss over ranks of every step this call ran
    val: dict[str, float]
    stopped: bool  # by SIGTERM/SIGINT before the end
    run_dir: Path


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embedding and CLS token (DeiT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], loader: Any, env: DistEnv, max_batches: int | None = None,
             amp: bool = True) -> float:
    """Top-1 accuracy of ``forward(x) -> logits`` over this rank's share of ``loader``, all-reduced."""
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(env.device, amp):
            pred = forward(x).argmax(-1)
        correct += int((pred == y).sum())
        total += y.numel()
    correct, total = allreduce_sum([correct, total], env)
    return correct / max(total, 1)


def fit(task: Task, data: DataBundle, cfg: DictConfig, env: DistEnv) -> FitResult:
    """Train ``task.net`` on ``data.train`` as configured by ``cfg`` (optim, run_dir, resume, max_steps,
    ckpt_every, log_every, eval.every, amp, progress); resumes from ``run_dir/last.ckpt``."""
    o, net, run_dir = cfg.optim, task.net, Path(cfg.run_dir)
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} x {env.world_size} ranks exceeds the training "
                        "split; lower it")
    total = o.epochs * steps_per_epoch if cfg.max_steps is None else int(cfg.max_steps)
    global_batch = cfg.data.batch_size * env.world_size
    opt = torch.optim.AdamW(param_groups(net, o.weight_decay), lr=o.lr * global_batch / 256,
                            betas=tuple(o.betas), fused=env.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(o.warmup_epochs * steps_per_epoch),
                                                             o.min_lr / o.lr))
    step = 0
    ckpt_path = run_dir / CKPT
    if cfg.resume not in ("auto", "never"):
        raise UserError(f"resume: {cfg.resume!r} (allowed: auto, never)")
    if cfg.resume == "auto" and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("identity") != task.identity:
            raise UserError(f"resume: {ckpt_path} was trained with another {task.identity_hint}; "
                            f"use another run_dir= or resume=never")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        task.state.update(ck["task_state"])
        torch.set_rng_state(ck["rng_cpu"])
        if env.is_main:
            print(f"resumed from {ckpt_path} at step {step}/{total}")
    broadcast_parameters(net, env)

    def save() -> None:
        if env.is_main:
            atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step, "total_steps": total, "rng_cpu": torch.get_rng_state(),
                         "identity": task.identity, "task_state": task.state, **task.identity,
                         "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_path)

    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step)

    def validate() -> dict[str, float]:
        net.eval()
        res = task.validate()
        net.train()
        if writer is not None and res:
            for name, acc in res.items():
                writer.add_scalar(f"val/acc_{name}", acc, step)
            tqdm.write(f"step {step}: val top-1 " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    net.train()
    losses: list[float] = []
    val: dict[str, float] = {}
    bar = tqdm(total=total, initial=step, disable=not env.is_main or not cfg.progress, desc=task.name,
               dynamic_ncols=True)
    stopped = False
    t_last, seen = time.perf_counter(), 0
    with StopFlag() as stop:
        while step < total and not stopped:
            epoch, first = divmod(step, steps_per_epoch)
            for x, y in data.train.epoch(epoch, start=first):
                with autocast(env.device, cfg.amp):
                    loss = F.cross_entropy(task.forward(x, step), y, label_smoothing=o.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # one collective agrees on the mean loss and on stopping (a signal may reach ranks a step apart)
                loss_sum, stop_votes = allreduce_sum([loss.item(), float(stop.requested)], env)
                loss_val = loss_sum / env.world_size
                if not math.isfinite(loss_val):
                    raise NonFiniteLoss(f"optim: non-finite loss {loss_val} at step {step}; the last good "
                                        f"checkpoint {ckpt_path} is kept; lower optim.lr or optim.grad_clip and "
                                        f"rerun to resume")
                losses.append(loss_val)
                allreduce_gradients(net.parameters(), env)
                if o.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], o.grad_clip)
                opt.step()
                sched.step()
                task.on_step(step)
                info = task.step_info(step) if writer is not None else {}
                step += 1
                seen += x.shape[0] * env.world_size
                bar.update(1)
                if writer is not None and (step % cfg.log_every == 0 or step == total):
                    now = time.perf_counter()
                    ips = seen / (now - t_last)
                    t_last, seen = now, 0
                    lr = opt.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                    for k, v in {"loss": loss_val, "lr": lr, "img_per_s": ips, **info}.items():
                        writer.add_scalar(f"train/{k}", v, step)
                stopped = stop_votes > 0
                if stopped or step == total or step % cfg.ckpt_every == 0:
                    save()
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == total) and not stopped:
                    val = validate()
                if stopped or step == total:
                    break
    bar.close()
    if writer is not None:
        writer.close()
    if env.is_main and stopped:
        print(f"stopped by signal at step {step}/{total}; checkpoint {ckpt_path}; rerun the same command to resume")
    return FitResult(step, total, losses, val, stopped, run_dir)
