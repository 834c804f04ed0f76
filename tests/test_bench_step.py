"""bench/step_speed.py: a row times the real Trainer.train_step on both sides and reports consistent figures; the
committed record holds every row of the plan; docs/benchmarks.md's table is the rendering of that record."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from bench import step_speed
from bench.synthetic import synthetic_data
from space.cost import macs
from space.space import SearchSpace

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_page_is_the_rendering_of_the_committed_record():
    doc = json.loads(step_speed.JSON.read_text())
    from scripts.docs import blocks

    block = dict(blocks(step_speed.PAGE.read_text()))["train_step"]
    assert block.strip() == step_speed.render(doc).strip()
    assert {"command", "date", "commit", "machine", "load_average", "target", "rows"} <= set(doc)
    planned = {(preset, batch or step_speed.default_batch(preset), entangle)
               for preset, batch, _, _ in step_speed.PLAN["full"] for entangle in ("dense", "slice")}
    assert {(r["preset"], r["batch"], r["entangle"]) for r in doc["rows"]} == planned
    assert {(r["preset"], r["batch"]) for r in doc["rows"]} >= {("fmnist_2d", 1), ("fmnist_2d", 256),
                                                                ("imagenet_tiny_2d", 1), ("imagenet_tiny_2d", 128)}
    for r in doc["rows"]:  # a row over the target carries its profile, and only such a row
        assert (r["profile"] is not None) == (r["ratio"] > doc["target"]), r


def test_a_row_times_both_trainers_on_the_same_path(monkeypatch):
    """Two paths, one repetition each on fmnist_2d with synthetic batches: the row's ratio is the median of its
    paths', its MACs the paths' mean; a row over the target gets a profile of its first path, whose optimizer time
    is the real optimizer's (SliceAdamW with entangle=slice), and leaves the optimizers as they were."""
    space = SearchSpace.from_config(step_speed._compose("space=fmnist_2d").space)
    data = synthetic_data(space, 1, torch.device("cpu"), length=1000)
    monkeypatch.setattr(step_speed, "TARGET", 0.0)  # every row over it: the profile is taken
    row = step_speed.step_row("fmnist_2d", 1, "slice", data, 2, 1)  # two paths: the profile is the first one's
    assert (row.preset, row.batch, row.entangle, row.data, row.paths) == ("fmnist_2d", 1, "slice", "synthetic", 2)
    assert row.ratio_min <= row.ratio <= row.ratio_max
    trainer, _ = step_speed.trainers("fmnist_2d", 1, "slice", data)
    assert row.path_macs == pytest.approx((macs(trainer.task.sampler(0)) + macs(trainer.task.sampler(1))) / 2)
    assert type(trainer.opt).__name__ == "SliceAdamW"
    prof = row.profile
    assert set(prof) == {"super", "extracted"} and all(v["optimizer_ms"] > 0 for v in prof.values())
    assert all(v["rest_ms"] > v["optimizer_ms"] / 10 and v["zero_grad_ms"] >= 0 for v in prof.values())
    steps: list[str] = []
    real = trainer.opt.step  # the lr scheduler's wrapper of step, which phases must put back: here wrapped again
    trainer.opt.step = functools.wraps(real)(lambda: (steps.append("lr scheduler's wrapper"), real())[1])
    step_speed.phases({"super": lambda: trainer.train_step(*data.train.batches[0])}, {"super": trainer}, reps=1)
    assert steps == ["lr scheduler's wrapper"]  # the step called through the timing wrapper
    trainer.opt.step()
    assert steps == ["lr scheduler's wrapper"] * 2 and "zero_grad" not in vars(trainer.opt)  # put back as it was
    text = step_speed.render({"date": "d", "commit": "c", "machine": "m", "command": "x", "load_average": [1, 2],
                              "target": 0.0, "rows": [row.__dict__]})
    assert "| fmnist_2d | 1 | synthetic | slice | 2 |" in text and "optimizer step: supernet / extracted" in text
