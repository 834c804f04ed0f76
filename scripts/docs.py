"""The measurement tables of README.md and docs/*.md, rendered from the JSON files the measuring commands wrote.

    .venv/bin/python scripts/docs.py render                 # rewrite every table between its markers (`make docs`)
    .venv/bin/python scripts/docs.py check                  # exit 1 naming each table that differs from its JSON
    .venv/bin/python scripts/docs.py record demo runs/demo/summary.json    # a measurement into docs/data/, rendered
    .venv/bin/python scripts/docs.py record bench runs/bench/quick.json
    .venv/bin/python scripts/docs.py record suite runs/suite.xml --make-seconds 250  # `make test`'s junitxml
    .venv/bin/python scripts/docs.py record determinism runs/determinism.json  # scripts/determinism.py's

A table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` and is never edited by hand: NAME is a key of
TABLES, whose function renders it from docs/data/ (or another committed JSON); tests/test_docs.py fails when a
page's table is not what its JSON renders to.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.record import provenance, write_json  # noqa: E402

DATA = REPO / "docs" / "data"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- table:([a-z0-9_]+) -->\n(.*?)<!-- /table:\1 -->", re.S)


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- formatting


def provenance_line(p: dict[str, Any]) -> str:
    """The one sentence a measurement table states about itself: date, commit, machine, threads, command."""
    commit = p["commit"] + (" with uncommitted changes" if p.get("dirty") else "")
    load = "/".join(f"{x:.1f}" for x in p["load"])
    return (f"Measured {p['date']} at commit `{commit}` on {p['cores']} cores of an {p['cpu']} "
            f"({p['cpu_capability']} kernels), torch {p['torch']}, {_threads(p['threads'])}, load average "
            f"{load} (1/5/15 min) at the start, by `{p['command']}`.")


def _threads(n: int | str) -> str:
    return f"{n} intra-op thread" + ("" if int(n) == 1 else "s")


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in (header, sep, *rows)) + "\n"


def macs(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


# ----------------------------------------------------------------------------- tables


def _demo_rows(d: dict[str, Any]) -> list[list[str]]:
    return [[name, macs(r["flops_macs"]), params(r["params"]), f"{r['test_top1']:.4f}", f"`{r['arch_short']}`"]
            for name, r in d["results"].items()]


def _demo_regime(d: dict[str, Any]) -> str:
    s = d["schedule"]
    return (f"Schedule: supernet `{' '.join(s['supernet'])}`; search `{' '.join(s['search'])}`; each retraining "
            f"`{' '.join(s['retrain'])}`, seed {next(iter(d['results'].values()))['seed']}, one run each; top-1 on "
            f"the {next(iter(d['results'].values()))['test_images']:,} official test images.")


def demo(d: dict[str, Any] | None = None) -> str:
    """docs/pipeline.md: what `make demo` printed, with its provenance and schedule."""
    d = d or load("demo")
    m = d["minutes"]
    return (provenance_line(d["provenance"]) + f" It took {sum(m.values()):.1f} min: supernet {m['supernet']:.1f}, "
            f"search {m['search']:.1f}, retraining {m['retrain']:.1f}. " + _demo_regime(d) + "\n\n"
            + table(["model", "FLOPs (MACs)", "params", "test top-1", "arch"], _demo_rows(d), "lrrrl"))


def demo_readme(d: dict[str, Any] | None = None) -> str:
    """README: the demo's table without commit or date (they are on docs/pipeline.md)."""
    d = d or load("demo")
    p = d["provenance"]
    return (f"`make demo` as a fresh clone runs it, on {p['cores']} cores of an {p['cpu']} ({p['cpu_capability']}), "
            f"{_threads(p['threads'])}; supernet 3 epochs, retraining 3 epochs, one seed: a demo schedule, far from "
            "converged:\n\n"
            + table(["model", "FLOPs (MACs)", "params", "test top-1", "arch"], _demo_rows(d), "lrrrl"))


def setup_readme() -> str:
    """README: the two set-up commands, what they print and how long they took."""
    d, s = load("demo"), load("suite")
    p = d["provenance"]
    return table(["command", "prints", "took (measured)"], [
        ["`make demo`", "a progress bar per stage, then the table below and the paths of every output",
         f"{sum(d['minutes'].values()):.1f} min on {p['cores']} cores ({p['cpu']}), load {p['load'][0]:.1f} at the "
         "start"],
        ["`make test`", f"pytest's summary: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped",
         (f"{s['make_seconds'] / 60:.1f} min with the install (pytest {s['seconds'] / 60:.1f} min)"
          if s.get("make_seconds") else f"pytest {s['seconds'] / 60:.1f} min (the install not timed)")
         + f" on {s['provenance']['cores']} cores ({s['provenance']['cpu']}), "
         f"load {s['provenance']['load'][0]:.1f} at the end"]])


def suite(s: dict[str, Any] | None = None) -> str:
    """docs/testing.md: the last recorded run of the whole suite."""
    s = s or load("suite")
    return (provenance_line(s["provenance"]).replace("at the start", "at the end") + "\n\n"
            + table(["tests", "passed", "failed", "errors", "skipped", "wall time"],
                    [[str(s["tests"]), str(s["passed"]), str(s["failed"]), str(s["errors"]), str(s["skipped"]),
                      f"{s['seconds']:.0f} s ({s['seconds'] / 60:.1f} min)"]], "rrrrrr"))


def bench(b: dict[str, Any] | None = None) -> str:
    """docs/benchmarks.md: every line each section of `make bench` printed, as it printed it."""
    b = b or load("bench")
    out = [provenance_line(b["provenance"]), ""]
    for name, sec in b["sections"].items():
        out += [f"`bench/{name}.py` ({sec['seconds']:.0f} s):", "", "```text", *sec["lines"], "```", ""]
    return "\n".join(out)


def latency() -> str:
    """docs/deployment.md: the accuracy of the committed latency tables (written by `python -m supernet.latency`)."""
    p = load("latency")["provenance"]
    rows = []
    for name, command in p["commands"].items():
        t = json.loads((REPO / "docs" / "latency" / name).read_text())
        a = t["accuracy"]
        rows.append([f"[`{name}`](latency/{name})", f"`{t['space']}`", t["device"], t["torch"],
                     str(t["threads"]), str(t["batch"]), str(a["archs"]), f"{a['mape']:.1f}%", f"{a['max_ape']:.1f}%",
                     f"{a['kendall_tau']:.2f}", f"{t['drift']:.2f}x", f"`{command}`"])
    return (f"Measured {p['date']} at commit `{p['commit']}` on {p['machine']} ({p['source']}). Each table's own "
            "accuracy on random networks not used for its calibration:\n\n"
            + table(["table", "space", "device", "torch", "threads", "batch", "networks", "MAPE", "worst error",
                     "Kendall τ", "drift", "command"], rows, "lllllrrrrrrl"))


def gpu_check() -> str:
    """docs/real_scale.md: the GPU measurements kept in docs/data/gpu_check_*.json."""
    out = []
    for f in sorted(DATA.glob("gpu_check_*.json")):
        g = json.loads(f.read_text())
        p = g["provenance"]
        out.append(f"Measured {p['date']} at commit `{p['commit']}` on {p['device']}, torch {p['torch']}, by "
                   f"`{p['command']}` ({p['source']}):\n")
        out.append(table(["device", "batch", "supernet img/s", "compiled img/s", "DeiT-Ti img/s",
                          "supernet / DeiT-Ti", "search evals/s", "peak memory"],
                         [[r["device"], str(r["batch"]), f"{r['supernet_img_s']:.0f}",
                           "-" if r["compiled_img_s"] is None else f"{r['compiled_img_s']:.0f}",
                           f"{r['deit_img_s']:.0f}", f"{r['supernet_img_s'] / r['deit_img_s']:.2f}",
                           f"{r['search_evals_s']:.1f}", f"{r['peak_gib']:.1f} GiB"] for r in g["rows"]],
                         "lrrrrrrr"))
    return "\n".join(out)


def determinism(d: dict[str, Any] | None = None) -> str:
    """docs/reliability.md: the same retraining rerun with the same and with other threads and kernels."""
    d = d or load("determinism")
    rows = []
    for r in d["runs"]:
        v = r["vs_first"]
        rows.append([r["name"], r["threads"], r["capability"], f"{r['test_top1']:.4f}",
                     "(the reference)" if v is None else f"{v['identical_tensors']} of {v['tensors']}",
                     "-" if v is None else f"{v['max_abs_diff']:.2g}"])
    return (provenance_line(d["provenance"]) + " Each run retrains the demo's DeiT-like baseline "
            f"(`{d['arch']['short']}`, {macs(d['arch']['macs'])} MACs) with `{' '.join(d['schedule'])}` (seed 0) "
            "in its own process.\n\n"
            + table(["run", "threads", "kernels", "test top-1", "weight tensors identical to the first run",
                     "largest weight difference"], rows, "lrlrrr"))


def train_step() -> str:
    from bench import step_speed

    return step_speed.render(json.loads(step_speed.JSON.read_text()))


def crop_stats() -> str:
    from scripts import crop_stats as cs

    return cs.render(json.loads(cs.OUT.read_text()))


def latency_tables() -> str:
    from scripts import latency_tables as lt

    return lt.render()


def results_v2_corrected() -> str:
    from scripts.study.render import v2_block

    return v2_block()


def study_readme() -> str:
    from scripts.study.render import readme_table

    return readme_table()


TABLES: dict[str, Callable[[], str]] = {
    "setup_readme": setup_readme, "demo_readme": demo_readme, "demo": demo, "suite": suite, "bench": bench,
    "latency": latency, "gpu_check": gpu_check, "determinism": determinism, "train_step": train_step,
    "crop_stats": crop_stats, "latency_tables": latency_tables, "results_v2_corrected": results_v2_corrected,
    "study_readme": study_readme,
}


# ----------------------------------------------------------------------------- pages


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, content) of every table block of a page."""
    return [(m[1], m[2]) for m in MARKER.finditer(text)]


def rendered(text: str) -> str:
    """The page with every table block replaced by what its JSON renders to; an unknown name is an error."""
    def one(m: re.Match[str]) -> str:
        if m[1] not in TABLES:
            raise SystemExit(f"error: table:{m[1]}: no such table (known: {', '.join(TABLES)})")
        return f"<!-- table:{m[1]} -->\n{TABLES[m[1]]().rstrip()}\n<!-- /table:{m[1]} -->"
    return MARKER.sub(one, text)


def _shown(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def stale(pages: list[Path] = PAGES) -> list[str]:
    """'page: table:NAME' for every table that is not what its JSON renders to."""
    out = []
    for page in pages:
        text = page.read_text()
        for (name, have), (_, want) in zip(blocks(text), blocks(rendered(text))):
            if have != want:
                out.append(f"{_shown(page)}: table:{name}")
    return out


def render(pages: list[Path] = PAGES) -> list[Path]:
    changed = []
    for page in pages:
        text = page.read_text()
        new = rendered(text)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


# ----------------------------------------------------------------------------- recording


def record_demo(src: Path) -> dict[str, Any]:
    d = json.loads(src.read_text())
    if "provenance" not in d or "schedule" not in d:
        raise SystemExit(f"error: {src}: no provenance or schedule: written by an older scripts/demo.py")
    if not d.get("fresh"):
        raise SystemExit(f"error: {src}: a resumed demo (its output folder existed): its minutes are not the "
                         "pipeline's; run `make demo` into an empty OUT")
    return d


def record_bench(src: Path) -> dict[str, Any]:
    d = json.loads(src.read_text())
    if "provenance" not in d or "sections" not in d:
        raise SystemExit(f"error: {src}: not written by `python -m bench` (no provenance or sections)")
    return d


def record_suite(src: Path, make_seconds: float | None = None) -> dict[str, Any]:
    """pytest's --junitxml file of a whole run: counts, wall time, and this machine's provenance now;
    ``make_seconds``: the whole `make test`'s wall time on a fresh clone (the install included), timed outside."""
    root = ET.parse(src).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # recorded right after the run, on the machine and commit it ran on; its start from the file, threads as make
    # test sets them
    p = provenance("make test (OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --dist loadfile)")
    start = s.get("timestamp")
    p["date"] = (start[:10] + " " + start[11:16] + " UTC") if start else time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(src.stat().st_mtime))
    p["threads"] = 1
    return {"provenance": p, "tests": n["tests"], "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"], "seconds": float(s.get("time")),
            **({"make_seconds": make_seconds} if make_seconds else {})}


def record_determinism(src: Path) -> dict[str, Any]:
    d = json.loads(src.read_text())
    if "provenance" not in d or "runs" not in d:
        raise SystemExit(f"error: {src}: not written by scripts/determinism.py (no provenance or runs)")
    return d


RECORDERS = {"demo": record_demo, "bench": record_bench, "suite": record_suite, "determinism": record_determinism}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("render", help="rewrite every table block from its JSON")
    sub.add_parser("check", help="exit 1 naming each table block that differs from its JSON")
    rec = sub.add_parser("record", help="copy a measurement into docs/data/NAME.json, then render")
    rec.add_argument("name", choices=sorted(RECORDERS))
    rec.add_argument("src", type=Path)
    rec.add_argument("--make-seconds", type=float, default=None,
                     help="suite only: the whole `make test`'s wall time, the install included (e.g. from `time`)")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        bad = stale()
        for b in bad:
            print(f"{b}: differs from its JSON; run `make docs`", file=sys.stderr)
        return 1 if bad else 0
    if a.cmd == "record":
        if not a.src.is_file():
            raise SystemExit(f"error: {a.src}: no such file")
        if a.make_seconds is not None and a.name != "suite":
            raise SystemExit("error: --make-seconds: only for `record suite` (the wall time of `make test`)")
        extra = {"make_seconds": a.make_seconds} if a.name == "suite" else {}
        write_json(DATA / f"{a.name}.json", RECORDERS[a.name](a.src, **extra))
        print(f"docs/data/{a.name}.json <- {a.src}")
    for page in render():
        print(f"rendered {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
