"""The weight-sharing PSViT supernet: ``forward(x, arch)`` runs one path, ``extract(arch)`` returns it as a
stand-alone PSViT.

As in SPOS, every cell keeps separate weights per op (a basic layer and a shared pair); as in AutoFormer,
every stage holds them at its largest dim and a smaller dim uses the leading slice of every weight, bias
and norm (weight entanglement; heads follow the dim at a fixed head dim). Patch embedding, position
embedding, pooling convs and head are entangled the same way. Slices are views: no weight is copied on
the forward path, and weights off the path take no part and receive no gradient (``grad is None``), so AdamW
leaves them alone. How the weights on the path receive theirs is ``entangle`` (entangle.py): a full-size
gradient, zero outside the slice (``dense``, the default: AdamW's moments and weight decay still move the part
outside the slice), or a gradient of the slice alone (``slice``: nothing outside it moves).

The supernet's modules are PSViT's elastic modules (layers.py) built at the largest sizes, with identical
parameter names: ``forward`` only picks each cell's op and passes the path's sizes, the modules slice their
own weights and own all the wiring. Extraction is one rule: copy ``src[:n0, :n1, ...]`` into every
parameter of the subnet.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from space.arch import ArchSpec
from space.space import SearchSpace
from supernet.model.entangle import SliceLeaves, lead
from supernet.model.layers import (BasicCell, ElasticConv2d, ElasticLayerNorm, ElasticLinear, PatchEmbed, Pool1d,
                                   Pool2d, SharedPair, classify, embed, init_weights)
from supernet.model.psvit import PSViT


class SuperCell(nn.Module):
    """One cell of the supernet: a basic layer and a shared pair at the stage's largest dim."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.basic = BasicCell(dim, num_heads, hidden)
        self.shared = SharedPair(dim, num_heads, hidden)

    def forward(self, x: Tensor, op: str, num_heads: int, hidden: int) -> Tensor:
        """Run ``op`` on tokens (B, N, C) at the input's dim C with ``num_heads`` heads and ``hidden`` units."""
        if op == "basic":
            return self.basic(x, num_heads, hidden)
        if op == "shared":
            return self.shared(x, num_heads, hidden)
        return x  # identity


class SuperStage(nn.Module):
    """Token pooling into the stage (absent for the first stage) and its super cells; run by the supernet."""

    def __init__(self, pool: nn.Module | None, cells: list[SuperCell]):
        super().__init__()
        self.pool = pool
        self.cells = nn.ModuleList(cells)


class Supernet(nn.Module):
    """Every path of ``space`` in one set of weights: ``forward(x, arch)`` runs one, ``extract(arch)`` copies it."""

    checked_paths = 4096  # paths whose check is remembered, the most recently used (training draws a new one a step)
    ENTANGLE = ("dense", "slice")

    def __init__(self, space: SearchSpace, entangle: str = "dense"):
        """Args:
            entangle: ``dense`` (a sliced weight gets a full-size gradient) or ``slice`` (a gradient of the slice
                alone, in ``slices``); entangle.py.
        """
        super().__init__()
        if entangle not in self.ENTANGLE:
            raise ValueError(f"entangle: {entangle!r} (allowed: {', '.join(self.ENTANGLE)})")
        self.space, self.entangle = space, entangle
        dims = [max(s.dims) for s in space.stages]
        hd = space.head_dim
        self.has_cls = space.pooling == "1d"
        self.patch_embed = PatchEmbed(space.in_chans, dims[0], space.patch_size)
        n0 = space.stages[0].tokens[0] + (1 if self.has_cls else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0])) if self.has_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n0, dims[0]))
        stages = []
        for i, (s, d) in enumerate(zip(space.stages, dims)):
            pool = None
            if i > 0:  # tokens / stride are runtime choices; the largest-size module only holds weights
                pool = Pool1d(dims[i - 1], d, max(s.tokens)) if self.has_cls else Pool2d(dims[i - 1], d, 2)
            hidden = int(round(d * space.mlp_ratio))
            stages.append(SuperStage(pool, [SuperCell(d, d // hd, hidden) for _ in range(s.cells)]))
        self.stages = nn.ModuleList(stages)
        self.norm = ElasticLayerNorm(dims[-1])
        self.head = ElasticLinear(dims[-1], space.num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self._checked: OrderedDict[ArchSpec, None] = OrderedDict()  # an LRU: bounded over any number of steps
        # entangle=slice: every elastic layer takes its slices from one store of the step's leaves
        self.slices = SliceLeaves() if entangle == "slice" else None
        if self.slices is not None:
            for m in self.modules():
                if isinstance(m, (ElasticLinear, ElasticLayerNorm, ElasticConv2d)):
                    m.slicer = self.slices
                if isinstance(m, ElasticLinear):  # column-major: slice gradients arrive without a copy (entangle.py)
                    m.weight = nn.Parameter(m.weight.detach().t().contiguous().t())

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's
        """``nn.Module._apply`` (``to``, ``cuda``, ``half``...), which may give the weights new storage: the slice
        leaves, views of the old one, are dropped."""
        if getattr(self, "slices", None) is not None:
            self.slices.clear()
        return super()._apply(fn, recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``, and with ``entangle=slice`` the step's leaves dropped as well."""
        super().zero_grad(set_to_none)
        if self.slices is not None:
            self.slices.zero_grad()

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides biases and norms (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def check(self, arch: ArchSpec) -> None:
        """Raise ArchError naming the field if ``arch`` is not a path of this supernet (remembered for the last
        ``checked_paths`` paths)."""
        if arch in self._checked:
            self._checked.move_to_end(arch)
            return
        self.space.check(arch)
        self._checked[arch] = None
        if len(self._checked) > self.checked_paths:
            self._checked.popitem(last=False)

    def forward(self, x: Tensor, arch: ArchSpec) -> Tensor:
        """Logits of the path ``arch``; x is (B, in_chans, img, img)."""
        self.check(arch)
        x = embed(x, self.patch_embed, self.cls_token, self.pos_embed, arch.stages[0].dim,
                  self.slices)  # (B, [1+]N, d)
        strides = arch.strides() if not self.has_cls else ()
        for i, (stage, s) in enumerate(zip(self.stages, arch.stages)):
            if i > 0:
                x = stage.pool(x, s.dim, tokens=s.tokens) if self.has_cls else \
                    stage.pool(x, s.dim, stride=strides[i - 1])
            hidden = arch.mlp_hidden(s.dim)
            for cell, op in zip(stage.cells, s.cells):
                x = cell(x, op, s.num_heads, hidden)
        return classify(self.norm(x), self.head, self.has_cls)

    def path_modules(self, arch: ArchSpec) -> dict[str, nn.Module]:
        """Supernet module for every PSViT module name the path ``arch`` uses (for extraction)."""
        out: dict[str, nn.Module] = {"patch_embed": self.patch_embed, "norm": self.norm, "head": self.head}
        for i, (stage, s) in enumerate(zip(self.stages, arch.stages)):
            if i > 0:
                out[f"stages.{i}.pool"] = stage.pool
            for j, op in enumerate(s.cells):
                if op != "identity":
                    out[f"stages.{i}.cells.{j}"] = getattr(stage.cells[j], op)
        return out

    @torch.no_grad()
    def extract(self, arch: ArchSpec) -> PSViT:
        """A stand-alone PSViT of ``arch`` holding copies of this path's (sliced) weights."""
        self.check(arch)
        model = PSViT(arch).to(self.pos_embed.device, self.pos_embed.dtype)
        src_params = {"pos_embed": self.pos_embed}
        if self.cls_token is not None:
            src_params["cls_token"] = self.cls_token
        for prefix, mod in self.path_modules(arch).items():
            for name, p in mod.named_parameters():
                src_params[f"{prefix}.{name}"] = p
        dst_params = dict(model.named_parameters())
        if set(dst_params) != set(src_params):  # a layout change in layers.py must fail loudly here
            raise RuntimeError(f"supernet/PSViT layouts differ: {sorted(set(dst_params) ^ set(src_params))}")
        for name, dst in dst_params.items():
            dst.copy_(lead(src_params[name], tuple(dst.shape)))
        model.train(self.training)
        return model

