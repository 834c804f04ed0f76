"""DeiT's weights as PSViT weights: the mapping from timm's / the official DeiT release's names and row order to
the PSViT of a DeiT baseline (conf/baselines/deit_tiny.json, deit_small.json), and the loaders retraining's
``init=pretrained`` and the `supernet.convert` app use.

With DeiT's layout (1D pooling, one stage of basic cells) PSViT is DeiT parameter for parameter, with DeiT's
LayerNorm eps 1e-6, erf GELU, attention scale ``head_dim ** -0.5`` and head on the CLS token; only the rows of
``qkv`` are regrouped per head (layers.py). Distilled DeiT (``dist_token``, ``head_dist``) is refused: it is not
a PSViT baseline.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from space.arch import ArchSpec
from space.errors import UserError
from supernet.engine.checkpoint import read_checkpoint
from supernet.model.psvit import PSViT

DISTILLED = ("dist_token", "head_dist.weight", "head_dist.bias")  # DeiT-distilled's second token and head
KNOWN_ARCHS = {192: "conf/baselines/deit_tiny.json", 384: "conf/baselines/deit_small.json"}  # by embed dim
DEIT_HEAD_DIM = 64  # DeiT-Ti / S / B and timm's ViTs: 3 / 6 / 12 heads
_BLOCK = re.compile(r"blocks\.(\d+)\..+")


class ConvertError(UserError):
    """A checkpoint or an architecture that cannot become a PSViT with DeiT's weights."""


def check_deit_layout(arch: ArchSpec, where: str = "arch") -> None:
    """DeiT weights fit only DeiT's layout: 1D pooling (CLS token) and one stage of basic cells.

    Raises:
        ConvertError: naming what differs.
    """
    if arch.pooling != "1d" or len(arch.stages) != 1 or set(arch.stages[0].cells) != {"basic"}:
        raise ConvertError(f"{where}: {arch.pooling} {arch.short()} is not DeiT's layout (allowed: 1d pooling and one "
                           "stage of basic cells, e.g. conf/baselines/deit_tiny.json or deit_small.json)")


def deit_names(arch: ArchSpec) -> dict[str, str]:
    """The PSViT parameter name of every DeiT (timm) parameter name, for an arch of DeiT's layout."""
    names = {k: k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                            "norm.weight", "norm.bias", "head.weight", "head.bias")}
    for i in range(len(arch.stages[0].cells)):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{part}.{p}"] = f"stages.0.cells.{i}.layer.{part}.{p}"
    return names


def qkv_per_head(t: Tensor, num_heads: int) -> Tensor:
    """timm's ``qkv`` rows ``[q; k; v]`` (heads contiguous in each) regrouped as ours, ``[q_h; k_h; v_h]`` for
    every head h: (3C, ...) -> (3C, ...)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, t.shape[0] // (3 * num_heads), *rest).transpose(0, 1).reshape(t.shape)


MODEL_KEYS = ("model", "state_dict")  # the official DeiT release's wrapper; timm's train.py's
EMA_KEYS = ("model_ema", "state_dict_ema")  # DeiT's main.py (--model-ema); timm's train.py
DDP_PREFIX = "module."  # a state dict saved from a DistributedDataParallel wrapper


def unwrap(ck: Any, source: str = "checkpoint", weights: str = "model") -> tuple[dict[str, Tensor], list[str]]:
    """The state dict of a checkpoint and what was done to find it: the dict itself, the ``model`` entry of the
    official DeiT release (``{"model": state_dict}``), the ``state_dict`` entry of timm's training checkpoints, or
    with ``weights="ema"`` their moving average (``model_ema`` / ``state_dict_ema``); a ``module.`` prefix on
    every name (a state dict saved from DistributedDataParallel) is dropped.

    Raises:
        ConvertError: it is not a dict of tensors, or the weights asked for are not in it (naming the fix).
    """
    notes: list[str] = []
    if isinstance(ck, Mapping):
        keys = EMA_KEYS if weights == "ema" else MODEL_KEYS
        found = next((k for k in keys if isinstance(ck.get(k), Mapping)), None)
        others = [k for k in (MODEL_KEYS if weights == "ema" else EMA_KEYS) if isinstance(ck.get(k), Mapping)]
        if found is None and weights == "ema":
            raise ConvertError(f"weights: ema but {source} holds no moving average of the weights (none of "
                               f"{', '.join(EMA_KEYS)}); use weights=model")
        if found is None and others:
            raise ConvertError(f"checkpoint: {source} holds only a moving average of the weights ({others[0]!r}); "
                               "pass weights=ema to convert it")
        if found is not None:
            ck = ck[found]
            if found != "model":  # the official release's wrapper needs no word
                notes.append(f"took the {found!r} entry")
            if others:
                notes.append(f"the file also holds {others[0]!r} (weights={'model' if weights == 'ema' else 'ema'} "
                             "takes those)")
    if not isinstance(ck, Mapping) or not ck:
        raise ConvertError(f"checkpoint: {source} holds a {type(ck).__name__}, not a DeiT state dict (allowed: a timm "
                           "VisionTransformer state dict, or {'model': state_dict} as DeiT releases them)")
    bad = [k for k, v in ck.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ConvertError(f"checkpoint: {source} is not a state dict ({bad[0]!r} is not a named tensor; allowed: a "
                           "timm VisionTransformer state dict, or {'model': state_dict})")
    if all(k.startswith(DDP_PREFIX) for k in ck):
        ck = {k[len(DDP_PREFIX):]: v for k, v in ck.items()}
        notes.append(f"dropped the {DDP_PREFIX!r} prefix of DistributedDataParallel from every name")
    return dict(ck), notes


def deit_heads(sd: Mapping[str, Tensor], arch: ArchSpec, source: str, num_heads: int | None = None) -> int:
    """The head count the checkpoint is converted with: ``num_heads`` when given, else DeiT's (every DeiT and timm
    ViT has 64-dim heads: 3, 6 and 12 for dims 192, 384 and 768). The weights do not record it, and a wrong one
    regroups the qkv rows wrongly without changing a shape, so it must equal the arch's.

    Raises:
        ConvertError: the arch's head count is not the checkpoint's (the fix is named).
    """
    dim, have = sd["patch_embed.proj.weight"].shape[0], arch.stages[0].num_heads
    if num_heads is None:
        if dim % DEIT_HEAD_DIM:
            raise ConvertError(f"num_heads: {source} has dim {dim}, not a multiple of DeiT's {DEIT_HEAD_DIM}-dim "
                               "heads, and its weights do not record the head count: pass num_heads=N, the count it "
                               "was trained with")
        want = dim // DEIT_HEAD_DIM
        if have != want:
            known = KNOWN_ARCHS.get(dim)
            raise ConvertError(f"arch: {have} heads, but {source} is a DeiT of dim {dim}, whose heads are "
                               f"{DEIT_HEAD_DIM}-dim: {want} heads (its weights do not record the count, and another "
                               f"one regroups the qkv rows wrongly); pass an arch with {want} heads"
                               + (f", e.g. {known}" if known else "")
                               + f", or num_heads={have} if the checkpoint was trained with {have} heads")
        return want
    if have != num_heads:
        raise ConvertError(f"num_heads: {num_heads} but the arch has {have} heads (pass an arch with {num_heads} "
                           "heads, or num_heads= the arch's)")
    return num_heads


def _shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _check_keys(sd: Mapping[str, Tensor], names: Mapping[str, str], arch: ArchSpec, source: str) -> None:
    """Refuse a distilled DeiT, a checkpoint of another depth and one with missing or unexpected keys."""
    distilled = [k for k in DISTILLED if k in sd]
    if distilled:
        raise ConvertError(f"checkpoint: {source} is a distilled DeiT ({', '.join(distilled)}), not a PSViT baseline "
                           "(convert the plain DeiT, e.g. deit_tiny_patch16_224, not deit_tiny_distilled_*)")
    blocks = {int(m.group(1)) for m in map(_BLOCK.fullmatch, sd) if m}
    depth = len(arch.stages[0].cells)
    if blocks and "patch_embed.proj.weight" in sd and len(blocks) != depth:
        raise ConvertError(f"checkpoint: {source} has {len(blocks)} blocks but the arch has {depth} cells (pass an "
                           f"arch with {len(blocks)} basic cells)")
    missing, unexpected = [k for k in names if k not in sd], [k for k in sd if k not in names]
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

        found = "; ".join(t for t in (missing and f"missing {few(missing)}",
                                      unexpected and f"unexpected {few(unexpected)}") if t)
        raise ConvertError(f"checkpoint: {source} is not a DeiT state dict ({found}; allowed: timm's "
                           "VisionTransformer names, e.g. blocks.0.attn.qkv.weight, or {'model': state_dict})")


def deit_to_psvit(state_dict: Mapping[str, Any], arch: ArchSpec, source: str = "checkpoint",
                  num_heads: int | None = None) -> dict[str, Tensor]:
    """The PSViT state dict of ``arch`` holding a DeiT checkpoint's weights.

    Args:
        state_dict: timm's ``VisionTransformer`` names (``blocks.{i}.attn.qkv.weight``, ...), or the official
            release's ``{"model": state_dict}``.
        arch: DeiT's layout (1D pooling, one stage of basic cells) at the checkpoint's sizes and head count.
        source: how errors name the checkpoint (its path).
        num_heads: the head count the checkpoint was trained with; None = DeiT's (:func:`deit_heads`).

    Raises:
        ConvertError: the arch is not DeiT's layout, or the checkpoint is not a DeiT state dict, is distilled,
            does not fit the arch (the first differing tensor is named) or has another head count.
    """
    check_deit_layout(arch)
    sd, _ = unwrap(state_dict, source)
    names = deit_names(arch)
    _check_keys(sd, names, arch, source)
    with torch.device("meta"):  # names and shapes only: no memory, no init
        want = PSViT(arch).state_dict()
    if set(want) != set(names.values()):  # a layout change in layers.py must fail loudly here
        raise RuntimeError(f"DeiT/PSViT layouts differ: {sorted(set(want) ^ set(names.values()))}")
    out = {}
    for k, ours in names.items():
        if sd[k].shape != want[ours].shape:
            dim, tokens = sd["patch_embed.proj.weight"].shape[0], sd["pos_embed"].shape[1]
            known = KNOWN_ARCHS.get(dim)
            raise ConvertError(f"checkpoint: {source} does not fit the arch: {k} is {_shape(sd[k].shape)}, the arch "
                               f"needs {_shape(want[ours].shape)} (the checkpoint has dim {dim}, {tokens} tokens with "
                               f"CLS, {sd['head.weight'].shape[0]} classes; pass an arch of those sizes"
                               + (f", e.g. {known})" if known else ")"))
        t = sd[k].detach()
        out[ours] = qkv_per_head(t, arch.stages[0].num_heads) if ".attn.qkv." in k else t.clone()
    deit_heads(sd, arch, source, num_heads)  # once the shapes are known to fit: the one thing they cannot show
    return out


def read_weights(path: str | Path) -> Any:
    """What a checkpoint file holds: ``torch.load`` (weights only) of a .pth / .pt / .bin file, or a .safetensors
    file (timm's Hugging Face release).

    Raises:
        UserError: the file is missing or unreadable.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return read_checkpoint(path)[0]  # one line for a missing or unreadable file
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConvertError(f"checkpoint: {path} is a .safetensors file and safetensors is not installed "
                           "(pip install safetensors, or pass the .pth release)") from None
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
        raise ConvertError(f"checkpoint: {path} is not a readable .safetensors file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def load_deit(checkpoint: str | Path | Mapping[str, Any], arch: ArchSpec | str | Path,
              num_heads: int | None = None, source: str | None = None) -> PSViT:
    """A ``PSViT(arch)`` holding DeiT's weights, computing exactly what that DeiT computes.

    Args:
        checkpoint: a state dict (e.g. ``timm_model.state_dict()``) or the path of a checkpoint file.
        arch: an ArchSpec or the path of its JSON (conf/baselines/deit_tiny.json, deit_small.json).
        num_heads: the checkpoint's head count, when it is not DeiT's (64-dim heads).
        source: how errors name the checkpoint (default: its path, or "checkpoint").

    Raises:
        UserError: the file or the arch cannot be read, or the weights do not fit (see :func:`deit_to_psvit`).
    """
    spec = arch if isinstance(arch, ArchSpec) else ArchSpec.load(arch)
    source = source or ("checkpoint" if isinstance(checkpoint, Mapping) else str(checkpoint))
    ck = checkpoint if isinstance(checkpoint, Mapping) else read_weights(checkpoint)
    state = deit_to_psvit(ck, spec, source, num_heads)
    model = PSViT(spec)
    model.load_state_dict(state)  # strict: every parameter comes from the checkpoint
    return model


def load_pretrained(path: str | Path, arch: ArchSpec) -> tuple[PSViT, str, list[str]]:
    """``PSViT(arch)`` started from the weights in ``path`` (retraining's ``init=pretrained``), the sha256 of the
    file and what unwrapping it took (:func:`unwrap`): either a PSViT state dict (what this tool writes) or a DeiT
    checkpoint with DeiT's head count, converted on the way (another head count: convert it first, with
    ``python -m supernet.convert num_heads=N``).

    Raises:
        UserError: the file cannot be read, or its weights do not fit ``arch`` (one line naming a tensor).
    """
    path = Path(path)
    sd, notes = unwrap(read_weights(path), str(path))
    if "blocks.0.attn.qkv.weight" in sd:  # timm's names: a DeiT checkpoint
        return load_deit(sd, arch, source=str(path)), hashlib.sha256(path.read_bytes()).hexdigest(), notes
    model = PSViT(arch)
    want = model.state_dict()
    missing, unexpected = [k for k in want if k not in sd], [k for k in sd if k not in want]
    wrong = [k for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]} is {_shape(sd[wrong[0]].shape)}, the arch needs {_shape(want[wrong[0]].shape)}" if wrong
                 else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise ConvertError(f"pretrained: {path} does not fit arch {arch.short()} ({first}; pass the weights of this "
                           "arch: a supernet.convert output, PSViT.state_dict() or a DeiT checkpoint)")
    model.load_state_dict(sd)
    return model, hashlib.sha256(path.read_bytes()).hexdigest(), notes
