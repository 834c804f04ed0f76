"""How reproducible a training run is: the demo's DeiT-like baseline retrained under one schedule several times, on
this machine, with the same and with other thread counts and CPU kernels; the final weights compared bit for bit.

    .venv/bin/python scripts/determinism.py                 # -> runs/determinism.json (a few minutes on 2 cores)
    .venv/bin/python scripts/docs.py record determinism runs/determinism.json   # -> docs/reliability.md's table

Each run is `python -m supernet.retrain` in its own process, as `make retrain` runs it, with one environment change:
`OMP_NUM_THREADS` (intra-op threads) or the instruction set torch's own kernels (`ATEN_CPU_CAPABILITY`), MKL's
(`MKL_ENABLE_INSTRUCTIONS`) and oneDNN's (`ONEDNN_MAX_CPU_ISA`) may use, which is how a run on an older CPU computes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.record import provenance, write_json  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# name -> environment changes; the first is the reference every other run is compared with
VARIANTS = {"2 threads": {"OMP_NUM_THREADS": "2"}, "2 threads, again": {"OMP_NUM_THREADS": "2"},
            "1 thread": {"OMP_NUM_THREADS": "1"}, "2 threads, AVX2 kernels": {"OMP_NUM_THREADS": "2", **AVX2}}
MACS = 3.5e6  # the demo's budget puts its baseline here: 49x24[BBBBBBBBBB], 3.52 M MACs


def baseline(path: Path) -> Path:
    """The demo's DeiT-like baseline (scripts/demo.py's dims) for a searched net of about MACS."""
    from hydra import compose, initialize_config_dir

    from space.baselines import deit_like

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        sp = compose("supernet")["space"]
    deit_like(MACS, sp.img_size, sp.patch_size, sp.in_chans, sp.num_classes, sp.mlp_ratio, sp.head_dim,
              dims=[16, 24, 32, 48, 64]).save(path)
    return path


def probe(env: dict[str, str]) -> dict[str, str]:
    """The thread count and kernel level torch reports under ``env``."""
    code = "import torch; print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads, capability = out.stdout.split()
    return {"threads": threads, "capability": capability}


def run(arch: Path, run_dir: Path, env: dict[str, str], schedule: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "supernet.retrain", f"arch={arch}", f"run_dir={run_dir}",
                        "resume=never", "progress=false", *schedule], cwd=REPO, env=env, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"supernet.retrain exited {r.returncode}:\n{r.stderr[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    return {"test_top1": result["test_top1"], "steps": result["steps"], "minutes": (time.perf_counter() - t) / 60}


def compare(a: Path, b: Path) -> dict:
    """How far two runs' final weights are apart: identical tensors, and the largest difference."""
    import torch

    wa = torch.load(a / "last.ckpt", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b / "last.ckpt", map_location="cpu", weights_only=False)["model"]
    same = sum(torch.equal(wa[k], wb[k]) for k in wa)
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    return {"identical_tensors": same, "tensors": len(wa), "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps of each run (batch 256)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "determinism.json")
    a = ap.parse_args()
    schedule = ["optim.epochs=3", "eval.every=0", f"max_steps={a.steps}"]  # the demo's retraining, cut short
    record = {"provenance": provenance(f"scripts/determinism.py --steps {a.steps}"), "schedule": schedule, "runs": []}
    with tempfile.TemporaryDirectory(prefix="determinism_") as tmp:
        arch = baseline(Path(tmp) / "deit_like.json")
        from space.arch import ArchSpec
        from space.cost import macs

        spec = ArchSpec.load(arch)
        record["arch"] = {"short": spec.short(), "macs": macs(spec)}
        first = None
        for name, change in VARIANTS.items():
            env = {**os.environ, **change}
            run_dir = Path(tmp) / name.replace(" ", "_").replace(",", "")
            row = {"name": name, "env": change, **probe(env), **run(arch, run_dir, env, schedule)}
            row["vs_first"] = compare(first, run_dir) if first else None
            first = first or run_dir
            record["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(f"written {write_json(a.out, record)}")


if __name__ == "__main__":
    main()
