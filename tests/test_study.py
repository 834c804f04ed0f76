"""The trained-regime study (scripts/experiments.py, scripts/study/): docs/results.md is exactly what its result
files render to, and the pilot's analysis picks the shortest settled schedule from result files alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_results_page_is_what_the_committed_result_files_render_to():
    from scripts.study.render import page

    assert (REPO / "docs" / "results.md").read_text() == page(REPO / "docs" / "study")


def _write(results: Path, arch: dict, seed: int, epochs: int, val: float) -> None:
    from scripts.study.units import Standalone

    u = Standalone.of(arch, seed, epochs)
    path = results / f"{u.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unit": "standalone", "arch": arch, "seed": seed, "epochs": epochs, "val_top1": val,
                                "test_top1": val, "wall_s": 1.0, "cpu_s": 1.0,
                                "machine": {"cpu": "test", "cores": 2, "torch": "x"}}))


def test_the_pilot_chooses_the_shortest_schedule_whose_ranking_has_settled(tmp_path):
    """Synthetic pilot: at 1 epoch the ranking is scrambled, at 2 it is the reverse of the final one (small nets
    train fastest), from 4 epochs on it is the final one. E is 4: tau(4, 8) = 1 with a ceiling of 1, while
    tau(1, 2) is low and tau(2, 4) = -1; with the 8-epoch runs missing, no schedule is chosen."""
    from scripts.study import plan
    from scripts.study.pilot import chosen_schedule, schedules

    archs = plan.pilot_archs()
    for i, a in enumerate(archs):
        for e in plan.PILOT_SCHEDULES:
            for s in plan.PILOT_SEEDS:
                quality = i if e >= 4 else len(archs) - i if e == 2 else (3 * i) % len(archs)
                _write(tmp_path, a.to_dict(), s, e, 0.5 + 0.01 * quality + 0.001 * s)
    rows = schedules(tmp_path, resamples=200)
    assert [r.runs for r in rows] == [16] * 4 and rows[1].settle.value == -1 and rows[2].settle.value == 1
    assert chosen_schedule(tmp_path) == 4
    for p in (tmp_path / "standalone").glob("*_e8.json"):
        p.unlink()
    assert chosen_schedule(tmp_path) is None
    shutil.rmtree(tmp_path / "standalone")
    assert chosen_schedule(tmp_path) is None and schedules(tmp_path, 200)[0].runs == 0


def test_a_worker_skips_finished_units_and_claims_are_exclusive(tmp_path, monkeypatch):
    """A unit with a result file is never run again; a unit claimed by a live process is left to it."""
    import os

    from scripts.study import units

    monkeypatch.setattr(units, "WORK", tmp_path / "work")
    ran = []

    class Unit:
        def __init__(self, name):
            self.name, self.result = name, tmp_path / "res" / f"{name}.json"

        def run(self):
            ran.append(self.name)
            return {"unit": "fake"}

    done, free, held = Unit("done"), Unit("free"), Unit("held")
    done.result.parent.mkdir(parents=True)
    done.result.write_text("{}")
    lock = tmp_path / "work" / "claims" / "held.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getppid()))  # a live process that is not this one
    units.drain([done, free, held], commit=False)
    assert ran == ["free"] and json.loads(free.result.read_text()) == {"unit": "fake"}
    lock.write_text("999999999")  # its process is gone: the claim is retaken
    units.drain([held], commit=False)
    assert ran == ["free", "held"]


@pytest.mark.parametrize("epochs", [1])
def test_a_standalone_units_name_and_cost_follow_its_architecture(epochs):
    from scripts.study import plan
    from scripts.study.units import Standalone

    small, big = plan.pilot_archs()[0], plan.pilot_archs()[-1]
    a, b = Standalone.of(small.to_dict(), 0, epochs), Standalone.of(big.to_dict(), 1, epochs)
    assert a.name.startswith("standalone/") and a.name.endswith("_s0_e1") and a.key != b.key
    assert b.cost() > a.cost() and Standalone.of(small.to_dict(), 0, epochs).name == a.name
