"""Model speed, measured side by side on this machine's CPU:

1. supernet path vs its extracted stand-alone PSViT, forward + backward, median ratio over random archs;
2. PSViT built from the DeiT-Ti spec vs a plain reference ViT written with ``scaled_dot_product_attention``;
3. a shared pair vs two basic layers at the same dim and tokens: measured time ratio vs analytic MACs ratio.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bench.timing import interleaved
from space.arch import ArchSpec
from space.cost import cell_cost
from space.space import SearchSpace
from supernet.model.layers import BasicCell, SharedPair
from supernet.model.psvit import PSViT
from supernet.model.supernet import Supernet

CONF = Path(__file__).resolve().parents[1] / "conf"


def _fwd_bwd(model: nn.Module, x: torch.Tensor, *args: object) -> None:
    model.zero_grad(set_to_none=True)
    model(x, *args).logsumexp(-1).sum().backward()


def supernet_vs_subnet(preset: str, batch: int, n_archs: int, reps: int) -> None:
    space = SearchSpace.from_config(OmegaConf.load(CONF / "space" / f"{preset}.yaml"))
    torch.manual_seed(0)
    net = Supernet(space).train()
    rng = random.Random(0)
    x = torch.randn(batch, space.in_chans, space.img_size, space.img_size)
    ratios = []
    for _ in range(n_archs):
        arch = space.sample(rng)
        sub = net.extract(arch).train()
        t_super, t_sub = interleaved([lambda: _fwd_bwd(net, x, arch), lambda: _fwd_bwd(sub, x)], reps=reps)
        ratios.append(t_super / t_sub)
    print(f"  {preset:18s} batch {batch:4d}  supernet / extracted fwd+bwd: median {statistics.median(ratios):.3f}"
          f"  (min {min(ratios):.3f}, max {max(ratios):.3f}, {n_archs} archs)   target <= 1.05")


class RefViT(nn.Module):
    """A plain DeiT-style ViT (timm's layout, fused SDPA), the speed reference for PSViT."""

    def __init__(self, dim: int = 192, depth: int = 12, heads: int = 3, classes: int = 1000):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 197, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim), n2=nn.LayerNorm(dim),
            fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        B, N, C = x.shape
        for b in self.blocks:
            q, k, v = b["qkv"](b["n1"](x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            x = x + b["proj"](a)
            x = x + b["fc2"](F.gelu(b["fc1"](b["n2"](x))))
        return self.head(self.norm(x)[:, 0])


def deit_vs_reference(batch: int, reps: int) -> None:
    torch.manual_seed(0)
    ours = PSViT(ArchSpec.load(CONF / "baselines" / "deit_tiny.json")).eval()
    ref = RefViT().eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        t_ours, t_ref = interleaved([lambda: ours(x), lambda: ref(x)], reps=reps)
    print(f"  DeiT-Ti spec, batch {batch}: PSViT {batch / t_ours:.1f} img/s, reference ViT {batch / t_ref:.1f} img/s"
          f"  -> throughput ratio {t_ref / t_ours:.3f}   target >= 0.95")


def shared_vs_basic(tokens: int, dim: int, batch: int, reps: int) -> None:
    torch.manual_seed(0)
    heads, hidden = dim // 32 or 1, 4 * dim
    pair = SharedPair(dim, heads, hidden).train()
    two = nn.Sequential(BasicCell(dim, heads, hidden), BasicCell(dim, heads, hidden)).train()
    x = torch.randn(batch, tokens, dim)

    def run(m: nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    t_pair, t_two = interleaved([lambda: run(pair), lambda: run(two)], reps=reps)
    flops = cell_cost("shared", tokens, dim, hidden).macs / (2 * cell_cost("basic", tokens, dim, hidden).macs)
    print(f"  shared pair / two basic layers (N={tokens}, C={dim}, batch {batch}, fwd+bwd): time {t_pair / t_two:.3f}"
          f"  MACs {flops:.3f}  -> excess {t_pair / t_two - flops:+.3f}   target <= +0.10")


def main(quick: bool = False) -> None:
    torch.set_num_threads(torch.get_num_threads())
    n, reps = (4, 3) if quick else (12, 5)
    print(f"== model speed (CPU, {torch.get_num_threads()} threads; FLOPs are MACs)")
    supernet_vs_subnet("fmnist_2d", 256, n, reps)
    supernet_vs_subnet("fmnist_1d", 256, n, reps)
    supernet_vs_subnet("imagenet_tiny_2d", 16, max(2, n // 4), reps)
    deit_vs_reference(8, reps)
    shared_vs_basic(197, 192, 8, reps)
    shared_vs_basic(50, 64, 64, reps)


if __name__ == "__main__":
    main()
