"""Supernet contract: a path equals its extracted subnet, only the path trains, bad paths fail early."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from space.arch import ArchError, ArchSpec
from space.space import SearchSpace
from supernet.model.supernet import Supernet

PRESETS = ["fmnist_2d", "fmnist_1d"]


def load_space(conf_dir, name: str) -> SearchSpace:
    return SearchSpace.from_config(OmegaConf.load(conf_dir / "space" / f"{name}.yaml"))


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    space = load_space(conf, request.param)
    torch.manual_seed(0)
    net = Supernet(space)
    # Perturb norms and biases away from their init (ones / zeros) so the equivalence test would catch a
    # wrongly sliced or forgotten norm or bias.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return space, net


def extremes(space: SearchSpace) -> list[ArchSpec]:
    """Smallest and largest archs, all-shared / all-basic at the largest dims, an all-identity stage."""
    big = space.extreme("max")
    out = [space.extreme("min"), big]
    for op in space.ops:
        out.append(replace(big, stages=tuple(replace(s, cells=(op,) * len(s.cells)) for s in big.stages)))
    small = space.extreme("min", "params")
    out.append(replace(small, stages=(replace(small.stages[0], cells=("shared",) * len(small.stages[0].cells)),)
                       + small.stages[1:]))
    return out


def test_extracted_subnet_equals_supernet_path(setup):
    space, net = setup
    net.eval()
    rng = random.Random(0)
    x = torch.randn(3, space.in_chans, space.img_size, space.img_size)
    archs = [space.sample(rng) for _ in range(25)] + extremes(space)
    with torch.no_grad():
        for arch in archs:
            sub = net.extract(arch).eval()
            torch.testing.assert_close(sub(x), net(x, arch), atol=1e-5, rtol=0, msg=arch.short())


def test_extracted_subnet_trains_identically(setup):
    """One train-mode step gives the same loss and the same gradients on the path as the subnet."""
    space, net = setup
    net.train()
    arch = space.sample(random.Random(3))
    sub = net.extract(arch).train()
    x = torch.randn(4, space.in_chans, space.img_size, space.img_size)
    y = torch.randint(0, space.num_classes, (4,))
    net.zero_grad(set_to_none=True)
    loss_super = torch.nn.functional.cross_entropy(net(x, arch), y)
    loss_sub = torch.nn.functional.cross_entropy(sub(x), y)
    torch.testing.assert_close(loss_sub, loss_super, atol=1e-6, rtol=1e-5)
    loss_super.backward()
    loss_sub.backward()
    sources = {"pos_embed": net.pos_embed, **({"cls_token": net.cls_token} if net.cls_token is not None else {})}
    for prefix, module in net.path_modules(arch).items():
        sources.update({f"{prefix}.{n}": q for n, q in module.named_parameters()})
    compared = 0
    for name, p in sub.named_parameters():  # every parameter of the subnet against its slice of the supernet
        g_super = sources[name].grad[tuple(slice(0, k) for k in p.shape)]
        torch.testing.assert_close(p.grad, g_super, atol=1e-6, rtol=1e-5, msg=name)
        compared += 1
    assert compared == len(sources) > 10
    net.zero_grad(set_to_none=True)


def test_only_path_parameters_get_gradients(setup):
    space, net = setup
    net.train()
    rng = random.Random(1)
    for _ in range(5):
        arch = space.sample(rng)
        net.zero_grad(set_to_none=True)
        x = torch.randn(2, space.in_chans, space.img_size, space.img_size)
        net(x, arch).sum().backward()
        active = {id(p) for m in net.path_modules(arch).values() for p in m.parameters()}
        active |= {id(net.pos_embed)} | ({id(net.cls_token)} if net.cls_token is not None else set())
        for name, p in net.named_parameters():
            if id(p) in active:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, f"{name} on the path got an all-zero gradient"
            else:
                assert p.grad is None, f"{name} is off the path of {arch.short()} but got a gradient"
    net.zero_grad(set_to_none=True)


def test_gradients_stay_inside_the_slice(setup):
    """A path at a smaller dim never touches the rows/columns beyond its leading slice."""
    space, net = setup
    arch = space.extreme("min", "params")
    net.zero_grad(set_to_none=True)
    net(torch.randn(2, space.in_chans, space.img_size, space.img_size), arch).sum().backward()
    d = arch.stages[-1].dim
    assert net.head.weight.grad[:, d:].abs().sum() == 0
    d0 = arch.stages[0].dim
    assert net.pos_embed.grad[..., d0:].abs().sum() == 0
    net.zero_grad(set_to_none=True)


def test_slices_are_views_not_copies(setup, monkeypatch):
    """On a path below the largest sizes, every weight and bias reaching linear, conv2d and layer_norm is a view
    of a supernet parameter (no copy), and each of them does run on a slice."""
    import supernet.model.layers as L

    space, net = setup
    arch = space.extreme("min", "params")
    seen: dict[str, list[torch.Tensor]] = {"linear": [], "conv2d": [], "layer_norm": []}

    def spy(name, fn):
        def wrapped(x, *a, **k):
            seen[name].extend(t for t in (*a, *k.values()) if isinstance(t, torch.Tensor))
            return fn(x, *a, **k)
        return wrapped

    for name in seen:
        monkeypatch.setattr(L.F, name, spy(name, getattr(L.F, name)))
    with torch.no_grad():
        net(torch.randn(1, space.in_chans, space.img_size, space.img_size), arch)
    monkeypatch.undo()
    bases = {p.untyped_storage().data_ptr() for p in net.parameters()}
    for name, weights in seen.items():
        assert weights, f"{name} was never called"
        assert all(w.untyped_storage().data_ptr() in bases for w in weights), f"{name} got a copied weight"
        assert any(w._is_view() for w in weights), f"{name} never ran on a leading slice"


def test_arch_outside_the_space_fails_before_computing(setup):
    space, net = setup
    arch = space.sample(random.Random(0))
    wide = max(space.stages[-1].dims) + space.head_dim
    too_wide = replace(arch, stages=arch.stages[:-1] + (replace(arch.stages[-1], dim=wide,
                                                                num_heads=wide // space.head_dim),))
    x = torch.randn(1, space.in_chans, space.img_size, space.img_size)
    with pytest.raises(ArchError, match=r"stages\[2\]\.dim: \d+ is not a choice"):
        net(x, too_wide)
    with pytest.raises(ArchError, match="img_size"):
        net(x, replace(arch, img_size=56, stages=(replace(arch.stages[0], tokens=196),) + arch.stages[1:]))
    with pytest.raises(ArchError, match=r"stages\[1\]\.cells"):
        net.extract(replace(arch, stages=(arch.stages[0], replace(arch.stages[1], cells=("basic",)),
                                          arch.stages[2])))


def test_supernet_has_both_ops_per_cell_and_shared_layer_has_no_qk(setup):
    _, net = setup
    cell = net.stages[0].cells[0]
    names = {n for n, _ in cell.shared.second.named_parameters()}
    assert not any("qkv" in n or ".q." in n or ".k." in n for n in names)
    assert {"attn.v.weight", "attn.proj.weight"} <= names
    assert hasattr(cell, "basic") and hasattr(cell, "shared")
