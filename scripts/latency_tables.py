"""The table of the committed latency tables (docs/latency/*.json) in docs/deployment.md: where each was measured,
how, and its accuracy on random networks and at the space's smallest and largest ones.

    .venv/bin/python scripts/latency_tables.py           # rewrites the page's table:latency_tables block
    .venv/bin/python scripts/latency_tables.py --check   # exit 1 if the page's table is not the files'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from space.latency import NO_MODEL, LatencyTable  # noqa: E402

TABLES = REPO / "docs" / "latency"
PAGE = REPO / "docs" / "deployment.md"


def _end(end: dict | None) -> str:
    if end is None:
        return "not measured"
    return f"{end['error_pct']:+.1f}% ({end['predicted_ms']:.3f} vs {end['measured_ms']:.3f} ms)"


def render(tables: Path = TABLES) -> str:
    """One row per table file, sorted by name."""
    lines = ["| file | space | machine | torch | threads, batch | warmup, repeats, rounds | drift | overhead, scale | "
             "MAPE, worst, tau (random) | smallest network | largest network |",
             "| --- | --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- |"]
    for path in sorted(tables.glob("*.json")):
        if path.name == "latency_bound_best_arch.json":
            continue
        t = LatencyTable.load(path)
        machine = (f"not named ({t.device_name!r}: refused by the search)" if t.device_name.lower() in NO_MODEL
                   else f"{t.device_name}, {t.cores} cores" if t.cores else t.device_name)
        how = "/".join(str(t.timing[k]) for k in ("warmup", "repeats", "rounds")) if t.timing else "not recorded"
        a = t.accuracy
        acc = f"{a.mape:.1f}%, {a.max_ape:.1f}%, {a.kendall_tau:.2f} ({a.archs})" if a else "not measured"
        lines.append(f"| `{path.name}` | {t.space} | {machine} | {t.torch} | {t.threads}, {t.batch} | {how} | "
                     f"{t.drift:.2f}x | {t.overhead_ms:.3f} ms, {t.scale:.3f} | {acc} | "
                     f"{_end(a.smallest if a else None)} | {_end(a.largest if a else None)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from scripts.docs import render as render_tables, stale

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare the page's table with the files")
    args = p.parse_args(argv)
    if args.check:
        if stale([PAGE]):
            raise SystemExit(f"{PAGE}: the latency table is not the files'; run scripts/latency_tables.py")
        return
    render_tables([PAGE])
    print(render())


if __name__ == "__main__":
    main()
