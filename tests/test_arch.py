"""ArchSpec: canonical JSON round trips, one-line field-named errors, atomic save, and the info CLI on bad files."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from space.arch import FORMAT, ArchError, ArchSpec
from space.space import SearchSpace

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("fmnist_2d", "fmnist_1d", "imagenet_tiny_2d", "imagenet_tiny_1d", "imagenet_small_2d")
DEIT = ("deit_tiny", "deit_small")


@lru_cache(maxsize=None)
def preset(name: str) -> SearchSpace:
    return SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / f"{name}.yaml"))


def base() -> dict[str, Any]:
    """A valid 3-stage 2D spec as parsed JSON: 7x7 -> 4x4 -> 2x2 grid."""
    return {
        "format": FORMAT, "pooling": "2d", "img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10,
        "mlp_ratio": 2.0,
        "stages": [
            {"tokens": 49, "dim": 16, "num_heads": 2, "cells": ["basic", "shared"]},
            {"tokens": 16, "dim": 32, "num_heads": 4, "cells": ["identity", "basic", "shared", "basic"]},
            {"tokens": 4, "dim": 32, "num_heads": 4, "cells": ["basic"]},
        ],
    }


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", DEIT)
def test_deit_files_are_canonical(name: str) -> None:
    text = (REPO / "conf" / "baselines" / f"{name}.json").read_text()
    arch = ArchSpec.from_json(text)
    assert arch.to_json() == text
    assert ArchSpec.from_json(arch.to_json()) == arch
    assert arch.depth == 12 and arch.pooling == "1d" and len(arch.stages) == 1


def test_base_spec_is_valid_and_round_trips() -> None:
    arch = ArchSpec.from_dict(base())
    assert arch.depth == (1 + 2) + (0 + 1 + 2 + 1) + 1  # basic 1, shared 2, identity 0
    assert arch.strides() == (2, 2)
    assert arch.seq_len(0) == 49  # no CLS in 2D
    assert ArchSpec.from_json(arch.to_json()) == arch
    assert json.loads(arch.to_json()) == base()


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(PRESETS))
def test_sampled_arch_round_trips_exactly(seed: int, name: str) -> None:
    arch = preset(name).sample(random.Random(seed))
    text = arch.to_json()
    back = ArchSpec.from_json(text)
    assert back == arch
    assert back.to_json() == text
    assert text.endswith("}\n") and text.count("\n") == 11 + len(arch.stages)


def test_meta_is_written_but_ignored_on_load() -> None:
    arch = ArchSpec.from_dict(base())
    text = arch.to_json(meta={"macs": 123, "acc": 0.5, "note": ["anything", {"x": None}]})
    assert json.loads(text)["meta"]["macs"] == 123
    assert ArchSpec.from_json(text) == arch
    assert ArchSpec.from_json(text).to_json() == arch.to_json()


def test_save_is_atomic_and_loads_back(tmp_path: Path) -> None:
    arch = ArchSpec.from_dict(base())
    path = tmp_path / "best.json"
    arch.save(path, meta={"macs": 1})
    arch.save(path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["best.json"]  # no .tmp left behind
    assert path.read_text() == arch.to_json()
    assert ArchSpec.load(path) == arch


def test_1d_pooling_reaches_any_smaller_count() -> None:
    d = base()
    d["pooling"] = "1d"
    d["stages"][1]["tokens"] = 25  # not a square-grid halving: fine in 1D
    arch = ArchSpec.from_dict(d)
    assert arch.seq_len(1) == 26  # CLS rides along


# ----------------------------------------------------------------------------- malformed specs
def _set(path: str, value: Any) -> Callable[[dict], None]:
    """Mutator that sets ``a.b[1].c`` style paths in the parsed JSON."""

    def f(d: dict) -> None:
        keys: list[Any] = []
        for part in path.split("."):
            name, *idx = part.replace("]", "").split("[")
            keys.append(name)
            keys += [int(i) for i in idx]
        obj = d
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return f


def _del(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


BAD: list[tuple[str, Callable[[dict], None], str]] = [
    ("missing format", _del("format"), "format: missing (expected 'psvit-arch/1')"),
    ("format version", _set("format", "psvit-arch/2"), "format: unsupported version 'psvit-arch/2'"),
    ("unknown field", _set("depth", 12), "depth: unknown field (allowed: "),
    ("unknown stage field", _set("stages[0].mlp", 3), "stages[0].mlp: unknown field"),
    ("missing pooling", _del("pooling"), "pooling: missing"),
    ("unknown pooling", _set("pooling", "3d"), "pooling: unknown variant '3d' (allowed: 1d, 2d)"),
    ("dim string", _set("stages[0].dim", "16"), 'stages[0].dim: expected integer, got string "16"'),
    ("tokens bool", _set("stages[1].tokens", True), "stages[1].tokens: expected integer, got boolean true"),
    ("img_size float", _set("img_size", 28.0), "img_size: expected integer, got number 28.0"),
    ("mlp_ratio string", _set("mlp_ratio", "2"), "mlp_ratio: expected number, got string"),
    ("cells not a list", _set("stages[0].cells", "basic"), "stages[0].cells: expected array, got string"),
    ("op not a string", _set("stages[0].cells[1]", 1), "stages[0].cells[1]: expected a string op, got integer"),
    ("stage not an object", _set("stages[1]", [16, 32]), "stages[1]: expected an object, got array"),
    ("stages not a list", _set("stages", {"tokens": 49}), "stages: expected array, got object"),
    ("missing dim", lambda d: d["stages"][2].pop("dim"), "stages[2].dim: missing"),
    ("tokens increase", _set("stages[2].tokens", 49), "stages[2].tokens: 49 grows from 16"),
    ("dims decrease", _set("stages[2].dim", 24), "stages[2].dim: 24 shrinks from 32"),
    ("heads do not divide dim", _set("stages[0].num_heads", 3), "stages[0].num_heads: 3 does not divide dim 16"),
    ("zero heads", _set("stages[0].num_heads", 0), "stages[0].num_heads: 0 is not a positive integer"),
    ("2d unreachable tokens", _set("stages[1].tokens", 25),
     "stages[1].tokens: 25 cannot be produced by 2D pooling of a 7x7 grid (allowed: 16, 49"),
    ("stage-0 tokens", _set("stages[0].tokens", 36), "stages[0].tokens: 36 != (28/4)^2 = 49"),
    ("empty stages", _set("stages", []), "stages: empty"),
    ("empty cells", _set("stages[1].cells", []), "stages[1].cells: empty"),
    ("non-integer mlp width", _set("mlp_ratio", 0.3), "mlp_ratio: 0.3 x stages[0].dim 16 = 4.8"),
    ("patch does not divide", _set("patch_size", 5), "patch_size: 5 does not divide img_size 28"),
    ("zero classes", _set("num_classes", 0), "num_classes: 0 is not a positive integer"),
]


@pytest.mark.parametrize("mutate,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_spec_names_the_field(mutate: Callable[[dict], None], fragment: str) -> None:
    d = copy.deepcopy(base())
    mutate(d)
    with pytest.raises(ArchError) as e:
        ArchSpec.from_json(json.dumps(d))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(fragment.split(":")[0] + ":"), msg  # the field path comes first
    assert fragment in msg


def test_unknown_op_message_is_exact() -> None:
    d = base()
    d["stages"][1]["cells"][3] = "shard"
    with pytest.raises(ArchError) as e:
        ArchSpec.from_dict(d)
    assert str(e.value) == "stages[1].cells[3]: unknown op 'shard' (allowed: basic, shared, identity)"


@pytest.mark.parametrize("text,fragment", [
    ('{"format": "psvit-arch/1",', "<json>: malformed JSON at line 1"),
    ("[1, 2]", "<root>: expected a JSON object, got array"),
    ("", "<json>: malformed JSON"),
])
def test_malformed_json(text: str, fragment: str) -> None:
    with pytest.raises(ArchError) as e:
        ArchSpec.from_json(text)
    assert str(e.value).startswith(fragment) and "\n" not in str(e.value)


def test_load_prefixes_the_path(tmp_path: Path) -> None:
    d = base()
    d["stages"][0]["dim"] = "wide"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(d, indent=2))
    with pytest.raises(ArchError) as e:
        ArchSpec.load(path)
    assert str(e.value).startswith(f"{path}: stages[0].dim: expected integer")
    with pytest.raises(ArchError, match="cannot read architecture file"):
        ArchSpec.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- the info CLI
def _run_info(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "space.info", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "malformed JSON"),
    (None, "cannot read architecture file"),
    (json.dumps({**base(), "stages": [{**base()["stages"][0], "cells": ["shard"]}]}), "unknown op 'shard'"),
], ids=["malformed", "missing", "unknown-op"])
def test_info_cli_bad_arch_is_one_error_line(tmp_path: Path, run_module, content: str | None, fragment: str) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    before = sorted(os.listdir(tmp_path))
    r = run_module("space.info", f"arch={bad}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before  # read-only: no outputs/, .hydra/ or log


def test_info_cli_deit_tiny_writes_nothing(tmp_path: Path) -> None:
    r = _run_info(tmp_path, f"arch={REPO / 'conf' / 'baselines' / 'deit_tiny.json'}")
    assert r.returncode == 0, r.stderr
    assert "5,717,416" in r.stdout and "1.25 G" in r.stdout and "FLOPs (MACs)" in r.stdout
    assert "in space fmnist_2d: no (pooling:" in r.stdout
    assert os.listdir(tmp_path) == []
