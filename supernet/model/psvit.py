"""PSViT: the stand-alone vision transformer of one ArchSpec (what users retrain).

Built from the architecture alone, no supernet code on its forward path: it assembles layers.py's modules at
the arch's sizes and calls them at full size. With the DeiT-Ti / DeiT-S specs (conf/baselines/deit_*.json) it
is DeiT's layer layout, parameter for parameter, and computes what DeiT computes (LayerNorm eps 1e-6, erf GELU):
supernet/convert.py loads DeiT's own weights into it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from space.arch import ArchSpec
from supernet.model.layers import (BasicCell, ElasticLayerNorm, ElasticLinear, PatchEmbed, Pool1d, Pool2d, SharedPair,
                                   classify, embed, init_weights)


def make_cell(op: str, dim: int, num_heads: int, hidden: int) -> nn.Module:
    """The module of one cell op ("basic", "shared" or "identity")."""
    if op == "basic":
        return BasicCell(dim, num_heads, hidden)
    if op == "shared":
        return SharedPair(dim, num_heads, hidden)
    return nn.Identity()


class Stage(nn.Module):
    """Token pooling into the stage (absent for the first stage), then its cells."""

    def __init__(self, pool: nn.Module | None, cells: list[nn.Module]):
        super().__init__()
        self.pool = pool
        self.cells = nn.ModuleList(cells)

    def forward(self, x: Tensor) -> Tensor:
        """(B, [1+]N, C) -> (B, [1+]tokens, dim)."""
        if self.pool is not None:
            x = self.pool(x)
        for cell in self.cells:
            x = cell(x)
        return x


class PSViT(nn.Module):
    """The vision transformer of ``arch``: patch embedding, stages of (pooling, cells), norm, head."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.arch = arch
        s0 = arch.stages[0]
        self.patch_embed = PatchEmbed(arch.in_chans, s0.dim, arch.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s0.dim)) if arch.has_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.seq_len(0), s0.dim))
        stages = []
        for i, s in enumerate(arch.stages):
            pool = None
            if i > 0:
                prev = arch.stages[i - 1]
                pool = Pool1d(prev.dim, s.dim, s.tokens) if arch.has_cls else \
                    Pool2d(prev.dim, s.dim, arch.strides()[i - 1])
            hidden = arch.mlp_hidden(s.dim)
            stages.append(Stage(pool, [make_cell(op, s.dim, s.num_heads, hidden) for op in s.cells]))
        self.stages = nn.ModuleList(stages)
        self.norm = ElasticLayerNorm(arch.stages[-1].dim)
        self.head = ElasticLinear(arch.stages[-1].dim, arch.num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides biases and norms (timm's convention)."""
        return {"pos_embed", "cls_token"}

    @classmethod
    def from_json(cls, path: str | Path) -> PSViT:
        """Build the model of an architecture JSON file (validated; ArchError names the bad field)."""
        return cls(ArchSpec.load(path))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, img, img) -> normed tokens (B, [1+]N, C) of the last stage."""
        x = embed(x, self.patch_embed, self.cls_token, self.pos_embed)  # (B, [1+]N, C)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, img, img) -> logits (B, num_classes)."""
        return classify(self.forward_features(x), self.head, self.cls_token is not None)
