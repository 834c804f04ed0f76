"""`python -m space.baselines`: the DeiT-like net closest to a MACs budget is written and announced, and every bad
input is one `error:` line on stderr, exit status 2, no traceback and no file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from space.arch import ArchSpec
from space.baselines import deit_like
from space.cost import fmt_macs, fmt_params, macs, params

REPO = Path(__file__).resolve().parents[1]
FMNIST_2D = REPO / "conf" / "space" / "fmnist_2d.yaml"


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "space.baselines", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_deit_like_baseline_matches_budget() -> None:
    arch = deit_like(6e6, 28, 4, 1, 10, 2.0, 8, dims=[32, 48, 64])
    assert arch.pooling == "1d" and len(arch.stages) == 1 and set(arch.stages[0].cells) == {"basic"}
    others = [deit_like(6e6, 28, 4, 1, 10, 2.0, 8, dims=[d], depths=[k]) for d in (32, 48, 64) for k in range(4, 17)]
    assert abs(macs(arch) - 6e6) == min(abs(macs(o) - 6e6) for o in others)
    shipped = json.loads((REPO / "conf" / "baselines" / "deit_fmnist.json").read_text())
    assert shipped["stages"][0]["cells"] == ["basic"] * len(shipped["stages"][0]["cells"])


def test_writes_the_deit_like_arch_closest_to_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "deit.json"
    r = _cli(tmp_path, "--macs", "4e6", "--space", str(FMNIST_2D), "--out", str(out))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    arch = ArchSpec.load(out)
    # fmnist_2d's input, classes, MLP ratio and head_dim 8; one stage of basic layers with a CLS token
    assert (arch.pooling, arch.img_size, arch.patch_size, arch.in_chans, arch.num_classes, arch.mlp_ratio) == \
        ("1d", 28, 4, 1, 10, 2.0)
    (stage,) = arch.stages
    assert stage.tokens == 49 and set(stage.cells) == {"basic"} and stage.num_heads == stage.dim // 8
    # closest of the default widths x depths 4..16, by brute force (ties: the shallower)
    candidates = [ArchSpec.from_dict({**arch.to_dict(), "stages": [
        {"tokens": 49, "dim": d, "num_heads": d // 8, "cells": ["basic"] * k}]})
        for d in (32, 48, 64, 96) for k in range(4, 17)]
    best = min(candidates, key=lambda a: (abs(macs(a) - 4e6), len(a.stages[0].cells)))
    assert arch == best
    assert (stage.dim, len(stage.cells), macs(arch)) == (32, 7, 4_012_608)  # 49x32[BBBBBBB], 0.3 % off
    assert r.stdout == f"49x32[BBBBBBB]: {fmt_macs(macs(arch))} MACs, {fmt_params(params(arch))} params -> {out}\n"
    assert _files(tmp_path) == ["deit.json"]  # no temp file left behind


@pytest.mark.parametrize("case, args, fragment", [
    ("nan", ["--macs", "nan"], "--macs: nan (allowed: a positive number of MACs"),
    ("negative", ["--macs", "-1"], "--macs: -1.0 (allowed: a positive number of MACs"),
    ("zero", ["--macs", "0"], "--macs: 0.0 (allowed: a positive number of MACs"),
    ("out_is_dir", ["--out", "{tmp}"], "--out: {tmp} is a directory (give a file name"),
    ("missing_space", ["--space", "{tmp}/nope.yaml"], "--space: cannot read {tmp}/nope.yaml (No such file"),
    ("not_yaml", ["--space", str(REPO / "README.md")], "is not a space preset YAML"),
    ("not_a_space", ["--space", str(REPO / "conf" / "supernet.yaml")], "is not a space preset YAML"),
    ("binary_space", ["--space", "{tmp}/keep.bin"], "--space: {tmp}/keep.bin is not a space preset YAML ("),
    ("dims_not_head_multiple", ["--dims", "7"], "--dims: 7 is not a positive multiple of the space's head_dim 8"),
    ("dims_zero", ["--dims", "32,0"], "--dims: 0 is not a positive multiple of the space's head_dim 8"),
    ("dims_not_ints", ["--dims", "a,b"], "--dims: 'a,b' (allowed: comma-separated integers"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, run_module, case: str, args: list[str],
                                                         fragment: str) -> None:
    (tmp_path / "keep.txt").write_text("untouched")
    (tmp_path / "keep.bin").write_bytes(b"\xff\xfe\x00 not UTF-8")
    opts = {"--macs": "4e6", "--space": str(FMNIST_2D), "--out": str(tmp_path / "x.json")}
    for k, v in zip(args[::2], args[1::2]):
        opts[k] = v.replace("{tmp}", str(tmp_path))
    r = run_module("space.baselines", *[t for kv in opts.items() for t in kv], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _files(tmp_path) == ["keep.bin", "keep.txt"] and (tmp_path / "keep.txt").read_text() == "untouched"
