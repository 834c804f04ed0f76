"""One fixed architecture trained by the shared loop: the task, the initial model (fresh, or a path's weights
inherited from a supernet) and ``train_arch``. Used by retraining (`supernet.retrain`) and by the fidelity
study's stand-alone runs (`search.fidelity`), so neither app imports the other. The supernet model is only
imported for ``init=inherit``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from space.app import check_fits
from space.arch import ArchSpec
from space.cost import params
from space.errors import UserError
from supernet.data import DataBundle
from supernet.engine.compile import compile_cells
from supernet.engine.distributed import DistEnv
from supernet.engine.loop import FitResult, Task, Trainer, top1
from supernet.model.psvit import PSViT


class RetrainTask(Task):
    """One fixed architecture; validated on the held-out training images (and its EMA weights with recipe.ema)."""

    def __init__(self, model: nn.Module, arch: ArchSpec, name: str, cfg: DictConfig, data: DataBundle,
                 env: DistEnv, source_sha256: str | None = None, stale: Path | None = None) -> None:
        self.net, self.name, self.cfg, self.data, self.env = model, f"retrain {name}", cfg, data, env
        self.stale = stale  # a result of the run in run_dir, removed once this run trains a step
        inherit = cfg.init == "inherit"  # the start weights' file: a supernet, or pretrained weights
        self.identity = {"arch": arch.to_dict(), "init": cfg.init,
                         "supernet_sha256": source_sha256 if inherit else None}
        if cfg.init == "pretrained":
            self.identity["pretrained_sha256"] = source_sha256

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.net(x)

    def after_step(self, step: int, log: bool) -> dict[str, float]:
        """The first step trained removes a result file of the run in ``run_dir`` (rank 0): from here on, the
        checkpoint it belonged to is being trained over (a finished run resumed trains no step and keeps it until
        its rerun writes it again)."""
        if self.stale is not None:
            if self.env.is_main:
                self.stale.unlink(missing_ok=True)
            self.stale = None
        return {}

    def validate(self) -> dict[str, float]:
        if self.data.val is None:
            return {}
        res = {"model": top1(self.net, self.data.val, self.env, self.cfg.eval.max_batches, self.cfg.amp)}
        if self.ema is not None:
            res["ema"] = top1(self.ema, self.data.val, self.env, self.cfg.eval.max_batches, self.cfg.amp)
        return res


def initial_model(arch: ArchSpec, cfg: DictConfig, announce: bool = True) -> tuple[nn.Module, str | None]:
    """A fresh ``PSViT(arch)``; with ``init=inherit`` the path ``arch`` extracted from the supernet, with
    ``init=pretrained`` ``PSViT(arch)`` holding the weights of ``cfg.pretrained`` (e.g. DeiT's, through
    supernet/convert.py); and the sha256 of the file the weights came from."""
    need, have = params(arch) * 16, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:  # weights, gradients and two AdamW moments in fp32, before a single activation
        raise UserError(f"arch: {params(arch):,} parameters need {need / 2**30:.1f} GiB for training state alone, "
                        f"more than this machine's {have / 2**30:.1f} GiB (check the stages' dim and tokens)")
    torch.manual_seed(cfg.seed)
    if cfg.init == "scratch":
        return PSViT(arch), None
    if cfg.init == "pretrained":
        from supernet.pretrained import load_pretrained

        model, digest, notes = load_pretrained(Path(cfg.pretrained), arch)
        if notes and announce:
            print(f"pretrained: {cfg.pretrained}: {'; '.join(notes)}")
        return model, digest
    from supernet.engine.checkpoint import load_supernet  # the supernet is imported for init=inherit only

    sck = load_supernet(Path(cfg.supernet), torch.device("cpu"))
    check_same_split(cfg.data, sck.data, Path(cfg.supernet))
    return sck.net.extract(arch), sck.sha256  # extract raises ArchError naming the field if arch is off its paths


def check_same_split(data: Any, supernet_data: dict[str, Any], path: Path) -> None:
    """Inherited weights have seen the supernet's training split: validating them on other held-out images
    would score them on images they trained on. The dataset, ``val_size`` and ``split_seed`` must be the
    supernet's (after the dataset defaults).

    Raises:
        UserError: naming the first field that differs and the value to use.
    """
    from supernet.data import DataConfig

    mine, theirs = DataConfig.from_cfg(data).resolved(), DataConfig.from_cfg(supernet_data).resolved()
    for key in ("name", "val_size", "split_seed"):
        if getattr(mine, key) != getattr(theirs, key):
            raise UserError(f"data.{key}: {getattr(mine, key)!r} but the supernet {path} held out its validation "
                            f"split with {key}={getattr(theirs, key)!r}; init=inherit needs the supernet's split "
                            f"(data.{key}={getattr(theirs, key)}), or its weights are validated on images they "
                            "trained on")


def train_arch(arch: ArchSpec, name: str, cfg: DictConfig, data: DataBundle, env: DistEnv,
               stale: Path | None = None) -> tuple[nn.Module, FitResult]:
    """Train ``arch`` as ``cfg`` says on ``data`` (resuming ``cfg.run_dir``); returns the model, in eval mode,
    and the run's result, whose ``val`` holds the final validation unless the run was stopped or
    ``eval.every`` is 0. ``stale``: a result file of ``run_dir`` to remove as soon as a step is trained."""
    check_fits("arch", arch, data)
    model, source_sha256 = initial_model(arch, cfg, announce=env.is_main)
    task = RetrainTask(model.to(env.device), arch, name, cfg, data, env, source_sha256, stale)
    compile_cells(task.net, cfg.compile, env.device, announce=env.is_main)
    res = Trainer(task, data, cfg, env).fit()
    task.net.eval()
    if not res.stopped and cfg.eval.every and "model" not in res.val:  # rerun after a kill before result.json
        res.val.update(task.validate())
    return task.net, res
