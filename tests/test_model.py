"""The stand-alone PSViT: exact DeiT layouts, analytic cost == measured cost, shapes, gradients."""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
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
    """FlopCounterMode on one image; the math SDPA backend exposes the attention matmuls to the counter on CPU,
    where the fused kernel is not counted. 224 px models run on the meta device (no compute); small ones on the
    CPU, whose kernels take less time than the meta device's Python decompositions (about 4x less at 28 px)."""
    with torch.device("meta" if arch.img_size > 64 else "cpu"):
        model = PSViT(arch)
        x = torch.zeros(1, arch.in_chans, arch.img_size, arch.img_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
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


@contextmanager
def softmax_in_fp32_under_cpu_autocast():
    """CUDA autocast's policy for softmax (``fp32_set_opt_dtype``: fp32 unless a dtype is given) on the CPU, whose
    autocast leaves softmax alone: what the model meets under CUDA bf16 autocast, on a machine without a GPU."""
    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def softmax(x, dim, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.aten.softmax.int(x, dim, torch.float32 if dtype is None else dtype)

    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore", UserWarning)
        lib.impl("softmax.int", softmax, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


def saved_maps(run, n: int) -> tuple[int, set[torch.dtype]]:
    """Bytes and dtypes of the distinct (..., n, n) tensors autograd keeps for backward while ``run()`` runs."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (n, n):
            kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.untyped_storage().nbytes() for t in kept.values()), {t.dtype for t in kept.values()}


def test_shared_pair_keeps_one_attention_map_in_the_compute_dtype():
    """Under bf16 autocast, also where softmax would run in fp32 (CUDA's policy), a shared pair forms one bf16 map
    that its second layer and backward reuse (no fp32 map, no bf16 copies), close to the fp32 map; without autocast
    the map and the pair's output are what they were, bit for bit."""
    from supernet.model.layers import SharedPair

    torch.manual_seed(0)
    B, N, C, heads = 2, 7, 32, 4
    pair = SharedPair(C, heads, 64)
    x = torch.randn(B, N, C)
    # The fp32 reference, written out: per-head q, k from the qkv rows, scaled scores, softmax over keys.
    q, k, _ = pair.first.attn.qkv(pair.first.norm1(x)).view(B, N, heads, 3, C // heads).permute(3, 0, 2, 1, 4)
    ref = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    x1, attn = pair.first(x, need_map=True)
    assert attn.dtype == torch.float32 and torch.equal(attn, ref)
    assert torch.equal(pair(x), pair.second(x1, ref))
    assert saved_maps(lambda: pair(x.requires_grad_()).sum().backward(), N) == (B * heads * N * N * 4,
                                                                               {torch.float32})
    with softmax_in_fp32_under_cpu_autocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, attn16 = pair.first(x, need_map=True)
        assert attn16.dtype == torch.bfloat16
        torch.testing.assert_close(attn16.float(), ref, atol=1e-2, rtol=0)
        nbytes, dtypes = saved_maps(lambda: pair(x).float().sum().backward(), N)
    assert (nbytes, dtypes) == (B * heads * N * N * 2, {torch.bfloat16})  # one bf16 map, not fp32 + bf16 copies


def test_init_is_timms_deit_linear_trunc_normal_and_convs_pytorch_default():
    """timm's DeiT: linear weights trunc_normal(0.02) with zero biases, the patch embedding's conv at PyTorch's
    default (uniform, bound 1/sqrt(fan_in)); it was trunc_normal(0.02) too, 7x smaller on 4x4x1 patches."""
    import math

    from space.space import SearchSpace
    from supernet.model.psvit import PSViT

    space = SearchSpace.from_config(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "space"
                                                   / "fmnist_2d.yaml"))
    torch.manual_seed(0)
    model = PSViT(space.extreme("max"))
    conv = model.patch_embed.proj.weight  # (dim, 1, 4, 4): fan_in 16
    bound = 1 / math.sqrt(conv[0].numel())
    assert conv.abs().max() <= bound and conv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)  # as timm: truncated at +-2 absolute, not 2 std
    assert all(m.bias is None or not m.bias.any() for m in linears)
