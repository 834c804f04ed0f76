"""SPOS supernet training, the `make supernet` app.

One CPU / one GPU:
    python -m supernet.train space=fmnist_2d optim.epochs=10
Many GPUs on one machine (what `make supernet NPROC=8` runs):
    torchrun --standalone --nproc_per_node=8 -m supernet.train space=imagenet_tiny_2d data=imagenet_folder data.root=...
Many machines (run on each node, NODE_RANK = 0..N-1):
    torchrun --nnodes=N --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_HOST:29500 -m supernet.train space=imagenet_tiny_2d ...

Each step trains one path (SPOS: ``sampler=uniform`` or ``flops_bins``) or, with ``sampler=sandwich``, the
largest, the smallest and ``sandwich_n`` random paths with their gradients accumulated (BigNAS), the largest
optionally teaching the others its soft predictions (``distill=inplace``). The paths are drawn from an RNG
seeded by (seed, step) (space/samplers.py): every rank trains the same paths without communicating, and a
resumed run replays exactly the paths of an uninterrupted one.

DDP with a path that changes every step: parameters off the path must neither block the gradient
reduction nor be updated. DDP's reducer needs ``find_unused_parameters=True`` for that, which walks the
autograd graph every step and still reduces (and hands AdamW) zero gradients for off-path weights. Since
all ranks run the same path, the set of parameters that have a gradient is identical on every rank, so
we all-reduce exactly those gradients, coalesced in buckets filled in the order autograd finishes them and
launched during the step's last backward (engine/distributed.py, GradReducer).
Off-path weights keep ``grad is None`` and AdamW skips them. The supernet has LayerNorm only (no
BatchNorm), so inherited-weight evaluation needs no BN recalibration.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from space.app import CONF_DIR, check_fits, check_overrides, config_hash, run_app
from space.arch import ArchSpec
from space.cost import macs
from space.errors import UserError
from space.samplers import make_sampler
from space.schema import SUPERNET, check_config
from space.space import SearchSpace
from supernet.data import DataBundle, build_data
from supernet.engine.compile import check_entangle, compile_cells
from supernet.engine.distributed import DistEnv, distributed
from supernet.engine.loop import FitResult, LossBackward, Task, Trainer, top1
from supernet.model.supernet import Supernet


def tracked_archs(space: SearchSpace, seed: int, n_random: int) -> dict[str, ArchSpec]:
    """Fixed archs validated during training: smallest, largest, and a fixed random set."""
    rng = random.Random(f"psvit-eval:{seed}")
    out = {"min": space.extreme("min"), "max": space.extreme("max")}
    for k in range(n_random):
        out[f"rand{k}"] = space.sample(rng)
    return out


class SupernetTask(Task):
    """Step ``t`` trains the paths ``sampler.paths(t)``, their gradients accumulated into one optimizer step
    (one path for SPOS's samplers; the sandwich rule's largest, smallest and random ones, the largest
    optionally teaching the others); validation runs the tracked paths."""

    name = "supernet"

    def __init__(self, net: Supernet, cfg: DictConfig, data: DataBundle, env: DistEnv) -> None:
        space = net.space
        self.net, self.data, self.env, self.cfg = net, data, env, cfg
        self.sampler = make_sampler(cfg.sampler, space, cfg.seed, cfg.flops_bins, cfg.sandwich_n)
        self.tracked = tracked_archs(space, cfg.seed, cfg.eval.n_random)
        space_cfg = space.to_config()
        self.identity = {"space": space_cfg, "sampler": cfg.sampler}
        if net.entangle != "dense":  # absent for dense, so the checkpoints of runs from before the setting resume
            self.identity["entangle"] = net.entangle
        if cfg.sampler == "flops_bins":
            self.identity["flops_bins"] = cfg.flops_bins
        if cfg.sampler == "sandwich":
            self.identity.update(sandwich_n=cfg.sandwich_n, distill=cfg.distill)
            if cfg.distill == "inplace":
                self.identity["distill_weight"] = cfg.distill_weight
        self.checkpoint_extras = {"space": space_cfg, "space_hash": config_hash(space_cfg)}
        self.paths: list[ArchSpec] = []  # the paths of the step in flight
        self.paths_digest = ""  # hash chain of the trained paths: equal digests = identical path sequences

    def backward(self, x: torch.Tensor, y: torch.Tensor, step: int, loss: LossBackward) -> torch.Tensor:
        """Each path's loss, scaled by 1 / paths so the step's gradient is their mean; with
        ``distill=inplace`` every path after the first (the largest) also fits its soft predictions."""
        self.paths = self.sampler.paths(step)
        losses, teacher = [], None
        for i, path in enumerate(self.paths):
            soft = {} if teacher is None else {"soft": teacher, "soft_weight": self.cfg.distill_weight}
            value, logits = loss(lambda p=path: self.net(x, p), y, scale=1 / len(self.paths),
                                 final=i == len(self.paths) - 1, **soft)
            if self.cfg.distill == "inplace" and teacher is None:
                teacher = logits.float().softmax(-1)
            losses.append(value.float())
        return torch.stack(losses).mean()

    def after_step(self, step: int, log: bool) -> dict[str, float]:
        """Chains the step's paths into the digest; for a logged step, also their mean MACs (counting them
        walks every layer of the path: not worth it for the steps nobody sees)."""
        for path in self.paths:
            self.paths_digest = hashlib.sha256((self.paths_digest + path.to_json()).encode()).hexdigest()
        return {"path_macs": sum(macs(p) for p in self.paths) / len(self.paths)} if log else {}

    def validate(self) -> dict[str, float]:
        if self.data.val is None:
            return {}
        return {name: top1(lambda x, a=a: self.net(x, a), self.data.val, self.env, self.cfg.eval.max_batches,
                           self.cfg.amp) for name, a in self.tracked.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"paths_digest": self.paths_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.paths_digest = state["paths_digest"]


@dataclass
class TrainResult(FitResult):
    paths_digest: str = ""  # running SHA-256 of every path trained since step 0 (resume-invariant)
    model: Supernet | None = None


def train(cfg: DictConfig) -> TrainResult:
    """Train the supernet described by ``cfg`` (conf/supernet.yaml); resumable, DDP-aware."""
    check_config(OmegaConf.to_container(cfg, resolve=True), SUPERNET)
    if cfg.distill != "none" and cfg.sampler != "sandwich":
        raise UserError(f"distill: {cfg.distill} needs sampler=sandwich (the teacher is the largest path, which "
                        "only the sandwich rule trains every step); set sampler=sandwich or distill=none")
    check_entangle(cfg.compile, cfg.entangle)
    if cfg.recipe.ema:
        raise UserError("recipe.ema: the search reads the supernet's trained weights, not an average of them; "
                        "set recipe.ema=false (the EMA is for retraining)")
    with distributed(cfg.device) as env:
        space = SearchSpace.from_config(cfg.space)
        data = build_data(cfg.data, env.rank, env.world_size, env.device, recipe=cfg.recipe,
                          label_smoothing=cfg.optim.label_smoothing)
        check_fits("space", space, data)
        torch.manual_seed(cfg.seed)
        task = SupernetTask(Supernet(space, cfg.entangle).to(env.device), cfg, data, env)
        compile_cells(task.net, cfg.compile, env.device, announce=env.is_main)
        res = Trainer(task, data, cfg, env).fit()
        return TrainResult(**vars(res), paths_digest=task.paths_digest, model=task.net)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="supernet")
def main(cfg: DictConfig) -> None:
    run_app(lambda: train(cfg))


if __name__ == "__main__":
    check_overrides("supernet")
    main()
