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
we all-reduce exactly those gradients, coalesced in buckets, after backward
(engine/distributed.py, allreduce_gradients).
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

from space.app import CONF_DIR, check_overrides, check_fits, run_app
from space.arch import ArchSpec
from space.cost import macs
from space.samplers import make_sampler
from space.schema import SUPERNET, check_config
from space.space import SearchSpace
from supernet.data import DataBundle, build_data
from supernet.engine.checkpoint import config_hash
from supernet.engine.distributed import DistEnv, distributed
from supernet.engine.loop import FitResult, Task, Trainer, top1
from supernet.model.supernet import Supernet


def tracked_archs(space: SearchSpace, seed: int, n_random: int) -> dict[str, ArchSpec]:
    """Fixed archs validated during training: smallest, largest, and a fixed random set."""
    rng = random.Random(f"psvit-eval:{seed}")
    out = {"min": space.extreme("min"), "max": space.extreme("max")}
    for k in range(n_random):
        out[f"rand{k}"] = space.sample(rng)
    return out


class SupernetTask(Task):
    """SPOS: step ``t`` trains the path ``sampler(t)``; validation runs the tracked paths."""

    name = "supernet"

    def __init__(self, net: Supernet, cfg: DictConfig, data: DataBundle, env: DistEnv) -> None:
        space = net.space
        self.net, self.data, self.env, self.cfg = net, data, env, cfg
        self.sampler = make_sampler(cfg.sampler, space, cfg.seed, cfg.flops_bins)
        self.tracked = tracked_archs(space, cfg.seed, cfg.eval.n_random)
        space_cfg = space.to_config()
        self.identity = {"space": space_cfg, "sampler": cfg.sampler}
        if cfg.sampler == "flops_bins":
            self.identity["flops_bins"] = cfg.flops_bins
        self.checkpoint_extras = {"space": space_cfg, "space_hash": config_hash(space_cfg)}
        self.path: ArchSpec | None = None  # the path of the step in flight
        self.paths_digest = ""  # hash chain of the trained paths: equal digests = identical path sequences

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        self.path = self.sampler(step)
        return self.net(x, self.path)

    def after_step(self, step: int) -> dict[str, float]:
        self.paths_digest = hashlib.sha256((self.paths_digest + self.path.to_json()).encode()).hexdigest()
        return {"path_macs": macs(self.path)}

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
    with distributed(cfg.device) as env:
        space = SearchSpace.from_config(cfg.space)
        data = build_data(cfg.data, env.rank, env.world_size, env.device)
        check_fits("space", space, data)
        torch.manual_seed(cfg.seed)
        task = SupernetTask(Supernet(space).to(env.device), cfg, data, env)
        res = Trainer(task, data, cfg, env).fit()
        return TrainResult(**vars(res), paths_digest=task.paths_digest, model=task.net)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="supernet")
def main(cfg: DictConfig) -> None:
    run_app(lambda: train(cfg))


if __name__ == "__main__":
    check_overrides("supernet")
    main()
