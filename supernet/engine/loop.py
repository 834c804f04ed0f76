"""The training loop shared by supernet training and retraining, as named steps: ``resume``, ``train_step``,
``sync``, ``validate``, ``save`` and ``fit`` around them. It owns label smoothing, gradient all-reduce across
ranks (overlapped with the step's last backward), clipping, bf16 autocast on CUDA, the SIGTERM/SIGINT stop, the
non-finite-loss stop, the checkpoint cadence (steps and minutes), tqdm on rank 0 and TensorBoard scalars; the
optimizer recipe is ``engine/optim.py``, the checkpoint layout and its background writer ``engine/checkpoint.py``.

A step never waits for the device: its loss and gradient norm stay there. The host reads them at sync points
only (every ``log_every`` steps, before every checkpoint, at the end), where one collective agrees on the mean
losses of the interval (a non-finite one stops the run, naming its step), the stop votes and the checkpoint
decision.

What differs between the two apps is a :class:`Task`: how a step computes logits (a sampled path or the
fixed model), what is validated, and what identifies a run so that a resume with other settings is refused.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from space.errors import Diverged, UserError
from space.app import run_dir_lock
from supernet.data import DataBundle, DataConfig, Loader, RecipeConfig
from supernet.engine.checkpoint import CKPT_NAME, CheckpointWriter, read_checkpoint, restore_training, training_state
from supernet.engine.distributed import (DistEnv, GradReducer, StopFlag, allreduce_sum_, autocast,
                                         broadcast_parameters, gather_objects)
from supernet.engine.optim import build_optimizer, floor_ratio
from supernet.model.entangle import SliceLeaves


class Task:
    """What a training run is, beyond the shared loop. Subclasses set ``name``, ``net`` and ``identity``."""

    name: str  # progress-bar label
    net: nn.Module
    identity: dict[str, Any]  # the task's settings that change the result; a resume must match them exactly
    checkpoint_extras: dict[str, Any] = {}  # stored at the checkpoint's top level for its readers
    ema: nn.Module | None = None  # the weights' moving average (recipe.ema), set by the Trainer

    def forward(self, x: Tensor, step: int) -> Tensor:
        """Logits of the batch ``x`` at ``step``."""
        raise NotImplementedError

    def backward(self, x: Tensor, y: Tensor, step: int, loss: LossBackward) -> Tensor:
        """Accumulate the gradients of step ``step`` into ``.grad``; returns the step's loss (detached).
        One forward by default; a task that trains several paths per step overrides this, calling ``loss``
        with ``final=False`` for every path but the last."""
        return loss(lambda: self.forward(x, step), y)[0]

    def validate(self) -> dict[str, float]:
        """Name -> top-1 on the validation split (the net is in eval mode)."""
        return {}

    def after_step(self, step: int, log: bool) -> dict[str, float]:
        """Called on every rank after each optimizer step. ``log``: the step's scalars are logged (decided by the
        step number, so the same on every rank); only then does it return its extra TensorBoard scalars."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The task's own resumable state (checkpointed with the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossBackward:
    """Forward under autocast, the training loss, and backward of ``scale`` x loss: what one path of a step
    costs. The loss is cross-entropy with label smoothing against the labels (or against the soft targets of a
    mixed batch, which carry their smoothing already), mixed with weight ``soft_weight`` with cross-entropy
    against ``soft`` target probabilities (in-place distillation). With a ``reducer``, the step's final
    backward all-reduces the gradients while it runs."""

    def __init__(self, device: torch.device, amp: bool, label_smoothing: float,
                 reducer: GradReducer | None = None) -> None:
        self.device, self.amp, self.label_smoothing, self.reducer = device, amp, label_smoothing, reducer

    def __call__(self, forward: Callable[[], Tensor], y: Tensor, *, soft: Tensor | None = None,
                 soft_weight: float = 0.0, scale: float = 1.0, final: bool = True) -> tuple[Tensor, Tensor]:
        """Returns the loss and the logits, both detached. ``final``: this is the step's last backward, whose
        finished gradients may be reduced as they appear (an earlier pass's may still grow)."""
        with autocast(self.device, self.amp):
            logits = forward()
            smoothing = 0.0 if y.is_floating_point() else self.label_smoothing  # Mixup/CutMix targets: smoothed
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            if soft is not None:
                loss = (1 - soft_weight) * loss + soft_weight * F.cross_entropy(logits.float(), soft)
        with self.reducer.backward(final) if self.reducer is not None else nullcontext():
            (loss * scale).backward()
        return loss.detach(), logits.detach()


KEPT_STEPS = 10_000  # FitResult keeps the losses and gradient norms of at most this many last steps


@dataclass
class StepStats:
    """What one optimizer step leaves for the loop, on the device: reading a tensor on the host waits for the
    device, so the loop reads them once per sync point for all the steps since the previous one."""

    loss: Tensor  # this rank's loss of the step (0-dim)
    grad_norm: Tensor | None  # global gradient norm before clipping, the same on every rank; None without clipping
    scalars: dict[str, float]  # the task's extra scalars, for a logged step only


@dataclass(frozen=True)
class SyncPoint:
    """What every rank agrees on at a sync point, from one collective."""

    losses: list[float]  # mean over ranks of the loss of each step since the previous sync point
    grad_norms: list[float]  # gradient norm before clipping of each of those steps (empty without clipping)
    stop: bool  # a rank was asked to stop (SIGTERM / SIGINT)
    checkpoint: bool  # rank 0's clock says a checkpoint is due (ckpt_minutes)


class _Interval:
    """The losses and gradient norms of the steps since the last sync point, written on the device in place."""

    def __init__(self, size: int, device: torch.device, first: int) -> None:
        self.loss = torch.zeros(size, device=device)
        self.grad_norm = torch.zeros(size, device=device)
        self.restart(first)

    def restart(self, first: int) -> None:
        self.first, self.n = first, 0  # the step of slot 0, slots filled

    def add(self, stats: StepStats) -> None:
        self.loss[self.n] = stats.loss  # a device copy, no host read
        if stats.grad_norm is not None:
            self.grad_norm[self.n] = stats.grad_norm
        self.n += 1


@dataclass
class FitResult:
    step: int
    total_steps: int
    losses: list[float]  # mean loss over ranks of each step this call ran, the last KEPT_STEPS of them
    grad_norms: list[float]  # gradient norm before clipping of those steps (clipping on)
    val: dict[str, float]
    stopped: bool  # by SIGTERM/SIGINT before the end
    run_dir: Path
    ema: nn.Module | None = None  # the moving average of the weights, with recipe.ema


@torch.no_grad()
def top1(forward: Callable[[Tensor], Tensor], loader: Loader, env: DistEnv, max_batches: int | None = None,
         amp: bool = True) -> float:
    """Top-1 accuracy of ``forward(x) -> logits`` over this rank's share of ``loader``, all-reduced. The counts
    add up on the device and the host reads them once, at the end."""
    counts = torch.zeros(2, dtype=torch.int64, device=env.device)  # correct, total
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(env.device, amp):
            pred = forward(x).argmax(-1)
        counts[0] += (pred == y).sum()
        counts[1] += y.numel()
    correct, total = allreduce_sum_(counts, env).tolist()
    return correct / max(total, 1)


class Trainer:
    """Trains ``task.net`` on ``data.train`` as ``cfg`` says (``optim``, ``run_dir``, ``resume``, ``max_steps``,
    ``ckpt_every``, ``ckpt_minutes``, ``log_every``, ``eval.every``, ``amp``, ``progress``), resuming from
    ``run_dir/last.ckpt``."""

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
        self.saved_step: int | None = None  # step of the checkpoint on disk
        self.lr_history: list[dict[str, float]] = []  # peak-lr restarts (resume_lr=), kept in the checkpoint
        self.identity = run_identity(task, cfg, env, data.source)
        # entangle=slice: the step trains slice leaves, not whole parameters (model/entangle.py)
        self.slices: SliceLeaves | None = getattr(task.net, "slices", None)
        self.reducer = GradReducer(task.net.parameters(), env,  # hooks the weights: reduces during backward
                                   leaves=None if self.slices is None else self.slices.leaves)
        self.loss = LossBackward(env.device, cfg.amp, cfg.optim.label_smoothing, self.reducer)
        self.recipe = RecipeConfig.from_cfg(cfg.get("recipe"))
        self.ema: Any = None  # timm's ModelEmaV3 with recipe.ema, made once the start weights are known
        self.writer: Any = None
        self.checkpoints = CheckpointWriter()  # rank 0 writes in the background, one checkpoint at a time
        self.ckpt_minutes: float | None = cfg.get("ckpt_minutes")  # absent from configs that predate it
        self._last_save = 0.0  # clock() at the last checkpoint (or the start of fit)
        self._interval = _Interval(0, env.device, 0)  # the steps since the last sync point (set by fit)

    def clock(self) -> float:
        """Seconds on a monotonic clock; what ``ckpt_minutes`` is measured with on rank 0."""
        return time.monotonic()

    # ----------------------------------------------------------------- named steps
    def resume(self) -> None:
        """Continue from ``run_dir/last.ckpt`` when ``resume=auto`` finds one trained with the same settings
        (``resume_lr=`` restarts its peak lr); then every rank starts from rank 0's weights.

        Raises:
            UserError: the checkpoint was trained with other settings (the differing keys are named).
        """
        cfg = self.cfg
        ema_state = None
        # Rank 0 decides whether there is a run to resume, so ranks never start at different steps (node-local
        # run dirs, a stale network file system view); every rank then checks it holds the same checkpoint.
        found = gather_objects(cfg.resume == "auto" and self.ckpt_path.exists() if self.env.is_main else None,
                               self.env)[0]
        if found:
            ck = self._read_shared_checkpoint()
            diff = identity_diff(ck.get("identity") if isinstance(ck, dict) else None, self.identity)
            if diff:
                raise UserError(f"resume: {self.ckpt_path} was trained with other settings: {diff}; use the same "
                                "values, another run_dir= or resume=never")
            self.step = self.saved_step = restore_training(ck, model=self.task.net, optimizer=self.opt,
                                                           scheduler=self.sched)
            self.task.load_state_dict(ck["task_state"])
            ema_state = ck.get("ema")
            self.lr_history = list(ck.get("lr_history", []))
            if cfg.get("resume_lr") is not None:
                self.restart_lr(float(cfg.resume_lr))
            if self.env.is_main:
                print(f"resumed from {self.ckpt_path} at step {self.step}/{self.total}")
        elif cfg.get("resume_lr") is not None:
            raise UserError(f"resume_lr: {cfg.resume_lr} but there is no checkpoint to resume in {self.run_dir} "
                            "(set optim.lr for a new run)")
        broadcast_parameters(self.task.net, self.env)
        if self.recipe.ema:  # starts as the start weights (DeiT's ModelEma); a resume restores its average
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.task.net, decay=self.recipe.ema_decay)
            if ema_state is not None:
                self.ema.module.load_state_dict(ema_state)
            self.task.ema = self.ema.module

    def _read_shared_checkpoint(self) -> dict[str, Any]:
        """``run_dir/last.ckpt`` as every rank reads it, once all ranks agree they read the same bytes.

        Raises:
            UserError: on every rank alike, when a rank cannot read the checkpoint rank 0 resumes or reads
                another one (run_dir is not one directory shared by all nodes).
        """
        ck, digest, problem = None, None, None
        try:
            ck, digest = read_checkpoint(self.ckpt_path)
        except UserError as e:
            problem = str(e)
        seen = gather_objects((digest, ck.get("step") if isinstance(ck, dict) else None, problem,
                               str(self.ckpt_path)), self.env)
        path = seen[0][3]  # rank 0's: the one resumed
        if seen[0][2] is not None:
            raise UserError(seen[0][2])
        hint = ("run_dir must be one directory that every node sees (a shared file system), not node-local copies; "
                "README: many machines")
        bad = [r for r, (_, _, p, _) in enumerate(seen) if p is not None]
        if bad:
            raise UserError(f"resume: rank 0 resumes {path} but rank {bad[0]} cannot read it "
                            f"({seen[bad[0]][2]}); {hint}")
        other = [r for r, (d, _, _, _) in enumerate(seen) if d != seen[0][0]]
        if other:
            r = other[0]
            raise UserError(f"resume: ranks hold different {path} files (rank 0: step {seen[0][1]}, "
                            f"sha256 {seen[0][0][:12]}; rank {r}: step {seen[r][1]}, sha256 {seen[r][0][:12]}); {hint}")
        return ck

    def restart_lr(self, peak: float) -> None:
        """Continue the schedule from the current step with ``peak`` in place of ``optim.lr`` (a way out of
        divergence); recorded in the checkpoint's ``lr_history``."""
        if self.lr_history and self.lr_history[-1]["peak_lr"] == peak:
            return  # the same command rerun: already applied, and kept in the scheduler's state
        base = peak * self.cfg.data.batch_size * self.env.world_size / 256
        self.sched.base_lrs = [base] * len(self.opt.param_groups)
        for group, fn in zip(self.opt.param_groups, self.sched.lr_lambdas):
            fn.min_ratio = floor_ratio(self.cfg.optim.min_lr, base)  # the floor stays optim.min_lr
            group["lr"] = base * fn(self.sched.last_epoch)
        self.lr_history.append({"step": self.step, "peak_lr": peak})

    def train_step(self, x: Tensor, y: Tensor, log: bool = False) -> StepStats:
        """One optimizer step on the batch, queued on the device without waiting for it: the loss and the
        gradient norm stay there (the loop reads them at its sync points, see :meth:`sync`). ``log``: the step's
        scalars go to TensorBoard, so the task computes its extra ones."""
        net, o = self.task.net, self.cfg.optim
        self.opt.zero_grad(set_to_none=True)  # SliceAdamW also drops the previous step's slices
        loss = self.task.backward(x, y, self.step, self.loss)
        self.reducer.finish()
        grad_norm = None
        if o.grad_clip:  # the norm of the averaged gradient, the same on every rank
            trained = [p for p in net.parameters() if p.grad is not None] if self.slices is None else \
                [leaf for _, leaf in self.slices.trained()]
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, o.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(net)
        scalars = self.task.after_step(self.step, log)
        self.step += 1
        return StepStats(loss.detach(), grad_norm, scalars)

    def sync(self, stop_requested: bool) -> SyncPoint:
        """The sync point: one collective sums over ranks the losses of the steps since the previous sync point,
        the stop votes (a signal may reach ranks steps apart) and rank 0's vote for a checkpoint by time, so
        every rank agrees on all of them; the host then reads the sums and the gradient norms in one copy.

        Raises:
            Diverged: a loss of the interval is not finite (the first such step is named).
        """
        iv, env = self._interval, self.env
        n, first, clipped = iv.n, iv.first, bool(self.cfg.optim.grad_clip)
        payload = torch.empty(n + 2, dtype=torch.float64, device=iv.loss.device)
        payload[:n] = iv.loss[:n]
        payload[n] = float(stop_requested)  # fills with a host number: no copy to the device, which would wait
        payload[n + 1] = float(self._checkpoint_due())
        summed = allreduce_sum_(payload, env)
        host = (torch.cat([summed, iv.grad_norm[:n].double()]) if clipped else summed).tolist()
        iv.restart(self.step)  # the host has read the slots: they may be overwritten
        losses = [v / env.world_size for v in host[:n]]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            raise Diverged(f"non-finite loss {losses[bad]} at step {first + bad}; {self._way_out()}")
        return SyncPoint(losses, host[n + 2:], host[n] > 0, host[n + 1] > 0)

    def _checkpoint_due(self) -> bool:
        """Rank 0's vote: ``ckpt_minutes`` have passed since the last checkpoint (the other ranks' clocks are
        not asked, so that one collective makes every rank save at the same step)."""
        return (self.ckpt_minutes is not None and self.env.is_main
                and self.clock() - self._last_save >= 60 * self.ckpt_minutes)

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
        """Checkpoint this step, called on every rank at the same step (they hold the same weights, so they
        find the same answer to the check below). Rank 0 copies the state to host memory now and writes it in
        the background (engine/checkpoint.py ``CheckpointWriter``), after the previous write is done. Never writes
        non-finite weights or optimizer state: the previous checkpoint stays the last good one.

        Raises:
            Diverged: a weight or an optimizer moment is NaN or infinite.
            UserError: the previous checkpoint's write failed (e.g. a full disk).
        """
        if not all_finite(self.task.net, self.opt):
            raise Diverged(f"non-finite weights or optimizer state at step {self.step}; {self._way_out()}")
        if self.env.is_main:
            state = training_state(model=self.task.net, optimizer=self.opt, scheduler=self.sched, step=self.step,
                                   total_steps=self.total, identity=self.identity,
                                   task_state=self.task.state_dict(),
                                   config=OmegaConf.to_container(self.cfg, resolve=True))
            if self.ema is not None:
                state["ema"] = self.ema.module.state_dict()
            keep = self.cfg.get("keep_every") or 0
            self.checkpoints.submit({**state, **self.task.checkpoint_extras, "lr_history": self.lr_history},
                                    self.ckpt_path,
                                    self.run_dir / f"step_{self.step}.ckpt" if keep and self.step % keep == 0 else None)
        self.saved_step = self.step
        self._last_save = self.clock()

    def _way_out(self) -> str:
        """What to run after a divergence: resume the last good checkpoint with a tenth of the peak lr (once its
        write is done: a failed write raises its own error instead)."""
        self.checkpoints.wait()
        if self.saved_step is None:
            return f"no checkpoint was written; start over with a lower optim.lr (e.g. {self.cfg.optim.lr / 10:g})"
        peak = self.lr_history[-1]["peak_lr"] if self.lr_history else self.cfg.optim.lr
        return (f"{self.ckpt_path} (step {self.saved_step}) is kept as the last good checkpoint; resume it with a "
                f"lower peak lr: rerun the same command with resume_lr={peak / 10:g}")

    # ----------------------------------------------------------------- the loop
    def fit(self) -> FitResult:
        """Lock ``run_dir``, resume, then train until ``total`` steps or a stop signal; checkpoints and
        validates on cadence."""
        with run_dir_lock(self.run_dir, self.env.is_main):
            return self._fit()

    def _fit(self) -> FitResult:
        cfg, env, total = self.cfg, self.env, self.total
        self.resume()
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        self.task.net.train()
        # at most min(log_every, ckpt_every) steps lie between two sync points
        self._interval = _Interval(max(1, min(cfg.log_every, cfg.ckpt_every, total - self.step)), env.device,
                                   self.step)
        self._last_save = self.clock()
        bar = tqdm(total=total, initial=self.step, disable=not env.is_main or not cfg.progress, desc=self.task.name,
                   dynamic_ncols=True)
        run = _Run(deque(maxlen=KEPT_STEPS), deque(maxlen=KEPT_STEPS), bar)
        try:
            with StopFlag() as stop:
                while self.step < total and not run.stopped:
                    epoch, first = divmod(self.step, self.steps_per_epoch)
                    for x, y in self.data.train.epoch(epoch, start=first):
                        if self._step_in_loop(x, y, stop, run):
                            break
        finally:
            self.checkpoints.wait()  # the last checkpoint is on disk when fit returns (or raises)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if env.is_main and run.stopped:
            print(f"stopped by signal at step {self.step}/{total}; checkpoint {self.ckpt_path}; rerun the same "
                  "command to resume")
        return FitResult(self.step, total, list(run.losses), list(run.grad_norms), run.val, run.stopped,
                         self.run_dir, None if self.ema is None else self.ema.module)

    def _step_in_loop(self, x: Tensor, y: Tensor, stop: StopFlag, run: _Run) -> bool:
        """One step of ``fit``, and at a sync point what depends on it: the log, the stop, the checkpoint;
        validation on its cadence. Returns whether the loop ends here (stopped, or the last step)."""
        cfg, total = self.cfg, self.total
        step = self.step + 1  # the step count once this step is done
        logged = step % cfg.log_every == 0 or step == total  # a function of the step: the same on every rank
        stats = self.train_step(x, y, log=logged)
        self._interval.add(stats)
        run.meter.add(x.shape[0] * self.env.world_size)
        run.bar.update(1)
        keep = cfg.get("keep_every") or 0
        kept = bool(keep) and step % keep == 0  # a step whose checkpoint is also kept as step_<N>.ckpt
        if logged or step % cfg.ckpt_every == 0 or kept:
            point = self.sync(stop.requested)
            run.losses.extend(point.losses)
            run.grad_norms.extend(point.grad_norms)
            self._log(run, point, stats.scalars if logged else None)
            run.stopped = point.stop
            if point.stop or step == total or step % cfg.ckpt_every == 0 or point.checkpoint or kept:
                self.save()
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == total) and not run.stopped:
            run.val = self.validate()
        return run.stopped or step == total

    def _log(self, run: _Run, point: SyncPoint, scalars: dict[str, float] | None) -> None:
        """Adds the sync point's steps to the TensorBoard point in the making; at a logged step (``scalars``: the
        task's of that step) writes it on rank 0: the mean loss and gradient norm since the previous point."""
        run.since_log[0] += sum(point.losses)
        run.since_log[1] += sum(point.grad_norms)
        run.since_log[2] += len(point.losses)
        if scalars is None:
            return
        (loss_sum, norm_sum, steps), run.since_log = run.since_log, [0.0, 0.0, 0]
        if self.writer is None:
            return
        loss, lr, img_per_s = loss_sum / steps, self.opt.param_groups[0]["lr"], run.meter.rate()
        run.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}")
        values = {"loss": loss, "lr": lr, "img_per_s": img_per_s, **scalars}
        if point.grad_norms:
            values["grad_norm"] = norm_sum / steps
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)


@dataclass
class _Run:
    """What one call of ``fit`` gathers as it goes."""

    losses: deque[float]  # bounded: the last KEPT_STEPS
    grad_norms: deque[float]
    bar: tqdm
    meter: _Throughput = field(default_factory=lambda: _Throughput())
    val: dict[str, float] = field(default_factory=dict)
    stopped: bool = False
    since_log: list[float] = field(default_factory=lambda: [0.0, 0.0, 0])  # loss sum, norm sum, steps


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


# Data settings that do not change what is trained: where the files are, evaluation batch, decoding workers, and
# whether decoded validation batches stay on the device.
DATA_NOT_IN_IDENTITY = ("root", "eval_batch_size", "num_workers", "cache_val")


def run_identity(task: Task, cfg: DictConfig, env: DistEnv, source: str | None = None) -> dict[str, Any]:
    """Every setting that changes what a run trains: the task's own (space or architecture), the data and
    its split, the seed, the optimizer recipe, the length, the global batch (per-rank batch x world size) and
    autocast, and the recipe unless it is ``light`` (so runs from before the recipe group still resume).
    ``source``, the digest of the images a prepared store was made from, joins the data settings: ``data.root``
    may move, but a resume on a store of other images is refused. Progress, logging, validation and checkpoint
    cadence may change between runs."""
    data = asdict(DataConfig.from_cfg(cfg.data).resolved())
    identity = {**task.identity, "seed": cfg.seed, "max_steps": cfg.max_steps, "world_size": env.world_size,
                "amp": bool(cfg.amp), "optim": OmegaConf.to_container(cfg.optim, resolve=True),
                "data": {k: v for k, v in data.items() if k not in DATA_NOT_IN_IDENTITY}}
    if source is not None:
        identity["data"]["source_digest"] = source
    recipe = RecipeConfig.from_cfg(cfg.get("recipe")).identity()
    if recipe is not None:
        identity["recipe"] = recipe
    return identity


def identity_diff(saved: Any, now: dict[str, Any]) -> str:
    """'' when equal, else the differing keys, e.g. ``optim.lr (0.001 in the checkpoint, 0.002 now)``."""
    if not isinstance(saved, dict):
        return "the checkpoint records no settings (written by an older version)"
    a, b = _flat(saved), _flat(now)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def show(k: str) -> str:
        was, now_ = repr(a.get(k)), repr(b.get(k))
        return f"{k} (differs)" if len(was) + len(now_) > 60 else f"{k} ({was} in the checkpoint, {now_} now)"
    return ", ".join(show(k) for k in keys)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@torch.no_grad()
def all_finite(net: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Whether every weight and every floating optimizer state tensor is finite; one host read per device
    holding some (AdamW keeps its step counts on the CPU unless it is fused)."""
    tensors = list(net.parameters()) + [t for st in opt.state.values() for t in st.values()
                                        if isinstance(t, Tensor) and t.is_floating_point()]
    flags: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())
