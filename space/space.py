"""SearchSpace: the PSViT space of architectures, built from a ``conf/space/*.yaml`` preset.

An architecture in the space is: for each stage, a token count and a dim from that stage's choices, and
for each of its cells one op from ``ops``; heads follow the dim (``dim // head_dim``). The (tokens, dim)
choices form a *chain* across stages that must satisfy the PSViT constraints: tokens never grow, dims
never shrink, and every token count is reachable by the pooling (any smaller count in 1D; in 2D the same
grid or its stride-2 halving, ``side -> ceil(side / 2)``, so one conv serves both with shared weights).

Sampling is exactly uniform over the architectures of the space: the chain is drawn uniformly from all
valid chains and every cell op independently and uniformly from ``ops``. As the ops do not depend on the
chain, this makes every architecture equally likely (``1 / size()``).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from space.arch import OPS, POOLINGS, ArchError, ArchSpec, StageSpec
from space.errors import UserError
from space.cost import Cost, cell_cost, embed_cost, head_cost, pool_cost

_MAX_CHAINS = 1_000_000


class SpaceError(UserError, ValueError):
    """An invalid search-space config; the message is one line naming the ``space.`` field."""


@dataclass(frozen=True)
class StageChoices:
    cells: int  # number of cells (each one op)
    tokens: tuple[int, ...]  # patch-token count choices
    dims: tuple[int, ...]  # embedding dim choices


Chain = tuple[tuple[int, int], ...]  # ((tokens, dim) per stage)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    pooling: str
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    mlp_ratio: float
    head_dim: int
    ops: tuple[str, ...]
    stages: tuple[StageChoices, ...]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SearchSpace:
        """Build from an OmegaConf node or a plain mapping (the ``space`` config group)."""
        try:  # accept DictConfig without importing omegaconf here
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise SpaceError(f"space: expected a mapping, got {type(cfg).__name__}")

        def get(key: str, typ: type | tuple[type, ...]) -> Any:
            if key not in cfg:
                raise SpaceError(f"space.{key}: missing")
            v = cfg[key]
            if not isinstance(v, typ) or isinstance(v, bool):
                raise SpaceError(f"space.{key}: {v!r} has the wrong type")
            if typ is int and v < 1:  # a zero patch_size / head_dim would divide by zero below
                raise SpaceError(f"space.{key}: {v!r} must be a positive integer")
            return v

        ops = tuple(get("ops", Sequence))
        for j, op in enumerate(ops):
            if op not in OPS:
                raise SpaceError(f"space.ops[{j}]: unknown op {op!r} (allowed: {', '.join(OPS)})")
        if len(set(ops)) != len(ops) or not ops:
            raise SpaceError(f"space.ops: {list(ops)} must be a non-empty list without repeats")
        stages = []
        for i, s in enumerate(get("stages", Sequence)):
            p = f"space.stages[{i}]"
            if not isinstance(s, Mapping) or set(s) != {"cells", "tokens", "dims"}:
                raise SpaceError(f"{p}: expected a mapping with keys cells, tokens, dims")
            for k in ("tokens", "dims"):
                if not isinstance(s[k], Sequence) or isinstance(s[k], str):
                    raise SpaceError(f"{p}.{k}: {s[k]!r} must be a list of positive integers")
            tok, dims = tuple(s["tokens"]), tuple(s["dims"])
            for k, vals in (("tokens", tok), ("dims", dims)):
                if not vals or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
                    raise SpaceError(f"{p}.{k}: {list(vals)} must be a non-empty list of positive integers")
                if len(set(vals)) != len(vals):
                    raise SpaceError(f"{p}.{k}: {list(vals)} has repeated choices")
            if not isinstance(s["cells"], int) or isinstance(s["cells"], bool) or s["cells"] < 1:
                raise SpaceError(f"{p}.cells: {s['cells']!r} must be a positive integer")
            stages.append(StageChoices(s["cells"], tuple(sorted(tok, reverse=True)), tuple(sorted(dims))))
        pooling = get("pooling", str)
        if pooling not in POOLINGS:
            raise SpaceError(f"space.pooling: {pooling!r} (allowed: {', '.join(POOLINGS)})")
        space = cls(name=str(cfg.get("name", "custom")), pooling=pooling, img_size=get("img_size", int),
                    patch_size=get("patch_size", int), in_chans=get("in_chans", int),
                    num_classes=get("num_classes", int), mlp_ratio=float(get("mlp_ratio", (int, float))),
                    head_dim=get("head_dim", int), ops=ops, stages=tuple(stages))
        space._validate()
        return space

    def _validate(self) -> None:
        if not self.stages:
            raise SpaceError("space.stages: empty (give at least one stage)")
        for i, s in enumerate(self.stages):
            for d in s.dims:
                if d % self.head_dim:
                    raise SpaceError(f"space.stages[{i}].dims: {d} is not a multiple of head_dim {self.head_dim}")
        grid = self.img_size // self.patch_size
        if self.img_size % self.patch_size:
            raise SpaceError(f"space.patch_size: {self.patch_size} does not divide img_size {self.img_size}")
        if self.stages[0].tokens != (grid * grid,):
            raise SpaceError(f"space.stages[0].tokens: {list(self.stages[0].tokens)} must be [{grid * grid}], "
                             f"the patch grid of a {self.img_size}px image with patch {self.patch_size}")
        n = math.prod(len(s.tokens) * len(s.dims) for s in self.stages)
        if n > _MAX_CHAINS:
            raise SpaceError(f"space.stages: {n} token/dim combinations, more than {_MAX_CHAINS}; use fewer choices")
        if not self.chains:
            raise SpaceError("space.stages: no token/dim sequence satisfies the constraints (tokens never grow, "
                             f"dims never shrink, {self.pooling} pooling reach)")
        try:
            self._build(self.chains[0], tuple((self.ops[0],) * s.cells for s in self.stages))
        except ArchError as e:
            raise SpaceError(f"space: its fields do not form a valid architecture: {e}") from None
        for i, s in enumerate(self.stages):
            used_t = {c[i][0] for c in self.chains}
            used_d = {c[i][1] for c in self.chains}
            for k, vals, used in (("tokens", s.tokens, used_t), ("dims", s.dims, used_d)):
                for v in vals:
                    if v not in used:
                        raise SpaceError(f"space.stages[{i}].{k}: choice {v} fits no valid chain (tokens "
                                         f"never grow, dims never shrink, {self.pooling} pooling reach)")

    # ----------------------------------------------------------------- chains
    def _step_ok(self, prev: tuple[int, int], cur: tuple[int, int]) -> bool:
        (pt, pd), (t, d) = prev, cur
        if t > pt or d < pd:
            return False
        if self.pooling == "2d":
            side = math.isqrt(pt)
            return t in (side * side, ((side + 1) // 2) ** 2)
        return True

    @cached_property
    def chains(self) -> tuple[Chain, ...]:
        """Every valid (tokens, dim) sequence across stages, in a fixed order."""
        per_stage = [list(itertools.product(s.tokens, s.dims)) for s in self.stages]
        out = []
        for combo in itertools.product(*per_stage):
            if all(self._step_ok(a, b) for a, b in zip(combo, combo[1:])):
                out.append(tuple(combo))
        return tuple(out)

    @cached_property
    def _chain_set(self) -> frozenset[Chain]:
        return frozenset(self.chains)

    def _build(self, chain: Chain, cells: tuple[tuple[str, ...], ...]) -> ArchSpec:
        stages = tuple(StageSpec(tokens=t, dim=d, num_heads=d // self.head_dim, cells=c)
                       for (t, d), c in zip(chain, cells))
        return ArchSpec(pooling=self.pooling, img_size=self.img_size, patch_size=self.patch_size,
                        in_chans=self.in_chans, num_classes=self.num_classes, mlp_ratio=self.mlp_ratio,
                        stages=stages)

    @staticmethod
    def chain_of(arch: ArchSpec) -> Chain:
        return tuple((s.tokens, s.dim) for s in arch.stages)

    # ----------------------------------------------------------------- size and enumeration
    def size(self) -> int:
        """Exact number of distinct architectures in the space."""
        return len(self.chains) * len(self.ops) ** sum(s.cells for s in self.stages)

    def all_archs(self) -> Iterator[ArchSpec]:
        """Every architecture (only sensible for tiny spaces, e.g. in tests)."""
        cell_choices = [list(itertools.product(self.ops, repeat=s.cells)) for s in self.stages]
        for chain in self.chains:
            for cells in itertools.product(*cell_choices):
                yield self._build(chain, cells)

    # ----------------------------------------------------------------- membership
    def why_not(self, arch: ArchSpec) -> str | None:
        """None if ``arch`` is in the space, else one line naming the first offending field."""
        for k in ("pooling", "img_size", "patch_size", "in_chans", "num_classes", "mlp_ratio"):
            if getattr(arch, k) != getattr(self, k):
                return f"{k}: {getattr(arch, k)!r} differs from the space's {getattr(self, k)!r}"
        if len(arch.stages) != len(self.stages):
            return f"stages: {len(arch.stages)} stages, the space has {len(self.stages)}"
        for i, (s, c) in enumerate(zip(arch.stages, self.stages)):
            p = f"stages[{i}]"
            if s.tokens not in c.tokens:
                return f"{p}.tokens: {s.tokens} is not a choice of the space (allowed: {list(c.tokens)})"
            if s.dim not in c.dims:
                return f"{p}.dim: {s.dim} is not a choice of the space (allowed: {list(c.dims)})"
            if s.num_heads != s.dim // self.head_dim:
                return f"{p}.num_heads: {s.num_heads}, the space uses dim/head_dim = {s.dim // self.head_dim}"
            if len(s.cells) != c.cells:
                return f"{p}.cells: {len(s.cells)} cells, the space has {c.cells}"
            for j, op in enumerate(s.cells):
                if op not in self.ops:
                    return f"{p}.cells[{j}]: op {op!r} is not in the space (allowed: {', '.join(self.ops)})"
        if self.chain_of(arch) not in self._chain_set:
            return f"stages: token/dim sequence {self.chain_of(arch)} violates the space's constraints"
        return None

    def contains(self, arch: ArchSpec) -> bool:
        return self.why_not(arch) is None

    def check(self, arch: ArchSpec) -> None:
        """Raise ArchError (one line, naming the field) if ``arch`` is not in the space."""
        reason = self.why_not(arch)
        if reason is not None:
            raise ArchError(f"not in space {self.name!r}: {reason}")

    # ----------------------------------------------------------------- sampling and variation
    def sample(self, rng: random.Random) -> ArchSpec:
        """An architecture drawn uniformly from the whole space (see the module docstring)."""
        chain = self.chains[rng.randrange(len(self.chains))]
        cells = tuple(tuple(rng.choice(self.ops) for _ in range(s.cells)) for s in self.stages)
        return self._build(chain, cells)

    def mutate(self, arch: ArchSpec, prob: float, rng: random.Random) -> ArchSpec:
        """Resample each choice (every cell op, every stage's tokens and dim) with probability ``prob``.

        A resampled op is uniform over ``ops``; a resampled token count or dim is uniform over the values
        that keep the chain valid given its neighbours, so the result is always in the space (it may equal
        the input).
        """
        self.check(arch)
        chain = list(self.chain_of(arch))
        for i in range(len(chain)):
            for k in (0, 1):  # 0 tokens, 1 dim
                if rng.random() >= prob:
                    continue
                values = self.stages[i].tokens if k == 0 else self.stages[i].dims
                ok = []
                for v in values:
                    cand = list(chain[i])
                    cand[k] = v
                    cand = tuple(cand)
                    if (i == 0 or self._step_ok(chain[i - 1], cand)) and \
                            (i + 1 == len(chain) or self._step_ok(cand, chain[i + 1])):
                        ok.append(cand)
                chain[i] = rng.choice(ok)
        cells = tuple(tuple(rng.choice(self.ops) if rng.random() < prob else op for op in s.cells)
                      for s in arch.stages)
        return self._build(tuple(chain), cells)

    def crossover(self, a: ArchSpec, b: ArchSpec, rng: random.Random) -> ArchSpec:
        """Uniform crossover: each cell op from either parent; tokens and dims per stage from either parent,
        drawn uniformly among the mixes that form a valid chain (both parents' chains always do)."""
        self.check(a)
        self.check(b)
        ca, cb = self.chain_of(a), self.chain_of(b)
        n = len(ca)
        valid = self._chain_set
        mixes = []
        for mask in itertools.product((0, 1), repeat=2 * n):
            chain = tuple(((ca, cb)[mask[2 * i]][i][0], (ca, cb)[mask[2 * i + 1]][i][1]) for i in range(n))
            if chain in valid and chain not in mixes:
                mixes.append(chain)
        chain = mixes[rng.randrange(len(mixes))]
        cells = tuple(tuple(rng.choice(pair) for pair in zip(sa.cells, sb.cells))
                      for sa, sb in zip(a.stages, b.stages))
        return self._build(chain, cells)

    # ----------------------------------------------------------------- cost range
    def _chain_extreme(self, chain: Chain, key: str, pick: Any) -> tuple[Cost, tuple[tuple[str, ...], ...]]:
        """Cost and cells of the min/max (``pick``) arch for a fixed chain; cells are independent."""
        arch = self._build(chain, tuple((self.ops[0],) * s.cells for s in self.stages))
        total = embed_cost(arch) + head_cost(chain[-1][1], self.num_classes)
        cells = []
        for i, ((t, d), s) in enumerate(zip(chain, self.stages)):
            if i:
                total = total + pool_cost(self.pooling, chain[i - 1][0], t, chain[i - 1][1], d)
            costs = {op: cell_cost(op, arch.seq_len(i), d, arch.mlp_hidden(d)) for op in self.ops}
            op = pick(self.ops, key=lambda o: getattr(costs[o], key))
            total = total + costs[op] * s.cells
            cells.append((op,) * s.cells)
        return total, tuple(cells)

    def extreme(self, which: str = "min", key: str = "macs") -> ArchSpec:
        """The architecture with the exact minimum or maximum ``key`` ("macs" or "params")."""
        pick = {"min": min, "max": max}[which]
        best = pick(((self._chain_extreme(c, key, pick), c) for c in self.chains),
                    key=lambda t: getattr(t[0][0], key))
        (_, cells), chain = best
        return self._build(chain, cells)

    def cost_range(self, key: str = "macs") -> tuple[int, int]:
        """Exact (min, max) of ``key`` ("macs" = FLOPs as MACs, or "params") over the whole space."""
        lo = min(getattr(self._chain_extreme(c, key, min)[0], key) for c in self.chains)
        hi = max(getattr(self._chain_extreme(c, key, max)[0], key) for c in self.chains)
        return lo, hi

    def macs_range(self) -> tuple[int, int]:
        """Exact (min, max) FLOPs of the space, as MACs."""
        return self.cost_range("macs")

    def params_range(self) -> tuple[int, int]:
        return self.cost_range("params")

    # ----------------------------------------------------------------- serialization
    def to_config(self) -> dict[str, Any]:
        """Plain dict that ``from_config`` turns back into this space (stored in checkpoints)."""
        return {"name": self.name, "pooling": self.pooling, "img_size": self.img_size,
                "patch_size": self.patch_size, "in_chans": self.in_chans, "num_classes": self.num_classes,
                "mlp_ratio": self.mlp_ratio, "head_dim": self.head_dim, "ops": list(self.ops),
                "stages": [{"cells": s.cells, "tokens": list(s.tokens), "dims": list(s.dims)}
                           for s in self.stages]}
