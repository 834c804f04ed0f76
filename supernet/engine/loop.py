"""The training loop shared by supernet training and retraining, as named steps: ``resume``, ``train_step``,
``validate``, ``save`` and ``fit`` around them. It owns label smoothing, gradient all-reduce across ranks,
clipping, bf16 autocast on CUDA, the SIGTERM/SIGINT stop, the non-finite-loss stop, the checkpoint cadence,
tqdm on rank 0 and TensorBoard scalars; the optimizer recipe is ``engine/optim.py``, the checkpoint layout
``engine/checkpoint.py``.

What differs between the two apps is a :class:`Task`: how a step computes logits (a sampled path or the
fixed model), what is validated, and what identifies a run so that a resume with other settings is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from space.errors import Diverged, UserError
from supernet.data import DataBundle, Loader
from supernet.engine.checkpoint import CKPT_NAME, load_checkpoint, restore_training, save_checkpoint, training_state
from supernet.engine.distributed import (DistEnv, StopFlag, allreduce_gradients, allreduce_sum, autocast,
                                         broadcast_parameters)
from supernet.engine.optim import build_optimizer


class Task:
    """What a training run is, beyond the shared loop. Subclasses set ``name``, ``net`` and ``identity``."""

    name: str  # progress-bar label
    net: nn.Module
    identity: dict[str, Any]  # stored in the checkpoint; a resume must match it exactly
    identity_hint: str = "configuration"  # names what differs, for the refusal message

    def forward(self, x: Tensor, step: int) -> Tensor:
        """Logits of the batch ``x`` at ``step``."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Name -> top-1 on the validation split (the net is in eval mode)."""
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        """Called on every rank after each optimizer step; returns extra TensorBoard scalars of the step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The task's own resumable state (checkpointed with the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class FitResult:
    step: int
    total_steps: int
    losses: list[float]  # mean loss over ranks of every step this call ran
    grad_norms: list[float]  # global gradient norm before clipping of every step this call ran (clipping on)
    val: dict[str, float]
    stopped: bool  # by SIGTERM/SIGINT before the end
    run_dir: Path


@torch.no_grad()
def top1(forward: Callable[[Tensor], Tensor], loader: Loader, env: DistEnv, max_batches: int | None = None,
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


class Trainer:
    """Trains ``task.net`` on ``data.train`` as ``cfg`` says (``optim``, ``run_dir``, ``resume``, ``max_steps``,
    ``ckpt_every``, ``log_every``, ``eval.every``, ``amp``, ``progress``), resuming from ``run_dir/last.ckpt``."""

    def __init__(self, task: Task, data: DataBundle, cfg: DictConfig, env: DistEnv) -> None:
        self.task, self.data, self.cfg, self.env = task, data, cfg, env
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / CKPT_NAME
        self.steps_per_epoch = len(data.train)
        if self.steps_per_epoch == 0:
            raise UserError(f"data.batch_size: {cfg.data.batch_size} x {env.world_size} ranks exceeds the "
                            "training split; lower it")
        self.total = cfg.optim.epochs * self.steps_per_epoch if cfg.max_steps is None else int(cfg.max_steps)
        self.opt, self.sched = build_optimizer(task.net, cfg.optim, cfg.data.batch_size * env.world_size,
                                               self.steps_per_epoch, self.total, env.device)
        self.step = 0
        self.writer: Any = None

    # ----------------------------------------------------------------- named steps
    def resume(self) -> None:
        """Continue from ``run_dir/last.ckpt`` when ``resume=auto`` finds one of the same identity; then
        every rank starts from rank 0's weights."""
        if self.cfg.resume not in ("auto", "never"):
            raise UserError(f"resume: {self.cfg.resume!r} (allowed: auto, never)")
        if self.cfg.resume == "auto" and self.ckpt_path.exists():
            ck = load_checkpoint(self.ckpt_path)
            if ck.get("identity") != self.task.identity:
                raise UserError(f"resume: {self.ckpt_path} was trained with another {self.task.identity_hint}; "
                                f"use another run_dir= or resume=never")
            self.step = restore_training(ck, model=self.task.net, optimizer=self.opt, scheduler=self.sched)
            self.task.load_state_dict(ck["task_state"])
            if self.env.is_main:
                print(f"resumed from {self.ckpt_path} at step {self.step}/{self.total}")
        broadcast_parameters(self.task.net, self.env)

    def train_step(self, x: Tensor, y: Tensor, stop_requested: bool) -> tuple[float, bool, dict[str, float]]:
        """One optimizer step on the batch; returns the mean loss over ranks, whether any rank asked to stop,
        and the step's extra scalars (the task's, and ``grad_norm`` when clipping is on)."""
        net, o = self.task.net, self.cfg.optim
        with autocast(self.env.device, self.cfg.amp):
            loss = F.cross_entropy(self.task.forward(x, self.step), y, label_smoothing=o.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # one collective agrees on the mean loss and on stopping (a signal may reach ranks a step apart)
        loss_sum, stop_votes = allreduce_sum([loss.item(), float(stop_requested)], self.env)
        loss_val = loss_sum / self.env.world_size
        if not math.isfinite(loss_val):
            raise Diverged(f"optim: non-finite loss {loss_val} at step {self.step}; the last good checkpoint "
                           f"{self.ckpt_path} is kept; lower optim.lr or optim.grad_clip and rerun to resume")
        allreduce_gradients(net.parameters(), self.env)
        info = {}
        if o.grad_clip:  # the norm of the averaged gradient, the same on every rank
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in net.parameters() if p.grad is not None], o.grad_clip))
        self.opt.step()
        self.sched.step()
        info.update(self.task.after_step(self.step))
        self.step += 1
        return loss_val, stop_votes > 0, info

    def validate(self) -> dict[str, float]:
        """The task's validation in eval mode, logged on rank 0."""
        self.task.net.eval()
        res = self.task.validate()
        self.task.net.train()
        if self.writer is not None and res:
            for name, acc in res.items():
                self.writer.add_scalar(f"val/acc_{name}", acc, self.step)
            tqdm.write(f"step {self.step}: val top-1 " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def save(self) -> None:
        """Checkpoint (rank 0 only; every rank holds the same weights)."""
        if self.env.is_main:
            save_checkpoint(training_state(
                model=self.task.net, optimizer=self.opt, scheduler=self.sched, step=self.step,
                total_steps=self.total, identity=self.task.identity, task_state=self.task.state_dict(),
                config=OmegaConf.to_container(self.cfg, resolve=True)), self.ckpt_path)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> FitResult:
        """Resume, then train until ``total`` steps or a stop signal; checkpoints and validates on cadence."""
        cfg, env, total = self.cfg, self.env, self.total
        self.resume()
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        self.task.net.train()
        losses: list[float] = []
        grad_norms: list[float] = []
        val: dict[str, float] = {}
        bar = tqdm(total=total, initial=self.step, disable=not env.is_main or not cfg.progress, desc=self.task.name,
                   dynamic_ncols=True)
        meter = _Throughput()
        stopped = False
        with StopFlag() as stop:
            while self.step < total and not stopped:
                epoch, first = divmod(self.step, self.steps_per_epoch)
                for x, y in self.data.train.epoch(epoch, start=first):
                    loss, stopped, info = self.train_step(x, y, stop.requested)
                    losses.append(loss)
                    if "grad_norm" in info:
                        grad_norms.append(info["grad_norm"])
                    meter.add(x.shape[0] * env.world_size)
                    bar.update(1)
                    step = self.step
                    if self.writer is not None and (step % cfg.log_every == 0 or step == total):
                        self._log(bar, loss, meter.rate(), info)
                    if stopped or step == total or step % cfg.ckpt_every == 0:
                        self.save()
                    if cfg.eval.every and (step % cfg.eval.every == 0 or step == total) and not stopped:
                        val = self.validate()
                    if stopped or step == total:
                        break
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if env.is_main and stopped:
            print(f"stopped by signal at step {self.step}/{total}; checkpoint {self.ckpt_path}; rerun the same "
                  "command to resume")
        return FitResult(self.step, total, losses, grad_norms, val, stopped, self.run_dir)

    def _log(self, bar: tqdm, loss: float, img_per_s: float, info: dict[str, float]) -> None:
        lr = self.opt.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}")
        for k, v in {"loss": loss, "lr": lr, "img_per_s": img_per_s, **info}.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)


class _Throughput:
    """Images per second since the previous reading."""

    def __init__(self) -> None:
        self.t, self.seen = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.seen += images

    def rate(self) -> float:
        now = time.perf_counter()
        ips = self.seen / (now - self.t)
        self.t, self.seen = now, 0
        return ips


def fit(task: Task, data: DataBundle, cfg: DictConfig, env: DistEnv) -> FitResult:
    """Train ``task`` with a :class:`Trainer` (see there)."""
    return Trainer(task, data, cfg, env).fit()
