"""`python -m supernet.latency`: the latency lookup table of a search space on this machine, and how well it
predicts whole networks (space/latency.py holds the table and the prediction, supernet/timing.py the timing).

    python -m supernet.latency space=fmnist_2d device=cpu threads=2 batch=1 out=runs/latency/fmnist_2d_cpu.json
    python -m supernet.latency space=imagenet_tiny_2d device=cuda batch=256 out=...     # bf16 autocast on CUDA

Every block the space can build (each op at every tokens x dim, each pooling step, embedding and head) is built
from the model's own modules (supernet/model/layers.py) at its sizes and timed at ``batch`` images: ``warmup``
untimed calls, then the median of ``repeats`` timed ones (CUDA: events around each call). ``calibrate``
architectures spread over the whole range (an all-identity network first, one without identity cells last) are timed
end to end as ``PSViT(arch)``, and ``measured ~ overhead_ms + scale x sum of its blocks`` is fitted to them by least
squares on the relative error; ``archs`` other random architectures and the space's smallest and largest networks
are timed end to end too, and the table reports its own accuracy on them: mean absolute percentage error, worst
error and Kendall tau on the random ones, and the error at both ends. The table records the machine (device, CPU
or GPU model, torch version, cores) with its threads and batch. Blocks and
networks are all timed together in ``rounds`` interleaved rounds (a new random order each round, the median over
rounds kept), so a machine whose speed drifts slows them alike; the table records how far the speed moved.
User errors print one ``error: ...`` line, exit 2 and write nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from space.app import CONF_DIR, check_overrides, run_app
from space.latency import LatencyError
from space.schema import LATENCY, check_config
from space.space import SearchSpace
from supernet.timing import Timing, measure_table


def latency(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Measure and write ``cfg.out``; returns the summary the app prints. Nothing is written on error."""
    check_config(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, LATENCY)
    if not cfg["out"]:
        raise LatencyError(f"out: required (e.g. out=runs/latency/{cfg['space']['name']}_{cfg['device']}.json)")
    out = Path(cfg["out"])
    if out.is_dir():
        raise LatencyError(f"out: {out} is a directory (give a file name, e.g. out={out / 'latency.json'})")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise LatencyError("device: 'cuda' but no CUDA device is visible (measure with device=cpu)")
    space = SearchSpace.from_config(cfg["space"])
    torch.set_num_threads(cfg["threads"])
    timing = Timing(torch.device(cfg["device"]), cfg["batch"], cfg["warmup"], cfg["repeats"], cfg["amp"])
    torch.manual_seed(cfg["seed"])
    table, rows = measure_table(space, timing, cfg["threads"], cfg["calibrate"], cfg["archs"], cfg["seed"],
                                cfg["rounds"], cfg["progress"])
    table.save(out)
    lines = [f"{out}: {len(table.blocks)} blocks of space {space.name!r} on {table.device_name} ({table.device}, "
             f"{table.cores} cores, {table.threads} threads, batch {table.batch}, {table.dtype}, torch {table.torch}); "
             f"calibrated on {cfg['calibrate']} networks: overhead {table.overhead_ms:.3f} ms, "
             f"scale {table.scale:.3f}; "
             f"{cfg['rounds']} rounds, the machine's speed moved {table.drift:.2f}x between them"]
    if table.accuracy is not None:
        a = table.accuracy
        lines.append(f"accuracy on {a.archs} other random architectures: MAPE {a.mape:.1f}%, worst {a.max_ape:.1f}%, "
                     f"Kendall tau {a.kendall_tau:.3f}")
        for name, end in (("smallest", a.smallest), ("largest", a.largest)):
            if end is not None:
                lines.append(f"the {name} network ({end['macs'] / 1e6:.2f} M MACs): predicted {end['predicted_ms']:.3f}"
                             f" ms, measured {end['measured_ms']:.3f} ms ({end['error_pct']:+.1f}%)")
        lines += [f"  {r['arch']}  {r['macs'] / 1e6:8.2f} M MACs  predicted {r['predicted_ms']:8.3f} ms  "
                  f"measured {r['measured_ms']:8.3f} ms" for r in rows]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="latency")
def main(cfg: DictConfig) -> None:
    print(run_app(lambda: latency(cfg)))


if __name__ == "__main__":
    check_overrides("latency")
    main()
