"""PSViT's layers (arXiv 2108.03428) and their wiring: attention (plain and shared), MLP, pre-norm transformer
layer, basic cell, shared pair, token pooling 1D / 2D, patch embedding, and the stem and head of the model.

Every layer is elastic, as in once-for-all: it stores its weights at its own size (for the supernet, the
largest) and runs at any smaller size on their leading slices, ``F.linear(x, w[:out, :in], b[:out])``. The
input size is read off the input; output sizes (``dim``, ``num_heads``, ``hidden``, ``tokens``, ``stride``)
are forward arguments, ``None`` meaning the layer's own size, which is how the stand-alone PSViT calls them.
The supernet calls the same modules with a path's sizes (weight entanglement), so the residual wiring exists
once and an extracted subnet computes exactly what its path computed. Every elastic layer reads its weights
as a view of its leading slice, so no weight is copied on the forward path. With the supernet's
``entangle=dense`` (the default) backward through a view writes the whole tensor's gradient, zeros outside the
slice, so AdamW's moments and weight decay still move the rows and columns outside the slice; ``entangle=slice``
gives the layers a ``slicer`` (entangle.py) whose slices are autograd leaves with slice-sized gradients, and
nothing outside the slice moves.

Every weight is laid out so that a smaller layer is its *leading* slice (``w[:out, :in]``). In particular
``qkv`` rows are grouped per head, ``[q_h; k_h; v_h]`` for h = 0..heads-1, so the first ``3 * dim`` rows
are the complete q, k and v of the first ``dim / head_dim`` heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from supernet.model.entangle import SliceLeaves


def _active(slicer: SliceLeaves | None, weight: Tensor, bias: Tensor | None, out: int,
            cin: int) -> tuple[Tensor, Tensor | None]:
    """``weight[:out, :cin]`` and ``bias[:out]`` through ``slicer``; without one as views, slicing only the dims that
    shrink (each slice is an autograd node, and the full-size PSViT takes none)."""
    if slicer is not None:
        return slicer(weight, (out, cin)), None if bias is None else slicer(bias, (out,))
    if cin != weight.shape[1]:
        weight = weight[:out, :cin]
    elif out != weight.shape[0]:
        weight = weight[:out]
    if bias is not None and out != bias.shape[0]:
        bias = bias[:out]
    return weight, bias


class ElasticLinear(nn.Linear):
    """``nn.Linear`` on its leading ``out`` rows and as many columns as the input is wide."""

    slicer: SliceLeaves | None = None  # None: views (entangle.py's dense); entangle=slice: the supernet's store

    def forward(self, x: Tensor, out_features: int | None = None) -> Tensor:
        """(..., in') -> (..., out'); ``out_features`` None means all outputs."""
        out = out_features or self.out_features
        if self.slicer is not None:  # x @ w.t() + b from the slicer's transposed weight: no transpose node
            w_t = self.slicer.transposed(self.weight, (out, x.shape[-1]))  # (in', out')
            b = None if self.bias is None else self.slicer(self.bias, (out,))
            flat = x.reshape(-1, x.shape[-1])
            y = flat.mm(w_t) if b is None else torch.addmm(b, flat, w_t)
            return y.view(*x.shape[:-1], out)
        w, b = _active(None, self.weight, self.bias, out, x.shape[-1])
        return F.linear(x, w, b)


class ElasticLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, on the leading slice of its affine weights as wide as the input.

    ``eps`` is 1e-6, DeiT's and timm's (not torch's 1e-5), for every norm of the model: DeiT weights then
    compute in a PSViT exactly what they compute in DeiT (supernet/convert.py).
    """

    slicer: SliceLeaves | None = None

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """(..., C') -> (..., C')."""
        dim = x.shape[-1]
        if self.slicer is not None:
            return F.layer_norm(x, (dim,), self.slicer(self.weight, (dim,)), self.slicer(self.bias, (dim,)), self.eps)
        if dim == self.normalized_shape[0]:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x, (dim,), self.weight[:dim], self.bias[:dim], self.eps)


class ElasticConv2d(nn.Conv2d):
    """``nn.Conv2d`` on its leading ``out`` filters and as many input channels as the input has."""

    slicer: SliceLeaves | None = None

    def forward(self, x: Tensor, out_channels: int | None = None, stride: int | None = None) -> Tensor:
        """(B, C_in', H, W) -> (B, C_out', H', W'); ``stride`` None means the stride it was built with."""
        w, b = _active(self.slicer, self.weight, self.bias, out_channels or self.out_channels, x.shape[1])
        return F.conv2d(x, w, b, stride or self.stride, self.padding, self.dilation, self.groups)


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` rows grouped per head so fewer heads are its leading rows."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ElasticLinear(dim, 3 * dim)  # rows grouped per head: [q_h; k_h; v_h]
        self.proj = ElasticLinear(dim, dim)

    def forward(self, x: Tensor, num_heads: int | None = None, need_map: bool = False,
                ) -> tuple[Tensor, Tensor | None]:
        """Multi-head self-attention at the input's dim.

        Args:
            x: tokens (B, N, C), C <= dim.
            num_heads: active heads (None: all); the head dim is ``C / num_heads``.
            need_map: also return the attention map (B, heads, N, N), in the compute dtype (q's: bf16 under
                autocast), for the second layer of a shared pair; otherwise the fused
                ``scaled_dot_product_attention`` kernel is used and no map is formed.
        """
        B, N, C = x.shape
        heads = num_heads or self.num_heads
        hd = C // heads
        qkv = self.qkv(x, 3 * C).view(B, N, heads, 3, hd).permute(3, 0, 2, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        if need_map:
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
            # In q's dtype (bf16 under autocast; the kernel accumulates in fp32): CUDA autocast would otherwise
            # run softmax in fp32 and keep that map for backward beside the bf16 copy ``attn @ v`` makes of it,
            # both of them (B, H, N, N). Without autocast the dtype is the input's: fp32 is unchanged.
            attn = attn.softmax(dim=-1, dtype=q.dtype)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out, C), attn


class SharedAttention(nn.Module):
    """The second layer of a shared pair: owns only V and the output projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.v = ElasticLinear(dim, dim)
        self.proj = ElasticLinear(dim, dim)

    def forward(self, x: Tensor, attn: Tensor) -> Tensor:
        """Attention that reuses another layer's map: no q, no k, no softmax, only ``attn @ v``.

        Args:
            x: tokens (B, N, C), C <= dim.
            attn: the first layer's attention map (B, heads, N, N); its heads are the active heads.
        """
        B, N, C = x.shape
        heads = attn.shape[1]
        v = self.v(x, C).view(B, N, heads, C // heads).transpose(1, 2)  # (B, H, N, hd)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out, C)


class Mlp(nn.Module):
    """The transformer MLP: fc1, GELU (the exact erf form, as DeiT's ``nn.GELU``), fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = ElasticLinear(dim, hidden)
        self.fc2 = ElasticLinear(hidden, dim)

    def forward(self, x: Tensor, hidden: int | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C) through ``hidden`` units (None: all)."""
        return self.fc2(F.gelu(self.fc1(x, hidden)), x.shape[-1])


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = ElasticLayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = ElasticLayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, num_heads: int | None = None, hidden: int | None = None,
                need_map: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, N, C) -> (B, N, C) and, if ``need_map``, the attention map (B, heads, N, N)."""
        a, attn = self.attn(self.norm1(x), num_heads, need_map)
        x = x + a
        return x + self.mlp(self.norm2(x), hidden), attn


class SharedBlock(nn.Module):
    """Pre-norm layer whose attention map comes from the previous layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = ElasticLayerNorm(dim)
        self.attn = SharedAttention(dim)
        self.norm2 = ElasticLayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, attn: Tensor, hidden: int | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C), reusing ``attn`` (B, heads, N, N)."""
        x = x + self.attn(self.norm1(x), attn)
        return x + self.mlp(self.norm2(x), hidden)


class BasicCell(nn.Module):
    """The ``basic`` op: one transformer layer."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.layer = Block(dim, num_heads, hidden)

    def forward(self, x: Tensor, num_heads: int | None = None, hidden: int | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        return self.layer(x, num_heads, hidden)[0]


class SharedPair(nn.Module):
    """The ``shared`` op: two layers, the second reusing the first's attention map."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.first = Block(dim, num_heads, hidden)
        self.second = SharedBlock(dim, hidden)

    def forward(self, x: Tensor, num_heads: int | None = None, hidden: int | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        x, attn = self.first(x, num_heads, hidden, need_map=True)
        return self.second(x, attn, hidden)


class Pool1d(nn.Module):
    """1D token pooling into a stage of ``tokens`` patch tokens (plus CLS) at dim ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.conv = ElasticLinear(in_dim, out_dim)  # pointwise Conv1d, written as the linear it is
        self.norm = ElasticLayerNorm(out_dim)

    def forward(self, x: Tensor, dim: int | None = None, tokens: int | None = None) -> Tensor:
        """Pointwise conv on every token (CLS at index 0 included), then adaptive max-pool of the patch
        tokens, then LayerNorm: (B, 1+N, C) -> (B, 1+tokens, dim); None means the module's own size."""
        x = self.conv(x, dim)  # (B, 1+N, dim)
        tokens = tokens or self.tokens
        cls, patches = x[:, :1], x[:, 1:]
        if patches.shape[1] != tokens:
            patches = F.adaptive_max_pool1d(patches.transpose(1, 2), tokens).transpose(1, 2)
        return self.norm(torch.cat([cls, patches], dim=1))


class Pool2d(nn.Module):
    """2D token pooling: 3x3 conv with stride 1 (same grid) or 2 (halved grid), then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv = ElasticConv2d(in_dim, out_dim, 3, stride=stride, padding=1)
        self.norm = ElasticLayerNorm(out_dim)

    def forward(self, x: Tensor, dim: int | None = None, stride: int | None = None) -> Tensor:
        """(B, S*S, C) -> (B, ceil(S/stride)^2, dim); None means the module's own dim and stride."""
        B, N, C = x.shape
        side = math.isqrt(N)
        x = self.conv(x.transpose(1, 2).reshape(B, C, side, side), dim, stride)  # (B, dim, S', S')
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N', dim)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C_in, H, W) -> (B, (H/p)*(W/p), dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = ElasticConv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor, dim: int | None = None) -> Tensor:
        """``dim`` None means the module's own dim."""
        return self.proj(x, dim).flatten(2).transpose(1, 2)


def embed(x: Tensor, patch_embed: PatchEmbed, cls_token: Tensor | None, pos_embed: Tensor,
          dim: int | None = None, slicer: SliceLeaves | None = None) -> Tensor:
    """The stem: patch tokens, CLS prepended in 1D, position embedding added, at ``dim`` (None: full).

    Args:
        x: images (B, C_in, H, W).
        cls_token: (1, 1, D) or None (2D pooling has no CLS).
        pos_embed: (1, [1+]N, D).
        slicer: how ``cls_token`` and ``pos_embed`` are sliced to ``dim`` (entangle.py); None: as views.

    Returns:
        Tokens (B, [1+]N, dim).
    """
    x = patch_embed(x, dim)  # (B, N, dim)
    dim = x.shape[-1]
    if slicer is not None:
        cls_token = None if cls_token is None else slicer(cls_token, (1, 1, dim))
        pos_embed = slicer(pos_embed, (1, pos_embed.shape[1], dim))
    if cls_token is not None:
        cls = cls_token if dim == cls_token.shape[-1] else cls_token[..., :dim]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
    return x + (pos_embed if dim == pos_embed.shape[-1] else pos_embed[..., :dim])


def classify(x: Tensor, head: ElasticLinear, has_cls: bool) -> Tensor:
    """The head on normed tokens (B, N, C): the CLS token in 1D, the mean token in 2D -> logits (B, classes)."""
    return head(x[:, 0] if has_cls else x.mean(dim=1))


def init_weights(module: nn.Module) -> None:
    """timm's DeiT init: truncated normal (std 0.02) for linear weights, zero linear biases, unit norms.
    Convolutions (the patch embedding, 2D pooling) keep PyTorch's default init, as timm's patch embedding does:
    on a 4x4x1 patch its std is about 0.14, 7x the 0.02 that a linear layer gets."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
