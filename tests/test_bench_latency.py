"""`make bench`'s latency section (bench/latency_speed.py): rows for the smallest, random and largest
architectures of a space, each with its MACs, the latency model's prediction from a table measured in the same run,
and PyTorch eager next to onnxruntime on the exported file. (The figures are the machine's; this checks the rows, on
a space small enough that exporting its largest network takes seconds.)"""

from __future__ import annotations

from bench import latency_speed
from space.space import SearchSpace


def test_latency_rows_hold_prediction_eager_and_onnxruntime_per_architecture():
    space = SearchSpace.from_config({
        "name": "tiny_2d", "pooling": "2d", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3,
        "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [8]}, {"cells": 2, "tokens": [16, 4], "dims": [8, 12]}]})
    rows = latency_speed.latency_rows(space, n_random=1, repeats=1, rounds=1)
    assert len(rows) == 3  # smallest, one random, largest
    assert rows[0]["macs"] <= rows[1]["macs"] <= rows[2]["macs"] and rows[0]["macs"] < rows[2]["macs"]
    for r in rows:
        assert set(r) == {"arch", "macs", "predicted_ms", "measured_ms", "eager_ms", "onnxruntime_ms"}
        assert r["measured_ms"] > 0 and r["eager_ms"] > 0 and r["onnxruntime_ms"] > 0
        assert isinstance(r["predicted_ms"], float)
