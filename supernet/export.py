"""`python -m supernet.export`: a found architecture as one file that runs without this project, checked before
it is kept.

    python -m supernet.export arch=runs/supernet_fmnist_2d/search/best_arch.json \
        checkpoint=runs/supernet_fmnist_2d/search/retrain_best_arch/last.ckpt            # -> .../best_arch.onnx
    python -m supernet.export arch=conf/baselines/deit_tiny.json format=torchscript batch=1  # fresh weights

Weights: none (a fresh ``PSViT(arch)``, for latency work), a retraining run's ``last.ckpt`` (trained for this
very arch; ``weights=ema`` takes its moving average, kept with ``recipe.ema=true``), or a supernet's ``last.ckpt``
(the path ``arch`` is extracted, as the search scored it). The report line names the weights it exported and the
step of the checkpoint out of its run's total; a checkpoint of an unfinished run is exported with a warning. The file
(supernet/deploy.py) is written to a scratch directory, run in its own runtime (onnxruntime, torch.jit.load,
torch.export.load) on random images and compared with the PyTorch model; only a file whose logits are finite and
within ``atol`` is copied to ``out`` (atomically), otherwise the app says by how much it missed and exits 1 with
nothing written. User errors print one ``error: ...`` line on stderr, exit with status 2 and write nothing (see
conf/export.yaml).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from space.app import CONF_DIR, atomic_write, check_overrides, run_app
from space.arch import ArchSpec
from space.errors import UserError
from space.schema import EXPORT, check_config
from supernet.deploy import FORMATS, Format, Verification, check_packages, verify, write
from supernet.engine.checkpoint import SUPERNET_KEYS, load_supernet, read_checkpoint
from supernet.model.psvit import PSViT


def describe(arch: ArchSpec) -> str:
    """How the app names an architecture: pooling and stages, e.g. ``2d 49x16[BS] 16x32[BB]``."""
    return f"{arch.pooling} {arch.short()}"


EXAMPLE_BATCH, CHECK_BATCHES = 2, (1, 3)  # a dynamic-batch file is traced at one batch and checked at two others


@dataclass(frozen=True)
class Exported:
    """What one export did: the report line's facts."""

    out: Path
    fmt: Format
    arch: ArchSpec
    weights: str  # which weights, from where
    batches: tuple[int, ...]  # the batch sizes the file was checked at
    check: Verification
    atol: float
    size: int | None  # bytes written; None when the check failed and nothing was kept
    warning: str | None = None  # e.g. a checkpoint of an unfinished run

    @property
    def ok(self) -> bool:
        return self.size is not None

    def line(self) -> str:
        """The report: the file, its size, the weights and the largest difference to PyTorch."""
        batches = ", ".join(map(str, self.batches))
        diff = f"max |difference| {self.check.max_diff:.2g} {'<=' if self.ok else 'vs'} atol {self.atol:g}"
        if not self.ok:
            why = self.check.problem or "the logits differ"
            return (f"{self.out}: {self.fmt.title} failed the check, {why} ({self.fmt.runtime} vs PyTorch on random "
                    f"images, batch {batches}: {diff}); nothing was written")
        return (f"{self.out}: {self.fmt.title}, {self.size / 1e6:.2f} MB, {describe(self.arch)}, {self.weights}; "
                f"{self.fmt.runtime} vs PyTorch on random images (batch {batches}): {diff}")


def output_path(cfg: Mapping[str, Any], arch_path: Path, fmt: Format) -> Path:
    """``cfg.out``, or the default name (see conf/export.yaml); refuses a directory, an input file and another
    format's extension."""
    ckpt = Path(cfg["checkpoint"]) if cfg["checkpoint"] else None
    if cfg["out"]:
        out = Path(cfg["out"])
    elif ckpt is not None:
        out = ckpt.parent / f"{arch_path.stem}{fmt.suffix}"
    else:
        out = arch_path.parent / f"{arch_path.stem}_untrained{fmt.suffix}"
    if out.is_dir():
        raise UserError(f"out: {out} is a directory (give a file name, e.g. out={out / (arch_path.stem + fmt.suffix)})")
    for what, src in (("arch", arch_path), ("checkpoint", ckpt)):
        if src is not None and out.exists() and src.exists() and out.resolve() == src.resolve():
            raise UserError(f"out: {out} is the {what} file itself (write the {fmt.name} file to another name)")
    other = [f.name for f in FORMATS.values() if f.suffix == out.suffix and f is not fmt]
    if other:
        raise UserError(f"out: {out} has the extension of format={other[0]}, not format={fmt.name} "
                        f"(name it {out.with_suffix(fmt.suffix).name} or pass format={other[0]})")
    return out


@dataclass(frozen=True)
class Weights:
    """The model to export and what the report says about its weights."""

    model: PSViT  # in eval mode
    source: str  # which weights, from where, e.g. "EMA weights of retraining checkpoint X (step 5/5)"
    warning: str | None = None  # a checkpoint of an unfinished run


def _steps(ck: dict[str, Any]) -> tuple[str, str | None]:
    """``"step 5/10"`` of a training checkpoint, and a warning when its run had not finished."""
    step, total = ck.get("step"), ck.get("total_steps")
    if not isinstance(step, int) or not isinstance(total, int):
        return f"step {step}", None
    if step >= total:
        return f"step {step}/{total}", None
    return f"step {step}/{total}", f"the run had not finished: its checkpoint is at step {step} of {total}"


def load_weights(arch: ArchSpec, checkpoint: str | None, seed: int, which: str = "model") -> Weights:
    """``PSViT(arch)`` in eval mode with the weights ``checkpoint`` holds for it (fresh ones from ``seed`` when
    None); ``which="ema"`` takes a retraining checkpoint's moving average of the weights.

    Raises:
        UserError: the checkpoint is missing, unreadable, of another kind, does not hold this arch, or holds no
            EMA when ``which="ema"``.
    """
    if not checkpoint:
        if which == "ema":
            raise UserError("weights: ema needs checkpoint= a retraining checkpoint trained with recipe.ema=true "
                            "(fresh weights have no average; use weights=model)")
        torch.manual_seed(seed)
        return Weights(PSViT(arch).eval(), f"fresh weights (seed {seed})")
    path = Path(checkpoint)
    ck = read_checkpoint(path)[0]
    if isinstance(ck, dict) and SUPERNET_KEYS <= set(ck):
        del ck  # load_supernet reads the file again; one copy in memory at a time
        return _from_supernet(arch, path, which)
    identity = ck.get("identity") if isinstance(ck, dict) else None
    if not isinstance(identity, dict) or "arch" not in identity or not isinstance(ck.get("model"), dict):
        raise UserError(f"checkpoint: {path} is neither a retraining checkpoint (`make retrain`'s last.ckpt) nor "
                        "a supernet checkpoint (`make supernet`'s last.ckpt) (pass one of those, or no checkpoint "
                        "for fresh weights)")
    try:
        trained = ArchSpec.from_dict(identity["arch"])
    except UserError:
        trained = None
    if trained != arch:
        which_arch = describe(trained) if trained is not None else "an unreadable architecture"
        raise UserError(f"checkpoint: {path} was trained for {which_arch}, not arch {describe(arch)} (pass arch= the "
                        "architecture JSON that run retrained)")
    state, kind = ck["model"], "trained weights (not the EMA)" if isinstance(ck.get("ema"), dict) else "weights"
    if which == "ema":
        if not isinstance(ck.get("ema"), dict):
            raise UserError(f"weights: ema but {path} holds no moving average of the weights (retrained without "
                            "recipe.ema=true); use weights=model")
        state, kind = ck["ema"], "EMA weights"
    model = PSViT(arch)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint: {path} holds weights that do not fit arch {describe(arch)} "
                        f"({str(e).splitlines()[0][:200]})") from None
    steps, warning = _steps(ck)
    return Weights(model.eval(), f"{kind} of retraining checkpoint {path} ({steps})", warning)


def _from_supernet(arch: ArchSpec, path: Path, which: str) -> Weights:
    if which == "ema":
        raise UserError(f"weights: ema but {path} is a supernet checkpoint, which keeps no moving average (the "
                        "search scores its trained weights); use weights=model")
    sck = load_supernet(path, torch.device("cpu"))
    try:
        model = sck.net.extract(arch)
    except UserError as e:
        raise UserError(f"checkpoint: {path} is a supernet of space {sck.net.space.name!r}, and arch {describe(arch)} "
                        f"is not one of its paths ({e})") from None
    steps, warning = _steps({"step": sck.step, "total_steps": sck.total_steps})
    return Weights(model.eval(), f"weights of supernet {path} ({steps}, path extracted)", warning)


def random_images(arch: ArchSpec, batches: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Standard-normal images (B, in_chans, img, img) for each batch size, as the normalized inputs look."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, arch.in_chans, arch.img_size, arch.img_size, generator=g) for b in batches]


def export(cfg: DictConfig | Mapping[str, Any]) -> Exported:
    """Write ``cfg.arch`` as ``cfg.format`` with the weights of ``cfg.checkpoint`` to ``cfg.out`` if the file
    computes what PyTorch computes within ``cfg.atol``; the result says whether it did. Raises UserError (one
    line, nothing written) for bad input."""
    check_config(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, EXPORT)
    if not cfg["arch"]:
        raise UserError("arch: required, an architecture JSON (e.g. arch=runs/.../search/best_arch.json)")
    arch_path, fmt = Path(cfg["arch"]), FORMATS[cfg["format"]]
    try:
        arch = ArchSpec.load(arch_path)
    except UserError as e:
        raise UserError(f"arch: {e}") from None
    out = output_path(cfg, arch_path, fmt)
    check_packages(fmt)
    weights = load_weights(arch, cfg["checkpoint"], cfg["seed"], cfg["weights"])
    model = weights.model
    batch = cfg["batch"]
    batches = CHECK_BATCHES if batch is None else (batch,)
    example, *inputs = random_images(arch, (batch or EXAMPLE_BATCH, *batches), cfg["seed"])
    with tempfile.TemporaryDirectory(prefix="psvit-export-") as scratch:
        tmp = Path(scratch) / out.name
        write(fmt, model, example, tmp, batch is None, arch.to_json())
        check = verify(fmt, tmp, model, inputs, arch.to_json())
        size = None
        if check.ok(cfg["atol"]):
            atomic_write(out, lambda dst: shutil.copyfile(tmp, dst))
            size = out.stat().st_size
    return Exported(out, fmt, arch, weights.source, batches, check, cfg["atol"], size, weights.warning)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    result = run_app(lambda: export(cfg))
    if result.warning is not None:
        print(f"warning: {result.warning}", file=sys.stderr, flush=True)
    if not result.ok:
        print(f"error: {result.line()}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(result.line())


if __name__ == "__main__":
    check_overrides("export")
    main()
