"""The gradient all-reduce overlapped with backward (engine/distributed.py, GradReducer) against the plain
post-backward reduction it replaces (allreduce_gradients), on 2 gloo ranks and a tiny supernet: bit-identical
gradients for uniform and sandwich steps at several bucket sizes, in both entangle modes (the parameters' full
gradients, or entangle=slice's slice leaves), off-path gradients left None, buckets launched during the step's
final backward only. Runs on random tensors, so it needs no dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]}
# 1 byte: every gradient its own bucket; 512 bytes: many buckets of a few gradients (the largest is 1152 bytes);
# the 25 MB default: one bucket, all of it reduced in finish()
BUCKETS = (1, 512, 25 << 20)
STEPS = 3
ENTANGLE = ("dense", "slice")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("supernet", overrides=list(overrides))


def _tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a step trains: the parameters, or with entangle=slice the step's slice leaves (in the order taken)."""
    if net.slices is None:
        return dict(net.named_parameters())
    return {f"leaf{i}": leaf for i, leaf in enumerate(net.slices.leaves())}


def _grads(net: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in _tensors(net).items()}


def _compare(env, sampler: str, bucket_bytes: int, entangle: str) -> list[dict[str, int]]:
    """STEPS steps of ``sampler``, each run twice from zeroed gradients: the plain backward then
    allreduce_gradients, and the Trainer's way (LossBackward with the reducer, then finish()). Asserts they
    agree bit for bit; returns each step's counts."""
    from space.space import SearchSpace
    from supernet.engine.distributed import GradReducer, allreduce_gradients
    from supernet.engine.loop import LossBackward
    from supernet.model.supernet import Supernet
    from supernet.train import SupernetTask

    torch.manual_seed(0)  # the same weights on both ranks
    net = Supernet(SearchSpace.from_config(TINY), entangle)
    distill = ["distill=inplace"] if sampler == "sandwich" else []
    task = SupernetTask(net, _cfg(f"sampler={sampler}", "sandwich_n=2", *distill), None, env)
    reducer = GradReducer(net.parameters(), env, bucket_bytes, leaves=None if net.slices is None else net.slices.leaves)
    plain = LossBackward(env.device, False, 0.1)  # the reducer's hooks stay inert: never armed
    overlapped = LossBackward(env.device, False, 0.1, reducer)
    counts = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + env.rank)  # each rank its own images
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        net.zero_grad(set_to_none=True)
        plain(lambda: net(x, task.sampler.paths(step)[-1]), y)
        last_path = sum(p.grad is not None for p in _tensors(net).values())  # what the final backward touches

        net.zero_grad(set_to_none=True)
        task.backward(x, y, step, plain)
        local = _grads(net)
        allreduce_gradients(_tensors(net).values(), env, bucket_bytes)
        want = _grads(net)

        net.zero_grad(set_to_none=True)
        task.backward(x, y, step, overlapped)
        reducer.finish()
        got = _grads(net)

        assert any(w is not None and not torch.equal(w, v) for w, v in zip(want.values(), local.values()))
        for name, w in want.items():
            assert (w is None) == (got[name] is None) == (local[name] is None), name  # off-path: still None
            assert w is None or torch.equal(w, got[name]), name
        trained = {id(w) for w, _ in net.slices.trained()} if net.slices is not None else \
            {id(p) for p in net.parameters() if p.grad is not None}
        assert net.slices is None or all(p.grad is None for p in net.parameters())
        counts.append({"overlapped": reducer.overlapped, "buckets": reducer.buckets, "last_path": last_path,
                       "with_grad": sum(v is not None for v in got.values()),
                       "off_path": sum(id(p) not in trained for p in net.parameters())})
    return counts


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from supernet.engine.distributed import distributed

    with distributed("cpu") as env:
        seen = {f"{e}/{s}/{b}": _compare(env, s, b, e) for e in ENTANGLE for s in ("uniform", "sandwich")
                for b in BUCKETS}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, fork_ranks, free_port) -> tuple[dict, dict]:
    """Both ranks' counts of every case (entangle mode, sampler, bucket size), from one run of 2 gloo ranks."""
    out = tmp_path_factory.mktemp("reducer")
    fork_ranks(_worker, (free_port(), str(out)))
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.parametrize("entangle", ENTANGLE)
def test_overlapped_reduction_equals_the_plain_one_bit_for_bit(ranks, entangle):
    """entangle=slice: the buckets carry the step's slice leaves (hooked as each backward starts, reduced in the
    order taken), the parameters keep no gradient."""
    r0, r1 = ranks
    assert r0 == r1  # the same buckets on both ranks
    e = entangle
    for step in r0[f"{e}/uniform/1"]:  # one gradient a bucket: each launched by its hook, during backward
        assert step["overlapped"] == step["buckets"] == step["last_path"] == step["with_grad"]
        assert step["off_path"] > 0
    for step in r0[f"{e}/sandwich/1"]:  # the final path's gradients during backward, the earlier paths' in finish()
        assert step["overlapped"] == step["last_path"] and step["buckets"] == step["with_grad"]
    assert any(step["with_grad"] > step["last_path"] for step in r0[f"{e}/sandwich/1"])
    for sampler in ("uniform", "sandwich"):
        assert all(0 < st["overlapped"] < st["last_path"] for st in r0[f"{e}/{sampler}/512"])
        assert all(st["overlapped"] == 0 and st["buckets"] == 1 for st in r0[f"{e}/{sampler}/{25 << 20}"])


def test_a_backward_after_the_final_one_is_refused():
    """A task with several passes that leaves the earlier ones final=True would have their unfinished
    gradients reduced: the reducer refuses the next pass until finish() ends the step."""
    from supernet.engine.distributed import DistEnv, GradReducer

    reducer = GradReducer([torch.nn.Parameter(torch.ones(2))], DistEnv(0, 1, 0, torch.device("cpu")))
    with reducer.backward(final=False):
        pass
    with reducer.backward(final=True):
        pass
    with pytest.raises(RuntimeError, match="a backward pass after the step's final one"):
        with reducer.backward(final=True):
            pass
    reducer.finish()
    with reducer.backward(final=True):  # the next step
        pass
