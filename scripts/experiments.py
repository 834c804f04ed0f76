"""The trained-regime study of the search's quality on Fashion-MNIST (fmnist_2d); docs/results.md is rendered
from the committed result files under docs/study/ alone.

    .venv/bin/python scripts/experiments.py work pilot [--commit]   # a worker: trains the plan's missing units
    .venv/bin/python scripts/experiments.py work study [--commit]   # F1-F3 at the pilot's schedule E
    .venv/bin/python scripts/experiments.py render                  # docs/results.md from docs/study/ (seconds)

Run two workers side by side, one thread each, in the background; each finished unit is one small JSON file
(``--commit`` also commits it), so the study continues on a fresh clone where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.study import plan  # noqa: E402
from scripts.study.units import drain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("work", help="train the plan's units that have no result file yet")
    w.add_argument("plan", choices=["pilot", "study"])
    w.add_argument("--commit", action="store_true", help="git-commit each result file as soon as it exists")
    r = sub.add_parser("render", help="write docs/results.md (and results_v2.md's statistics) from docs/study/")
    r.add_argument("--page", action="store_true",
                   help="docs/results.md and the README's study table only (what a worker does with each result)")
    args = ap.parse_args()
    if args.cmd == "work":
        import torch

        torch.set_num_threads(1)
        # the study's plan is asked again after each unit; a worker with nothing ready waits for the other
        drain(plan.study if args.plan == "study" else plan.pilot(), args.commit, wait=60.0)
    elif args.page:
        from scripts.docs import render as render_tables
        from scripts.study.render import render_page

        print(render_page())  # one path a line: what a worker commits with its result
        for path in render_tables([REPO / "README.md"]):  # the README's table of the study's answers
            print(path)
    else:
        from scripts.study.render import render

        render()


if __name__ == "__main__":
    main()
