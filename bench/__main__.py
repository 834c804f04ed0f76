"""`python -m bench [quick]`: run every benchmark and print side-by-side ratios."""

import sys

from bench import latency_speed, loader_speed, model_speed, search_speed, step_speed, train_speed

if __name__ == "__main__":
    quick = "quick" in sys.argv[1:]
    model_speed.main(quick=quick)
    # a full run writes docs/bench/train_step.json and docs/benchmarks.md's table
    rows = step_speed.main(quick, "python -m bench (make bench)")
    default = next(r for r in rows if r.preset == "fmnist_2d" and r.batch > 1 and r.entangle == "dense")
    train_speed.main(quick=quick, t_step=default.super_ms / 1e3)
    search_speed.main(quick=quick)
    loader_speed.main(quick=quick)
    latency_speed.main(quick=quick)
