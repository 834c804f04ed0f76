"""Retrain an exported architecture from scratch, the `make retrain ARCH=...` app.

    python -m supernet.retrain arch=runs/supernet_fmnist_2d/search/best_arch.json optim.epochs=30
    python -m supernet.retrain arch=... init=inherit supernet=runs/supernet_fmnist_2d/last.ckpt
    python -m supernet.retrain arch=conf/baselines/deit_tiny.json init=pretrained pretrained=deit_tiny.pth ...
    torchrun --standalone --nproc_per_node=8 -m supernet.retrain arch=conf/baselines/deit_tiny.json \
        data=imagenet_folder data.root=...

The model is ``PSViT.from_json(arch)``: no supernet code (``init=inherit`` alone loads the supernet, to
extract the path's weights). Training uses the shared engine (supernet/engine/: AdamW, warmup + cosine,
AMP on CUDA, DDP, atomic checkpoints, resume, tqdm, TensorBoard). At the end the model is evaluated once
on the dataset's official test split, which neither supernet training nor search ever read, and
``result.json`` is written next to the checkpoint: it names the checkpoint it was measured on and its sha256,
and the whole recipe. A run that trains a step removes the run directory's earlier ``result.json`` first, so a
result never sits next to a checkpoint it was not measured on (:func:`read_result` checks it for a reader).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from space.app import CONF_DIR, check_overrides, atomic_write, run_app
from space.arch import ArchSpec
from space.cost import macs, params
from space.errors import UserError
from space.schema import RETRAIN, check_config
from supernet.data import DataBundle, RecipeConfig, build_data
from supernet.engine.checkpoint import CKPT_NAME
from supernet.engine.distributed import DistEnv, allreduce_sum, distributed
from supernet.engine.loop import FitResult, top1
from supernet.engine.standalone import train_arch


RESULT = "result.json"  # in run_dir, next to the checkpoint it was measured on


def default_run_dir(arch_path: Path) -> Path:
    return arch_path.parent / f"retrain_{arch_path.stem}"


def check_args(cfg: DictConfig) -> ArchSpec:
    """The architecture to retrain, once every setting is valid and ``arch``, ``init``, ``supernet`` and
    ``max_steps`` are consistent."""
    check_config(OmegaConf.to_container(cfg, resolve=True), RETRAIN)
    if not cfg.arch:
        raise UserError("arch: required, an architecture JSON (e.g. arch=runs/.../best_arch.json or "
                        "arch=conf/baselines/deit_fmnist.json)")
    arch = ArchSpec.load(Path(cfg.arch))
    if cfg.init not in ("scratch", "inherit", "pretrained"):
        raise UserError(f"init: {cfg.init!r} (allowed: scratch, inherit, pretrained)")
    if cfg.init == "inherit" and not cfg.supernet:
        raise UserError("supernet: init=inherit needs supernet=path/to/last.ckpt")
    if cfg.init == "pretrained" and not cfg.pretrained:
        raise UserError("pretrained: init=pretrained needs pretrained=FILE (a supernet.convert output or a DeiT "
                        "checkpoint)")
    if cfg.max_steps == 0 and cfg.init == "scratch":
        raise UserError("max_steps: 0 trains nothing (allowed: >= 1; 0 only with init=inherit or init=pretrained, "
                        "to evaluate the weights as they are)")
    return arch


def retrain(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.arch`` as configured by conf/retrain.yaml; returns the result written to result.json
    (empty when stopped by a signal before the end)."""
    arch = check_args(cfg)
    arch_path = Path(cfg.arch)
    with open_dict(cfg):
        cfg.run_dir = str(cfg.run_dir or default_run_dir(arch_path))
    with distributed(cfg.device) as env:
        data = build_data(cfg.data, env.rank, env.world_size, env.device, test=True, recipe=cfg.recipe,
                          label_smoothing=cfg.optim.label_smoothing)
        t0 = time.perf_counter()
        result_path = Path(cfg.run_dir) / RESULT
        model, res = train_arch(arch, arch_path.stem, cfg, data, env, stale=result_path)
        if res.stopped:
            return {}
        test_acc = top1(model, data.test, env, None, cfg.amp)
        result = result_record(arch, arch_path, cfg, res, data, env, test_acc, time.perf_counter() - t0)
        if res.ema is not None:
            result["test_top1_ema"] = top1(res.ema, data.test, env, None, cfg.amp)
            result["val_top1_ema"] = res.val.get("ema")
    if env.is_main:
        ckpt = Path(cfg.run_dir) / CKPT_NAME  # none when max_steps=0 evaluated the initial weights as they are
        result.update(checkpoint=str(ckpt) if ckpt.is_file() else None,
                      checkpoint_sha256=hashlib.sha256(ckpt.read_bytes()).hexdigest() if ckpt.is_file() else None)
        out = atomic_write(result_path, json.dumps(result, indent=2) + "\n")
        print(f"{arch.short()}: test top-1 {test_acc:.4f} ({data.name} official test split), "
              f"{macs(arch) / 1e6:.2f} M MACs, {params(arch) / 1e3:.1f} K params -> {out}")
    return result


def result_record(arch: ArchSpec, arch_path: Path, cfg: DictConfig, res: FitResult, data: DataBundle,
                  env: DistEnv, test_acc: float, seconds: float) -> dict[str, Any]:
    """What result.json holds."""
    return {"arch": str(arch_path), "arch_short": arch.short(), "init": cfg.init, "test_top1": test_acc,
            "val_top1": res.val.get("model"), "params": params(arch), "flops_macs": macs(arch),
            "steps": res.step, "epochs": cfg.optim.epochs if cfg.max_steps is None else None,
            "dataset": data.name, "test_images": int(allreduce_sum([data.test.num_examples], env)[0]),
            "world_size": env.world_size, "train_seconds_this_run": round(seconds, 1), "seed": cfg.seed,
            "recipe": cfg.recipe.name, "recipe_config": asdict(RecipeConfig.from_cfg(cfg.recipe)),
            "total_steps": res.total_steps}


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/result.json`` if it was measured on the checkpoint now in ``run_dir``.

    Raises:
        UserError: there is none, or it belongs to another checkpoint (an earlier run, or one from before results
            named their checkpoint): a stale result is never read as current.
    """
    run_dir = Path(run_dir)
    path, ckpt = run_dir / RESULT, run_dir / CKPT_NAME
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no readable result ({type(e).__name__}); rerun the retraining to write it") from None
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest() if ckpt.is_file() else None
    # None: a max_steps=0 run measured its initial weights and wrote no checkpoint (nor may there be one since)
    if not isinstance(result, dict) or "checkpoint_sha256" not in result or result["checkpoint_sha256"] != digest:
        raise UserError(f"{path}: stale, it was not measured on {ckpt} (an earlier run's, or written before results "
                        "named their checkpoint); rerun the retraining command to measure this checkpoint")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="retrain")
def main(cfg: DictConfig) -> None:
    run_app(lambda: retrain(cfg))


if __name__ == "__main__":
    check_overrides("retrain")
    main()
