"""Path samplers for SPOS supernet training: the architecture of training step ``t`` is a pure function of
``(seed, t)``, so every DDP rank trains the same path without communicating and a resumed run samples
exactly the paths the uninterrupted run would have.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from space.arch import ArchSpec
from space.cost import macs
from space.errors import UserError
from space.space import SearchSpace

SAMPLERS = ("uniform", "flops_bins")


def step_rng(seed: int, step: int) -> random.Random:
    """An RNG for one step; string seeds are hashed with SHA-512, identical in every process."""
    return random.Random(f"psvit-path:{seed}:{step}")


@dataclass
class UniformSampler:
    """SPOS's default: each step's path uniform over the whole space (SearchSpace.sample)."""

    space: SearchSpace
    seed: int

    def __call__(self, step: int) -> ArchSpec:
        return self.space.sample(step_rng(self.seed, step))


@dataclass
class FlopsBinsSampler:
    """SPOS's FLOPs-uniform scheme: pick a FLOPs bin uniformly, then a path inside it.

    The exact range [min, max] of the space is cut into ``bins`` equal bins. Uniform architectures are
    concentrated in the middle of the range, so bins that none of ``probe`` uniform samples reach (the
    extremes, e.g. only the single all-identity net) are left out; they are listed in ``empty_bins``. Inside
    a bin, paths are drawn uniformly by rejection (``tries`` draws), falling back to a probe sample of that
    bin so a step never stalls.
    """

    space: SearchSpace
    seed: int
    bins: int = 10
    probe: int = 2000
    tries: int = 200
    edges: list[float] = field(init=False)
    pool: dict[int, list[ArchSpec]] = field(init=False)

    def __post_init__(self) -> None:
        lo, hi = self.space.macs_range()
        self.edges = [lo + (hi - lo) * k / self.bins for k in range(1, self.bins)]
        rng = random.Random(f"psvit-bins:{self.seed}")
        self.pool = {}
        for _ in range(self.probe):
            a = self.space.sample(rng)
            self.pool.setdefault(self.bin_of(a), []).append(a)
        self._bins = sorted(self.pool)

    def bin_of(self, arch: ArchSpec) -> int:
        return bisect.bisect_right(self.edges, macs(arch))

    def __call__(self, step: int) -> ArchSpec:
        rng = step_rng(self.seed, step)
        b = self._bins[rng.randrange(len(self._bins))]
        for _ in range(self.tries):
            a = self.space.sample(rng)
            if self.bin_of(a) == b:
                return a
        return rng.choice(self.pool[b])


def make_sampler(name: str, space: SearchSpace, seed: int, bins: int = 10) -> UniformSampler | FlopsBinsSampler:
    if name == "uniform":
        return UniformSampler(space, seed)
    if name == "flops_bins":
        return FlopsBinsSampler(space, seed, bins)
    raise UserError(f"sampler: unknown sampler {name!r} (allowed: {', '.join(SAMPLERS)})")
