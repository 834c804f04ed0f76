"""The stand-alone PSViT: exact DeiT layouts, analytic cost == measured cost, shapes, gradients."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from space.arch import ArchError, ArchSpec
from space.cost import macs, params
from space.space import SearchSpace
from supernet.model.psvit import PSViT

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = ["fmnist_2d", "fmnist_1d", "cifar_2d", "cifar_1d", "imagenet_tiny_2d", "imagenet_tiny_1d",
           "imagenet_small_2d"]


def space(name: str) -> SearchSpace:
    return SearchSpace.from_config(OmegaConf.load(CONF / "space" / f"{name}.yaml"))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def measured_macs(arch: ArchSpec) -> float:
    """FlopCounterMode on a meta-device model (no compute); the math SDPA backend exposes the attention
    matmuls to the counter on CPU, where the fused kernel is not counted."""
    with torch.device("meta"):
        model = PSViT(arch)
        x = torch.empty(1, arch.in_chans, arch.img_size, arch.img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2  # 2 FLOPs per multiply-accumulate


@pytest.mark.parametrize("name,n,g", [("deit_tiny", 5_717_416, 1.3), ("deit_small", 22_050_664, 4.6)])
def test_deit_specs_match_published_models(name, n, g):
    arch = ArchSpec.load(CONF / "baselines" / f"{name}.json")
    with torch.device("meta"):
        model = PSViT(arch)
    assert n_params(model) == params(arch) == n
    assert round(measured_macs(arch) / 1e9, 1) == round(macs(arch) / 1e9, 1) == g


@pytest.mark.parametrize("preset", PRESETS)
def test_analytic_cost_equals_model(preset):
    sp = space(preset)
    rng = random.Random(0)
    archs = [sp.sample(rng) for _ in range(6)] + [sp.extreme("min"), sp.extreme("max")]  # every op, both ends
    for arch in archs:
        with torch.device("meta"):
            assert n_params(PSViT(arch)) == params(arch), arch.short()
        assert measured_macs(arch) == macs(arch), arch.short()  # exact: every counted op, no tolerance


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_no_nan_and_every_parameter_gets_a_gradient(preset):
    sp = space(preset)
    torch.manual_seed(0)
    for arch in (sp.extreme("min", "params"), sp.sample(random.Random(1))):
        if preset.startswith("imagenet") and arch.depth > 8:
            arch = sp.extreme("min", "params")  # keep the 224px cases cheap
        model = PSViT(arch)
        x = torch.randn(2, arch.in_chans, arch.img_size, arch.img_size)
        out = model(x)
        assert out.shape == (2, arch.num_classes)
        assert torch.isfinite(out).all()
        out.logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_shared_layer_owns_no_query_or_key():
    arch = space("fmnist_1d").extreme("max")
    model = PSViT(arch)
    pair = model.stages[0].cells[0]
    names = [n for n, _ in pair.second.named_parameters()]
    assert names == ["norm1.weight", "norm1.bias", "attn.v.weight", "attn.v.bias", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"]


def test_shared_pair_reuses_the_first_attention_map():
    """Changing the second layer's input changes only V's contribution: its map is the first layer's."""
    from supernet.model.layers import SharedPair

    torch.manual_seed(0)
    pair = SharedPair(16, 2, 32)
    x = torch.randn(2, 5, 16)
    x1, attn = pair.first(x, need_map=True)
    assert attn.shape == (2, 2, 5, 5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 5))
    # First layer with and without the explicit map agree (SDPA vs softmax path).
    torch.testing.assert_close(pair.first(x)[0], x1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pair(x), pair.second(x1, attn))


def test_shared_layer_computes_no_query_key_or_softmax(monkeypatch):
    """The second layer of a pair runs V, proj, fc1, fc2 and one ``attn @ v``: no qkv, no softmax, no SDPA;
    also when the pair runs at smaller active sizes than it holds (as in the supernet)."""
    import supernet.model.layers as L

    calls: list[str] = []

    def record(owner, name, tag):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            calls.append(tag(*a))
            return fn(*a, **k)
        monkeypatch.setattr(owner, name, wrapped)

    record(L.F, "linear", lambda x, w, *_: f"linear{w.shape[0]}")  # tagged with its active outputs
    record(L.F, "scaled_dot_product_attention", lambda *_: "sdpa")
    record(torch.Tensor, "softmax", lambda *_: "softmax")

    torch.manual_seed(0)
    pair = L.SharedPair(32, 4, 64)
    for x, heads, hidden in ((torch.randn(2, 5, 32), None, None), (torch.randn(2, 5, 16), 2, 32)):
        d = x.shape[-1]
        h = hidden or 64
        x1, attn = pair.first(x, heads, hidden, need_map=True)
        assert calls == [f"linear{3 * d}", "softmax", f"linear{d}", f"linear{h}", f"linear{d}"]
        calls.clear()
        pair.second(x1, attn, hidden)
        assert calls == [f"linear{d}", f"linear{d}", f"linear{h}", f"linear{d}"]
        calls.clear()


def test_from_json_round_trip(tmp_path):
    arch = space("fmnist_2d").sample(random.Random(2))
    arch.save(tmp_path / "a.json")
    model = PSViT.from_json(tmp_path / "a.json")
    assert model.arch == arch
    (tmp_path / "bad.json").write_text('{"format": "psvit-arch/1"')
    with pytest.raises(ArchError, match="bad.json: <json>: malformed JSON"):
        PSViT.from_json(tmp_path / "bad.json")
