"""entangle=slice (model/entangle.py, engine/optim.py SliceAdamW): a path's step gives its weights slice-sized
gradients, moves exactly what AdamW moves on the extracted path and nothing outside the trained slices, merges
the sizes a sandwich step uses, and survives a state_dict round trip; entangle=dense (the default) keeps today's
full-size gradients and updates. Tiny spaces, random tensors: no dataset."""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from space.space import SearchSpace
from supernet.engine.optim import SliceAdamW, build_optimizer
from supernet.model.entangle import column_major
from supernet.model.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"name": "tiny", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]}
TINY_1D = {**TINY, "pooling": "1d", "stages": [{"cells": 2, "tokens": [16], "dims": [4, 8]},
                                               {"cells": 2, "tokens": [9, 4], "dims": [8, 12]}]}
OPTIM = OmegaConf.create({"lr": 0.05, "min_lr": 1e-5, "warmup_epochs": 0, "weight_decay": 0.05,
                          "betas": [0.9, 0.999]})


def supernets(space_cfg: dict, *modes: str) -> list[Supernet]:
    """Supernets of ``modes`` holding the same weights, perturbed off their init (norms at 1, biases at 0 would
    hide a wrongly sliced norm or bias)."""
    space = SearchSpace.from_config(space_cfg)
    torch.manual_seed(0)
    ref = Supernet(space)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    nets = []
    for mode in modes:
        net = Supernet(space, mode).train()
        net.load_state_dict(ref.state_dict())
        nets.append(net)
    return nets


def small_path(space: SearchSpace, seed: int = 0):
    """A path below the largest sizes in every stage, with both ops."""
    rng = random.Random(seed)
    while True:
        arch = space.sample(rng)
        ops = {op for s in arch.stages for op in s.cells}
        if {"basic", "shared"} <= ops and arch.stages[-1].dim < max(space.stages[-1].dims):
            return arch


def batch(space: SearchSpace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, space.in_chans, space.img_size, space.img_size, generator=g),
            torch.randint(0, space.num_classes, (3,), generator=g))


def path_sources(net: Supernet, arch) -> dict[str, torch.Tensor]:
    """The supernet parameter behind every parameter name of the extracted PSViT."""
    out = {"pos_embed": net.pos_embed, **({"cls_token": net.cls_token} if net.cls_token is not None else {})}
    for prefix, module in net.path_modules(arch).items():
        out.update({f"{prefix}.{n}": q for n, q in module.named_parameters()})
    return out


def box(t: torch.Tensor, shape) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def grad_of(weight: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A slice leaf's gradient in the weight's (out, in) orientation (linear weights' leaves are transposed)."""
    return leaf.grad.t() if column_major(weight) else leaf.grad


@pytest.mark.parametrize("space_cfg", [TINY, TINY_1D], ids=["2d", "1d"])
def test_slice_gradients_are_the_slices_of_the_dense_ones_and_parameters_keep_none(space_cfg):
    dense, sliced = supernets(space_cfg, "dense", "slice")
    arch = small_path(dense.space)
    x, y = batch(dense.space, 1)
    for net in (dense, sliced):
        torch.nn.functional.cross_entropy(net(x, arch), y).backward()
    assert all(p.grad is None for p in sliced.parameters())
    trained = {id(w): leaf for w, leaf in sliced.slices.trained()}
    names = {id(p): n for n, p in sliced.named_parameters()}
    sub = sliced.extract(arch)
    src_dense, src_slice = path_sources(dense, arch), path_sources(sliced, arch)
    assert len(trained) == len(src_slice) == len(list(sub.parameters())) > 20
    for name, p in sub.named_parameters():
        grad = grad_of(src_slice[name], trained[id(src_slice[name])])
        assert grad.shape == p.shape, names[id(src_slice[name])]
        g_dense = src_dense[name].grad
        torch.testing.assert_close(grad, box(g_dense, p.shape), atol=1e-6, rtol=1e-5, msg=name)
        outside = g_dense.clone()
        box(outside, p.shape).zero_()
        assert outside.abs().sum() == 0, name  # dense: the full-size gradient is zero outside the slice
    sliced.zero_grad()
    assert sliced.slices.leaves() == [] and sliced.slices.trained() == []


def test_a_slice_step_is_adamw_on_the_extracted_path_and_moves_nothing_else():
    """Two steps on one path: the path's slices of weights and moments end bit for bit where torch's AdamW takes
    the extracted subnet given the same gradients; every element outside them (weights, exp_avg, exp_avg_sq) and
    every weight off the path is untouched. A third step on another path leaves the first path's extra rows
    alone. entangle=dense moves and decays the whole tensor instead (today's behaviour)."""
    dense, sliced = supernets(TINY, "dense", "slice")
    space, arch = sliced.space, small_path(sliced.space)
    opt, _ = build_optimizer(sliced, OPTIM, 256, 10, 100, torch.device("cpu"))
    assert isinstance(opt, SliceAdamW)
    sub = sliced.extract(arch)
    sub_opt, _ = build_optimizer(sub, OPTIM, 256, 10, 100, torch.device("cpu"))
    assert type(sub_opt) is torch.optim.AdamW
    before = {n: p.detach().clone() for n, p in sliced.named_parameters()}
    src = path_sources(sliced, arch)
    trained_ids = {id(p) for p in src.values()}
    for step in range(2):
        x, y = batch(space, 10 + step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(sliced(x, arch), y).backward()
        leaves = {id(w): leaf for w, leaf in sliced.slices.trained()}
        sub_opt.zero_grad()
        for name, p in sub.named_parameters():
            p.grad = grad_of(src[name], leaves[id(src[name])]).clone()
        opt.step()
        sub_opt.step()
    names = {id(p): n for n, p in sliced.named_parameters()}
    for name, p in sub.named_parameters():
        w = src[name]
        assert torch.equal(box(w.detach(), p.shape), p.detach()), name
        moved = w.detach() != before[names[id(w)]]
        assert box(moved, p.shape).any(), name  # trained
        box(moved, p.shape).zero_()
        assert not moved.any(), name  # no weight decay, no momentum outside the slice
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(box(opt.state[w][key], p.shape), sub_opt.state[p][key]), (name, key)
            rest = opt.state[w][key].clone()
            box(rest, p.shape).zero_()
            assert rest.abs().sum() == 0, (name, key)  # never written outside the slice
        assert opt.state[w]["step"].item() == 2
    for name, p in sliced.named_parameters():
        if id(p) not in trained_ids:
            assert torch.equal(p.detach(), before[name]) and p not in opt.state, name
    w = sliced.stages[1].cells[0].basic.layer.mlp.fc1.weight  # grows with the third path below
    first = w.detach().clone()
    big = replace(space.extreme("max"), stages=tuple(replace(s, cells=("basic",) * len(s.cells))
                                                     for s in space.extreme("max").stages))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(sliced(batch(space, 20)[0], big), batch(space, 20)[1]).backward()
    opt.step()
    assert not torch.equal(w.detach(), first)

    dense_opt, _ = build_optimizer(dense, OPTIM, 256, 10, 100, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    x, y = batch(space, 10)
    torch.nn.functional.cross_entropy(dense(x, arch), y).backward()
    dense_opt.step()
    head = dense.head.weight
    d = arch.stages[-1].dim
    assert not torch.equal(head.detach()[:, d:], before["head.weight"][:, d:])  # decayed outside the slice


def test_a_sandwich_step_trains_the_bounding_box_of_its_sizes():
    """Leaves of several sizes of one weight (the largest and a smaller path in one step) give one gradient of
    their leading bounding box: the sum, as dense accumulation gives it."""
    dense, sliced = supernets(TINY, "dense", "slice")
    space = dense.space
    paths = [space.extreme("max"), small_path(space, 3)]
    x, y = batch(space, 5)
    for net in (dense, sliced):
        for arch in paths:
            torch.nn.functional.cross_entropy(net(x, arch), y).backward()
    trained = sliced.slices.trained()
    assert len({id(w) for w, _ in trained}) == len(trained)  # one entry a weight
    assert len(sliced.slices.leaves()) > len(trained)  # several sizes were taken
    names = {id(p): n for n, p in dense.named_parameters()}
    dense_by_name = dict(dense.named_parameters())
    sliced_names = {id(p): n for n, p in sliced.named_parameters()}
    for w, leaf in trained:
        g_dense = dense_by_name[sliced_names[id(w)]].grad
        grad = grad_of(w, leaf)
        torch.testing.assert_close(grad, box(g_dense, grad.shape), atol=1e-6, rtol=1e-5, msg=names.get(id(w)))
    assert trained is sliced.slices.trained()  # one merge: clipping and the optimizer see the same tensors


def test_the_slice_supernet_round_trips_its_state_dict_into_either_mode():
    """Column-major storage is a layout only: the values load into a dense supernet (search's load_supernet) and
    back, and both run and extract the same paths."""
    dense, sliced = supernets(TINY_1D, "dense", "slice")
    assert not sliced.head.weight.is_contiguous() and dense.head.weight.is_contiguous()
    fresh = Supernet(dense.space)
    fresh.load_state_dict(sliced.state_dict())
    x, _ = batch(dense.space, 7)
    arch = small_path(dense.space)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, arch), sliced(x, arch), atol=1e-5, rtol=0)
        torch.testing.assert_close(sliced.extract(arch)(x), sliced(x, arch), atol=1e-5, rtol=0)
        for name, p in fresh.extract(arch).named_parameters():
            assert torch.equal(p, dict(sliced.extract(arch).named_parameters())[name]), name


def test_compile_true_with_slice_is_one_line_and_auto_leaves_the_cells_eager():
    from space.errors import UserError
    from supernet.engine.compile import check_entangle, compile_cells

    check_entangle("auto", "slice")
    check_entangle(True, "dense")
    with pytest.raises(UserError) as e:
        check_entangle(True, "slice")
    assert str(e.value).startswith("compile: true is not allowed with entangle=slice") and "\n" not in str(e.value)
    (sliced,) = supernets(TINY, "slice")
    assert compile_cells(sliced, "auto", torch.device("cuda")) is None
    assert all(m._compiled_call_impl is None for m in sliced.modules())


def test_train_refuses_compile_true_with_slice_before_any_work(tmp_path):
    from unittest import mock

    from hydra import compose, initialize_config_dir

    from space.errors import UserError
    from supernet.train import train

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("supernet", overrides=[f"run_dir={tmp_path / 'run'}", "entangle=slice", "compile=true"])
    with mock.patch("supernet.train.distributed", side_effect=AssertionError("got past the checks")):
        with pytest.raises(UserError, match=r"^compile: true is not allowed with entangle=slice"):
            train(cfg)
    assert not (tmp_path / "run").exists()
