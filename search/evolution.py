"""Evolutionary architecture search under FLOPs / params constraints (SPOS, Guo et al. 2019, as in PSViT).

Pure Python over a batched ``evaluate(archs) -> scores``: no torch, no DDP, no logging. Every rank of a
distributed search runs this same deterministic loop and lets ``evaluate`` split each batch across ranks.
FLOPs are multiply-accumulates (MACs), see ``space.cost``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from space.arch import ArchSpec
from space.cost import Cost, arch_cost, fmt_macs, fmt_params
from space.errors import UserError
from space.space import SearchSpace

FORMAT = "psvit-search/1"
Evaluate = Callable[[list[ArchSpec]], Sequence[float]]
Band = tuple[int | None, int | None]


class InfeasibleError(UserError, ValueError):
    """No architecture of the space satisfies the constraint; the message is one line."""


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 50  # candidates evaluated per generation (SPOS: 50)
    topk: int = 10  # parents are the best k of everything evaluated so far (SPOS keeps a top-10 pool)
    generations: int = 20  # 20 x 50 = 1000 evaluations, SPOS's budget
    mutations: int = 25  # children by mutating a random parent per generation (SPOS: 25)
    mutation_prob: float = 0.1  # each choice (op, tokens, dim) is resampled with this probability (SPOS: 0.1)
    crossovers: int = 25  # children by crossing two random parents (SPOS: 25); random samples fill the rest
    max_tries: int = 10_000  # proposals per fill before giving up, so a tight constraint cannot loop forever;
    # mutation and crossover get min(max_tries, 10 x their count), as in SPOS: a converged top-k mostly breeds
    # already-seen children, and random samples then fill the generation instead

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "mutation_prob":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"evolution.mutation_prob: {v!r} (allowed: a number in [0, 1])")
                continue
            least = 1 if f.name in ("population", "topk", "max_tries") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"evolution.{f.name}: {v!r} (allowed: an integer >= {least})")
        if self.mutations + self.crossovers > self.population:
            raise ValueError(f"evolution.mutations + evolution.crossovers: {self.mutations} + {self.crossovers} "
                             f"exceeds evolution.population {self.population}")


@dataclass(frozen=True)
class Constraint:
    flops_min: int | None = None  # MACs, inclusive; None = unbounded
    flops_max: int | None = None  # MACs, inclusive; None = unbounded
    params_max: int | None = None  # parameters, inclusive; None = unbounded

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                  or not math.isfinite(v)):
                raise ValueError(f"constraint.{f.name}: {v!r} (allowed: a non-negative number or null)")

    def admits(self, flops: int, params: int) -> bool:
        """Whether an architecture with these MACs and parameters satisfies the constraint."""
        return ((self.flops_min is None or flops >= self.flops_min)
                and (self.flops_max is None or flops <= self.flops_max)
                and (self.params_max is None or params <= self.params_max))

    def __call__(self, arch: ArchSpec) -> bool:
        c = arch_cost(arch)
        return self.admits(c.macs, c.params)

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
        return ", ".join(parts) or "unconstrained"


def _band(lo: float | None, hi: float | None) -> str:
    return f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _extremes(space: SearchSpace) -> tuple[ArchSpec, ...]:
    """Anchors for proposals near the ends of the cost range, where uniform samples rarely land."""
    return space.extreme("min", "macs"), space.extreme("max", "macs"), space.extreme("min", "params")


def _random_arch(space: SearchSpace, rng: random.Random, t: int, uniform_until: int,
                 extremes: Callable[[], tuple[ArchSpec, ...]]) -> ArchSpec:
    """Proposal number ``t``: uniform first; after ``uniform_until`` tries, every other one is a random-size
    mutation of an extreme architecture, so narrow bands at either end of the range are still found."""
    if t < uniform_until or t % 2 == 0:
        return space.sample(rng)
    anchors = extremes()
    return space.mutate(anchors[(t // 2) % len(anchors)], rng.random(), rng)


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
    lo, hi = space.flops_range()
    if (c.flops_min is not None and c.flops_min > hi) or (c.flops_max is not None and c.flops_max < lo):
        raise InfeasibleError(f"constraint flops {_band(c.flops_min, c.flops_max)} MACs is outside the space "
                              f"{space.name!r}'s exact range [{lo}, {hi}] MACs ({fmt_macs(lo)} to {fmt_macs(hi)})")
    plo, phi = space.params_range()
    if c.params_max is not None and c.params_max < plo:
        raise InfeasibleError(f"constraint params <= {c.params_max} is below the space {space.name!r}'s exact "
                              f"range [{plo}, {phi}] params ({fmt_params(plo)} to {fmt_params(phi)})")
    anchors: list[tuple[ArchSpec, ...]] = []

    def extremes() -> tuple[ArchSpec, ...]:
        if not anchors:
            anchors.append(_extremes(space))
        return anchors[0]

    for t in range(tries):
        arch = _random_arch(space, rng, t, 0, extremes)
        if constraint(arch):
            return arch
    raise InfeasibleError(f"no architecture of space {space.name!r} satisfying {c.describe()} found in {tries} "
                          f"tries (space: [{lo}, {hi}] MACs, [{plo}, {phi}] params); widen the constraint")


@dataclass(frozen=True)
class Record:
    generation: int  # generation that proposed it; -1 when built from a bare cache
    arch: str  # canonical ArchSpec JSON, also the cache key
    score: float  # higher is better
    flops: int  # MACs
    params: int

    def spec(self) -> ArchSpec:
        return ArchSpec.from_json(self.arch)


def _rank(r: Record) -> tuple[float, int, str]:
    """Best first: score desc, then fewer FLOPs, then canonical JSON, so every order is deterministic."""
    return -r.score, r.flops, r.arch


class RandomSearch:
    """Uniform random search with the same interface and budget as Evolution (``strategy=random``).

    Each generation evaluates ``population`` new, feasible, distinct architectures in one batched call.
    """

    strategy = "random"

    def __init__(self, space: SearchSpace, evaluate: Evaluate, rng: random.Random,
                 constraint: Constraint = Constraint(), cfg: EvolutionConfig = EvolutionConfig(),
                 cache: dict[str, float] | None = None) -> None:
        """
        Args:
            evaluate: scores a batch of architectures (higher is better), e.g. supernet accuracy.
            rng: the only source of randomness of the search.
            cache: canonical JSON -> score, shared and extended in place; pre-filled entries are never re-sent
                to ``evaluate`` (resume, or several budgets sharing one cache).
        """
        self.space, self.evaluate, self.rng, self.constraint, self.cfg = space, evaluate, rng, constraint, cfg
        self.cache: dict[str, float] = cache if cache is not None else {}
        self.history: list[Record] = []  # every candidate of every generation, in proposal order
        self.population: list[str] = []  # the last generation's candidates
        self.generation = 0  # generations completed
        self.evaluations = 0  # architectures sent to evaluate
        self._seen: set[str] = set()
        self._specs: dict[str, ArchSpec] = {}
        self._anchors: tuple[ArchSpec, ...] | None = None
        check_feasible(space, constraint, random.Random(0), cfg.max_tries)  # own rng: the search stream is untouched

    # ----------------------------------------------------------------- proposals
    def _offer(self, out: dict[str, tuple[ArchSpec, Cost]], arch: ArchSpec) -> None:
        """Accept ``arch`` into this generation if it is new to the run and satisfies the constraint."""
        key = arch.to_json()
        if key in out or key in self._seen:
            return
        cost = arch_cost(arch)
        if self.constraint.admits(cost.macs, cost.params):
            out[key] = (arch, cost)

    def _fill(self, out: dict[str, tuple[ArchSpec, Cost]], n: int, propose: Callable[[], ArchSpec]) -> None:
        target = len(out) + n
        for _ in range(min(self.cfg.max_tries, 10 * n)):
            if len(out) >= target:
                return
            self._offer(out, propose())

    def _fill_random(self, out: dict[str, tuple[ArchSpec, Cost]], n: int) -> None:
        target, half = len(out) + n, self.cfg.max_tries // 2
        for t in range(self.cfg.max_tries):
            if len(out) >= target:
                return
            self._offer(out, _random_arch(self.space, self.rng, t, half, self._extremes))

    def _extremes(self) -> tuple[ArchSpec, ...]:
        if self._anchors is None:
            self._anchors = _extremes(self.space)
        return self._anchors

    def _spec(self, key: str) -> ArchSpec:
        if key not in self._specs:
            self._specs[key] = ArchSpec.from_json(key)
        return self._specs[key]

    def _propose(self) -> dict[str, tuple[ArchSpec, Cost]]:
        out: dict[str, tuple[ArchSpec, Cost]] = {}
        self._fill_random(out, self.cfg.population)
        return out

    # ----------------------------------------------------------------- the loop
    def step(self) -> list[Record]:
        """Run one generation: propose, evaluate the uncached candidates in one batch, record. Returns its records.

        A generation is smaller than ``population`` only if ``max_tries`` proposals found no more new feasible
        architectures (a nearly exhausted space or a very narrow band).
        """
        cand = self._propose()
        todo = [k for k in cand if k not in self.cache]
        if todo:
            scores = list(self.evaluate([cand[k][0] for k in todo]))
            if len(scores) != len(todo):
                raise ValueError(f"evaluate: returned {len(scores)} scores for {len(todo)} architectures")
            for k, s in zip(todo, scores):
                s = float(s)
                if math.isnan(s):
                    raise ValueError(f"evaluate: score is NaN for {cand[k][0].short()}")
                self.cache[k] = s
            self.evaluations += len(todo)
        recs = [Record(self.generation, k, self.cache[k], c.macs, c.params) for k, (_, c) in cand.items()]
        self.history.extend(recs)
        self._seen.update(cand)
        self._specs.update((k, a) for k, (a, _) in cand.items())
        self.population = list(cand)
        self.generation += 1
        return recs

    def run(self, callback: Callable[[Any], None] | None = None) -> Record | None:
        """Run the remaining generations, calling ``callback(self)`` after each (save state, log). Returns the best."""
        while self.generation < self.cfg.generations:
            self.step()
            if callback is not None:
                callback(self)
        return self.best

    def topk(self, n: int) -> list[Record]:
        """The best ``n`` candidates evaluated by this run (score desc, then FLOPs asc, then JSON)."""
        return sorted(self.history, key=_rank)[:n]

    @property
    def best(self) -> Record | None:
        top = self.topk(1)
        return top[0] if top else None

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain JSON-serializable values."""
        version, internal, gauss = self.rng.getstate()
        return {"format": FORMAT, "strategy": self.strategy, "space": self.space.to_config(),
                "constraint": asdict(self.constraint), "cfg": asdict(self.cfg), "generation": self.generation,
                "evaluations": self.evaluations, "rng": [version, list(internal), gauss],
                "population": list(self.population), "history": [asdict(r) for r in self.history],
                "cache": dict(self.cache)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (possibly through JSON); only ``cfg.generations`` may differ (extend a run).

        Raises:
            ValueError: the state belongs to another format, strategy, space, constraint or config.
        """
        if state.get("format") != FORMAT:
            raise ValueError(f"state.format: {state.get('format')!r} (supported: {FORMAT!r})")
        mine = self.state_dict()
        for key in ("strategy", "space", "constraint"):
            if _plain(state[key]) != _plain(mine[key]):
                raise ValueError(f"state.{key}: the saved search used {state[key]!r}, this one {mine[key]!r}")
        for k, v in mine["cfg"].items():
            if k != "generations" and state["cfg"].get(k) != v:
                raise ValueError(f"state.cfg.{k}: {state['cfg'].get(k)!r} in the saved search, {v!r} now "
                                 f"(resume with the same config)")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generation, self.evaluations = int(state["generation"]), int(state["evaluations"])
        self.population = list(state["population"])
        self.history = [Record(**r) for r in state["history"]]
        self.cache.update(state["cache"])
        self._seen = {r.arch for r in self.history}
        self._specs = {}


def _plain(v: Any) -> Any:
    """Tuples as lists, so a state that went through JSON compares equal to a fresh one."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class Evolution(RandomSearch):
    """SPOS evolution: generation 0 is random; later ones mutate and cross the top-k of all evaluated so far.

    Every child must satisfy the constraint and be new to the run (SPOS skips visited candidates), so each
    generation spends its whole budget on unseen architectures; random samples fill any shortfall.
    """

    strategy = "evolution"

    def _propose(self) -> dict[str, tuple[ArchSpec, Cost]]:
        out: dict[str, tuple[ArchSpec, Cost]] = {}
        parents = [self._spec(r.arch) for r in self.topk(self.cfg.topk)]
        if self.generation > 0 and parents:
            cfg, rng, space = self.cfg, self.rng, self.space

            def mutate() -> ArchSpec:
                return space.mutate(rng.choice(parents), cfg.mutation_prob, rng)

            def cross() -> ArchSpec:
                a, b = rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
                return space.crossover(a, b, rng)

            self._fill(out, cfg.mutations, mutate)
            self._fill(out, cfg.crossovers, cross)
        self._fill_random(out, self.cfg.population - len(out))
        return out


# --------------------------------------------------------------------- reading results
def records_from_cache(cache: Mapping[str, float], space: SearchSpace) -> list[Record]:
    """Records (generation -1) for every cached architecture that belongs to ``space``."""
    out = []
    for key, score in cache.items():
        arch = ArchSpec.from_json(key)
        if space.contains(arch):
            c = arch_cost(arch)
            out.append(Record(-1, key, float(score), c.macs, c.params))
    return out


def best_per_budget(source: Iterable[Record] | Mapping[str, float], space: SearchSpace,
                    budgets: Sequence[Band]) -> list[Record | None]:
    """The best architecture within each FLOPs band, all picked from one shared set of evaluations.

    Args:
        source: search history records, or a cache (canonical JSON -> score).
        budgets: (flops_min, flops_max) MACs per band, inclusive, None for unbounded.

    Returns:
        One record per band, None where no evaluated architecture falls in it.
    """
    records = records_from_cache(source, space) if isinstance(source, Mapping) else list(source)
    out: list[Record | None] = []
    for i, (lo, hi) in enumerate(budgets):
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"budgets[{i}]: flops_min {lo} > flops_max {hi}")
        band = Constraint(flops_min=lo, flops_max=hi)
        inside = [r for r in records if band.admits(r.flops, r.params)]
        out.append(min(inside, key=_rank) if inside else None)
    return out


def pareto_front(records: Iterable[Record]) -> list[Record]:
    """Records not dominated in (max score, min FLOPs), by FLOPs ascending; one per architecture."""
    front: list[Record] = []
    for r in sorted({r.arch: r for r in records}.values(), key=lambda r: (r.flops, -r.score, r.arch)):
        if not front or r.score > front[-1].score:
            front.append(r)
    return front
