"""The `python -m search.evolve` app over a tiny real Fashion-MNIST supernet: outputs, no arch scored twice
(resume included), SIGKILL resume == uninterrupted run, 2 gloo ranks == 1 process (spawned, and through
`make search NPROC=2`'s launcher), random search, FLOPs bands sharing one cache, and one-line exit-2 errors that
write nothing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from forkserver import ForkServer
from hydra import compose, initialize_config_dir

from space.arch import ArchSpec
from space.cost import arch_cost, macs

REPO = Path(__file__).resolve().parents[1]
# a supernet trained on the real dataset (conftest.py fails these without it), on one thread (conftest.py)
pytestmark = [pytest.mark.fmnist, pytest.mark.usefixtures("one_thread")]

FLOPS_MAX = 8_000_000  # MACs; about the 75th percentile of fmnist_2d's uniform samples
GENERATIONS, POPULATION, IMAGES, VAL, FINALISTS = 5, 6, 100, 1000, 10
# Tiny search: 5 generations of 6 candidates (2 mutations, 2 crossovers, 2 random) scored on 100 held-out images.
SEARCH = [f"evolution.population={POPULATION}", "evolution.topk=2", "evolution.mutations=2",
          "evolution.crossovers=2", f"evolution.generations={GENERATIONS}", f"eval_images={IMAGES}",
          "progress=false", "show_top=3", "seed=0", "device=cpu"]


@dataclass
class Run:
    run_dir: Path
    calls: list[str]  # canonical JSON of every architecture the scorer scored, in order
    out: str  # stdout

    def history(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "history.jsonl").read_text().splitlines()]


def search_cfg(ckpt: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evolve", overrides=[f"checkpoint={ckpt}", f"run_dir={run_dir}", *SEARCH, *overrides])


def cli(forkserver: ForkServer, ckpt: Path, run_dir: Path, *overrides: str):
    """``python -m search.evolve``'s own process (forked from conftest.py's ``forkserver``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forkserver.popen([sys.executable, "-m", "search.evolve", f"checkpoint={ckpt}", f"run_dir={run_dir}",
                             *SEARCH, *overrides], cwd=REPO, env=env)


@contextmanager
def counting() -> Iterator[list[str]]:
    """Record every ``InheritedAccuracy.accuracy`` call (the one place a candidate is scored)."""
    from search.inherited import InheritedAccuracy

    calls: list[str] = []
    real = InheritedAccuracy.accuracy

    def accuracy(self, arch: ArchSpec) -> float:
        calls.append(arch.to_json())
        return real(self, arch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InheritedAccuracy, "accuracy", accuracy)
        yield calls


def run_search(ckpt: Path, run_dir: Path, capsys: pytest.CaptureFixture | None, *overrides: str) -> Run:
    from search.evolve import evolve

    with counting() as calls:
        summary = evolve(search_cfg(ckpt, run_dir, *overrides))
    assert summary["scored"] == len(calls) and (summary["scoring_s"] > 0) == bool(calls)  # the scorer's own count
    return Run(run_dir, calls, capsys.readouterr().out if capsys is not None else "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A tiny fmnist_2d supernet (20 SPOS steps) with a 1000-image held-out validation split."""
    from supernet.train import train

    run_dir = tmp_path_factory.mktemp("supernet")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("supernet", overrides=[f"run_dir={run_dir}", "max_steps=20", "data.batch_size=32",
                                             "data.val_size=1000", "eval.every=0", "progress=false", "device=cpu"])
    assert train(cfg).step == 20
    return run_dir / "last.ckpt"


@pytest.fixture(scope="module")
def reference(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted single-process search every other run is compared with."""
    return run_search(ckpt, tmp_path_factory.mktemp("reference"), None, f"flops_max={FLOPS_MAX}")


def _space(ckpt: Path):
    from supernet.engine.checkpoint import load_supernet

    return load_supernet(ckpt, torch.device("cpu")).net.space


# ----------------------------------------------------------------------------- outputs
def test_outputs(ckpt: Path, reference: Run):
    import hashlib

    d = reference.run_dir
    best = ArchSpec.load(d / "best_arch.json")
    assert _space(ckpt).contains(best)
    cost = arch_cost(best)
    assert cost.macs <= FLOPS_MAX
    meta = json.loads((d / "best_arch.json").read_text())["meta"]
    assert meta["flops_macs"] == cost.macs and meta["params"] == cost.params
    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["fitness_images"] == IMAGES and meta["val_images"] == VAL
    assert meta["search"]["evolution"]["population"] == POPULATION and meta["search"]["flops_max"] == FLOPS_MAX

    hist = reference.history()
    assert len(hist) == GENERATIONS * POPULATION
    assert [h["generation"] for h in hist] == [g for g in range(GENERATIONS) for _ in range(POPULATION)]
    for h in hist:
        arch = ArchSpec.from_dict(h["arch"])
        c = arch_cost(arch)
        assert (h["flops_macs"], h["params"]) == (c.macs, c.params) and c.macs <= FLOPS_MAX
        assert 0.0 <= h["val_acc"] <= 1.0 and round(h["val_acc"] * IMAGES) / IMAGES == h["val_acc"]
    # The finalists are the best 10 by the fitness subset (score, then fewer FLOPs), each re-scored on the whole
    # split; the winner is the best of those and carries both scores.
    by_arch = {json.dumps(h["arch"], sort_keys=True): h for h in hist}
    ranked = sorted(by_arch.values(), key=lambda h: (-h["val_acc"], h["flops_macs"]))
    finalists = [h for h in by_arch.values() if "val_acc_full" in h]
    assert len(finalists) == FINALISTS
    assert {h["val_acc"] for h in finalists} >= {h["val_acc"] for h in ranked[:FINALISTS - 1]}
    assert min(h["val_acc"] for h in finalists) >= ranked[FINALISTS - 1]["val_acc"]
    top = max(finalists, key=lambda h: h["val_acc_full"])
    assert meta["val_acc"] == top["val_acc_full"] and meta["fitness_acc"] == top["val_acc"]
    assert [f["val_acc"] for f in meta["finalists"]] == sorted((h["val_acc_full"] for h in finalists), reverse=True)
    lead = meta["lead_over_runner_up"]
    assert lead["value"] == meta["finalists"][0]["val_acc"] - meta["finalists"][1]["val_acc"]
    assert lead["low"] <= lead["value"] <= lead["high"]
    assert (d / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((d / "state.json").read_text())
    assert state["searches"][0]["generation"] == GENERATIONS
    assert list((d / "tb").glob("events.out.tfevents.*"))


def test_finalists_are_scored_on_the_whole_split_as_the_fitness_scorer_would(ckpt: Path, reference: Run):
    """The re-scoring's per-image vectors (each rank's block, gathered) give the top-1 that the fitness scorer
    gives on all the held-out images, and the lead's interval is the paired bootstrap of those vectors."""
    from search.inherited import InheritedAccuracy, validation_batches
    from supernet.engine.checkpoint import load_supernet
    from supernet.engine.distributed import DistEnv

    sck = load_supernet(ckpt, torch.device("cpu"))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    full = InheritedAccuracy(sck.net, validation_batches(sck.data, None, 250, env.device), env, amp=False)
    meta = json.loads((reference.run_dir / "best_arch.json").read_text())["meta"]
    hist = [h for h in reference.history() if "val_acc_full" in h]
    archs = list({json.dumps(h["arch"], sort_keys=True): ArchSpec.from_dict(h["arch"]) for h in hist}.values())
    assert full.images == VAL
    assert {a.short(): s for a, s in zip(archs, full(archs))} == {h_short(h): h["val_acc_full"] for h in hist}
    assert meta["finalists"][0]["arch"] == ArchSpec.load(reference.run_dir / "best_arch.json").short()


def h_short(h: dict) -> str:
    return ArchSpec.from_dict(h["arch"]).short()


def test_without_finalists_the_best_is_the_fitness_subsets(ckpt: Path, tmp_path: Path, capsys):
    """finalists=0: no re-scoring, the winner is the top of the history by the fitness score."""
    run = run_search(ckpt, tmp_path, capsys, f"flops_max={FLOPS_MAX}", "finalists=0")
    meta = json.loads((run.run_dir / "best_arch.json").read_text())["meta"]
    hist = run.history()
    top = max(hist, key=lambda h: (h["val_acc"], -h["flops_macs"]))
    assert meta["val_acc"] == top["val_acc"] and meta["val_images"] == IMAGES and "finalists" not in meta
    assert not any("val_acc_full" in h for h in hist) and "finalists re-scored" not in run.out


def test_defaults_are_spos_on_1000_images_and_the_run_dir_is_next_to_the_checkpoint(ckpt: Path, tmp_path: Path,
                                                                                    capsys):
    """The README's defaults: SPOS's evolution (population 50, top-k 10, 20 generations, 25 mutations with
    p = 0.1, 25 crossovers) on 1000 held-out images; without run_dir the search writes search/ beside the
    checkpoint."""
    from search.evolve import evolve

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evolve", overrides=[f"checkpoint={ckpt}"])
    assert {k: cfg.evolution[k] for k in ("population", "topk", "generations", "mutations", "mutation_prob",
                                          "crossovers")} == {"population": 50, "topk": 10, "generations": 20,
                                                             "mutations": 25, "mutation_prob": 0.1, "crossovers": 25}
    assert cfg.eval_images == 1000 and cfg.run_dir is None and cfg.strategy == "evolution"

    moved = tmp_path / "supernet" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evolve", overrides=[f"checkpoint={moved}", *SEARCH, "evolution.generations=1"])
    assert Path(evolve(cfg)["run_dir"]) == moved.parent / "search"
    assert (moved.parent / "search" / "best_arch.json").exists() and sorted(tmp_path.iterdir()) == [moved.parent]
    capsys.readouterr()


# ----------------------------------------------------------------------------- evaluation count, resume
def test_no_arch_evaluated_twice(reference: Run):
    archs = [json.dumps(h["arch"]) for h in reference.history()]
    assert len(reference.calls) == len(set(reference.calls)) == len(set(archs)) == len(archs)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_scores_only_the_rest(ckpt: Path, reference: Run, tmp_path: Path, capsys):
    from search.inherited import InheritedAccuracy
    from search.evolve import evolve
    from space.errors import UserError

    real, batches = InheritedAccuracy.__call__, [0]

    def crash_at_generation_2(self, archs):  # one batch per generation: die before scoring the third
        batches[0] += 1
        if batches[0] == 3:
            raise _Crash
        return real(self, archs)

    with counting() as first, pytest.MonkeyPatch.context() as mp:
        mp.setattr(InheritedAccuracy, "__call__", crash_at_generation_2)
        with pytest.raises(_Crash):
            evolve(search_cfg(ckpt, tmp_path, f"flops_max={FLOPS_MAX}"))
    capsys.readouterr()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["searches"][0]["generation"] == 2 and len(first) == 2 * POPULATION
    assert not (tmp_path / "history.jsonl").exists()
    # Scores on another validation subset would not compare with the cached ones: refused, state untouched.
    saved = (tmp_path / "state.json").read_bytes()
    with pytest.raises(UserError, match=f"scored candidates on {IMAGES} validation images, this command on 50"):
        evolve(search_cfg(ckpt, tmp_path, f"flops_max={FLOPS_MAX}", "eval_images=50"))
    assert (tmp_path / "state.json").read_bytes() == saved
    # The same number of other images (another split, preprocessing or a state from before the fitness set was
    # fixed): its digest differs, refused too.
    (tmp_path / "state.json").write_text(json.dumps({**state, "eval_digest": "0" * 64}))
    with pytest.raises(UserError, match="scored candidates on another fitness set than this command's 100"):
        evolve(search_cfg(ckpt, tmp_path, f"flops_max={FLOPS_MAX}"))
    (tmp_path / "state.json").write_bytes(saved)

    again = run_search(ckpt, tmp_path, capsys, f"flops_max={FLOPS_MAX}")
    assert f"resumed {tmp_path / 'state.json'} at generation 2/{GENERATIONS}" in again.out
    assert not set(again.calls) & set(first)  # nothing scored before the crash is scored again
    assert len(first) + len(again.calls) == len({json.dumps(h["arch"]) for h in again.history()})
    assert again.history() == reference.history()


def test_sigkill_then_rerun_equals_uninterrupted_run(ckpt: Path, reference: Run, tmp_path: Path,
                                                   forkserver: ForkServer):
    p = cli(forkserver, ckpt, tmp_path, f"flops_max={FLOPS_MAX}")
    state, at = tmp_path / "state.json", 0
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            at = json.loads(state.read_text())["searches"][0]["generation"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if at >= 1:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    at = json.loads(state.read_text())["searches"][0]["generation"]
    assert 1 <= at < GENERATIONS and not (tmp_path / "history.jsonl").exists()

    rerun = cli(forkserver, ckpt, tmp_path, f"flops_max={FLOPS_MAX}")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resumed {state} at generation {at}/{GENERATIONS}" in out
    assert Run(tmp_path, [], out).history() == reference.history()
    ours, ref = (json.loads((d / "best_arch.json").read_text()) for d in (tmp_path, reference.run_dir))
    ours.pop("meta"), ref.pop("meta")
    assert ours == ref


# ----------------------------------------------------------------------------- 2 gloo ranks
def _ddp_worker(rank: int, world: int, port: int, ckpt: str, run_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from search.evolve import evolve
    from supernet.engine.distributed import cleanup_distributed

    with counting() as calls:
        summary = evolve(search_cfg(Path(ckpt), Path(run_dir), f"flops_max={FLOPS_MAX}"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"calls": calls, "evaluations": summary["evaluations"],
                                                             "scored": summary["scored"]}))
    cleanup_distributed()


def test_two_gloo_ranks_score_exactly_like_one_process(ckpt: Path, reference: Run, tmp_path: Path,
                                                      fork_ranks: Callable[..., None],
                                                      free_port: Callable[[], int]):
    fork_ranks(_ddp_worker, (2, free_port(), str(ckpt), str(tmp_path / "run"), str(tmp_path)))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert Run(tmp_path / "run", [], "").history() == reference.history()
    # Each candidate scored once, on one rank, and the ranks shared the work by MACs: in each generation's batch
    # the ranks' loads differ by at most its largest candidate
    assert sorted(r0["calls"] + r1["calls"]) == sorted(reference.calls)
    load = [sum(macs(ArchSpec.from_json(a)) for a in r["calls"]) for r in (r0, r1)]
    assert r0["calls"] and r1["calls"]
    assert abs(load[0] - load[1]) <= GENERATIONS * max(macs(ArchSpec.from_json(a)) for a in reference.calls)
    assert r0["evaluations"] == r1["evaluations"] == len(reference.calls)
    assert (r0["scored"], r1["scored"]) == (len(r0["calls"]), len(r1["calls"]))  # each rank counts its own share


@pytest.mark.slow
def test_make_search_on_two_ranks_scores_like_one_process(ckpt: Path, reference: Run, tmp_path: Path, make_recipe,
                                                          forkserver: ForkServer):
    """`make search NPROC=2` launches 2 workers through supernet.engine.launch: the one-process history."""
    args = [f"checkpoint={ckpt}", f"run_dir={tmp_path / 'run'}", *SEARCH, f"flops_max={FLOPS_MAX}"]
    cmd = make_recipe("search", NPROC="2", ARGS=" ".join(args))
    assert cmd[1:7] == ["-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2", "-m", "search.evolve"]
    r = forkserver.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Run(tmp_path / "run", [], "").history() == reference.history()


# ----------------------------------------------------------------------------- strategies and budgets
def test_random_search_same_budget(ckpt: Path, reference: Run, tmp_path: Path, capsys):
    run = run_search(ckpt, tmp_path, capsys, f"flops_max={FLOPS_MAX}", "strategy=random")
    hist = run.history()
    assert len(hist) == len(reference.history())
    assert [h["generation"] for h in hist] == [h["generation"] for h in reference.history()]
    assert all(h["flops_macs"] <= FLOPS_MAX for h in hist)
    assert len(run.calls) == len(set(run.calls)) == len(hist)
    assert arch_cost(ArchSpec.load(tmp_path / "best_arch.json")).macs <= FLOPS_MAX
    assert "search: random" in run.out


def test_two_flops_bands_share_one_cache(ckpt: Path, tmp_path: Path, capsys):
    bands = [(2_000_000, 5_000_000), (4_000_000, 9_000_000)]  # overlapping: either search may propose the other's
    run = run_search(ckpt, tmp_path, capsys, f"flops_budgets={[list(b) for b in bands]}".replace(" ", ""),
                     "evolution.generations=3")
    hist = run.history()
    proposals = len(hist)
    assert proposals == 2 * 3 * POPULATION and {h["budget"] for h in hist} == {0, 1}
    assert not (tmp_path / "best_arch.json").exists()
    for i, (lo, hi) in enumerate(bands):
        assert all(lo <= h["flops_macs"] <= hi for h in hist if h["budget"] == i)
        arch = ArchSpec.load(tmp_path / f"best_arch_{i}.json")
        assert lo <= arch_cost(arch).macs <= hi
        meta = json.loads((tmp_path / f"best_arch_{i}.json").read_text())["meta"]
        inside = sorted({json.dumps(h["arch"]): h["val_acc"] for h in hist if lo <= h["flops_macs"] <= hi}.values(),
                        reverse=True)  # the band's fitness scores, one per architecture
        fin = meta["finalists"]
        assert sorted((f["fitness_acc"] for f in fin), reverse=True) == inside[:FINALISTS]
        assert all(lo <= f["flops_macs"] <= hi for f in fin) and meta["val_acc"] == fin[0]["val_acc"] == max(
            f["val_acc"] for f in fin)
    distinct = {json.dumps(h["arch"]) for h in hist}
    assert len(run.calls) == len(set(run.calls)) == len(distinct) <= proposals


def test_search_under_a_latency_bound(ckpt: Path, tmp_path: Path, capsys, monkeypatch):
    """A table measured here (1 thread, batch 1, 3 rounds of 3 repeats), a bound at 30% of its predicted range:
    every candidate's predicted latency is within it, history and best_arch.json carry the prediction, and the winner
    is measured on this CPU as the table's networks were timed. How close that measurement comes to the bound is a
    figure of the machine's load, not a test: on a busy 2-core VM it missed a 2x allowance (13.7 ms measured against
    a 2.57 ms bound while the table's own error was 83%); docs/deployment.md reports the model's measured error."""
    import supernet.timing
    from space.latency import LatencyTable
    from supernet.timing import Timing, measure_table

    measured = []  # how the winner was timed: as the table's networks were
    real = supernet.timing.measure_arch

    def measure_arch(arch, timing, rounds=1):
        measured.append((timing.warmup, timing.repeats, rounds, timing.batch))
        return real(arch, timing, rounds)

    monkeypatch.setattr(supernet.timing, "measure_arch", measure_arch)
    space = _space(ckpt)
    table, _ = measure_table(space, Timing(torch.device("cpu"), 1, 1, 3, False), threads=1, calibrate=4, archs=4,
                             seed=0, rounds=3, progress=False)
    table.save(tmp_path / "lat.json")
    lo, hi = table.predicted_range(space)
    bound = lo + 0.3 * (hi - lo)
    run = run_search(ckpt, tmp_path / "run", capsys, f"latency_table={tmp_path / 'lat.json'}",
                     f"latency_max={bound}", "evolution.generations=2")
    hist = run.history()
    assert hist and all(h["latency_ms"] <= bound for h in hist)
    assert all(h["latency_ms"] == table.predict(ArchSpec.from_dict(h["arch"])) for h in hist)
    best = tmp_path / "run" / "best_arch.json"
    meta = json.loads(best.read_text())["meta"]
    assert meta["latency_ms_predicted"] == table.predict(ArchSpec.load(best)) <= bound
    assert 0 < meta["latency_ms_measured"] < float("inf")
    assert meta["latency_table"]["threads"] == 1
    assert table.timing == {"warmup": 1, "repeats": 3, "rounds": 3} and measured == [(1, 3, 3, 1)]
    assert f"latency <= {bound:g} ms" in run.out and "ms measured" in run.out
    assert LatencyTable.load(tmp_path / "lat.json") == table


# ----------------------------------------------------------------------------- bad input
def _snapshot(d: Path) -> dict[str, bytes] | None:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else None


def test_bad_input_is_one_line_exit_2_and_writes_nothing(ckpt: Path, reference: Run, tmp_path: Path, capsys,
                                                         forkserver: ForkServer):
    from search.evolve import evolve
    from space.app import run_app

    from space.app import config_hash
    from space.latency import LatencyTable, space_blocks
    from space.space import SearchSpace
    from supernet.timing import device_name

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    lo, hi = _space(ckpt).macs_range()
    tables = {}
    for name in ("fmnist_1d", "fmnist_2d"):  # synthetic times: these cases stop before any timing matters
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            space = SearchSpace.from_config(compose("supernet", overrides=[f"space={name}"]).space)
        tables[name] = tmp_path / f"lat_{name}.json"
        here = device_name(torch.device("cpu"))  # this machine's: the machine check passes
        LatencyTable(name, config_hash(space.to_config()), "cpu", here, torch.__version__, 1, 1, "float32", 0.0,
                     dict.fromkeys(space_blocks(space), 1.0)).save(tables[name])
    elsewhere = json.loads(tables["fmnist_2d"].read_text()) | {"device_name": "x86_64"}  # as tables were written
    (tmp_path / "lat_x86_64.json").write_text(json.dumps(elsewhere))
    cases = {  # name: (checkpoint, overrides, expected text in the message)
        "missing": (tmp_path / "nope.ckpt", [], "does not exist"),
        "corrupt": (corrupt, [], "is not a readable checkpoint"),
        "other_space": (ckpt, ["space=fmnist_1d"], "differs from the checkpoint's space 'fmnist_2d'"),
        "empty_band": (ckpt, ["flops_min=5e6", "flops_max=4e6"], "flops_min 5000000 > flops_max 4000000"),
        "out_of_range": (ckpt, [f"flops_max={lo - 1}"], f"exact range [{lo}, {hi}] MACs"),
        "strategy": (ckpt, ["strategy=annealing"], "strategy: 'annealing' is not allowed (allowed: evolution, random)"),
        "eval_images": (ckpt, ["eval_images=1001"], "eval_images: 1001 but the validation split holds 1000 images"),
        "latency_no_table": (ckpt, ["latency_max=5"], "latency_max: needs latency_table=FILE"),
        "latency_other_space": (ckpt, [f"latency_table={tables['fmnist_1d']}", "latency_max=20"],
                                "the table was measured for space 'fmnist_1d'"),
        "latency_too_low": (ckpt, [f"latency_table={tables['fmnist_2d']}", "latency_max=1"],
                            "latency <= 1 ms is below the predicted range of space 'fmnist_2d', [4.000, 22.000] ms"),
        "latency_no_machine": (ckpt, [f"latency_table={tmp_path / 'lat_x86_64.json'}", "latency_max=20"],
                               "the table does not identify its machine (device_name 'x86_64'"),
        "latency_threads": (ckpt, [f"latency_table={tables['fmnist_2d']}", "latency_max=20", "latency_threads=4"],
                            "latency_table: measured with threads=1, not threads=4"),
    }
    # Half of the runs point at a fresh run_dir (must stay absent), half at a finished search (must stay intact).
    dirs = {}
    for k, name in enumerate(cases):
        dirs[name] = tmp_path / f"run_{name}"
        if k % 2:
            shutil.copytree(reference.run_dir, dirs[name])
    before = {name: _snapshot(d) for name, d in dirs.items()}
    ckpt_dir = _snapshot(ckpt.parent)

    def check(name: str, code: object, err: str) -> None:
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (name, err)
        assert cases[name][2] in lines[0], (name, lines[0])
        assert _snapshot(dirs[name]) == before[name], name

    # Two through the real CLI (its startup dominates, so they run in the background) ...
    procs = {name: cli(forkserver, cases[name][0], dirs[name] / "cli", *cases[name][1])
             for name in ("corrupt", "out_of_range")}
    # ... and every case through the app body `main` runs.
    for name, (c, overrides, _) in cases.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run_app(lambda: evolve(search_cfg(c, dirs[name], *overrides)))
        check(name, exit_.value.code, capsys.readouterr().err)
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        check(name, p.returncode, err)
    assert _snapshot(ckpt.parent) == ckpt_dir
