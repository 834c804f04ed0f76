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
import random
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from space.arch import ArchError, ArchSpec
from space.cost import macs
from space.samplers import make_sampler
from space.space import SearchSpace, SpaceError
from supernet.data import DataBundle, DataError, build_data
from supernet.loop import FitResult, Task, evaluate, fit
from supernet.runtime import UserError, config_hash, run_app, setup_distributed
from supernet.supernet import Supernet

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERRORS = (UserError, DataError, SpaceError, ArchError)


def check_data_fits(what: str, obj: object, data: DataBundle) -> None:
    """The space (or arch) must take the dataset's images and predict its classes."""
    for k in ("img_size", "in_chans", "num_classes"):
        if getattr(obj, k) != getattr(data, k):
            raise UserError(f"{what}.{k}: {getattr(obj, k)} but dataset {data.name} has {getattr(data, k)} "
                            f"(use a {what} built for {data.name} input and classes, or another data=)")


def eval_archs(space: SearchSpace, seed: int, n_random: int) -> dict[str, ArchSpec]:
    """Fixed archs tracked during training: smallest, largest, and a fixed random set."""
    rng = random.Random(f"psvit-eval:{seed}")
    out = {"min": space.extreme("min"), "max": space.extreme("max")}
    for k in range(n_random):
        out[f"rand{k}"] = space.sample(rng)
    return out


@dataclass
class TrainResult(FitResult):
    paths_digest: str = ""  # running SHA-256 of every path trained since step 0 (resume-invariant)
    model: Supernet | None = None


def train(cfg: DictConfig) -> TrainResult:
    """Train the supernet described by ``cfg`` (conf/supernet.yaml); resumable, DDP-aware."""
    env = setup_distributed(cfg.device)
    space = SearchSpace.from_config(cfg.space)
    data = build_data(cfg.data, env.rank, env.world_size, env.device)
    check_data_fits("space", space, data)
    torch.manual_seed(cfg.seed)
    net = Supernet(space).to(env.device)
    sampler = make_sampler(cfg.sampler, space, cfg.seed, cfg.flops_bins)
    tracked = eval_archs(space, cfg.seed, cfg.eval.n_random)
    state = {"paths_digest": ""}  # hash chain of the sampled paths: equal digests = identical path sequences
    current: dict[str, ArchSpec] = {}  # the path of the step in flight

    def forward(x: torch.Tensor, step: int) -> torch.Tensor:
        current["arch"] = sampler(step)
        return net(x, current["arch"])

    def on_step(step: int) -> None:
        state["paths_digest"] = hashlib.sha256((state["paths_digest"] + current["arch"].to_json()).encode()).hexdigest()

    def validate() -> dict[str, float]:
        if data.val is None:
            return {}
        return {name: evaluate(lambda x, a=a: net(x, a), data.val, env, cfg.eval.max_batches, cfg.amp)
                for name, a in tracked.items()}

    space_cfg = space.to_config()
    task = Task(name="supernet", net=net, forward=forward, validate=validate,
                identity={"space": space_cfg, "space_hash": config_hash(space_cfg)},
                identity_hint=f"search space (this config: {space.name!r}, hash {config_hash(space_cfg)})",
                step_info=lambda step: {"path_macs": macs(current["arch"])}, state=state, on_step=on_step)
    res = fit(task, data, cfg, env)
    return TrainResult(**vars(res), paths_digest=state["paths_digest"], model=net)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="supernet")
def main(cfg: DictConfig) -> None:
    run_app(lambda: train(cfg), USER_ERRORS)


if __name__ == "__main__":
    main()
