"""Typed, ranged config schemas of the apps, checked before any work: every bad value is one line
``<key>: <value> is not allowed (<what is>)`` (a :class:`UserError`, exit 2), so no app starts a run, loads
a checkpoint or writes a file on a value that makes no sense. Keys Hydra does not know are refused by Hydra's
composition, which :func:`space.app.hydra_app` reports the same way. The ``data`` and ``space`` groups are
checked by their own builders (``DataConfig``, ``SearchSpace.from_config``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from space.errors import UserError


@dataclass(frozen=True)
class Key:
    """What one config key accepts."""

    kind: str  # "int", "float", "bool", "str", "betas", "switch" (true, false or auto)
    low: float | None = None  # inclusive lower bound
    positive: bool = False  # strictly above zero
    high: float | None = None  # exclusive upper bound
    most: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def problem(self, v: Any) -> str | None:
        """None if ``v`` is allowed, else what is allowed."""
        if v is None:
            return None if self.nullable else self.allowed()
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "bool": isinstance(v, bool),
              "switch": isinstance(v, bool) or v == "auto",
              "str": isinstance(v, str) and v != "" and "\0" not in v,  # a NUL byte ends a path in the OS
              "betas": _betas(v)}[self.kind]
        if ok and self.choices and v not in self.choices:
            ok = False
        if ok and self.kind in ("int", "float"):
            ok = ((self.low is None or v >= self.low) and (self.high is None or v < self.high)
                  and (self.most is None or v <= self.most) and (not self.positive or v > 0))
        return None if ok else self.allowed()

    def allowed(self) -> str:
        if self.choices:
            text = ", ".join(self.choices)
        elif self.kind == "betas":
            text = "two numbers in [0, 1), e.g. [0.9, 0.999]"
        elif self.kind == "str":
            text = "a non-empty string without NUL characters"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "switch":
            text = "auto, true or false"
        elif self.low is not None and self.most is not None:
            text = f"{'an integer' if self.kind == 'int' else 'a number'} in [{self.low:g}, {self.most:g}]"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = ["> 0" if self.positive else "", f">= {self.low:g}" if self.low is not None else "",
                      f"< {self.high:g}" if self.high is not None else "",
                      f"<= {self.most:g}" if self.most is not None else ""]
            text = " ".join([noun] + [b for b in bounds if b])
        return text + (", or null" if self.nullable else "")


def _betas(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v))


RUN = {
    "resume": Key("str", choices=("auto", "never")),
    "resume_lr": Key("float", positive=True, nullable=True),
    "seed": Key("int", low=0),
    "device": Key("str", choices=("auto", "cpu", "cuda")),
    "amp": Key("bool"),
    "compile": Key("switch"),
    "ckpt_every": Key("int", low=1),
    "ckpt_minutes": Key("float", positive=True, nullable=True),
    "log_every": Key("int", low=1),
    "progress": Key("bool"),
    "optim.epochs": Key("int", low=1),
    "optim.lr": Key("float", positive=True),
    "optim.min_lr": Key("float", low=0),
    "optim.warmup_epochs": Key("float", low=0),
    "optim.weight_decay": Key("float", low=0),
    "optim.betas": Key("betas"),
    "optim.label_smoothing": Key("float", low=0, high=1),
    "optim.grad_clip": Key("float", low=0),
    "eval.every": Key("int", low=0),
    "eval.max_batches": Key("int", low=1, nullable=True),
    "recipe.name": Key("str"),
    "recipe.rand_augment": Key("str", nullable=True),
    "recipe.interpolation": Key("str", choices=("bilinear", "bicubic")),
    "recipe.reprob": Key("float", low=0, most=1),
    "recipe.mixup": Key("float", low=0),
    "recipe.cutmix": Key("float", low=0),
    "recipe.mix_switch_prob": Key("float", low=0, most=1),
    "recipe.repeated_aug": Key("int", low=1),
    "recipe.ema": Key("bool"),
    "recipe.ema_decay": Key("float", low=0, high=1),
}
SUPERNET = {**RUN, "run_dir": Key("str"), "max_steps": Key("int", low=1, nullable=True),
            "keep_every": Key("int", low=0),
            "sampler": Key("str", choices=("uniform", "flops_bins", "sandwich")), "flops_bins": Key("int", low=1),
            "sandwich_n": Key("int", low=0), "distill": Key("str", choices=("none", "inplace")),
            "distill_weight": Key("float", low=0, most=1), "entangle": Key("str", choices=("dense", "slice")),
            "eval.n_random": Key("int", low=0)}
# arch= and checkpoint= are nullable here: the apps explain what to pass when they are missing.
RETRAIN = {**RUN, "arch": Key("str", nullable=True), "run_dir": Key("str", nullable=True),
           "init": Key("str", choices=("scratch", "inherit", "pretrained")), "supernet": Key("str", nullable=True),
           "pretrained": Key("str", nullable=True),
           "max_steps": Key("int", low=0, nullable=True)}
EVOLVE = {"checkpoint": Key("str", nullable=True), "run_dir": Key("str", nullable=True), "resume": RUN["resume"],
          "strategy": Key("str", choices=("evolution", "random")), "seed": RUN["seed"],
          "flops_min": Key("float", low=0, nullable=True), "flops_max": Key("float", low=0, nullable=True),
          "params_max": Key("float", low=0, nullable=True), "latency_table": Key("str", nullable=True),
          "latency_max": Key("float", low=0, nullable=True), "latency_other_machine": Key("bool"),
          "latency_threads": Key("int", low=1, nullable=True), "latency_batch": Key("int", low=1, nullable=True),
          "eval_images": Key("int", low=1), "finalists": Key("int", low=0), "bootstrap": Key("int", low=100),
          "eval_batch_size": Key("int", low=1), "data_root": Key("str", nullable=True), "device": RUN["device"],
          "amp": RUN["amp"], "compile": RUN["compile"], "progress": RUN["progress"], "show_top": Key("int", low=0)}

FIDELITY = {"checkpoint": EVOLVE["checkpoint"], "run_dir": Key("str", nullable=True),
            "standalone_dir": Key("str", nullable=True), "seed": RUN["seed"], "archs": Key("int", low=3),
            "band_archs": Key("int", low=3), "seeds": Key("int", low=0), "topk": Key("int", low=1),
            "eval_images": Key("int", low=1),
            "bootstrap": Key("int", low=100), "eval_batch_size": Key("int", low=1),
            "data_root": Key("str", nullable=True), "device": RUN["device"], "amp": RUN["amp"],
            "compile": RUN["compile"], "progress": RUN["progress"],
            "standalone.max_steps": Key("int", low=1, nullable=True), "standalone.ckpt_every": RUN["ckpt_every"],
            **{f"standalone.{k}": v for k, v in RUN.items() if k.startswith("optim.")},
            # null: the supernet's recipe (recipe@standalone.recipe=NAME selects one, then its keys are checked)
            **{f"standalone.{k}": replace(v, nullable=True) for k, v in RUN.items() if k.startswith("recipe.")}}

LATENCY = {"out": Key("str", nullable=True), "device": Key("str", choices=("cpu", "cuda")),
           "threads": Key("int", low=1), "batch": Key("int", low=1), "amp": Key("bool"), "warmup": Key("int", low=0),
           "repeats": Key("int", low=1), "rounds": Key("int", low=1), "calibrate": Key("int", low=0),
           "archs": Key("int", low=0), "seed": Key("int"), "progress": Key("bool")}

CONVERT = {"checkpoint": Key("str", nullable=True), "arch": Key("str", nullable=True), "out": Key("str", nullable=True),
           "num_heads": Key("int", low=1, nullable=True), "weights": Key("str", choices=("model", "ema"))}
PREPARE = {"src": Key("str", nullable=True), "out": Key("str", nullable=True), "img_size": Key("int", low=1),
           "short_side": Key("int", low=1, nullable=True), "interpolation": RUN["recipe.interpolation"],
           "val_size": Key("int", low=0), "split_seed": Key("int", low=0),
           "shards": Key("int", low=1), "workers": Key("int", low=0, nullable=True), "progress": RUN["progress"]}

EXPORT = {"arch": Key("str", nullable=True), "checkpoint": Key("str", nullable=True),
          "weights": Key("str", choices=("model", "ema")),
          "format": Key("str", choices=("onnx", "torchscript", "pt2")), "out": Key("str", nullable=True),
          "batch": Key("int", low=1, nullable=True), "atol": Key("float", low=0), "seed": RUN["seed"]}


def check_config(cfg: Mapping[str, Any], schema: Mapping[str, Key]) -> None:
    """Raise a one-line :class:`UserError` for the first key of ``schema`` whose value ``cfg`` gets wrong."""
    for dotted, key in schema.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        allowed = key.problem(node)
        if allowed is not None:
            hint = " (required)" if node is None and not key.nullable else ""
            raise UserError(f"{dotted}: {node!r} is not allowed{hint} (allowed: {allowed})")
