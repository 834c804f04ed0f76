"""A PSViT as one file that runs without this project, and the check that it computes what the model computes.

Formats (``FORMATS``), each holding the architecture JSON under ``ARCH_KEY`` for provenance:

* ``onnx``: torch's torch.export-based ONNX exporter (``torch.onnx.export(dynamo=True)``, the default since torch
  2.9; the TorchScript-based one is deprecated and cannot export ``adaptive_max_pool1d`` with a dynamic batch), run
  by onnxruntime. 1D token pooling's adaptive max-pooling has no ONNX operator and no decomposition in the
  exporter, so :func:`onnx_adaptive_max_pool` translates it exactly (a gather of each window, then a max).
* ``torchscript``: ``torch.jit.trace``, loaded by ``torch.jit.load`` or libtorch (C++); deprecated by torch
  (torch 2.14 warns so) but still the format C++ deployments read.
* ``pt2``: a ``torch.export`` program (``torch.export.save``), loaded by ``torch.export.load``: torch's successor
  to TorchScript.

Nothing here reads checkpoints or decides where files go: the app (supernet/export.py) does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from space.errors import UserError

ARCH_KEY = "psvit_arch.json"  # ONNX metadata key / TorchScript and pt2 extra file: the architecture JSON
INPUT, OUTPUT = "images", "logits"  # ONNX input and output names


@dataclass(frozen=True)
class Format:
    """One way to write the model, and what runs the file."""

    name: str
    suffix: str  # the file extension written by default
    title: str  # how the app's report names it
    runtime: str  # what the file is compared in
    packages: tuple[str, ...] = ()  # modules it needs beyond torch (the `export` extra)


FORMATS = {f.name: f for f in (
    Format("onnx", ".onnx", "ONNX", "onnxruntime", ("onnx", "onnxscript", "onnxruntime")),
    Format("torchscript", ".pt", "TorchScript", "torch.jit.load"),
    Format("pt2", ".pt2", "torch.export program", "torch.export.load"),
)}


def check_packages(fmt: Format) -> None:
    """Raise a one-line UserError if a package ``fmt`` needs is not installed."""
    for name in fmt.packages:
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"format: {fmt.name} needs {name}, which is not installed (pip install -e '.[export]', "
                            "as `make install` does, or another format=)") from None


def onnx_adaptive_max_pool(x: Any, output_size: list[int]) -> tuple[Any, Any]:
    """ONNX translation of ``aten.adaptive_max_pool2d`` over a (B, C, 1, L) input, which is what
    ``F.adaptive_max_pool1d`` becomes: output ``i`` is the max of ``x[..., floor(i L / T):ceil((i + 1) L / T)]``,
    PyTorch's windows. Every window is gathered at the longest window's length ``k`` (short ones repeat their
    last index, which leaves the max unchanged), then reduced: exact for any L and T, with a dynamic batch.
    Returns the values (B, C, 1, T) and the indices along L, as the aten op does."""
    from onnxscript import opset18 as op

    rows, length = x.shape[2], x.shape[3]  # static: only the batch is dynamic
    if list(output_size)[0] != rows or rows != 1:
        raise NotImplementedError(f"adaptive max-pooling over a {rows}-row input to {output_size}: only the 1D "
                                  "token pooling (one row) is translated")
    t = int(output_size[1])
    starts = [i * length // t for i in range(t)]
    ends = [-(-(i + 1) * length // t) for i in range(t)]
    k = max(e - s for s, e in zip(starts, ends))
    index = [s + min(j, e - s - 1) for s, e in zip(starts, ends) for j in range(k)]
    windows = op.Reshape(op.Gather(x, op.Constant(value_ints=index), axis=3),
                         op.Constant(value_ints=[0, 0, 1, t, k]))  # (B, C, 1, T, k)
    values = op.ReduceMax(windows, op.Constant(value_ints=[4]), keepdims=0)
    indices = op.Add(op.ArgMax(windows, axis=4, keepdims=0), op.Constant(value_ints=starts))
    return values, indices


def _batch_dim(dynamic: bool) -> tuple[dict[int, Any], ...] | None:
    return ({0: torch.export.Dim("batch")},) if dynamic else None


def _write_onnx(model: nn.Module, example: Tensor, path: Path, dynamic: bool, arch_json: str) -> None:
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
        dynamic_shapes=_batch_dim(dynamic), verbose=False,  # the batch axis is named after its Dim: "batch"
        custom_translation_table={torch.ops.aten.adaptive_max_pool2d.default: onnx_adaptive_max_pool})
    # The exporter annotates every node with its Python stack trace: this machine's source paths, and more
    # bytes than the weights of a small model. A deployment file needs none of it. (TorchScript files keep
    # their debug info: torch.jit.save has no switch for it.)
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.model.metadata_props[ARCH_KEY] = arch_json
    program.save(path, external_data=False)  # one self-contained file (protobuf's limit: 2 GB)


def _write_torchscript(model: nn.Module, example: Tensor, path: Path, dynamic: bool, arch_json: str) -> None:
    # Tracing records shape reads (x.shape[0]) as graph ops, so a trace at one batch runs at any batch;
    # the verification runs it at batches other than the traced one to prove it.
    traced = torch.jit.trace(model, (example,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={ARCH_KEY: arch_json})


def _write_pt2(model: nn.Module, example: Tensor, path: Path, dynamic: bool, arch_json: str) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim(dynamic))
    for node in program.graph.nodes:  # as for ONNX: no source paths of this machine in the file
        node.meta.pop("stack_trace", None)
    torch.export.save(program, path, extra_files={ARCH_KEY: arch_json})


def write(fmt: Format, model: nn.Module, example: Tensor, path: Path, dynamic: bool, arch_json: str) -> None:
    """Write ``model`` (eval mode, CPU, float32) as ``fmt`` to ``path``, traced on ``example`` (B, C, H, W).

    Args:
        dynamic: the file takes any batch size; otherwise only ``example``'s (ONNX and pt2 fix it; a
            TorchScript trace runs at any batch either way).
        arch_json: stored in the file under ``ARCH_KEY``.
    """
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2}[fmt.name]
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer and deprecation warnings are about traces in general; this one is verified after writing.
        warnings.simplefilter("ignore")
        writer(model, example, path, dynamic, arch_json)


def load(fmt: Format, path: Path) -> tuple[Callable[[Tensor], Tensor], str]:
    """What runs the file ``path`` of ``fmt`` (images -> logits, on CPU) and the architecture JSON it holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation warning
        if fmt.name == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            arch_json = session.get_modelmeta().custom_metadata_map.get(ARCH_KEY, "")
            return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0]), arch_json
        extra = {ARCH_KEY: ""}
        if fmt.name == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        else:
            module = torch.export.load(path, extra_files=extra).module()
    text = extra[ARCH_KEY]
    return module, text.decode() if isinstance(text, bytes) else text


@dataclass(frozen=True)
class Verification:
    """How the written file compared with the PyTorch model."""

    max_diff: float  # max |file logits - PyTorch logits| over every input; inf when it could not run or a logit
    # was not finite
    problem: str | None  # why the file failed apart from the difference (it did not load or run, wrong arch)

    def ok(self, atol: float) -> bool:
        return self.problem is None and self.max_diff <= atol  # NaN fails too


def verify(fmt: Format, path: Path, model: nn.Module, inputs: list[Tensor], arch_json: str) -> Verification:
    """Run the file ``path`` on ``inputs`` in its own runtime and compare with ``model`` (eval mode)."""
    try:
        run, stored = load(fmt, path)
        diff = 0.0
        with torch.no_grad():
            for x in inputs:
                want, got = model(x), run(x)
                if tuple(got.shape) != tuple(want.shape):
                    return Verification(math.inf, f"batch {x.shape[0]} gives logits {tuple(got.shape)}, "
                                                  f"PyTorch {tuple(want.shape)}")
                # max() would pass a NaN over (max(0.0, nan) is 0.0): a non-finite logit is a failure of its own
                for who, logits in (("PyTorch's", want), ("the file's", got)):
                    if not bool(torch.isfinite(logits).all()):
                        return Verification(math.inf, f"{who} logits are not finite (NaN or inf) at batch "
                                                      f"{x.shape[0]}: the weights or the graph produce them")
                diff = max(diff, (got.float() - want).abs().max().item())
    except Exception as e:  # noqa: BLE001 - whatever stops the file from running is the verdict
        return Verification(math.inf, f"{fmt.runtime} cannot run it ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:160]})")
    if stored != arch_json:
        return Verification(diff, f"the file does not hold the architecture JSON under {ARCH_KEY!r}")
    return Verification(diff, None)
