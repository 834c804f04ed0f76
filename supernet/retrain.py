"""Retrain an exported architecture from scratch, the `make retrain ARCH=...` app.

    python -m supernet.retrain arch=runs/supernet_fmnist_2d/search/best_arch.json optim.epochs=30
    python -m supernet.retrain arch=... init=inherit supernet=runs/supernet_fmnist_2d/last.ckpt
    torchrun --standalone --nproc_per_node=8 -m supernet.retrain arch=conf/baselines/deit_tiny.json \
        data=imagenet_folder data.root=...

The model is ``PSViT.from_json(arch)``: no supernet code. Training uses the supernet's loop
(supernet/loop.py: AdamW, warmup + cosine, AMP on CUDA, DDP, atomic checkpoints, resume, tqdm,
TensorBoard). At the end the model is evaluated once on the dataset's official test split, which neither
supernet training nor search ever read, and ``result.json`` is written next to the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, open_dict

from space.arch import ArchError, ArchSpec
from space.cost import macs, params
from space.space import SpaceError
from supernet.data import DataError, build_data
from supernet.loop import Task, evaluate, fit
from supernet.model import PSViT
from supernet.runtime import UserError, allreduce_sum, run_app, setup_distributed
from supernet.supernet import load_supernet
from supernet.train import check_data_fits

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERRORS = (UserError, DataError, SpaceError, ArchError)


def default_run_dir(arch_path: Path) -> Path:
    return arch_path.parent / f"retrain_{arch_path.stem}"


def retrain(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.arch`` as configured by conf/retrain.yaml; returns the result written to result.json
    (empty when stopped by a signal before the end)."""
    if not cfg.arch:
        raise UserError("arch: required, an architecture JSON (e.g. arch=runs/.../best_arch.json or "
                        "arch=conf/baselines/deit_fmnist.json)")
    arch_path = Path(cfg.arch)
    arch = ArchSpec.load(arch_path)
    if cfg.init not in ("scratch", "inherit"):
        raise UserError(f"init: {cfg.init!r} (allowed: scratch, inherit)")
    if cfg.init == "inherit" and not cfg.supernet:
        raise UserError("supernet: init=inherit needs supernet=path/to/last.ckpt")
    with open_dict(cfg):
        cfg.run_dir = str(cfg.run_dir or default_run_dir(arch_path))
    env = setup_distributed(cfg.device)
    data = build_data(cfg.data, env.rank, env.world_size, env.device)
    check_data_fits("arch", arch, data)

    torch.manual_seed(cfg.seed)
    if cfg.init == "inherit":
        supernet, _ = load_supernet(Path(cfg.supernet), torch.device("cpu"))
        model = supernet.extract(arch)  # raises ArchError naming the field if arch is not a path of it
        del supernet
    else:
        model = PSViT(arch)
    model = model.to(env.device)

    def validate() -> dict[str, float]:
        if data.val is None:
            return {}
        return {"model": evaluate(model, data.val, env, cfg.eval.max_batches, cfg.amp)}

    task = Task(name=f"retrain {arch_path.stem}", net=model, forward=lambda x, step: model(x), validate=validate,
                identity={"arch": arch.to_dict(), "init": cfg.init}, identity_hint="architecture or init")
    t0 = time.perf_counter()
    res = fit(task, data, cfg, env)
    if res.stopped:
        return {}
    model.eval()
    test_acc = evaluate(model, data.test, env, None, cfg.amp)
    result = {"arch": str(arch_path), "arch_short": arch.short(), "init": cfg.init, "test_top1": test_acc,
              "val_top1": res.val.get("model"), "params": params(arch), "flops_macs": macs(arch),
              "steps": res.step, "epochs": cfg.optim.epochs if cfg.max_steps is None else None,
              "dataset": data.name, "test_images": int(allreduce_sum([data.test.num_examples], env)[0]),
              "world_size": env.world_size, "train_seconds_this_run": round(time.perf_counter() - t0, 1),
              "seed": cfg.seed}
    if env.is_main:
        out = Path(cfg.run_dir) / "result.json"
        tmp = out.with_name(f".result.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"{arch.short()}: test top-1 {test_acc:.4f} ({data.name} official test split), "
              f"{macs(arch) / 1e6:.2f} M MACs, {params(arch) / 1e3:.1f} K params -> {out}")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="retrain")
def main(cfg: DictConfig) -> None:
    run_app(lambda: retrain(cfg), USER_ERRORS)


if __name__ == "__main__":
    main()
