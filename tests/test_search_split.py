"""How a distributed search deals a batch of candidates to the ranks (search/inherited.py,
InheritedAccuracy.share): by MACs, largest first onto the least-loaded rank, the same split on every rank, each
candidate on exactly one rank. Pure arithmetic on imagenet_tiny_2d's costs: no model, no data, no process group
(the end-to-end runs: test_search_app.py's 2-rank tests)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from space.cost import macs
from space.space import SearchSpace

REPO = Path(__file__).resolve().parents[1]


def _skewed_batch() -> list:
    """imagenet_tiny_2d's extremes (5.48 G and 31.7 M MACs) alternating, then 17 uniform samples: round-robin
    hands every 5.48 G candidate to the even ranks."""
    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "imagenet_tiny_2d.yaml"))
    hi, lo = space.extreme("max"), space.extreme("min")
    assert (macs(hi), macs(lo)) == (5_475_546_496, 31_746_560)
    rng = random.Random(0)
    return [hi, lo] * 4 + [space.sample(rng) for _ in range(17)]


def _shares(archs: list, world: int) -> list[list[int]]:
    """What each rank of ``world`` scores, each computed by its own scorer, as the ranks do."""
    from search.inherited import InheritedAccuracy
    from supernet.engine.distributed import DistEnv

    return [InheritedAccuracy(None, [], DistEnv(r, world, r, torch.device("cpu"))).share(archs) for r in range(world)]


@pytest.mark.parametrize("world, round_robin_over", [(2, 1.6), (4, 1.7)])
def test_a_skewed_batch_is_balanced_by_macs_where_round_robin_is_not(world: int, round_robin_over: float):
    archs = _skewed_batch()
    cost = [macs(a) for a in archs]
    ideal = sum(cost) / world
    shares = _shares(archs, world)
    assert sorted(i for s in shares for i in s) == list(range(len(archs)))  # each candidate scored exactly once
    load = [sum(cost[i] for i in s) for s in shares]
    round_robin = [sum(cost[r::world]) for r in range(world)]
    # measured: makespan / ideal 1.005 (2 ranks) and 1.030 (4) against round-robin's 1.630 and 1.748
    assert max(load) <= 1.05 * ideal and max(round_robin) >= round_robin_over * ideal
    assert max(load) - min(load) <= max(cost)  # the greedy rule's bound


def test_the_split_is_deterministic_and_one_process_scores_everything():
    archs = _skewed_batch()
    assert _shares(archs, 2) == _shares(list(archs), 2)
    assert all(s == sorted(s) for s in _shares(archs, 2))  # each rank scores its share in batch order
    assert _shares(archs, 1) == [list(range(len(archs)))]
