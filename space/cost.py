"""Analytic parameter count and FLOPs of an ArchSpec, exact for the PSViT layer layout.

FLOPs are multiply-accumulates (MACs), the convention of the DeiT / AutoFormer / PSViT tables (DeiT-Ti
~1.3 G). Counted: every linear and conv (patch embedding, qkv / v, projection, MLP, pooling conv, head)
and both attention matmuls (Q K^T and attn @ V). Not counted, as in those tables: biases, norms, softmax,
GELU, residual adds, max-pooling and the token mean. ``torch.utils.flop_counter.FlopCounterMode`` counts
the same ops at 2 FLOPs per MAC, which tests/test_model.py checks.

The layout this mirrors (supernet/model/layers.py builds exactly this):

* patch embed: Conv2d(in_chans, D0, patch, stride=patch) with bias; a CLS token (1D only); one learned
  position embedding over the stage-0 sequence.
* basic layer (pre-norm): LN, qkv Linear(C, 3C) with bias, attention, proj Linear(C, C), LN,
  fc1 Linear(C, H), GELU, fc2 Linear(H, C).
* shared pair: a basic layer that also hands out its attention map, then a layer with only
  v Linear(C, C) (no q, k, softmax), attn @ v, proj, and its own LN + MLP.
* pooling between stages, then LN(C'): 1D a pointwise Conv1d(C, C') over all tokens (CLS included)
  followed by adaptive max-pooling of the patch tokens; 2D a Conv2d(C, C', 3, stride 1|2, padding 1).
* head: LN(C) then Linear(C, classes) on the CLS token (1D) or on the mean token (2D).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from space.arch import ArchSpec


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)

    def __mul__(self, k: int) -> Cost:
        return Cost(self.params * k, self.macs * k)


ZERO = Cost(0, 0)


def _linear(tokens: int, cin: int, cout: int) -> Cost:
    return Cost(cin * cout + cout, tokens * cin * cout)


def _norm(dim: int) -> Cost:
    return Cost(2 * dim, 0)


def layer_cost(seq: int, dim: int, hidden: int, shared_second: bool = False) -> Cost:
    """One pre-norm transformer layer over ``seq`` tokens of width ``dim``.

    Args:
        seq: tokens attention sees (CLS included).
        hidden: MLP width.
        shared_second: the second layer of a shared pair: v only, one attention matmul (attn @ v).
    """
    attn = _linear(seq, dim, dim if shared_second else 3 * dim)
    matmuls = Cost(0, (1 if shared_second else 2) * seq * seq * dim)
    return _norm(dim) + attn + matmuls + _linear(seq, dim, dim) + _norm(dim) + _linear(seq, dim, hidden) + \
        _linear(seq, hidden, dim)


@lru_cache(maxsize=4096)  # a space has few (op, seq, dim, hidden) combinations; search and picking ask often
def cell_cost(op: str, seq: int, dim: int, hidden: int) -> Cost:
    """Cost of one cell: ``basic`` (one layer), ``shared`` (a pair sharing attention) or ``identity``."""
    if op == "basic":
        return layer_cost(seq, dim, hidden)
    if op == "shared":
        return layer_cost(seq, dim, hidden) + layer_cost(seq, dim, hidden, shared_second=True)
    if op == "identity":
        return ZERO
    raise ValueError(f"unknown op {op!r}")


def embed_cost(arch: ArchSpec) -> Cost:
    """Patch embedding, CLS token and position embedding."""
    s0 = arch.stages[0]
    patch_in = arch.in_chans * arch.patch_size ** 2
    cls = s0.dim if arch.has_cls else 0
    return _linear(s0.tokens, patch_in, s0.dim) + Cost(cls + arch.seq_len(0) * s0.dim, 0)


def pool_cost(pooling: str, tokens_in: int, tokens_out: int, cin: int, cout: int) -> Cost:
    """Token pooling from one stage to the next (conv + LayerNorm)."""
    if pooling == "1d":  # pointwise conv over every token, CLS included, before max-pooling
        return _linear(tokens_in + 1, cin, cout) + _norm(cout)
    return Cost(9 * cin * cout + cout, tokens_out * 9 * cin * cout) + _norm(cout)


def head_cost(dim: int, num_classes: int) -> Cost:
    return _norm(dim) + _linear(1, dim, num_classes)


def breakdown(arch: ArchSpec) -> dict[str, Cost]:
    """Cost of every part, keyed ``embed``, ``pool[i]`` (into stage i), ``stages[i].cells[j]``, ``head``."""
    out = {"embed": embed_cost(arch)}
    for i, s in enumerate(arch.stages):
        if i > 0:
            p = arch.stages[i - 1]
            out[f"pool[{i}]"] = pool_cost(arch.pooling, p.tokens, s.tokens, p.dim, s.dim)
        hidden = arch.mlp_hidden(s.dim)
        for j, op in enumerate(s.cells):
            out[f"stages[{i}].cells[{j}]"] = cell_cost(op, arch.seq_len(i), s.dim, hidden)
    out["head"] = head_cost(arch.stages[-1].dim, arch.num_classes)
    return out


def arch_cost(arch: ArchSpec) -> Cost:
    total = ZERO
    for c in breakdown(arch).values():
        total = total + c
    return total


def params(arch: ArchSpec) -> int:
    """Exact number of parameters of ``PSViT(arch)``."""
    return arch_cost(arch).params


def macs(arch: ArchSpec) -> int:
    """FLOPs as multiply-accumulates of one forward pass on one image."""
    return arch_cost(arch).macs


def fmt_macs(m: float) -> str:
    """Human-readable MACs, e.g. ``1.25 G``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if m >= div:
            return f"{m / div:.3g} {unit}"
    return f"{m:.0f}"


def fmt_params(p: float) -> str:
    return f"{p / 1e6:.3g} M" if p >= 1e6 else f"{p / 1e3:.3g} K"
