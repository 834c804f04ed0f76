"""The search's last stage: the best ``k`` candidates of each budget by their fitness score (inherited top-1 on
the fixed ``eval_images`` subset) are scored again on the whole held-out validation split, and the winner is
picked from those scores. Candidates of one band often lie within the fitness subset's noise (1000 images:
one image is 0.001 top-1), so the subset picks the finalists and the whole split picks among them.

Pure Python and numpy: it gets ``correct(archs) -> one 0/1 vector per architecture over the same images`` and
returns the re-scored finalists and the winner's lead over the runner-up with a paired bootstrap interval
(the same images resampled for both, search/ranking.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from search.constraint import Constraint
from search.evolution import Record, ranked
from search.ranking import Estimate, paired_difference
from space.arch import ArchSpec

Correct = Callable[[list[ArchSpec]], Sequence[np.ndarray]]  # (images,) 0/1 per architecture, same images


@dataclass(frozen=True)
class Finalist:
    record: Record  # its fitness-subset score is ``record.score``
    full: float  # top-1 on the whole validation split


@dataclass(frozen=True)
class Final:
    """One budget's re-scored finalists, best first by ``full``, and the winner's lead over the runner-up."""

    finalists: list[Finalist]
    lead: Estimate | None  # winner minus runner-up on the same images; None with a single finalist
    images: int

    @property
    def winner(self) -> Finalist:
        return self.finalists[0]


def finalists(records: Sequence[Record], constraint: Constraint, k: int) -> list[Record]:
    """The best ``k`` distinct architectures of ``records`` that ``constraint`` admits, by fitness score."""
    inside = [r for r in ranked(records) if constraint.admits(r.macs, r.params, constraint.latency_ms(r.arch))]
    return inside[:k]


def rescore(chosen: list[list[Record]], correct: Correct, resamples: int = 2000, seed: int = 0) -> list[Final | None]:
    """Score every budget's finalists on the whole split (one batched call, each architecture once) and rank
    them: whole-split top-1 desc, then the fitness ranking (fewer MACs, canonical JSON) for exact ties."""
    unique = list(dict.fromkeys(r.arch for recs in chosen for r in recs))
    vectors = dict(zip(unique, (np.asarray(v, dtype=np.float64) for v in correct(unique))))
    out: list[Final | None] = []
    for recs in chosen:
        if not recs:
            out.append(None)
            continue
        order = {r.arch: i for i, r in enumerate(recs)}  # the fitness ranking, for ties
        fin = sorted((Finalist(r, float(vectors[r.arch].mean())) for r in recs),
                     key=lambda f: (-f.full, order[f.record.arch]))
        lead = None
        if len(fin) > 1:
            lead = paired_difference(vectors[fin[0].record.arch], vectors[fin[1].record.arch], resamples, seed)
        out.append(Final(fin, lead, len(vectors[recs[0].arch])))
    return out
