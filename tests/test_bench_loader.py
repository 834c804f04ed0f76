"""`make bench`'s loader section (bench/loader_speed.py) on a tiny folder: its figures are positive and consistent
(workers needed = ceil(model rate / per-worker rate); the prepared store's cores = ceil(rate / per-core rate)), and
its generated JPEGs have ImageNet's size."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench import loader_speed


def test_workers_needed_rounds_up():
    assert loader_speed.workers_needed(7000, 46.4) == 151
    assert loader_speed.workers_needed(10.0, 10.0) == 1
    assert loader_speed.workers_needed(10.001, 10.0) == 2
    assert loader_speed.workers_needed(0.5, 40.0) == 1


def test_generated_photo_is_an_imagenet_sized_jpeg():
    from PIL import Image
    import io

    data = loader_speed._picture(np.random.default_rng(0), *loader_speed.PHOTO)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("JPEG", (500, 375))
    assert 80_000 <= len(data) <= 160_000  # ImageNet's training JPEGs average ~110 KB


def test_section_measures_positive_consistent_figures(tmp_path: Path, capsys: pytest.CaptureFixture):
    mean_bytes = loader_speed.write_image_folder(tmp_path, 4, classes=2, size=(40, 30), distinct=2)
    assert mean_bytes > 0 and len(list((tmp_path / "train").glob("*/*.jpg"))) == 4
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["class0", "class1"]
    f = loader_speed.measure(tmp_path, "cifar_2d", batch_size=2, batches=1, steps=1, reps=1)
    assert (f.preset, f.batch_size) == ("cifar_2d", 2)
    assert f.per_worker > 0 and f.model > 0 and f.device_ms > 0
    assert abs(f.path_macs / f.space_macs - 1) <= 0.1  # the timed path is a typical one
    assert f.workers_for_model == math.ceil(f.model / f.per_worker) >= 1

    loader_speed.report(f, 7000)
    out = capsys.readouterr().out
    rates = re.findall(r"ceil\(([\d.]+) / ([\d.]+)\) = (\d+)", out)
    assert len(rates) == 2 and rates[1][0] == "7000"
    for rate, per_worker, workers in rates:
        assert int(workers) == math.ceil(float(rate) / float(per_worker))
    assert float(rates[0][1]) == pytest.approx(f.per_worker, abs=0.05)
    assert "ESTIMATE, not a measurement" in out


def test_prepared_store_figures_are_positive_and_consistent(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = tmp_path / "folder"
    loader_speed.write_image_folder(folder, 4, classes=2, size=(40, 30), distinct=2)
    p = loader_speed.measure_prepared(folder, tmp_path / "store", 16, batch_size=2, batches=2, reps=1)
    # 4 training + 2 val JPEGs of 40x30, stored whole with the short side at floor(16 / 0.7) = 22
    assert (p.batch_size, p.max_h, p.max_w, p.images) == (2, 22, 29, 6)
    assert p.prepare > 0 and p.read > 0 and p.draws_ms > 0 and p.device_ms > 0
    assert p.per_core == pytest.approx(1 / (1 / p.read + p.draws_ms / 1e3 / 2)) and p.per_core < p.read
    loader_speed.report_prepared(p, 100.0, 7000)
    out = capsys.readouterr().out
    (rate, per_core, cores), = re.findall(r"ceil\((\d+) / (\d+)\) = (\d+) with the store", out)
    pc = float(per_core)  # printed rounded to an integer
    assert math.ceil(7000 / (pc + 0.5)) <= int(cores) <= math.ceil(7000 / max(pc - 0.5, 1e-9)) and rate == "7000"
    assert "against 70 decoding the folder" in out and "per decoding process" in out
