"""ArchSpec: one PSViT architecture, its versioned JSON form and its validation.

The ArchSpec is the one value that crosses every boundary of the framework: search space -> supernet
training -> evolutionary search -> exported JSON -> stand-alone retraining. It is deliberately general
enough to describe the DeiT baselines exactly (one stage of basic layers), not only members of a space.

Token layout (PSViT, arXiv 2108.03428, Sec. 3):

* ``pooling="1d"``: a CLS token rides along with the patch tokens; between stages a pointwise 1D conv
  changes the dim of every token (CLS included) and adaptive 1D max-pooling brings the patch tokens to
  the next stage's count, so any count in ``1..previous`` is reachable.
* ``pooling="2d"``: no CLS; patch tokens stay a square grid; between stages a 3x3 conv with stride 1
  or 2 (padding 1) changes the dim and keeps or halves each side (``side -> ceil(side / 2)``).

``StageSpec.tokens`` always counts patch tokens only; the 1D sequence is ``tokens + 1`` long.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from space.app import atomic_write
from space.errors import UserError

FORMAT = "psvit-arch/1"
OPS = ("basic", "shared", "identity")
POOLINGS = ("1d", "2d")
# Layers each op contributes: a shared pair is two layers, the second reusing the first's attention.
OP_LAYERS = {"basic": 1, "shared": 2, "identity": 0}


class ArchError(UserError, ValueError):
    """An invalid architecture; the message is one line: ``<field path>: <problem> (<what is allowed>)``."""


@dataclass(frozen=True)
class StageSpec:
    """One stage: all its cells run at the same token count and dim."""

    tokens: int  # patch tokens (no CLS); a square number in 2D
    dim: int  # embedding dim of every token in the stage
    num_heads: int  # dim must be divisible by it
    cells: tuple[str, ...]  # one op per cell, from OPS

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def depth(self) -> int:
        """Transformer layers in this stage (a shared pair counts two)."""
        return sum(OP_LAYERS[op] for op in self.cells)


@dataclass(frozen=True)
class ArchSpec:
    """A complete PSViT (or DeiT) architecture; validated on construction."""

    pooling: str  # "1d" (CLS + 1D conv/max-pool) or "2d" (token grid + strided 2D conv)
    img_size: int  # square input side in pixels
    patch_size: int  # square patch side; img_size must be a multiple of it
    in_chans: int  # image channels (1 for Fashion-MNIST, 3 for RGB)
    num_classes: int  # classifier outputs
    mlp_ratio: float  # MLP hidden = dim * mlp_ratio, must be an integer for every stage
    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        _validate(self)

    # ----------------------------------------------------------------- derived values
    @property
    def grid(self) -> int:
        """Patch grid side of the first stage."""
        return self.img_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.pooling == "1d"

    @property
    def depth(self) -> int:
        """Total transformer layers (0-36 in the PSViT space)."""
        return sum(s.depth for s in self.stages)

    def mlp_hidden(self, dim: int) -> int:
        return int(round(dim * self.mlp_ratio))

    def seq_len(self, stage: int) -> int:
        """Tokens the attention of ``stage`` sees (patch tokens plus CLS in 1D)."""
        return self.stages[stage].tokens + (1 if self.has_cls else 0)

    def strides(self) -> tuple[int, ...]:
        """2D only: the conv stride (1 or 2) of each pooling between consecutive stages."""
        out = []
        for prev, cur in zip(self.stages, self.stages[1:]):
            out.append(1 if math.isqrt(cur.tokens) == math.isqrt(prev.tokens) else 2)
        return tuple(out)

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain dict in canonical key order, including the format version."""
        return {
            "format": FORMAT,
            "pooling": self.pooling,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "mlp_ratio": self.mlp_ratio,
            "stages": [
                {"tokens": s.tokens, "dim": s.dim, "num_heads": s.num_heads, "cells": list(s.cells)}
                for s in self.stages
            ],
        }

    def to_json(self, meta: dict[str, Any] | None = None) -> str:
        """Canonical JSON text: fixed key order, one stage per line, trailing newline.

        Args:
            meta: optional informational object (FLOPs, accuracy, provenance) written under ``"meta"``;
                it is ignored when loading, so it never changes the architecture.
        """
        d = self.to_dict()
        head = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items() if k != "stages"]
        stages = ",\n".join(f"    {json.dumps(s)}" for s in d["stages"])
        lines = head + [f'  "stages": [\n{stages}\n  ]']
        if meta is not None:
            lines.append(f'  "meta": {json.dumps(meta, sort_keys=True)}')
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_dict(cls, d: Any) -> ArchSpec:
        """Validate a parsed JSON object and build the spec; raises ArchError naming the field."""
        if not isinstance(d, dict):
            raise ArchError(f"<root>: expected a JSON object, got {_tname(d)}")
        if "format" not in d:
            raise ArchError(f"format: missing (expected {FORMAT!r})")
        if d["format"] != FORMAT:
            raise ArchError(f"format: unsupported version {d['format']!r} (supported: {FORMAT!r})")
        known = {"format", "pooling", "img_size", "patch_size", "in_chans", "num_classes", "mlp_ratio",
                 "stages", "meta"}
        for k in d:
            if k not in known:
                raise ArchError(f"{k}: unknown field (allowed: {', '.join(sorted(known))})")
        pooling = _get(d, "pooling", str, "")
        if pooling not in POOLINGS:
            raise ArchError(f"pooling: unknown variant {pooling!r} (allowed: {', '.join(POOLINGS)})")
        ints = {k: _get(d, k, int, "") for k in ("img_size", "patch_size", "in_chans", "num_classes")}
        mlp_ratio = _get(d, "mlp_ratio", float, "")
        raw_stages = _get(d, "stages", list, "")
        stages = []
        for i, s in enumerate(raw_stages):
            p = f"stages[{i}]"
            if not isinstance(s, dict):
                raise ArchError(f"{p}: expected an object, got {_tname(s)}")
            for k in s:
                if k not in ("tokens", "dim", "num_heads", "cells"):
                    raise ArchError(f"{p}.{k}: unknown field (allowed: cells, dim, num_heads, tokens)")
            cells = _get(s, "cells", list, p + ".")
            for j, op in enumerate(cells):
                if not isinstance(op, str):
                    raise ArchError(f"{p}.cells[{j}]: expected a string op, got {_tname(op)}")
            stages.append(StageSpec(tokens=_get(s, "tokens", int, p + "."), dim=_get(s, "dim", int, p + "."),
                                    num_heads=_get(s, "num_heads", int, p + "."), cells=tuple(cells)))
        return cls(pooling=pooling, mlp_ratio=float(mlp_ratio), stages=tuple(stages), **ints)

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchError(f"<json>: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting past the stack
            raise ArchError(f"<json>: unreadable JSON ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        """Read and validate an architecture JSON file (errors are prefixed with the path)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ArchError(f"{path}: cannot read architecture file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ArchError(f"{path}: not a text file (an architecture JSON is UTF-8 text, e.g. best_arch.json; "
                            "a checkpoint is not one)") from None
        except ValueError:  # "embedded null byte"
            raise ArchError(f"{path}: cannot read architecture file (a path cannot hold a NUL character)") from None
        try:
            return cls.from_json(text)
        except ArchError as e:
            raise ArchError(f"{path}: {e}") from None

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the canonical JSON atomically (see :func:`space.app.atomic_write`)."""
        atomic_write(path, self.to_json(meta))

    def short(self) -> str:
        """Compact one-line summary, e.g. ``2d 49x64[BSI...] 16x96[...]`` (B basic, S shared, I identity)."""
        sym = {"basic": "B", "shared": "S", "identity": "I"}
        return " ".join(f"{s.tokens}x{s.dim}[{''.join(sym.get(c, '?') for c in s.cells)}]"
                        for s in self.stages)


# --------------------------------------------------------------------- validation
def _tname(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _get(d: dict, key: str, typ: type, prefix: str) -> Any:
    if key not in d:
        raise ArchError(f"{prefix}{key}: missing")
    v = d[key]
    ok = isinstance(v, typ) and not isinstance(v, bool)
    if typ is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        want = {int: "integer", float: "number", str: "string", list: "array"}[typ]
        raise ArchError(f"{prefix}{key}: expected {want}, got {_tname(v)} {json.dumps(v)}")
    return v


def _positive(path: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ArchError(f"{path}: {v!r} is not a positive integer")


def _validate(a: ArchSpec) -> None:
    if a.pooling not in POOLINGS:
        raise ArchError(f"pooling: unknown variant {a.pooling!r} (allowed: {', '.join(POOLINGS)})")
    for k in ("img_size", "patch_size", "in_chans", "num_classes"):
        _positive(k, getattr(a, k))
    if a.img_size % a.patch_size:
        raise ArchError(f"patch_size: {a.patch_size} does not divide img_size {a.img_size}")
    if not isinstance(a.mlp_ratio, float) or not a.mlp_ratio > 0 or not math.isfinite(a.mlp_ratio):
        raise ArchError(f"mlp_ratio: {a.mlp_ratio!r} is not a positive number")
    if not isinstance(a.stages, tuple) or not a.stages:
        raise ArchError("stages: empty (at least one stage is required)")
    grid = a.grid
    for i, s in enumerate(a.stages):
        p = f"stages[{i}]"
        for k in ("tokens", "dim", "num_heads"):
            _positive(f"{p}.{k}", getattr(s, k))
        if not isinstance(s.cells, tuple) or not s.cells:
            raise ArchError(f"{p}.cells: empty (give at least one cell; use 'identity' for no layer)")
        for j, op in enumerate(s.cells):
            if op not in OPS:
                raise ArchError(f"{p}.cells[{j}]: unknown op {op!r} (allowed: {', '.join(OPS)})")
        if s.dim % s.num_heads:
            raise ArchError(f"{p}.num_heads: {s.num_heads} does not divide dim {s.dim}")
        hidden = s.dim * a.mlp_ratio
        if abs(hidden - round(hidden)) > 1e-9:
            raise ArchError(f"mlp_ratio: {a.mlp_ratio} x {p}.dim {s.dim} = {hidden} is not an integer MLP width")
        if i == 0:
            if s.tokens != grid * grid:
                raise ArchError(f"{p}.tokens: {s.tokens} != ({a.img_size}/{a.patch_size})^2 = {grid * grid} "
                                f"patch tokens of the input")
            continue
        prev = a.stages[i - 1]
        if s.tokens > prev.tokens:
            raise ArchError(f"{p}.tokens: {s.tokens} grows from {prev.tokens} (tokens never grow with depth)")
        if s.dim < prev.dim:
            raise ArchError(f"{p}.dim: {s.dim} shrinks from {prev.dim} (dims never shrink with depth)")
        if a.pooling == "2d":
            side = math.isqrt(prev.tokens)
            allowed = sorted({side * side, ((side + 1) // 2) ** 2})
            if s.tokens not in allowed:
                raise ArchError(f"{p}.tokens: {s.tokens} cannot be produced by 2D pooling of a {side}x{side} grid "
                                f"(allowed: {', '.join(map(str, allowed))}, i.e. stride 1 or 2)")
