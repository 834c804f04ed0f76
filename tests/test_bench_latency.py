"""`make bench`'s latency section (bench/latency_speed.py): rows for the smallest, random and largest
architectures of a space, each with its MACs, the latency model's prediction from a table measured in the same run,
and PyTorch eager next to onnxruntime on the exported file. (The figures are the machine's; this checks the rows.)"""

from __future__ import annotations

import pytest

from bench import latency_speed


@pytest.mark.slow
def test_latency_rows_hold_prediction_eager_and_onnxruntime_per_architecture():
    rows = latency_speed.latency_rows("fmnist_2d", n_random=1, repeats=1, rounds=1)
    assert len(rows) == 3  # smallest, one random, largest
    assert rows[0]["macs"] <= rows[1]["macs"] <= rows[2]["macs"] and rows[0]["macs"] < rows[2]["macs"]
    for r in rows:
        assert set(r) == {"arch", "macs", "predicted_ms", "eager_ms", "onnxruntime_ms"}
        assert r["eager_ms"] > 0 and r["onnxruntime_ms"] > 0
        assert isinstance(r["predicted_ms"], float)
