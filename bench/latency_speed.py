"""Latency at batch 1 on this CPU (2 threads), measured side by side:

1. for a few architectures of ``fmnist_2d`` and ``imagenet_tiny_2d`` (the smallest, the largest and random ones),
   PyTorch eager latency next to the latency model's prediction (a table measured in the same run,
   supernet/timing.py) and the MACs;
2. each exported as ONNX (supernet/deploy.py, what `python -m supernet.export` writes), onnxruntime next to eager.

Each network is timed twice: with the table's blocks, in the table's interleaved rounds (supernet/timing.py), which
the prediction is compared with; then eager against onnxruntime in interleaved rounds of their own (bench/timing.py).
The machine's drift hits what is timed together alike (README: Deployment).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.timing import interleaved
from space.arch import ArchSpec
from space.cost import fmt_macs, macs
from space.space import SearchSpace
from supernet.deploy import FORMATS, INPUT, OUTPUT, write
from supernet.model.psvit import PSViT
from supernet.timing import Timing, measure_table

CONF = Path(__file__).resolve().parents[1] / "conf"


def archs_of(space: SearchSpace, n_random: int) -> list[ArchSpec]:
    """The smallest and largest architecture by MACs and ``n_random`` random ones (seed 0)."""
    rng = random.Random(0)
    return [space.extreme("min"), *(space.sample(rng) for _ in range(n_random)), space.extreme("max")]


def onnx_runner(path: Path) -> Callable[[torch.Tensor], object]:
    """onnxruntime on the file with torch's thread count and no spinning: its idle threads would otherwise spin
    on the cores the next eager call needs (interleaved, eager ran 4x slower than alone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT], {INPUT: x.numpy()})


def latency_rows(preset: str | SearchSpace, n_random: int, repeats: int, rounds: int) -> list[dict[str, object]]:
    """Per architecture of a space (a preset's name, or the space): MACs, predicted ms, eager ms timed in the same
    rounds as the table (so the prediction's error holds no drift), and eager next to onnxruntime on the exported
    file (their own interleaved rounds)."""
    space = preset if isinstance(preset, SearchSpace) else \
        SearchSpace.from_config(OmegaConf.load(CONF / "space" / f"{preset}.yaml"))
    timing = Timing(torch.device("cpu"), 1, warmup=max(1, repeats // 5), repeats=repeats, amp=False)
    archs = archs_of(space, n_random)
    table, timed = measure_table(space, timing, torch.get_num_threads(), calibrate=max(5, n_random), archs=0, seed=1,
                                 rounds=rounds, progress=False, extra=archs)
    rows = []
    x = torch.randn(1, space.in_chans, space.img_size, space.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (arch, with_table) in enumerate(zip(archs, timed)):
            torch.manual_seed(0)
            model = PSViT(arch).eval()
            path = Path(tmp) / f"{i}.onnx"
            write(FORMATS["onnx"], model, x, path, dynamic=False, arch_json=arch.to_json())
            run = onnx_runner(path)
            with torch.inference_mode():
                eager, ort = interleaved([lambda: model(x), lambda: run(x)], reps=rounds, warmup=2)
            rows.append({"arch": arch.short(), "macs": macs(arch), "predicted_ms": table.predict(arch),
                         "measured_ms": with_table["measured_ms"], "eager_ms": eager * 1e3,
                         "onnxruntime_ms": ort * 1e3})
    return rows


def main(quick: bool = False) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    print(f"== latency (CPU, batch 1, {torch.get_num_threads()} threads; FLOPs are MACs)")
    presets = {"fmnist_2d": (5, 10, 20)} if quick else {"fmnist_2d": (3, 30, 50), "imagenet_tiny_2d": (2, 10, 20)}
    for preset, (n_random, repeats, rounds) in presets.items():
        rows = latency_rows(preset, n_random, repeats, rounds)
        print(f"{preset}: {'arch':<48} {'MACs':>8} {'predicted':>10} {'measured':>9} {'error':>7}   "
              f"{'eager':>9} {'onnxruntime':>11} {'ort/eager':>9}")
        for r in rows:
            err = (r['predicted_ms'] / r['measured_ms'] - 1) * 100
            print(f"  {r['arch']:<56} {fmt_macs(r['macs']):>8} {r['predicted_ms']:>8.3f}ms {r['measured_ms']:>7.3f}ms "
                  f"{err:>+6.1f}%   {r['eager_ms']:>7.3f}ms {r['onnxruntime_ms']:>9.3f}ms "
                  f"{r['onnxruntime_ms'] / r['eager_ms']:>9.2f}")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
