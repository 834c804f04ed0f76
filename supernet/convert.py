"""`python -m supernet.convert`: DeiT's weights (timm's or the official DeiT release) as a PSViT of the DeiT
baselines, so conf/baselines/deit_tiny.json / deit_small.json can start from, or be evaluated with, DeiT's own
ImageNet weights (Touvron et al., "Training data-efficient image transformers", arXiv 2012.12877).

    python -m supernet.convert checkpoint=deit_tiny_patch16_224-a1311bcf.pth arch=conf/baselines/deit_tiny.json \
        out=deit_tiny_psvit.pt

The output is a plain state dict of ``PSViT(arch)``, loaded with
``PSViT.from_json(arch).load_state_dict(torch.load(out, weights_only=True))`` or by retraining's
``init=pretrained pretrained=out``. The conversion is exact (supernet/pretrained.py). The weights do not record
the head count: DeiT's 64-dim heads are assumed (``num_heads=N`` for a checkpoint trained otherwise), and an arch
of another count is refused. Wrapped checkpoints are unwrapped, saying so in the report line (``{"model": ...}``,
``{"state_dict": ...}``, a ``module.`` prefix; ``weights=ema`` takes ``model_ema`` / ``state_dict_ema``). User
errors print one
``error: ...`` line on stderr, exit with status 2 and write nothing (see conf/convert.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from space.app import CONF_DIR, check_overrides, run_app
from space.arch import ArchSpec
from space.cost import fmt_params, params
from space.schema import CONVERT, check_config
from supernet.engine.checkpoint import save_checkpoint
from supernet.pretrained import ConvertError, check_deit_layout, load_deit, read_weights, unwrap


def convert(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Write ``cfg.out``, the PSViT state dict of ``cfg.arch`` with the weights of the DeiT ``cfg.checkpoint``;
    returns the line ``python -m supernet.convert`` prints. Nothing is written on error."""
    check_config(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, CONVERT)
    for key, example in (("checkpoint", "deit_tiny_patch16_224-a1311bcf.pth"),
                         ("arch", "conf/baselines/deit_tiny.json"), ("out", "deit_tiny_psvit.pt")):
        if not cfg[key]:
            raise ConvertError(f"{key}: required (e.g. {key}={example})")
    src, out = Path(cfg["checkpoint"]), Path(cfg["out"])
    if out.is_dir():
        raise ConvertError(f"out: {out} is a directory (give a file name, e.g. out={out / 'deit_psvit.pt'})")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ConvertError(f"out: {out} is the checkpoint itself (write the PSViT weights to another file)")
    arch = ArchSpec.load(cfg["arch"])
    check_deit_layout(arch, f"arch: {cfg['arch']}")
    sd, notes = unwrap(read_weights(src), str(src), cfg["weights"])
    model = load_deit(sd, arch, cfg["num_heads"], source=str(src))
    save_checkpoint(model.state_dict(), out)
    heads = arch.stages[0].num_heads
    done = "; ".join([f"{heads} heads" + (" (num_heads as given)" if cfg["num_heads"] else " (DeiT's 64-dim heads)"),
                      *notes])
    return (f"{src} -> {out}: PSViT {arch.short()}, {fmt_params(params(arch))} params, DeiT's "
            f"{'EMA ' if cfg['weights'] == 'ema' else ''}weights exactly ({done}; load: "
            f"PSViT.from_json({cfg['arch']!r}).load_state_dict(torch.load({str(out)!r}, weights_only=True)))")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="convert")
def main(cfg: DictConfig) -> None:
    print(run_app(lambda: convert(cfg)))


if __name__ == "__main__":
    check_overrides("convert")
    main()
