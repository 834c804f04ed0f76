"""`python -m bench [quick] [json=PATH]`: run every benchmark and print side-by-side ratios.

What each section printed, with the run's provenance (date, commit, machine, threads, load), is also written to
PATH (default runs/bench/quick.json or runs/bench/full.json); `scripts/docs.py record bench PATH` copies it into
docs/data/ and renders docs/benchmarks.md from it.
"""

import os
import sys
import time
from pathlib import Path

from bench import latency_speed, loader_speed, model_speed, search_speed, train_speed
from bench.record import REPO, printed, provenance, write_json

SECTIONS = {"model_speed": model_speed, "train_speed": train_speed, "search_speed": search_speed,
            "loader_speed": loader_speed, "latency_speed": latency_speed}

if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "quick" in args
    out = Path(next((a.split("=", 1)[1] for a in args if a.startswith("json=")),
                    REPO / "runs" / "bench" / ("quick.json" if quick else "full.json")))
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    record = {"provenance": provenance(threads + "make bench" + (" ARGS=quick" if quick else "")), "quick": quick,
              "sections": {}}
    for name, module in SECTIONS.items():
        lines: list[str] = []
        t = time.perf_counter()
        with printed(lines):
            module.main(quick=quick)
        record["sections"][name] = {"lines": lines, "seconds": round(time.perf_counter() - t, 1)}
    print(f"\nwritten {write_json(out, record)}")
