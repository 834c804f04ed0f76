"""What a search may return: the FLOPs / params / predicted-latency :class:`Constraint` of one band, the
fail-fast feasibility check, and the random proposals both use. Pure Python, no torch. FLOPs are
multiply-accumulates (MACs), see ``space.cost``; the user-facing ``flops_*`` names are MACs. Latency is the
prediction of a measured lookup table (space/latency.py), in milliseconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from space.arch import ArchSpec
from space.cost import arch_cost, fmt_macs, fmt_params
from space.errors import UserError
from space.latency import LatencyTable
from space.space import SearchSpace


class InfeasibleError(UserError, ValueError):
    """No architecture of the space satisfies the constraint; the message is one line."""


@dataclass(frozen=True)
class Constraint:
    flops_min: int | None = None  # MACs, inclusive; None = unbounded
    flops_max: int | None = None  # MACs, inclusive; None = unbounded
    params_max: int | None = None  # parameters, inclusive; None = unbounded
    latency_max: float | None = None  # milliseconds predicted by ``latency``, inclusive; None = unbounded
    latency: LatencyTable | None = field(default=None, compare=False, repr=False)  # the table predicting it

    def __post_init__(self) -> None:
        if self.latency_max is not None and self.latency is None:
            raise ValueError("latency_max: needs latency_table=FILE, the lookup table that predicts latency "
                             "(python -m supernet.latency)")
        for f in fields(self):
            if f.name == "latency":
                continue
            v = getattr(self, f.name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                  or not math.isfinite(v)):
                raise ValueError(f"constraint.{f.name}: {v!r} (allowed: a non-negative number or null)")

    def latency_ms(self, arch: ArchSpec) -> float | None:
        """The predicted latency of ``arch`` (None without a table)."""
        return None if self.latency is None else self.latency.predict(arch)

    def admits(self, macs: int, params: int, latency_ms: float | None = None) -> bool:
        """Whether an architecture with these MACs, parameters and predicted latency satisfies the constraint."""
        if self.latency_max is not None and latency_ms is None:
            raise ValueError("latency_max is set: pass the architecture's predicted latency")
        return ((self.flops_min is None or macs >= self.flops_min)
                and (self.flops_max is None or macs <= self.flops_max)
                and (self.params_max is None or params <= self.params_max)
                and (self.latency_max is None or latency_ms <= self.latency_max))

    def __call__(self, arch: ArchSpec) -> bool:
        c = arch_cost(arch)
        return self.admits(c.macs, c.params, self.latency_ms(arch))

    def identity(self) -> dict[str, Any]:
        """What a saved search must share with this one to resume it: the bounds, and the table's measurements
        when a latency bound uses them (absent otherwise, so states of searches without one still resume)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in ("flops_min", "flops_max", "params_max")}
        if self.latency_max is not None:
            t = self.latency
            out.update(latency_max=self.latency_max, latency_table={"space_hash": t.space_hash, "device": t.device,
                       "device_name": t.device_name, "threads": t.threads, "batch": t.batch,
                       "overhead_ms": t.overhead_ms, "scale": t.scale, "blocks": t.blocks})
        return out

    def describe(self) -> str:
        """One human-readable line, e.g. ``FLOPs in [1.2 G, 1.3 G] MACs, params <= 5.7 M``."""
        parts = []
        lo, hi = self.flops_min, self.flops_max
        if lo is not None and hi is not None:
            parts.append(f"FLOPs in [{fmt_macs(lo)}, {fmt_macs(hi)}] MACs")
        elif lo is not None:
            parts.append(f"FLOPs >= {fmt_macs(lo)} MACs")
        elif hi is not None:
            parts.append(f"FLOPs <= {fmt_macs(hi)} MACs")
        if self.params_max is not None:
            parts.append(f"params <= {fmt_params(self.params_max)}")
        if self.latency_max is not None:
            t = self.latency
            parts.append(f"latency <= {self.latency_max:g} ms (predicted: {t.device}, {t.threads} threads, "
                         f"batch {t.batch})")
        return ", ".join(parts) or "unconstrained"


def _band(lo: float | None, hi: float | None) -> str:
    return f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def extremes(space: SearchSpace) -> tuple[ArchSpec, ...]:
    """Anchors for proposals near the ends of the cost range, where uniform samples rarely land."""
    return space.extreme("min", "macs"), space.extreme("max", "macs"), space.extreme("min", "params")


def random_arch(space: SearchSpace, rng: random.Random, t: int, uniform_until: int,
                anchors: Callable[[], tuple[ArchSpec, ...]]) -> ArchSpec:
    """Proposal number ``t``: uniform first; after ``uniform_until`` tries, every other one is a random-size
    mutation of an extreme architecture (``anchors()``, computed only when first needed), so narrow bands at
    either end of the range are still found."""
    if t < uniform_until or t % 2 == 0:
        return space.sample(rng)
    ends = anchors()
    return space.mutate(ends[(t // 2) % len(ends)], rng.random(), rng)


def check_feasible(space: SearchSpace, constraint: Constraint, rng: random.Random,
                   tries: int = 10_000) -> ArchSpec:
    """Fail fast on an impossible constraint, else return one architecture that satisfies it.

    The exact FLOPs and params ranges of the space are checked first, then up to ``tries`` proposals are drawn.

    Raises:
        InfeasibleError: the band is empty, outside the space's range, or no proposal satisfied it.
    """
    c = constraint
    if c.flops_min is not None and c.flops_max is not None and c.flops_min > c.flops_max:
        raise InfeasibleError(f"constraint flops {_band(c.flops_min, c.flops_max)} MACs is empty: "
                              f"flops_min {c.flops_min} > flops_max {c.flops_max}")
    lo, hi = space.macs_range()
    if (c.flops_min is not None and c.flops_min > hi) or (c.flops_max is not None and c.flops_max < lo):
        raise InfeasibleError(f"constraint flops {_band(c.flops_min, c.flops_max)} MACs is outside the space "
                              f"{space.name!r}'s exact range [{lo}, {hi}] MACs ({fmt_macs(lo)} to {fmt_macs(hi)})")
    plo, phi = space.params_range()
    if c.params_max is not None and c.params_max < plo:
        raise InfeasibleError(f"constraint params <= {c.params_max} is below the space {space.name!r}'s exact "
                              f"range [{plo}, {phi}] params ({fmt_params(plo)} to {fmt_params(phi)})")
    if c.latency_max is not None:
        llo, lhi = c.latency.predicted_range(space)
        if c.latency_max < llo:
            raise InfeasibleError(f"constraint latency <= {c.latency_max:g} ms is below the predicted range of space "
                                  f"{space.name!r}, [{llo:.3f}, {lhi:.3f}] ms ({c.latency.device}, batch "
                                  f"{c.latency.batch}); raise latency_max")
    found: list[tuple[ArchSpec, ...]] = []

    def anchors() -> tuple[ArchSpec, ...]:
        if not found:
            found.append(extremes(space))
        return found[0]

    for t in range(tries):
        arch = random_arch(space, rng, t, 0, anchors)
        if constraint(arch):
            return arch
    raise InfeasibleError(f"no architecture of space {space.name!r} satisfying {c.describe()} found in {tries} "
                          f"tries (space: [{lo}, {hi}] MACs, [{plo}, {phi}] params); widen the constraint")
