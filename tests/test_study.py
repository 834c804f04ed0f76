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
    """A unit with a result file is never run again; a unit claimed by another process is left to it, and its
    claim frees itself when that process lets go (or dies); a claim is exclusive."""
    import fcntl
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
    other = os.open(lock, os.O_CREAT | os.O_RDWR)  # another open file: its flock conflicts like another process's
    fcntl.flock(other, fcntl.LOCK_EX)
    assert units.held_by_another(held) and not units.claim(held)
    units.drain([done, free, held], commit=False)
    assert ran == ["free"] and json.loads(free.result.read_text()) == {"unit": "fake"}
    os.close(other)  # its holder lets go (a dead process's flock goes the same way); a stale file stays behind
    assert lock.exists() and not units.held_by_another(held)
    units.drain([held], commit=False)
    assert ran == ["free", "held"] and not units._HELD  # released once its result was written
    again = Unit("again")
    assert units.claim(again) and not units.held_by_another(again) and units.claim(again) is False
    units.release(again)


@pytest.mark.parametrize("epochs", [1])
def test_a_standalone_units_name_and_cost_follow_its_architecture(epochs):
    from scripts.study import plan
    from scripts.study.units import Standalone

    small, big = plan.pilot_archs()[0], plan.pilot_archs()[-1]
    a, b = Standalone.of(small.to_dict(), 0, epochs), Standalone.of(big.to_dict(), 1, epochs)
    assert a.name.startswith("standalone/") and a.name.endswith("_s0_e1") and a.key != b.key
    assert b.cost() > a.cost() and Standalone.of(small.to_dict(), 0, epochs).name == a.name


def test_f1_f2_f3_render_from_result_files_alone(tmp_path):
    """A synthetic study in which quality grows with MACs and the supernet's inherited scores follow it from its
    second kept checkpoint on: the page picks E = 1, shows the tau-vs-length curve (tau 1 at the end, below it at
    the start), why the rankings differ (tau with MACs), the searched net's rank and lead over the random median,
    and F3's gaps with their intervals at E and at 4E."""
    from scripts.study import plan
    from scripts.study.answers import diagnosis, f1, f2, f3, groups
    from scripts.study.render import page, readme_table
    from space.cost import macs

    def q(a):  # the synthetic truth: bigger is better
        return 0.5 + macs(a) / 1e8

    for a in plan.pilot_archs():  # a settled pilot at 1 and 2 epochs
        for e in (1, 2):
            for s in plan.PILOT_SEEDS:
                _write(tmp_path, a.to_dict(), s, e, q(a) + 0.0001 * s)
    for a in plan.f1_range():
        for s in plan.RANGE_SEEDS:
            _write(tmp_path, a.to_dict(), s, 1, q(a) + 0.0001 * s)
    for a in plan.band_set():
        for s in plan.BAND_SEEDS:
            _write(tmp_path, a.to_dict(), s, 1, q(a) + 0.0001 * s)
    uniform, sandwich, plain = plan.supernets()
    archs = plan.range_archs() + plan.band_set()
    fid = {"archs": [a.to_dict() for a in archs],
           "groups": [["range"]] * len(plan.range_archs()) + [["band"]] * len(plan.band_set())}
    points = [{"step": step, "whole": [q(a) if step > 1000 else 1 - q(a) for a in archs],
               "fitness": [q(a) for a in archs]} for step in (1000, 2000)]
    worse = [{"step": 1448, "whole": [q(a) if a in plan.band_set() else 1 - q(a) for a in archs],
              "fitness": [q(a) for a in archs]}]
    for unit, pts, f in ((uniform, points, fid), (sandwich, worse, fid), (plain, [], {"archs": [], "groups": []})):
        (tmp_path / "supernet").mkdir(exist_ok=True)
        (tmp_path / f"{unit.name}.json").write_text(json.dumps({
            "unit": "supernet", "rule": unit.rule, "steps": unit.steps, **f, "points": pts, "cpu_s": 3600.0,
            **({"train_cpu_s": 600.0, "train_wall_s": 1800.0} if unit is uniform else {})}))
    best, plain_best = plan.band_set()[-1], plan.band_set()[0]  # the band's largest wins
    for unit, arch in zip(plan.searches(), (best, plain_best)):
        (tmp_path / "search").mkdir(exist_ok=True)
        (tmp_path / f"{unit.name}.json").write_text(json.dumps({"unit": "search", "supernet": unit.supernet.name,
                                           "arch": arch.to_dict(),
                                           "short": arch.short(), "macs": macs(arch), "val_acc": 0.8,
                                           "lead_over_runner_up": {"value": 0.01, "low": 0.0, "high": 0.02},
                                           "scored": 1000, "scoring_s": 600.0, "rescored": 10, "rescoring_s": 60.0,
                                           "cpu_s": 600.0}))
    for a in [best, plain_best, *plan.deit_matches(best).values()]:
        for s in plan.F23_SEEDS:
            _write(tmp_path, a.to_dict(), s, 1, q(a) + 0.001 * s)
            _write(tmp_path, a.to_dict(), s, 4, q(a) + 0.05 + 0.001 * s)  # F3 again at 4E

    res = f1(1, tmp_path)
    assert sorted(r["rule"] for r in res) == ["sandwich", "uniform"]  # plain has no kept points: not in F1
    first, last = next(r for r in res if r["rule"] == "uniform")["curve"]
    assert last["range"]["whole"]["kendall_tau"].value == 1 and first["range"]["whole"]["kendall_tau"].value == -1
    assert last["band"]["archs"] == 12 and last["range"]["archs"] == 12
    got = f2(1, tmp_path)
    assert got["rank"] == 1 and got["lead"].value > 0
    rows = f3(1, tmp_path)
    assert [len(r["test"]) for r in rows] == [3, 3, 3, 3] and rows[0]["gap"] is None
    assert all(r["gap"].value == pytest.approx(q(r["arch"]) - q(best)) for r in rows[1:])
    # truth and uniform follow MACs, sandwich the reverse
    diag = diagnosis(groups(1, tmp_path), res)["range"]["rankings"]
    assert [r["tau_macs"].value for r in diag] == [1.0, -1.0, 1.0]
    assert [r["macs_over_truth"].value for r in diag[1:]] == [-2.0, 0.0]
    assert diag[0]["ranks"] == diag[2]["ranks"] and sorted(diag[1]["ranks"]) == list(range(1, 13))
    text = page(tmp_path)
    assert "| range | `uniform` inherited (step 2000) |" in text and "### F3 at 4 epochs" in text
    assert "in the range, `sandwich` inherited (step 1448) favours smaller nets than 1 epoch of training" in text
    assert "Runs finished so far: 12/12" in text
    assert "From 1 epoch to 4 epochs: " in text and "Not every gap shrinks with longer training" in text  # equal gaps
    assert "The pilot's 4-epoch and 8-epoch runs are queued last and not all run" in text  # 4 of 16 at 4 epochs
    assert "τ(2, 4) is unmeasured" in text
    plain_row, f3_row = readme_table(tmp_path).splitlines()[-2:]
    assert "(1 epoch, 3 seeds)" in f3_row and f3_row.endswith("test top-1 (4 epochs, 3 seeds) |")
    assert "searched in `fmnist_2d_plain` minus PSViT" in plain_row and plain_row.endswith("(4 epochs, 3 seeds) |")
    assert "E = 1 epoch**" in text and "ranks 1 of 13" in text and "1.5 CPU-hours" not in text
    assert "| 2000 | range | 0.6137 (24) | 12 |" in text and "The interval excludes zero." in text
    assert "sandwich - uniform, range: Δτ -2.0000 [-2.0000, -2.0000]" in text
    assert "| `uniform` (step 2000) | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in text  # vs the pilot
    assert "sandwich - uniform, band: Δτ +0.0000 [+0.0000, +0.0000] (includes 0: no difference shown)" in text
    assert "re-scoring its 10 finalists on the whole split took 1.0 min, 9% of its scoring time" in text
    # uniform's training ran 1800 s over its processes, of which the unit's own clock saw 600 s
    assert "3.7 CPU-hours so far (stand-alone runs 0.0, supernets 3.3, searches 0.3)" in text


def test_a_later_pair_that_moves_the_ranking_moves_the_chosen_schedule(tmp_path):
    """tau(1, 2) = 1 would choose E = 1, but the 4-epoch ranking reverses the 2-epoch one (a big net overtaking
    late): E moves to 4 once tau(4, 8) = 1 is measured, and is None while only the unsettled pair follows."""
    from scripts.study import plan
    from scripts.study.pilot import chosen_schedule

    archs = plan.pilot_archs()
    for e in (1, 2, 4):
        for i, a in enumerate(archs):
            for s in plan.PILOT_SEEDS:
                _write(tmp_path, a.to_dict(), s, e, 0.5 + 0.01 * (i if e < 4 else len(archs) - i) + 0.001 * s)
    assert chosen_schedule(tmp_path) is None  # tau(2, 4) = -1 unsettles E = 1; nothing after 4 yet
    from scripts.study.render import page, readme_table

    text = page(tmp_path)  # what was measured at 1 epoch stays on the page, marked as not settled
    assert "**No schedule is chosen yet:**" in text and "F1-F3 below were measured at 1 epoch" in text
    assert "## F1: does the supernet rank" in text and "not settled: the ranking at 1 epoch moves" in readme_table(
        tmp_path)
    for i, a in enumerate(archs):
        for s in plan.PILOT_SEEDS:
            _write(tmp_path, a.to_dict(), s, 8, 0.6 + 0.01 * (len(archs) - i) + 0.001 * s)
    assert chosen_schedule(tmp_path) == 4


def test_a_search_unit_trains_its_supernet_when_missing_and_records_the_winner(tmp_path, monkeypatch):
    """The units a fresh machine runs: a search whose supernet's checkpoint is absent trains it first (the
    result file of the supernet is all that makes the search ready), then records a winner inside its band."""
    from scripts.study import units
    from space.arch import ArchSpec
    from space.cost import macs

    monkeypatch.setattr(units, "WORK", tmp_path / "work")
    monkeypatch.setattr(units, "RESULTS", tmp_path / "res")
    sn = units.Supernet("plain", 4, 4, ("data.batch_size=16",), (), space="fmnist_2d_plain")
    search = units.Search(sn, (3.5e6, 4.5e6), overrides=(
        "evolution.population=4", "evolution.topk=2", "evolution.generations=1", "evolution.mutations=2",
        "evolution.crossovers=2", "eval_images=64", "eval_batch_size=64", "finalists=2", "bootstrap=100"))
    assert not search.ready()
    sn.result.parent.mkdir(parents=True)
    sn.result.write_text("{}")  # as if the supernet's unit had finished on another machine
    assert search.ready() and not (sn.run_dir / "last.ckpt").exists()
    rec = search.run()
    assert (sn.run_dir / "step_4.ckpt").exists() and rec["space"] == "fmnist_2d_plain"
    arch = ArchSpec.from_dict(rec["arch"])
    assert 3.5e6 <= macs(arch) <= 4.5e6 and rec["macs"] == macs(arch) and arch.stages[0].tokens == 49
    assert 0 <= rec["val_acc"] <= 1 and len(rec["finalists"]) == 2 and rec["cpu_s"] > 0
    assert rec["scored"] == rec["proposals"] == 4 and rec["rescored"] == 2 and rec["rescoring_s"] > 0


def test_the_study_queue_follows_the_pilot(tmp_path, monkeypatch):
    """Without a chosen schedule the queue is the pilot's; with E = 1 it puts the supernets and the search first,
    the band's ground truth before the pilot's 4-epoch confirmation, and the plain supernet before the range's."""
    from scripts.study import pilot, plan

    monkeypatch.setattr(pilot, "RESULTS", tmp_path)
    monkeypatch.setattr(pilot.chosen_schedule, "__defaults__", (tmp_path,))
    assert [u.name for u in plan.study()] == [u.name for u in plan.pilot()]
    for a in plan.pilot_archs():
        for e in (1, 2):
            for s in plan.PILOT_SEEDS:
                _write(tmp_path, a.to_dict(), s, e, 0.5 + 0.001 * s)
    monkeypatch.setattr(pilot, "chosen_schedule", lambda results=tmp_path: 1)
    names = [u.name for u in plan.study()]
    assert names[:3] == ["supernet/uniform_8000", "supernet/sandwich_1448", "search/uniform_8000_s0"]
    first_e4 = next(i for i, n in enumerate(names) if n.endswith("_e4"))
    band = {plan.arch_key(a) for a in plan.band_set()}
    wide = {plan.arch_key(a) for a in plan.f1_range()} - band
    assert all(i < first_e4 for i, n in enumerate(names) if n.endswith("_e1") and n.split("/")[1][:12] in band)
    assert any(i > first_e4 for i, n in enumerate(names) if n.endswith("_e1") and n.split("/")[1][:12] in wide)
    # the plain supernet runs beside the range's trainings, not after them
    assert names.index("supernet/plain_8000") < min(i for i, n in enumerate(names)
                                                    if n.endswith("_e1") and n.split("/")[1][:12] in wide)
    # once the PSViT search has a winner, its F3 nets run again at 4E (cheapest first), after F1's range and
    # before the pilot's 8-epoch runs
    pilots = {plan.arch_key(a) for a in plan.pilot_archs()}
    winner = next(a for a in plan.band_set() if plan.arch_key(a) not in pilots)
    monkeypatch.setattr(plan, "searched", lambda search: winner if search.supernet.rule == "uniform" else None)
    names = [u.name for u in plan.study()]
    longer = plan.f3_longer(1)
    assert len(longer) == 9 and {u.epochs for u in longer} == {4}
    assert [u.cost() for u in longer] == sorted(u.cost() for u in longer)
    spots = [names.index(u.name) for u in longer]
    last_wide = max(i for i, n in enumerate(names) if n.endswith("_e1") and n.split("/")[1][:12] in wide)
    assert last_wide < min(spots) and max(spots) < min(i for i, n in enumerate(names) if n.endswith("_e8"))


def test_the_lead_over_the_random_median_counts_the_searched_nets_seed_noise():
    """With 3 seeds a bootstrap of the searched net's mean never leaves [min, max] of its seeds (here all above the
    random median): the interval must be Student's t over its seeds instead, and so include 0 here."""
    from scipy import stats

    from scripts.study.answers import lead_over_median

    seeds, random = [0.71, 0.72, 0.73], [0.70] * 12  # a constant random side: the interval is the searched side's
    lead = lead_over_median(seeds, random, resamples=20000)
    half = stats.t.ppf(0.975, 2) * stats.sem(seeds)
    assert lead.value == pytest.approx(0.02)
    assert lead.low == pytest.approx(0.02 - half, abs=0.002) and lead.high == pytest.approx(0.02 + half, abs=0.002)
    assert lead.low < 0 < lead.high
