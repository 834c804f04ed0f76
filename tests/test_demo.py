"""`make demo` (scripts/demo.py) end to end at a tiny schedule on generated IDX files: every stage writes what
the README lists, each stage shows a progress bar, the table holds both models, supernet training and search run
without the test split's files, and a rerun resumes every stage: finished ones are not redone, a deleted stage is
redone and gives the same result."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from space.arch import ArchSpec
from space.cost import macs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(train_root: Path, full_root: Path, out: Path) -> list[str]:
    """The demo's ARGS for a few seconds a stage; supernet training gets a data folder with no test split, and
    the search reads the checkpoint's."""
    data = ["data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100"]
    return [f"OUT={out}", "THREADS=2",
            *(f"supernet.{a}" for a in [f"data.root={train_root}", *data, "max_steps=4", "eval.every=0",
                                        "log_every=2"]),
            *(f"search.{a}" for a in ["eval_batch_size=50", "evolution.population=4", "evolution.topk=2",
                                      "evolution.generations=1", "evolution.mutations=2", "evolution.crossovers=2",
                                      "eval_images=50"]),
            *(f"retrain.{a}" for a in [f"data.root={full_root}", *data, "max_steps=2", "log_every=1"])]


def _run_demo(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str]) -> tuple[str, str]:
    """scripts/demo.py's main() with these ARGS, in this process; its stdout and stderr."""
    spec = importlib.util.spec_from_file_location("psvit_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setattr(sys, "argv", ["scripts/demo.py", *args])
    capsys.readouterr()
    demo.main()
    out = capsys.readouterr()
    return out.out, out.err


def _stamp(path: Path) -> tuple[str, int]:
    """The file's bytes and write time: a deterministic stage redone could write the same bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_demo_runs_end_to_end_without_the_test_split_until_retraining_and_a_rerun_resumes(
        tmp_path, fake_fmnist, monkeypatch, capsys):
    full = fake_fmnist(tmp_path / "full", n_train=200, n_test=40)
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for f in full.glob("train-*"):
        shutil.copy(f, train_only / f.name)
    out = tmp_path / "demo"
    args = _tiny(train_only, full, out)

    text, err = _run_demo(monkeypatch, capsys, args)
    for bar in ("supernet: 100%", "| 4/4 ", "search (evolution): 100%", "| 1/1 ", "retrain best_arch: 100%",
                "retrain deit_like: 100%", "| 2/2 "):  # a progress bar all along: each stage's, at its end
        assert bar in err, bar
    summary = json.loads((out / "summary.json").read_text())
    results = summary["results"]
    # what scripts/docs.py renders the docs' demo tables from: a fresh run's schedule, as passed, and provenance
    assert summary["fresh"] is True and "max_steps=4" in summary["schedule"]["supernet"]
    assert summary["schedule"]["retrain"][:2] == ["optim.epochs=3", "eval.every=0"]
    assert {"date", "commit", "cpu", "cores", "threads", "torch", "command"} <= set(summary["provenance"])
    assert summary["provenance"]["threads"] == 2  # THREADS=2 pins it, though the test runs with one thread (the
    # demo's default is 1)
    assert list(results) == ["PSViT (searched)", "DeiT-like baseline"]
    best = out / "search" / "best_arch.json"
    assert [Path(r["arch"]).resolve() for r in results.values()] == [best.resolve(),
                                                                     (out / "deit_like.json").resolve()]
    for name, r in results.items():
        arch = ArchSpec.load(r["arch"])
        assert 0 <= r["test_top1"] <= 1
        row = next(line for line in text.splitlines() if line.startswith(name))
        assert f"{r['test_top1']:.4f}" in row and arch.short() in row, row
    assert macs(ArchSpec.load(best)) <= 4e6  # the demo's budget
    listed = [Path(line.strip()) for line in text.split("\noutputs:\n", 1)[1].splitlines() if line.strip()]
    assert len(listed) == 8 and all(p.exists() for p in listed), [p for p in listed if not p.exists()]

    # a rerun: the supernet and the searched net's retraining are finished, their checkpoints stay as they are (a
    # finished retraining scores the test split again); the finished search scores no candidate and writes the
    # same files again; the baseline's retraining, deleted, is redone from scratch to the same test accuracy
    import search.evolve

    searches, evolve = [], search.evolve.evolve
    monkeypatch.setattr(search.evolve, "evolve", lambda cfg: searches.append(evolve(cfg)) or searches[-1])
    kept = [out / "supernet" / "last.ckpt", out / "retrain_best_arch" / "last.ckpt"]
    before = {p: _stamp(p) for p in kept}
    history, best_text = (out / "search" / "history.jsonl").read_text(), best.read_text()
    shutil.rmtree(out / "retrain_deit_like")
    again, _ = _run_demo(monkeypatch, capsys, args)
    assert {p: _stamp(p) for p in kept} == before
    assert len(searches) == 1 and searches[0]["scored"] == 0
    assert (out / "search" / "history.jsonl").read_text() == history and best.read_text() == best_text
    rerun = json.loads((out / "summary.json").read_text())["results"]
    assert json.loads((out / "summary.json").read_text())["fresh"] is False  # a resumed run's minutes are not kept
    assert {k: r["test_top1"] for k, r in rerun.items()} == {k: r["test_top1"] for k, r in results.items()}
    assert (out / "retrain_deit_like" / "result.json").exists() and "outputs:" in again
