"""The search loop (SPOS, Guo et al. 2019, as in PSViT) and the reading of its results.

A :class:`Search` proposes a generation, scores the candidates it has not seen with one batched
``evaluate(archs) -> scores`` call and records them; :class:`Evolution` and :class:`RandomSearch` differ only
in how they propose. Pure Python: no torch, no DDP, no logging. Every rank of a distributed search runs this
same deterministic loop and lets ``evaluate`` split each batch across ranks. Architectures are
:class:`ArchSpec` values in memory; canonical JSON appears only in ``state_dict`` (format psvit-search/1).
FLOPs are multiply-accumulates (MACs), see ``space.cost``.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

from search.constraint import Constraint, check_feasible, extremes, random_arch
from space.arch import ArchSpec
from space.cost import Cost, arch_cost
from space.space import SearchSpace

FORMAT = "psvit-search/1"
Evaluate = Callable[[list[ArchSpec]], Sequence[float]]
Candidates = dict[ArchSpec, Cost]  # one generation's proposals, in proposal order


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
class Record:
    generation: int  # generation that proposed it; -1 when built from a bare cache
    arch: ArchSpec
    score: float  # higher is better
    macs: int  # FLOPs as multiply-accumulates
    params: int

    @cached_property
    def canonical(self) -> str:
        """Canonical JSON of ``arch``: the last tie-break of every ranking. Any fixed total order would be
        deterministic; this one is the order runs of format psvit-search/1 used, so their results stand."""
        return self.arch.to_json()


def _rank(r: Record) -> tuple[float, int, str]:
    """Best first: score desc, then fewer MACs, then canonical JSON, so every order is deterministic."""
    return -r.score, r.macs, r.canonical


class Search(ABC):
    """The loop shared by every strategy: propose a generation, evaluate its uncached candidates in one
    batched call, record. Subclasses only say how a generation is proposed (:meth:`propose`).

    Every candidate of a run must satisfy the constraint and be new to the run (SPOS skips visited
    candidates), so each generation spends its whole budget on unseen architectures.
    """

    strategy: ClassVar[str]  # the config's `strategy=` value, also saved in the state

    def __init__(self, space: SearchSpace, evaluate: Evaluate, rng: random.Random,
                 constraint: Constraint = Constraint(), cfg: EvolutionConfig = EvolutionConfig(),
                 cache: dict[ArchSpec, float] | None = None) -> None:
        """
        Args:
            evaluate: scores a batch of architectures (higher is better), e.g. supernet accuracy.
            rng: the only source of randomness of the search.
            cache: architecture -> score, shared and extended in place; pre-filled entries are never re-sent
                to ``evaluate`` (resume, or several budgets sharing one cache).

        Raises:
            InfeasibleError: no architecture of ``space`` satisfies ``constraint``.
        """
        self.space, self.evaluate, self.rng, self.constraint, self.cfg = space, evaluate, rng, constraint, cfg
        self.cache: dict[ArchSpec, float] = cache if cache is not None else {}
        self.history: list[Record] = []  # every candidate of every generation, in proposal order
        self.population: list[ArchSpec] = []  # the last generation's candidates
        self.generation = 0  # generations completed
        self.evaluations = 0  # architectures sent to evaluate
        self._seen: set[ArchSpec] = set()
        self._anchors: tuple[ArchSpec, ...] | None = None
        self._texts: dict[ArchSpec, str] = {}  # canonical JSON already computed for state_dict (it is not cheap)
        check_feasible(space, constraint, random.Random(0), cfg.max_tries)  # own rng: the search stream is untouched

    # ----------------------------------------------------------------- proposals
    @abstractmethod
    def propose(self) -> Candidates:
        """The next generation: at most ``cfg.population`` feasible architectures new to the run."""

    def _offer(self, out: Candidates, arch: ArchSpec) -> None:
        """Accept ``arch`` into this generation if it is new to the run and satisfies the constraint."""
        if arch in out or arch in self._seen:
            return
        cost = arch_cost(arch)
        if self.constraint.admits(cost.macs, cost.params, self.constraint.latency_ms(arch)):
            out[arch] = cost

    def _fill(self, out: Candidates, n: int, propose: Callable[[], ArchSpec]) -> None:
        target = len(out) + n
        for _ in range(min(self.cfg.max_tries, 10 * n)):
            if len(out) >= target:
                return
            self._offer(out, propose())

    def _fill_random(self, out: Candidates, n: int) -> None:
        target, half = len(out) + n, self.cfg.max_tries // 2
        for t in range(self.cfg.max_tries):
            if len(out) >= target:
                return
            self._offer(out, random_arch(self.space, self.rng, t, half, self._extremes))

    def _extremes(self) -> tuple[ArchSpec, ...]:
        if self._anchors is None:
            self._anchors = extremes(self.space)
        return self._anchors

    # ----------------------------------------------------------------- the loop
    def step(self) -> list[Record]:
        """Run one generation: propose, evaluate the uncached candidates in one batch, record. Returns its records.

        A generation is smaller than ``population`` only if ``max_tries`` proposals found no more new feasible
        architectures (a nearly exhausted space or a very narrow band).
        """
        cand = self.propose()
        todo = [a for a in cand if a not in self.cache]
        if todo:
            scores = list(self.evaluate(todo))
            if len(scores) != len(todo):
                raise ValueError(f"evaluate: returned {len(scores)} scores for {len(todo)} architectures")
            for a, s in zip(todo, scores):
                s = float(s)
                if math.isnan(s):
                    raise ValueError(f"evaluate: score is NaN for {a.short()}")
                self.cache[a] = s
            self.evaluations += len(todo)
        recs = [Record(self.generation, a, self.cache[a], c.macs, c.params) for a, c in cand.items()]
        self.history.extend(recs)
        self._seen.update(cand)
        self.population = list(cand)
        self.generation += 1
        return recs

    def run(self, callback: Callable[[Search], None] | None = None) -> Record | None:
        """Run the remaining generations, calling ``callback(self)`` after each (save state, log). Returns the best."""
        while self.generation < self.cfg.generations:
            self.step()
            if callback is not None:
                callback(self)
        return self.best

    def topk(self, n: int) -> list[Record]:
        """The best ``n`` candidates evaluated by this run (score desc, then MACs asc, then JSON)."""
        return sorted(self.history, key=_rank)[:n]

    @property
    def best(self) -> Record | None:
        top = self.topk(1)
        return top[0] if top else None

    # ----------------------------------------------------------------- resume
    def _identity(self) -> dict[str, Any]:
        """What a saved state must share with this search to resume it."""
        return {"strategy": self.strategy, "space": self.space.to_config(), "constraint": self.constraint.identity(),
                "cfg": asdict(self.cfg)}

    def _text(self, arch: ArchSpec) -> str:
        text = self._texts.get(arch)
        if text is None:
            text = self._texts[arch] = arch.to_json()
        return text

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain JSON-serializable values (architectures as canonical
        JSON, records with their MACs under ``"flops"``: the field names of format psvit-search/1)."""
        version, internal, gauss = self.rng.getstate()
        return {"format": FORMAT, **self._identity(), "generation": self.generation,
                "evaluations": self.evaluations, "rng": [version, list(internal), gauss],
                "population": [self._text(a) for a in self.population],
                "history": [{"generation": r.generation, "arch": self._text(r.arch), "score": r.score,
                             "flops": r.macs, "params": r.params} for r in self.history],
                "cache": {self._text(a): s for a, s in self.cache.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (possibly through JSON); only ``cfg.generations`` may differ (extend a run).

        Raises:
            ValueError: the state belongs to another format, strategy, space, constraint or config.
        """
        if state.get("format") != FORMAT:
            raise ValueError(f"state.format: {state.get('format')!r} (supported: {FORMAT!r})")
        mine = self._identity()
        for key in ("strategy", "space", "constraint"):
            if _plain(state[key]) != _plain(mine[key]):
                raise ValueError(f"state.{key}: the saved search used {state[key]!r}, this one {mine[key]!r}")
        for k, v in mine["cfg"].items():
            if k != "generations" and state["cfg"].get(k) != v:
                raise ValueError(f"state.cfg.{k}: {state['cfg'].get(k)!r} in the saved search, {v!r} now "
                                 f"(resume with the same config)")
        specs: dict[str, ArchSpec] = {}

        def spec(text: str) -> ArchSpec:  # each saved architecture is parsed once
            if text not in specs:
                specs[text] = ArchSpec.from_json(text)
            return specs[text]

        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generation, self.evaluations = int(state["generation"]), int(state["evaluations"])
        self.population = [spec(t) for t in state["population"]]
        self.history = [Record(r["generation"], spec(r["arch"]), r["score"], r["flops"], r["params"])
                        for r in state["history"]]
        self.cache.update((spec(t), s) for t, s in state["cache"].items())
        self._seen = {r.arch for r in self.history}
        self._texts = {a: t for t, a in specs.items()}


def _plain(v: Any) -> Any:
    """Tuples as lists, so a state that went through JSON compares equal to a fresh one."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class RandomSearch(Search):
    """Uniform random search with the same interface and budget as Evolution (``strategy=random``): each
    generation is ``population`` new, feasible, distinct random architectures."""

    strategy = "random"

    def propose(self) -> Candidates:
        out: Candidates = {}
        self._fill_random(out, self.cfg.population)
        return out


class Evolution(Search):
    """SPOS evolution: generation 0 is random; later ones mutate and cross the top-k of all evaluated so far,
    and random samples fill any shortfall."""

    strategy = "evolution"

    def propose(self) -> Candidates:
        out: Candidates = {}
        parents = [r.arch for r in self.topk(self.cfg.topk)]
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
def ranked(records: Iterable[Record]) -> list[Record]:
    """One record per architecture, best first (score desc, then MACs asc, then JSON)."""
    return sorted({r.arch: r for r in records}.values(), key=_rank)


def records_from_cache(cache: Mapping[ArchSpec, float], space: SearchSpace) -> list[Record]:
    """Records (generation -1) for every cached architecture that belongs to ``space``."""
    out = []
    for arch, score in cache.items():
        if space.contains(arch):
            c = arch_cost(arch)
            out.append(Record(-1, arch, float(score), c.macs, c.params))
    return out


def best_per_budget(source: Iterable[Record] | Mapping[ArchSpec, float], space: SearchSpace,
                    budgets: Sequence[Constraint]) -> list[Record | None]:
    """The best architecture within each budget, all picked from one shared set of evaluations.

    Args:
        source: search history records, or a cache (architecture -> score).
        budgets: one constraint per band (FLOPs band in MACs and params bound, inclusive).

    Returns:
        One record per band, None where no evaluated architecture satisfies it.
    """
    records = records_from_cache(source, space) if isinstance(source, Mapping) else list(source)
    out: list[Record | None] = []
    for i, band in enumerate(budgets):
        lo, hi = band.flops_min, band.flops_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"budgets[{i}]: flops_min {lo} > flops_max {hi}")
        inside = [r for r in records if band.admits(r.macs, r.params, band.latency_ms(r.arch))]
        out.append(min(inside, key=_rank) if inside else None)
    return out


def pareto_front(records: Iterable[Record]) -> list[Record]:
    """Records not dominated in (max score, min MACs), by MACs ascending; one per architecture."""
    front: list[Record] = []
    for r in sorted({r.arch: r for r in records}.values(), key=lambda r: (r.macs, -r.score, r.canonical)):
        if not front or r.score > front[-1].score:
            front.append(r)
    return front
