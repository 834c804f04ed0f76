"""PSViT building blocks (arXiv 2108.03428): attention (plain and shared), MLP, pre-norm transformer
layer, shared pair, token pooling 1D / 2D and patch embedding.

Each block's math lives in a plain function taking its weights explicitly; the ``nn.Module`` classes call
it with their own parameters and the supernet calls it with leading slices of its largest weights
(weight entanglement). One code path, so an extracted subnet computes exactly what the supernet did.

Every weight is laid out so that a smaller layer is its *leading* slice (``w[:out, :in]``). In particular
``qkv`` rows are grouped per head, ``[q_h; k_h; v_h]`` for h = 0..heads-1, so the first ``3 * dim`` rows
are the complete q, k and v of the first ``dim / head_dim`` heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(x: Tensor, qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor, proj_b: Tensor, num_heads: int,
              need_map: bool = False) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention.

    Args:
        x: tokens (B, N, C).
        qkv_w: (3C, C) weight, rows grouped per head as [q_h; k_h; v_h].
        need_map: also return the attention map (B, heads, N, N) for the second layer of a shared pair;
            otherwise the fused ``scaled_dot_product_attention`` kernel is used and no map is formed.
    """
    B, N, C = x.shape
    hd = C // num_heads
    qkv = F.linear(x, qkv_w, qkv_b).view(B, N, num_heads, 3, hd).permute(3, 0, 2, 1, 4)  # (3, B, H, N, hd)
    q, k, v = qkv.unbind(0)
    if need_map:
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
        attn = attn.softmax(dim=-1)
        out = attn @ v
    else:
        attn = None
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(B, N, C)
    return F.linear(out, proj_w, proj_b), attn


def shared_attention(x: Tensor, attn: Tensor, v_w: Tensor, v_b: Tensor, proj_w: Tensor, proj_b: Tensor,
                     ) -> Tensor:
    """Attention that reuses another layer's map: no q, no k, no softmax, only ``attn @ v``.

    Args:
        x: tokens (B, N, C).
        attn: the first layer's attention map (B, heads, N, N).
    """
    B, N, C = x.shape
    heads = attn.shape[1]
    v = F.linear(x, v_w, v_b).view(B, N, heads, C // heads).transpose(1, 2)  # (B, H, N, hd)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, proj_w, proj_b)


def mlp(x: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, fc1_w, fc1_b)), fc2_w, fc2_b)


def pool1d(x: Tensor, conv_w: Tensor, conv_b: Tensor, norm_w: Tensor, norm_b: Tensor, tokens: int,
           eps: float) -> Tensor:
    """1D token pooling: pointwise conv on every token (CLS at index 0 included), then adaptive max-pool
    of the patch tokens to ``tokens``, then LayerNorm. (B, 1+N, C) -> (B, 1+tokens, C')."""
    x = F.linear(x, conv_w, conv_b)  # the pointwise Conv1d, written as the linear it is
    cls, patches = x[:, :1], x[:, 1:]
    if patches.shape[1] != tokens:
        patches = F.adaptive_max_pool1d(patches.transpose(1, 2), tokens).transpose(1, 2)
    x = torch.cat([cls, patches], dim=1)
    return F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)


def pool2d(x: Tensor, conv_w: Tensor, conv_b: Tensor, norm_w: Tensor, norm_b: Tensor, stride: int,
           eps: float) -> Tensor:
    """2D token pooling: the token grid goes through a 3x3 conv (stride 1 or 2, padding 1) and LayerNorm.
    (B, S*S, C) -> (B, ceil(S/stride)^2, C')."""
    B, N, C = x.shape
    side = int(round(N ** 0.5))
    x = x.transpose(1, 2).reshape(B, C, side, side)
    x = F.conv2d(x, conv_w, conv_b, stride=stride, padding=1)
    x = x.flatten(2).transpose(1, 2)  # (B, N', C')
    return F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows grouped per head: [q_h; k_h; v_h]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, need_map: bool = False) -> tuple[Tensor, Tensor | None]:
        return attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.num_heads,
                         need_map)


class SharedAttention(nn.Module):
    """The second layer of a shared pair: owns only V and the output projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn: Tensor) -> Tensor:
        return shared_attention(x, attn, self.v.weight, self.v.bias, self.proj.weight, self.proj.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, need_map: bool = False) -> tuple[Tensor, Tensor | None]:
        a, attn = self.attn(self.norm1(x), need_map)
        x = x + a
        return x + self.mlp(self.norm2(x)), attn


class SharedBlock(nn.Module):
    """Pre-norm layer whose attention map comes from the previous layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SharedAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, attn: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), attn)
        return x + self.mlp(self.norm2(x))


class BasicCell(nn.Module):
    """The ``basic`` op: one transformer layer."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.layer = Block(dim, num_heads, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)[0]


class SharedPair(nn.Module):
    """The ``shared`` op: two layers, the second reusing the first's attention map."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.first = Block(dim, num_heads, hidden)
        self.second = SharedBlock(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x, attn = self.first(x, need_map=True)
        return self.second(x, attn)


class Pool1d(nn.Module):
    """1D token pooling into a stage of ``tokens`` patch tokens (plus CLS) at dim ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.conv = nn.Linear(in_dim, out_dim)  # pointwise Conv1d
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return pool1d(x, self.conv.weight, self.conv.bias, self.norm.weight, self.norm.bias, self.tokens,
                      self.norm.eps)


class Pool2d(nn.Module):
    """2D token pooling: 3x3 conv with stride 1 (same grid) or 2 (halved grid), then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return pool2d(x, self.conv.weight, self.conv.bias, self.norm.weight, self.norm.bias, self.stride,
                      self.norm.eps)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C_in, H, W) -> (B, (H/p)*(W/p), dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module: nn.Module) -> None:
    """ViT/DeiT init: truncated normal (std 0.02) for linear and conv weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
