"""SPOS supernet training, the `make supernet` app.

One CPU / one GPU:
    python -m supernet.train space=fmnist_2d optim.epochs=10
Many GPUs on one machine (what `make supernet NPROC=8` runs):
    torchrun --standalone --nproc_per_node=8 -m supernet.train space=imagenet_tiny_2d data=imagenet_folder data.root=...
Many machines (run on each node, NODE_RANK = 0..N-1):
    torchrun --nnodes=N --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_HOST:29500 -m supernet.train space=imagenet_tiny_2d ...

Each step trains one path, drawn from an RNG seeded by (seed, step) (space/samplers.py): every rank trains
the same path without communicating, and a resumed run replays exactly the paths of an uninterrupted one.

DDP with a path that changes every step: parameters off the path must neither block the gradient
reduction nor be updated. DDP's reducer needs ``find_unused_parameters=True`` for that, which walks the
autograd graph every step and still reduces (and hands AdamW) zero gradients for off-path weights. Since
all ranks run the same path, the set of parameters that have a gradient is identical on every rank, so
we all-reduce exactly those gradients, coalesced in buckets, after backward (runtime.allreduce_gradients).
Off-path weights keep ``grad is None`` and AdamW skips them. The supernet has LayerNorm only (no
BatchNorm), so inherited-weight evaluation needs no BN recalibration.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from space.arch import ArchError, ArchSpec
from space.cost import macs
from space.samplers import make_sampler
from space.space import SearchSpace, SpaceError
from supernet.data import DataBundle, DataError, build_data
from supernet.runtime import (DistEnv, StopFlag, UserError, allreduce_gradients, allreduce_sum, atomic_save,
                              autocast, broadcast_parameters, config_hash, load_checkpoint, run_app,
                              setup_distributed)
from supernet.supernet import Supernet

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CKPT = "last.ckpt"
USER_ERRORS = (UserError, DataError, SpaceError, ArchError)


class NonFiniteLoss(RuntimeError):
    pass


def check_data_fits(space: SearchSpace, data: DataBundle) -> None:
    for k in ("img_size", "in_chans", "num_classes"):
        if getattr(space, k) != getattr(data, k):
            raise UserError(f"space.{k}: {getattr(space, k)} but dataset {data.name} has {getattr(data, k)} "
                            f"(pick a space preset made for it, e.g. space=fmnist_2d for fashion_mnist)")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embedding and CLS token (DeiT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Any:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def evaluate_path(forward: Any, loader: Any, env: DistEnv, max_batches: int | None = None,
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


def eval_archs(space: SearchSpace, seed: int, n_random: int) -> dict[str, ArchSpec]:
    """Fixed archs tracked during training: smallest, largest, and a fixed random set."""
    import random

    rng = random.Random(f"psvit-eval:{seed}")
    out = {"min": space.extreme("min"), "max": space.extreme("max")}
    for k in range(n_random):
        out[f"rand{k}"] = space.sample(rng)
    return out


@dataclass
class TrainResult:
    step: int
    total_steps: int
    loss: float | None
    val: dict[str, float]
    run_dir: Path
    stopped: bool  # by SIGTERM/SIGINT before the end
    losses: list[float]  # mean loss over ranks of every step this call ran
    paths_digest: str  # running SHA-256 of every path trained since step 0 (resume-invariant)
    model: Supernet


def train(cfg: DictConfig) -> TrainResult:
    """Train the supernet described by ``cfg`` (conf/supernet.yaml); resumable, DDP-aware."""
    env = setup_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    space = SearchSpace.from_config(cfg.space)
    space_cfg = space.to_config()
    space_hash = config_hash(space_cfg)
    data = build_data(cfg.data, env.rank, env.world_size, env.device)
    check_data_fits(space, data)
    o = cfg.optim
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} x {env.world_size} ranks exceeds the training "
                        "split; lower it")
    total = o.epochs * steps_per_epoch if cfg.max_steps is None else int(cfg.max_steps)

    torch.manual_seed(cfg.seed)
    net = Supernet(space).to(env.device)
    global_batch = cfg.data.batch_size * env.world_size
    opt = torch.optim.AdamW(param_groups(net, o.weight_decay), lr=o.lr * global_batch / 256,
                            betas=tuple(o.betas), fused=env.device.type == "cuda" or None)
    warmup = int(o.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, o.min_lr / o.lr))
    sampler = make_sampler(cfg.sampler, space, cfg.seed, cfg.flops_bins)

    step = 0
    digest = ""  # hash chain of the sampled paths: equal digests = identical path sequences
    ckpt_path = run_dir / CKPT
    if cfg.resume == "auto" and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("space_hash") != space_hash:
            raise UserError(f"resume: {ckpt_path} was trained on space {ck.get('space', {}).get('name')!r} "
                            f"(hash {ck.get('space_hash')}), not this space config ({space.name!r}, hash "
                            f"{space_hash}); use another run_dir= or resume=never")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        digest = ck["paths_digest"]
        torch.set_rng_state(ck["rng_cpu"])
        if env.is_main:
            print(f"resumed from {ckpt_path} at step {step}/{total}")
    elif cfg.resume not in ("auto", "never"):
        raise UserError(f"resume: {cfg.resume!r} (allowed: auto, never)")
    broadcast_parameters(net, env)

    def save() -> None:
        if env.is_main:
            atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step, "total_steps": total, "rng_cpu": torch.get_rng_state(),
                         "paths_digest": digest,
                         "space": space_cfg, "space_hash": space_hash,
                         "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_path)

    tracked = eval_archs(space, cfg.seed, cfg.eval.n_random)
    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step)

    def validate() -> dict[str, float]:
        if data.val is None:
            return {}
        net.eval()
        res = {name: evaluate_path(lambda x, a=a: net(x, a), data.val, env, cfg.eval.max_batches, cfg.amp)
               for name, a in tracked.items()}
        net.train()
        if writer is not None:
            for name, acc in res.items():
                writer.add_scalar(f"val/acc_{name}", acc, step)
            tqdm.write(f"step {step}: val top-1 " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    net.train()
    loss_val: float | None = None
    losses: list[float] = []
    val: dict[str, float] = {}
    bar = tqdm(total=total, initial=step, disable=not env.is_main or not cfg.progress, desc="supernet",
               dynamic_ncols=True)
    stopped = False
    t_last, seen = time.perf_counter(), 0
    with StopFlag() as stop:
        while step < total and not stopped:
            epoch, first = divmod(step, steps_per_epoch)
            for x, y in data.train.epoch(epoch, start=first):
                arch = sampler(step)
                with autocast(env.device, cfg.amp):
                    loss = F.cross_entropy(net(x, arch), y, label_smoothing=o.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # one collective agrees on the mean loss and on stopping (a signal may reach ranks a step apart)
                loss_sum, stop_votes = allreduce_sum([loss.item(), float(stop.requested)], env)
                loss_val = loss_sum / env.world_size
                losses.append(loss_val)
                if not math.isfinite(loss_val):
                    raise NonFiniteLoss(f"optim: non-finite loss {loss_val} at step {step} on path {arch.short()}; "
                                        f"the last good checkpoint {ckpt_path} is kept; lower optim.lr or "
                                        f"optim.grad_clip and rerun to resume")
                allreduce_gradients(net.parameters(), env)
                if o.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], o.grad_clip)
                opt.step()
                sched.step()
                digest = hashlib.sha256((digest + arch.to_json()).encode()).hexdigest()
                step += 1
                seen += x.shape[0] * env.world_size
                bar.update(1)
                if writer is not None and (step % cfg.log_every == 0 or step == total):
                    now = time.perf_counter()
                    ips = seen / (now - t_last)
                    t_last, seen = now, 0
                    lr = opt.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                    writer.add_scalar("train/loss", loss_val, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/img_per_s", ips, step)
                    writer.add_scalar("train/path_macs", macs(arch), step)
                if stop_votes > 0:
                    stopped = True
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
    return TrainResult(step, total, loss_val, val, run_dir, stopped, losses, digest, net)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="supernet")
def main(cfg: DictConfig) -> None:
    def body() -> None:
        try:
            train(cfg)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    run_app(body, USER_ERRORS)


if __name__ == "__main__":
    main()
