"""The latency model (space/latency.py, supernet/latency.py): a space's block set is exactly the blocks its
architectures run; the blocks the app times are the network's own modules (loaded with a PSViT's weights, run in
order, they give its logits exactly); prediction = overhead + sum of blocks; a table of another space, device,
thread count or batch is refused; the app writes a table that predicts every architecture of its space, and bad
input is one line, exit 2, nothing written. (How accurate a table is depends on the machine: the app reports its
MAPE; README: latency model.)"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from space.app import config_hash
from space.arch import ArchSpec
from space.cost import params
from space.latency import FORMAT, LatencyError, LatencyTable, block_keys, space_blocks
from space.space import SearchSpace
from supernet.timing import block_module, device_name, machine
from supernet.model.psvit import PSViT


REPO = Path(__file__).resolve().parents[1]


def tiny_space(pooling: str) -> SearchSpace:
    """Small enough to enumerate every architecture (2 cells per stage), with several tokens and dims."""
    tokens = [[49], [49, 16], [16, 4]] if pooling == "2d" else [[49], [49, 20], [20, 8]]
    dims = [[16, 24], [24, 32], [32, 48]]
    return SearchSpace.from_config({
        "name": f"tiny_{pooling}", "pooling": pooling, "img_size": 28, "patch_size": 4, "in_chans": 1,
        "num_classes": 10, "mlp_ratio": 2.0, "head_dim": 8, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": t, "dims": d} for t, d in zip(tokens, dims)]})


def table_for(space: SearchSpace, times: dict[str, float] | None = None, **kw) -> LatencyTable:
    blocks = times if times is not None else {k: float(i + 1) for i, k in enumerate(space_blocks(space))}
    base = dict(space=space.name, space_hash=config_hash(space.to_config()), device="cpu", device_name="test",
                torch=torch.__version__, threads=2, batch=1, dtype="float32", overhead_ms=0.5, blocks=blocks)
    return LatencyTable(**{**base, **kw})


@pytest.mark.parametrize("pooling", ["1d", "2d"])
def test_a_spaces_blocks_are_exactly_what_its_architectures_run(pooling: str) -> None:
    space = tiny_space(pooling)
    seen: set[str] = set()
    for arch in space.all_archs():
        seen.update(block_keys(arch))
    assert seen == set(space_blocks(space))


def psvit_parts(model: PSViT, arch: ArchSpec) -> list[dict[str, torch.Tensor]]:
    """The PSViT's weights of each block, in ``block_keys(arch)`` order, named as the block modules name them."""
    sd = model.state_dict()
    parts = [{k: v for k, v in sd.items() if k.split(".")[0] in ("patch_embed", "cls_token", "pos_embed")}]
    for i, s in enumerate(arch.stages):
        if i > 0:
            parts.append(model.stages[i].pool.state_dict())
        parts += [model.stages[i].cells[j].state_dict() for j, op in enumerate(s.cells) if op != "identity"]
    parts.append({k: v for k, v in sd.items() if k.split(".")[0] in ("norm", "head")})
    return parts


@pytest.mark.parametrize("pooling", ["1d", "2d"])
def test_the_timed_blocks_are_the_networks_own_modules(pooling: str) -> None:
    """Every block module, given the PSViT's weights of that part and run in forward order, reproduces the
    PSViT's logits exactly, and their parameters add up to the cost model's count: the table times the very
    computation of the network, nothing more or less."""
    space = tiny_space(pooling)
    rng = random.Random(0)
    for _ in range(4):
        arch = space.sample(rng)
        torch.manual_seed(0)
        model = PSViT(arch).eval()
        x = h = torch.randn(2, 1, 28, 28)
        total = 0
        for key, weights in zip(block_keys(arch), psvit_parts(model, arch), strict=True):
            module, shape = block_module(space, key)
            module.load_state_dict(weights)
            assert tuple(h.shape[1:]) == shape[1:], key
            h = module.eval()(h)
            total += sum(p.numel() for p in module.parameters())
        assert torch.equal(h, model(x)), arch.short()
        assert total == params(arch)


def test_prediction_is_the_overhead_plus_the_blocks_of_the_forward() -> None:
    space = tiny_space("2d")
    times = {k: 2.0 ** i for i, k in enumerate(space_blocks(space))}  # every sum of distinct blocks is unique
    table = table_for(space, times, overhead_ms=0.25)
    arch = space.sample(random.Random(3))
    assert table.predict(arch) == 0.25 + sum(times[k] for k in block_keys(arch))
    scaled = table_for(space, times, overhead_ms=0.25, scale=0.75)  # powers of 2: exact in floating point
    assert scaled.predict(arch) == 0.25 + 0.75 * sum(times[k] for k in block_keys(arch))
    # one block per shared pair and per basic cell, none per identity cell; embed, the two pools and the head
    s0 = arch.stages[0]
    arch = dataclasses.replace(arch, stages=(dataclasses.replace(s0, cells=("shared", "identity")), *arch.stages[1:]))
    keys = block_keys(arch)
    assert keys[:2] == [f"embed:{s0.dim}", f"shared:{s0.tokens}x{s0.dim}"] and keys[2].startswith("pool:")
    n_cells = sum(op != "identity" for s in arch.stages for op in s.cells)
    assert len(keys) == 1 + 2 + n_cells + 1 and keys[-1].startswith("head:")
    assert table.predict(arch) == 0.25 + sum(times[k] for k in keys)


def test_a_table_of_another_space_device_or_setting_is_refused() -> None:
    space, other = tiny_space("2d"), tiny_space("1d")
    table = table_for(space)
    table.check_space(space)
    with pytest.raises(LatencyError, match="measured for space 'tiny_2d'.*supernet.latency space=tiny_1d"):
        table.check_space(other)
    table.check_device("cpu", 2, 1)
    for kw, msg in (({"device": "cuda"}, "device=cpu, not device=cuda"), ({"threads": 4}, "threads=2, not threads=4"),
                    ({"batch": 256}, "batch=1, not batch=256")):
        args = {"device": "cpu", "threads": 2, "batch": 1, **kw}
        with pytest.raises(LatencyError, match=msg):
            table.check_device(args["device"], args["threads"], args["batch"])
    with pytest.raises(LatencyError, match=r"arch: block 'pool:49x24>20x24' is not in the latency table of space"):
        table.predict(other.sample(random.Random(0)))


def test_a_table_survives_json_and_bad_files_are_one_line(tmp_path: Path) -> None:
    space = tiny_space("1d")
    table = table_for(space)
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    (tmp_path / "old.json").write_text(json.dumps({**table.to_dict(), "format": "psvit-latency/0"}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "field.json").write_text(json.dumps({**table.to_dict(), "colour": 1}))
    (tmp_path / "scale.json").write_text(json.dumps({**table.to_dict(), "scale": 0}))
    (tmp_path / "timing.json").write_text(json.dumps({**table.to_dict(), "timing": {"warmup": 1, "repeats": "3"}}))
    before = {k: v for k, v in table.to_dict().items() if k != "timing"}  # a table from before timing was kept
    (tmp_path / "before.json").write_text(json.dumps(before))
    assert LatencyTable.load(tmp_path / "before.json").timing is None
    for name, msg in (("missing.json", "does not exist"), ("junk.json", "is not a latency table"),
                      ("old.json", f"format 'psvit-latency/0', not '{FORMAT}'"), ("field.json", "is malformed"),
                      ("scale.json", "malformed time"), ("timing.json", "malformed timing")):
        with pytest.raises(LatencyError, match=msg) as e:
            LatencyTable.load(tmp_path / name)
        assert "\n" not in str(e.value)


def test_the_app_writes_a_table_that_predicts_its_space(tmp_path: Path, run_module) -> None:
    out = tmp_path / "lat.json"
    r = run_module("supernet.latency", "space=fmnist_1d", f"out={out}", "threads=1", "warmup=0", "repeats=1",
                   "rounds=2", "calibrate=1", "archs=3", "progress=false")
    assert r.returncode == 0, r.stderr
    table = LatencyTable.load(out)
    space = SearchSpace.from_config(json.loads(json.dumps(_space_cfg("fmnist_1d"))))
    table.check_space(space)
    assert set(table.blocks) == set(space_blocks(space)) and all(v > 0 for v in table.blocks.values())
    assert (table.device, table.threads, table.batch, table.dtype) == ("cpu", 1, 1, "float32")
    assert table.timing == {"warmup": 0, "repeats": 1, "rounds": 2}
    assert table.accuracy is not None and table.accuracy.archs == 3
    assert "MAPE" in r.stdout and r.stdout.count(" measured ") == 3 + 2  # 3 random networks, then both ends
    assert "the smallest network (" in r.stdout and "the largest network (" in r.stdout
    assert table.accuracy.smallest["arch"] == space.extreme("min", "macs").short()
    assert table.accuracy.largest["arch"] == space.extreme("max", "macs").short()
    assert table.device_name == device_name(torch.device("cpu")) and table.cores >= 1
    arch = space.sample(random.Random(7))  # times of 1 repeat are noise; the arithmetic is what is checked
    assert table.predict(arch) == pytest.approx(table.overhead_ms
                                                + table.scale * sum(table.blocks[k] for k in block_keys(arch)))


def _space_cfg(name: str) -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "space" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("args,fragment", [
    ((), "out: required"),
    (("out={tmp}",), "is a directory"),
    (("out={tmp}/t.json", "device=cuda"), "no CUDA device"),
    (("out={tmp}/t.json", "threads=0"), "threads"),
    (("out={tmp}/t.json", "rounds=0"), "rounds: 0 is not allowed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, run_module, args, fragment) -> None:
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    before = sorted(tmp_path.rglob("*"))
    r = run_module("supernet.latency", *(a.replace("{tmp}", str(tmp_path)) for a in args), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("pooling", ["1d", "2d"])
def test_the_predicted_range_is_exact(pooling: str) -> None:
    """Brute force over every architecture of a small space: the range check_feasible refuses against."""
    space = tiny_space(pooling)
    rng = random.Random(1)
    table = table_for(space, {k: rng.uniform(0.1, 5.0) for k in space_blocks(space)}, overhead_ms=0.3, scale=0.9)
    predictions = [table.predict(a) for a in space.all_archs()]
    lo, hi = table.predicted_range(space)
    assert lo == pytest.approx(min(predictions), rel=1e-12) and hi == pytest.approx(max(predictions), rel=1e-12)


def test_a_latency_bound_in_a_constraint() -> None:
    from search.constraint import Constraint, InfeasibleError, check_feasible

    space = tiny_space("2d")
    table = table_for(space)
    lo, hi = table.predicted_range(space)
    bound = (lo + hi) / 2
    c = Constraint(latency_max=bound, latency=table)
    arch = check_feasible(space, c, random.Random(0))
    assert table.predict(arch) <= bound and c(arch)
    archs = list(space.all_archs())[::37]
    assert [c(a) for a in archs] == [table.predict(a) <= bound for a in archs]
    assert "latency <= " in c.describe() and "batch 1" in c.describe()
    with pytest.raises(ValueError, match="pass the architecture's predicted latency"):
        c.admits(1, 1)
    with pytest.raises(ValueError, match="latency_max: needs latency_table=FILE"):
        Constraint(latency_max=3.0)
    with pytest.raises(InfeasibleError, match=f"below the predicted range of space 'tiny_2d', \\[{lo:.3f}"):
        check_feasible(space, Constraint(latency_max=lo - 0.01, latency=table), random.Random(0))
    # a search state without a latency bound keeps the identity of older versions (it still resumes)
    assert Constraint(flops_max=5).identity() == {"flops_min": None, "flops_max": 5, "params_max": None}
    assert c.identity()["latency_table"]["blocks"] == table.blocks


def test_the_calibration_is_the_least_squares_line_never_below_zero() -> None:
    from supernet.timing import calibration

    sums = [1.0, 2.0, 4.0, 8.0]
    fit = calibration(sums, [0.5 + 0.8 * x for x in sums])
    assert fit["overhead_ms"] == pytest.approx(0.5) and fit["scale"] == pytest.approx(0.8)
    # a line that would start below 0 (two noisy networks): through the origin instead, least squares
    # a line below 0 at the space's smallest sum (1 here): through the origin, scale = sum(s/m) / sum((s/m)^2), the
    # least squares on the relative error
    assert calibration([4.0, 5.0], [2.0, 6.0], smallest=1.0) == {
        "overhead_ms": 0.0, "scale": pytest.approx((2 + 5 / 6) / (4 + 25 / 36))}
    # a line that starts below 0 but predicts every network of the space a positive time is kept
    fit = calibration([4.0, 5.0], [2.0, 6.0], smallest=3.9)
    assert fit == {"overhead_ms": pytest.approx(-14.0), "scale": pytest.approx(4.0)}
    assert calibration([2.0], [2.5]) == {"overhead_ms": 0.0, "scale": pytest.approx(1.25)}  # one network: a scale
    assert calibration([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == {"overhead_ms": 0.0,
                                                             "scale": pytest.approx((1 / 3 + 1 + 3) / (1 / 9 + 1 + 9))}
    assert calibration([], []) == {"overhead_ms": 0.0, "scale": 1.0}
    # relative, not absolute: a 1 ms network's miss weighs what a 100 ms one's does (absolute least squares puts
    # this line's intercept at 2.0, twice the small network's time)
    fit = calibration([1.0, 50.0, 100.0], [1.0, 56.0, 100.0])
    assert abs(fit["overhead_ms"] + fit["scale"] - 1.0) < 0.05 and fit["overhead_ms"] < 0.1


def test_interleaved_rounds_keep_the_items_ratios_through_drift_and_report_it() -> None:
    """Items are timed round by round, in a new order each round; a machine at half speed for two of five rounds
    slows every item in them, and the per-item medians keep the true figures; the drift is the slow/fast ratio."""
    from supernet.timing import Timing, time_rounds

    calls: list[float] = []
    speeds = [1.0, 2.0, 1.0, 1.0, 2.0]  # the machine's slowdown in each round

    class Clock(Timing):  # a deterministic machine: an item's cost times the round's slowdown
        def __call__(self, fn, x):
            calls.append(x)
            return x * speeds[(len(calls) - 1) // 3]

    items = {"a": (None, 1.0), "b": (None, 3.0), "c": (None, 10.0)}
    r = time_rounds(items, Clock(torch.device("cpu"), 1, 0, 1, False), rounds=5, seed=3)
    assert r.ms == {"a": 1.0, "b": 3.0, "c": 10.0} and r.drift == 2.0
    assert len(calls) == 15 and len({tuple(calls[i:i + 3]) for i in range(0, 15, 3)}) > 1  # reshuffled


# ----------------------------------------------------------------------------- the machine, the ends
def test_a_table_names_its_machine_and_another_machines_or_an_unnamed_one_is_refused() -> None:
    """A CPU table recorded platform.machine(), 'x86_64', so any x86 machine matched it; it records the CPU model
    now, and the search refuses a table of another machine or one that names none, unless told otherwise."""
    here = machine(torch.device("cpu"))
    assert here["device_name"] not in ("", "x86_64", "aarch64") and here["torch"] == torch.__version__
    space = tiny_space("2d")
    table_for(space, device_name=here["device_name"]).check_machine(here)
    for kw, msg in (({"device_name": "x86_64"}, "the table does not identify its machine \\(device_name 'x86_64'"),
                    ({"device_name": "Other CPU 9000"}, "measured on another machine \\(device_name 'Other CPU 9000'; "
                                                        f"this one: device_name '{here['device_name']}'\\)"),
                    ({"device_name": here["device_name"], "torch": "1.0"}, "measured on another machine \\(torch "),
                    ({"device_name": here["device_name"], "device": "cuda"}, "\\(device 'cuda'; this one: device")):
        table = table_for(space, **kw)
        with pytest.raises(LatencyError, match=msg + ".*latency_other_machine=true") as e:
            table.check_machine(here)
        assert "\n" not in str(e.value)
        table.check_machine(here, allow_other=True)


def test_a_table_missing_a_block_is_one_line_not_a_key_error() -> None:
    from search.constraint import Constraint, check_feasible

    space = tiny_space("2d")
    blocks = {k: 1.0 for k in space_blocks(space)}
    del blocks["shared:16x32"]
    table = table_for(space, blocks)
    with pytest.raises(LatencyError, match=r"^latency_table: the table lacks 1 of the \d+ blocks of space 'tiny_2d' "
                                           r"\(e.g. 'shared:16x32'\): a truncated or edited file; measure it again"):
        table.check_space(space)
    for call in (lambda: table.predicted_range(space),
                 lambda: check_feasible(space, Constraint(latency_max=50.0, latency=table), random.Random(0))):
        with pytest.raises(LatencyError, match="lacks block 'shared:16x32'"):  # a KeyError traceback before
            call()


def _fake_ms(arch: ArchSpec) -> float:
    """What the fake machine below takes for a whole network."""
    keys = block_keys(arch)
    cells = sum(k.split(":")[0] in ("basic", "shared") for k in keys)
    return 0.02 + 0.05 * len(keys) + 1e-4 * params(arch) + 0.3 * cells


class _Machine:
    """A deterministic machine on which a cell costs 0.3 ms more inside a network than timed alone (cold caches,
    threads waking), and every call 0.05 ms: the effect that made the line fitted to random networks (whose cell
    counts cluster mid-range) start at 2.3 ms, 49% of its prediction for the all-identity network, predicted twice
    its time. A block's time is its parameters' (the blocks of a network add up to its parameters exactly)."""

    def __call__(self, fn, x) -> float:
        if isinstance(fn, PSViT):
            return _fake_ms(fn.arch)
        return 0.05 + 1e-4 * sum(p.numel() for p in fn.parameters())


def test_a_tight_latency_bound_the_old_fit_refused_admits_networks_that_meet_it(monkeypatch) -> None:
    """fmnist_2d on the fake machine: calibrated over the whole range on the relative error, the table predicts the
    smallest and largest networks within 5% (it is judged there, not only on random networks), and a bound 25%
    above the smallest network's time, which the old table (random calibration networks, absolute least squares)
    refused as below the space's predicted range (the old table: overhead 2.2 ms, the smallest network predicted
    +101%), is searched: the architecture it admits meets it."""
    from search.constraint import Constraint, InfeasibleError, check_feasible
    from supernet.timing import Timing, measure_table

    monkeypatch.setattr(Timing, "__call__", lambda self, fn, x: _Machine()(fn, x))
    space = SearchSpace.from_config(_space_cfg("fmnist_2d"))
    table, _ = measure_table(space, Timing(torch.device("cpu"), 1, 0, 1, False), threads=1, calibrate=15, archs=30,
                             seed=0, rounds=1, progress=False)
    acc = table.accuracy
    smallest = space.extreme("min", "macs")
    assert acc.smallest["measured_ms"] == _fake_ms(smallest)
    # the figures docs/deployment.md quotes
    assert (round(acc.smallest["error_pct"], 1), round(acc.largest["error_pct"], 1), round(acc.mape, 1)) == (
        0.4, 4.1, 3.0)
    assert table.overhead_ms < 0.5 * table.predict(smallest)  # the intercept does not dominate the small end
    bound = 1.25 * _fake_ms(smallest)
    assert table.predicted_range(space)[0] <= bound
    arch = check_feasible(space, Constraint(latency_max=bound, latency=table), random.Random(0))
    assert _fake_ms(arch) <= bound
    # the old fit on the same machine: absolute least squares on the random networks the old table drew
    import statistics

    from supernet.timing import distinct_archs

    cal = distinct_archs(space, 15, random.Random("psvit-latency:0"), set())
    old = statistics.linear_regression([sum(table.blocks[k] for k in block_keys(a)) for a in cal],
                                       [_fake_ms(a) for a in cal])
    blocks_min = sum(table.blocks[k] for k in block_keys(smallest))
    old_min = old.intercept + old.slope * blocks_min
    assert round(old.intercept, 1) == 2.2 and round(100 * (old_min / _fake_ms(smallest) - 1)) == 101
    with pytest.raises(InfeasibleError, match="below the predicted range"):
        old_table = dataclasses.replace(table, overhead_ms=old.intercept, scale=old.slope)
        check_feasible(space, Constraint(latency_max=bound, latency=old_table), random.Random(0))


def test_the_committed_tables_are_the_pages():
    """docs/deployment.md's table of docs/latency/*.json is what scripts/latency_tables.py renders from the files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("latency_tables", REPO / "scripts" / "latency_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--check"])
    assert "not named ('x86_64': refused by the search)" in module.render()  # F4's tables, marked
