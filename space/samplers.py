"""Path samplers for supernet training: the paths of training step ``t`` are a pure function of
``(seed, t)``, so every DDP rank trains the same paths without communicating and a resumed run samples
exactly the paths the uninterrupted run would have.

A sampler's ``paths(step)`` lists the paths one optimizer step trains: one for SPOS's uniform and FLOPs-bin
rules, the largest, the smallest and ``n`` random ones for BigNAS's sandwich rule.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from space.arch import ArchSpec
from space.cost import macs
from space.errors import UserError
from space.space import SearchSpace

SAMPLERS = ("uniform", "flops_bins", "sandwich")


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

    def paths(self, step: int) -> list[ArchSpec]:
        return [self(step)]


@dataclass
class FlopsBinsSampler:
    """SPOS's FLOPs-uniform scheme: pick a FLOPs bin uniformly, then a path inside it.

    The exact range [min, max] of the space is cut into ``bins`` equal bins. Uniform architectures are
    concentrated in the middle of the range, so the end bins hold a tiny share of the space (fmnist_2d's
    lowest: the all-identity net and a few more). Adjacent bins are merged, from each end inward, until every
    bin holds at least ``min_share`` of ``probe`` uniform samples; inside a bin, paths are drawn uniformly by
    rejection, with enough tries that a bin of ``min_share`` misses with probability 0.001, then falling back
    to one of the bin's probe samples (at least ``min_share * probe`` of them). So no path gets much more than
    its uniform share of its bin's steps (before, sparse bins fell back to a pool of one or two paths: one
    path got 10.7% of 2000 steps).
    """

    space: SearchSpace
    seed: int
    bins: int = 10
    probe: int = 4000
    min_share: float = 0.02
    edges: list[float] = field(init=False)  # upper edges of the merged bins but the last, ascending
    pool: dict[int, list[ArchSpec]] = field(init=False)  # probe samples of each merged bin
    tries: int = field(init=False)

    def __post_init__(self) -> None:
        lo, hi = self.space.macs_range()
        edges = [lo + (hi - lo) * k / self.bins for k in range(1, self.bins)]
        rng = random.Random(f"psvit-bins:{self.seed}")
        probes = [self.space.sample(rng) for _ in range(self.probe)]
        cost = [macs(a) for a in probes]
        need = self.min_share * self.probe
        count = lambda a, b: sum(a < c <= b for c in cost)  # noqa: E731 - probe samples in (a, b]
        bounds = [-math.inf, *edges, math.inf]
        while len(bounds) > 2:  # merge the sparsest end bin into its neighbour until both ends hold enough
            first, last = count(bounds[0], bounds[1]), count(bounds[-2], bounds[-1])
            if min(first, last) >= need:
                break
            if first <= last:
                del bounds[1]
            else:
                del bounds[-2]
        inner = [i for i in range(1, len(bounds) - 2) if count(bounds[i], bounds[i + 1]) < need]
        for i in reversed(inner):  # a sparse bin inside the range (rare): merge it into its upper neighbour
            del bounds[i + 1]
        self.edges = bounds[1:-1]
        self.pool = {}
        for a in probes:
            self.pool.setdefault(self.bin_of(a), []).append(a)
        self._bins = sorted(self.pool)
        share = min(len(v) for v in self.pool.values()) / self.probe
        self.tries = max(1, math.ceil(math.log(0.001) / math.log1p(-share))) if share < 1 else 1

    def bin_of(self, arch: ArchSpec) -> int:
        """Index of ``arch``'s merged bin; MACs equal to an edge belong to the lower bin."""
        return bisect.bisect_left(self.edges, macs(arch))

    def __call__(self, step: int) -> ArchSpec:
        rng = step_rng(self.seed, step)
        b = self._bins[rng.randrange(len(self._bins))]
        for _ in range(self.tries):
            a = self.space.sample(rng)
            if self.bin_of(a) == b:
                return a
        return rng.choice(self.pool[b])

    def paths(self, step: int) -> list[ArchSpec]:
        return [self(step)]


@dataclass
class SandwichSampler:
    """BigNAS's sandwich rule: every step trains the largest path (most MACs), the smallest one and ``n``
    uniform random ones, in that order; their gradients are accumulated into one optimizer step. The largest
    path comes first so that it can teach the others (in-place distillation, ``distill=inplace``)."""

    space: SearchSpace
    seed: int
    n: int = 2
    largest: ArchSpec = field(init=False)
    smallest: ArchSpec = field(init=False)

    def __post_init__(self) -> None:
        self.largest, self.smallest = self.space.extreme("max"), self.space.extreme("min")

    def paths(self, step: int) -> list[ArchSpec]:
        rng = step_rng(self.seed, step)
        return [self.largest, self.smallest] + [self.space.sample(rng) for _ in range(self.n)]


Sampler = UniformSampler | FlopsBinsSampler | SandwichSampler


def make_sampler(name: str, space: SearchSpace, seed: int, bins: int = 10, sandwich_n: int = 2) -> Sampler:
    if name == "uniform":
        return UniformSampler(space, seed)
    if name == "flops_bins":
        return FlopsBinsSampler(space, seed, bins)
    if name == "sandwich":
        return SandwichSampler(space, seed, sandwich_n)
    raise UserError(f"sampler: unknown sampler {name!r} (allowed: {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------- evaluation sets
def _pool(space: SearchSpace, seed: int, size: int) -> list[ArchSpec]:
    """``size`` distinct uniform architectures and the two extremes, from a fixed RNG, sorted by MACs."""
    rng = random.Random(f"psvit-pick:{seed}")
    seen = {space.extreme("min"), space.extreme("max")}
    for _ in range(size * 4):
        if len(seen) >= size + 2:
            break
        seen.add(space.sample(rng))
    return sorted(seen, key=lambda a: (macs(a), a.to_json()))


def stratified_archs(space: SearchSpace, n: int, seed: int, pool: int = 4000) -> list[ArchSpec]:
    """``n`` distinct architectures spread over the space's whole FLOPs range: the range is cut into ``n``
    equal-width strata and each stratum contributes one architecture drawn at random from a pool of ``pool``
    uniform samples plus the smallest and largest nets; a stratum the pool does not reach (uniform samples
    are scarce near the extremes) takes the unused pool member nearest its centre. Sorted by MACs."""
    archs = _pool(space, seed, max(pool, n))
    cost = [macs(a) for a in archs]  # cached per cell: cheap the second time
    lo, hi = cost[0], cost[-1]
    rng, chosen = random.Random(f"psvit-strata:{seed}"), set()
    for k in range(n):
        a, b = lo + (hi - lo) * k / n, lo + (hi - lo) * (k + 1) / n
        inside = [i for i in range(bisect.bisect_left(cost, a), bisect.bisect_right(cost, b)) if i not in chosen]
        if inside:
            chosen.add(rng.choice(inside))
        else:
            centre = (a + b) / 2
            chosen.add(min((i for i in range(len(archs)) if i not in chosen), key=lambda i: abs(cost[i] - centre)))
    return [archs[i] for i in sorted(chosen)]


def band_archs(space: SearchSpace, n: int, lo: float, hi: float, seed: int, draws: int = 200_000) -> list[ArchSpec]:
    """``n`` distinct uniform architectures with ``lo <= MACs <= hi`` (rejection sampling from a fixed RNG,
    at most ``draws`` draws), sorted by MACs: the search's real situation, candidates of similar cost.

    Raises:
        UserError: fewer than ``n`` distinct architectures were found in the band.
    """
    rng, found = random.Random(f"psvit-band:{seed}"), set()
    for _ in range(draws):
        a = space.sample(rng)
        if lo <= macs(a) <= hi:
            found.add(a)
            if len(found) == n:
                break
    if len(found) < n:
        s_lo, s_hi = space.macs_range()
        raise UserError(f"band: only {len(found)} of {n} architectures found with MACs in [{lo:g}, {hi:g}] after "
                        f"{draws} uniform draws (the space spans [{s_lo:g}, {s_hi:g}]); widen the band or lower "
                        "band_archs")
    return sorted(found, key=lambda a: (macs(a), a.to_json()))
