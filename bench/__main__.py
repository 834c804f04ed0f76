"""`python -m bench [quick]`: run every benchmark and print side-by-side ratios."""

import sys

from bench import latency_speed, loader_speed, model_speed, search_speed, train_speed

if __name__ == "__main__":
    quick = "quick" in sys.argv[1:]
    model_speed.main(quick=quick)
    train_speed.main(quick=quick)
    search_speed.main(quick=quick)
    loader_speed.main(quick=quick)
    latency_speed.main(quick=quick)
