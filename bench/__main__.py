"""`python -m bench [quick] [json=PATH]`: run every benchmark and print side-by-side ratios.

What each section printed, with the run's provenance (date, commit, machine, threads, load), is also written to
PATH (default runs/bench/quick.json or runs/bench/full.json); `scripts/docs.py record bench PATH` copies it into
docs/data/ and renders docs/benchmarks.md from it.
"""

import os
import sys
import time
from pathlib import Path

from bench import latency_speed, loader_speed, model_speed, search_speed, step_speed, train_speed
from bench.record import REPO, printed, provenance, write_json

if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "quick" in args
    out = Path(next((a.split("=", 1)[1] for a in args if a.startswith("json=")),
                    REPO / "runs" / "bench" / ("quick.json" if quick else "full.json")))
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    record = {"provenance": provenance(threads + "make bench" + (" ARGS=quick" if quick else "")), "quick": quick,
              "sections": {}}
    rows: list = []

    def step_rows(quick: bool) -> None:  # a full run writes docs/bench/train_step.json and benchmarks.md's table
        rows.extend(step_speed.main(quick, "python -m bench (make bench)"))

    def train_rows(quick: bool) -> None:  # the fmnist_2d step time comes from the step rows
        default = next(r for r in rows if r.preset == "fmnist_2d" and r.batch > 1 and r.entangle == "dense")
        train_speed.main(quick=quick, t_step=default.super_ms / 1e3)

    sections = {"model_speed": model_speed.main, "step_speed": step_rows, "train_speed": train_rows,
                "search_speed": search_speed.main, "loader_speed": loader_speed.main,
                "latency_speed": latency_speed.main}
    for name, run in sections.items():
        lines: list[str] = []
        t = time.perf_counter()
        with printed(lines):
            run(quick=quick)
        record["sections"][name] = {"lines": lines, "seconds": round(time.perf_counter() - t, 1)}
    print(f"\nwritten {write_json(out, record)}")
