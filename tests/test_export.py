"""`supernet.export`: a 1D (CLS, adaptive max-pooling to token counts that do not divide) and a 2D (strided conv)
architecture with shared pairs and identity cells, written as ONNX, TorchScript and a torch.export program, run in
onnxruntime / torch.jit.load / torch.export.load, in this process and in one that cannot import this project,
within 1e-4 of PyTorch; weights from a supernet checkpoint and a retraining checkpoint; bad input is one line,
exit 2, nothing written; a file that fails its check is not kept (exit 1)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from space.arch import ArchSpec, StageSpec
from space.errors import UserError
from space.schema import EXPORT
from space.space import SearchSpace
from supernet import deploy
from supernet.export import export
from supernet.model.psvit import PSViT

REPO = Path(__file__).resolve().parents[1]
I5 = ("identity",) * 5
# A shared pair, a basic layer and identity cells in each; fmnist_1d's two poolings (49 -> 36 -> 16 tokens) have
# windows of unequal length; 2D takes both conv strides (7x7 -> 7x7 -> 4x4). Three layers each: exports are slow.
ARCHS = {
    "1d": ArchSpec("1d", 28, 4, 1, 10, 2.0, (StageSpec(49, 16, 2, ("shared", *I5)),
                                              StageSpec(36, 32, 4, ("identity", *I5)),
                                              StageSpec(16, 48, 6, ("basic", *I5)))),
    "2d": ArchSpec("2d", 28, 4, 1, 10, 2.0, (StageSpec(49, 16, 2, ("basic", *I5)),
                                              StageSpec(49, 32, 4, ("identity", *I5)),
                                              StageSpec(16, 48, 6, ("shared", *I5)))),
}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}


def config(**kw: object) -> dict[str, object]:
    """conf/export.yaml with ``kw`` set."""
    return {**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "export.yaml")), **kw}


def fresh(arch: ArchSpec, seed: int = 0) -> PSViT:
    """The model `export` builds without a checkpoint."""
    torch.manual_seed(seed)
    return PSViT(arch).eval()


def images(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_archs_are_paths_of_the_fmnist_spaces_and_formats_match_the_schema() -> None:
    for pooling, arch in ARCHS.items():
        SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / f"fmnist_{pooling}.yaml")).check(arch)
    assert EXPORT["format"].choices == tuple(deploy.FORMATS) and SUFFIX == {
        k: f.suffix for k, f in deploy.FORMATS.items()}


def test_onnx_adaptive_max_pooling_is_exact(tmp_path: Path) -> None:
    """The ONNX translation against PyTorch: values and indices, for windows of equal and unequal length."""
    pairs = [(49, 36), (36, 16), (10, 4), (5, 1)]

    class Pools(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(t for n, m in pairs for t in F.adaptive_max_pool1d(x[..., :n], m, return_indices=True))

    x = torch.randn(3, 5, 49)
    path = tmp_path / "pools.onnx"
    torch.onnx.export(Pools().eval(), (x,), path, dynamo=True, verbose=False, input_names=["x"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},),
                      custom_translation_table={torch.ops.aten.adaptive_max_pool2d.default:
                                                deploy.onnx_adaptive_max_pool})
    x = torch.randn(4, 5, 49)  # another batch
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    want = Pools()(x)
    assert len(got) == len(want) == 2 * len(pairs)
    for g, w in zip(got, want):
        assert np.array_equal(g, w.numpy())  # a max picks an input value: exact


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, object]]:
    """Every (pooling, format) written with fresh weights by `export`; 2D's ONNX and program for batch 1 only."""
    d = tmp_path_factory.mktemp("exported")
    out = {}
    for pooling, arch in ARCHS.items():
        arch.save(d / f"{pooling}.json")
        for fmt in SUFFIX:
            batch = 1 if (pooling, fmt) in (("2d", "onnx"), ("2d", "pt2")) else None
            res = export(config(arch=str(d / f"{pooling}.json"), format=fmt, batch=batch))
            out[pooling, fmt] = res.out, res
    return out


@pytest.mark.slow
def test_every_format_holds_the_arch_and_matches_pytorch(exported) -> None:
    for (pooling, fmt), (path, res) in exported.items():
        arch = ARCHS[pooling]
        assert res.ok and path == path.parent / f"{pooling}_untrained{SUFFIX[fmt]}" and path.is_file()
        assert res.check.problem is None and 0 <= res.check.max_diff <= 1e-4, (pooling, fmt, res.line())
        assert res.size == path.stat().st_size and f"{res.size / 1e6:.2f} MB" in res.line()
        assert f"max |difference| {res.check.max_diff:.2g} <= atol 0.0001" in res.line()
        if fmt != "torchscript":  # no source paths of this machine (torch.jit.save always keeps its debug info)
            members = [path.read_bytes()] if fmt == "onnx" else map(zipfile.ZipFile(path).read,
                                                                     zipfile.ZipFile(path).namelist())
            assert not any(str(REPO).encode() in m for m in members), (pooling, fmt)
        run, stored = deploy.load(deploy.FORMATS[fmt], path)  # the file's own arch and logits, checked here again
        assert ArchSpec.from_json(stored) == arch
        batch = 1 if res.batches == (1,) else 4
        with torch.no_grad():
            assert (run(images(batch)) - fresh(arch)(images(batch))).abs().max() <= 1e-4
    assert exported["1d", "onnx"][1].batches == (1, 3)
    inputs = ort.InferenceSession(str(exported["1d", "onnx"][0])).get_inputs()
    assert inputs[0].shape == ["batch", 1, 28, 28]
    for fmt in ("onnx", "pt2"):  # batch=1 means batch 1 only
        fixed, _ = deploy.load(deploy.FORMATS[fmt], exported["2d", fmt][0])
        with pytest.raises(Exception, match=r"[Ii]nvalid dimensions|size\(\)\[0\] == 1"):
            fixed(images(2))


SCRIPT = """
import sys
for name in ("space", "supernet", "search"):
    sys.modules[name] = None  # this project cannot be imported, editable install or not
import numpy as np, onnxruntime, torch
for path, images in zip(sys.argv[1::2], sys.argv[2::2]):
    x = np.load(images)
    if path.endswith(".onnx"):
        y = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    else:
        model = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
        y = model(torch.from_numpy(x)).detach().numpy()
    np.save(path + ".logits.npy", y)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("space", "supernet", "search") and sys.modules[m]))
"""


@pytest.mark.slow
def test_files_run_where_this_project_cannot_be_imported(exported, tmp_path: Path) -> None:
    """One isolated interpreter (-I, another cwd, the project's packages blocked) runs every file at batch 4
    (the batch-1 files at 1) and its logits match PyTorch's."""
    args = []
    for batch in (1, 4):
        np.save(tmp_path / f"x{batch}.npy", images(batch, seed=batch).numpy())
    for path, res in exported.values():
        args += [str(path), str(tmp_path / f"x{1 if res.batches == (1,) else 4}.npy")]
    r = subprocess.run([sys.executable, "-I", "-c", SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=240)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr[-2000:]
    for (pooling, fmt), (path, res) in exported.items():
        batch = 1 if res.batches == (1,) else 4
        got = torch.from_numpy(np.load(f"{path}.logits.npy"))
        with torch.no_grad():
            assert (got - fresh(ARCHS[pooling])(images(batch, seed=batch))).abs().max() <= 1e-4, (pooling, fmt)


# ----------------------------------------------------------------------------- weights from checkpoints
def compose_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, fake_fmnist) -> dict[str, Path]:
    """A supernet of fmnist_2d and a retraining of the 1D arch, one step each on generated images; the arch
    JSONs next to them."""
    from supernet.retrain import retrain
    from supernet.train import train

    d = tmp_path_factory.mktemp("ckpts")
    data = [f"data.root={fake_fmnist(d / 'data')}", "data.val_size=10", "data.batch_size=16", "progress=false",
            "max_steps=1", "eval.every=0", "device=cpu"]
    train(compose_cfg("supernet", *data, "space=fmnist_2d", f"run_dir={d / 'supernet'}"))
    for pooling, arch in ARCHS.items():
        arch.save(d / f"{pooling}.json")
    retrain(compose_cfg("retrain", *data, f"arch={d / '1d.json'}", f"run_dir={d / 'retrain'}"))
    return {"supernet": d / "supernet" / "last.ckpt", "retrain": d / "retrain" / "last.ckpt",
            "1d": d / "1d.json", "2d": d / "2d.json"}


def _ls(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


def test_supernet_checkpoint_exports_the_path_it_scores(ckpts, run_module, tmp_path: Path) -> None:
    from supernet.engine.checkpoint import load_supernet

    r = run_module("supernet.export", f"arch={ckpts['2d']}", f"checkpoint={ckpts['supernet']}",
                   "format=torchscript", cwd=tmp_path)
    out = ckpts["supernet"].parent / "2d.pt"  # next to the checkpoint, named after the arch
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith(f"{out}: TorchScript, ") and r.stdout.count("\n") == 1
    assert f"weights of supernet {ckpts['supernet']} (step 1/1, path extracted)" in r.stdout
    net = load_supernet(ckpts["supernet"], torch.device("cpu")).net
    with torch.no_grad():
        want = net(images(3), ARCHS["2d"])  # the supernet's own forward of the path, as the search scores it
        assert (torch.jit.load(str(out))(images(3)) - want).abs().max() <= 1e-5
        assert (want - fresh(ARCHS["2d"])(images(3))).abs().max() > 1e-2  # not the fresh init by chance


def test_retraining_checkpoint_exports_its_weights(ckpts, tmp_path: Path) -> None:
    res = export(config(arch=str(ckpts["1d"]), checkpoint=str(ckpts["retrain"]), format="torchscript",
                        out=str(tmp_path / "m.pt")))
    assert res.ok and res.check.max_diff <= 1e-4 and res.warning is None
    assert f"weights of retraining checkpoint {ckpts['retrain']} (step 1/1)" in res.line()
    model = PSViT(ARCHS["1d"]).eval()
    model.load_state_dict(torch.load(ckpts["retrain"], weights_only=True)["model"])
    with torch.no_grad():
        assert (torch.jit.load(str(tmp_path / "m.pt"))(images(5)) - model(images(5))).abs().max() <= 1e-5
        assert (model(images(5)) - fresh(ARCHS["1d"])(images(5))).abs().max() > 1e-3  # trained weights, not fresh


def _edited(ckpt: Path, out: Path, **changes) -> Path:
    """A copy of a retraining checkpoint with some entries replaced (``None`` removes one)."""
    ck = torch.load(ckpt, weights_only=True)
    for k, v in changes.items():
        ck.pop(k) if v is None else ck.__setitem__(k, v)
    torch.save(ck, out)
    return out


def test_ema_weights_on_request_and_the_line_says_which(ckpts, run_module, tmp_path: Path) -> None:
    """weights=ema exports a retraining checkpoint's moving average, and the line says which weights it holds;
    a checkpoint without an average, a supernet or fresh weights with weights=ema are one line, nothing written."""
    sd = torch.load(ckpts["retrain"], weights_only=True)["model"]
    ema = {k: v * 0.5 for k, v in sd.items()}  # an average that differs from the weights everywhere
    ckpt = _edited(ckpts["retrain"], tmp_path / "ema.ckpt", ema=ema)
    res = export(config(arch=str(ckpts["1d"]), checkpoint=str(ckpt), format="torchscript", weights="ema",
                        out=str(tmp_path / "ema.pt")))
    assert res.ok and f"EMA weights of retraining checkpoint {ckpt} (step 1/1)" in res.line()
    trained = export(config(arch=str(ckpts["1d"]), checkpoint=str(ckpt), format="torchscript",
                            out=str(tmp_path / "model.pt")))
    assert trained.ok and f"trained weights (not the EMA) of retraining checkpoint {ckpt}" in trained.line()
    want = {}
    for name, state in (("ema", ema), ("model", sd)):
        want[name] = PSViT(ARCHS["1d"]).eval()
        want[name].load_state_dict(state)
    with torch.no_grad():
        for name in ("ema", "model"):
            got = torch.jit.load(str(tmp_path / f"{name}.pt"))(images(3))
            assert (got - want[name](images(3))).abs().max() <= 1e-5, name
        assert (want["ema"](images(3)) - want["model"](images(3))).abs().max() > 1e-3
    for checkpoint, fragment in ((ckpts["retrain"], "holds no moving average of the weights (retrained without "
                                                    "recipe.ema=true); use weights=model"),
                                 (ckpts["supernet"], "is a supernet checkpoint, which keeps no moving average"),
                                 (None, "error: weights: ema needs checkpoint= a retraining checkpoint")):
        arch = ckpts["2d" if checkpoint == ckpts["supernet"] else "1d"]
        args = [f"arch={arch}", "weights=ema", "format=torchscript", f"out={tmp_path / 'no.pt'}"]
        r = run_module("supernet.export", *args, *([f"checkpoint={checkpoint}"] if checkpoint else []), cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert not (tmp_path / "no.pt").exists()


def test_an_unfinished_run_is_exported_with_a_warning_naming_its_step(ckpts, run_module, tmp_path: Path) -> None:
    ckpt = _edited(ckpts["retrain"], tmp_path / "unfinished.ckpt", total_steps=40)
    r = run_module("supernet.export", f"arch={ckpts['1d']}", f"checkpoint={ckpt}", "format=torchscript",
                   f"out={tmp_path / 'm.pt'}", cwd=tmp_path)
    assert r.returncode == 0 and f"weights of retraining checkpoint {ckpt} (step 1/40)" in r.stdout, r.stdout
    assert r.stderr == "warning: the run had not finished: its checkpoint is at step 1 of 40\n"


def test_non_finite_logits_fail_the_check_and_nothing_is_written(ckpts, run_module, tmp_path: Path) -> None:
    """A NaN weight makes every logit NaN in PyTorch and in the file alike: their difference is NaN, and max(0.0,
    nan) is 0.0, which passed for a verified file; a non-finite logit fails the check."""
    sd = torch.load(ckpts["retrain"], weights_only=True)["model"]
    sd["head.bias"] = torch.full_like(sd["head.bias"], float("nan"))
    ckpt = _edited(ckpts["retrain"], tmp_path / "nan.ckpt", model=sd)
    out = tmp_path / "nan.pt"
    r = run_module("supernet.export", f"arch={ckpts['1d']}", f"checkpoint={ckpt}", "format=torchscript",
                   f"out={out}", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {out}: TorchScript failed the check, PyTorch's logits are not finite (NaN "
                               "or inf) at batch 1"), r.stderr
    assert not out.exists()
    load = deploy.load  # the file alone producing NaN (a runtime that breaks the graph) fails as well

    def nan_file(fmt, path):
        run, stored = load(fmt, path)
        return (lambda x: run(x) * float("nan")), stored
    with mock.patch.object(deploy, "load", nan_file):
        res = export(config(arch=str(ckpts["1d"]), checkpoint=str(ckpts["retrain"]), format="torchscript",
                            out=str(out)))
    assert not res.ok and "the file's logits are not finite" in res.line() and not out.exists()


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize("case, fragment", [
    ("malformed_arch", "error: arch: {tmp}/bad.json: <json>: malformed JSON at line 1"),
    ("missing_arch", "error: arch: {tmp}/nope.json: cannot read architecture file"),
    ("no_arch", "error: arch: required"),
    ("missing_checkpoint", "error: checkpoint: {tmp}/nope.ckpt does not exist"),
    ("not_a_checkpoint", "is not a readable checkpoint"),
    ("state_dict", "is neither a retraining checkpoint (`make retrain`'s last.ckpt) nor a supernet checkpoint"),
    ("retrained_another_arch", "was trained for 1d 49x16[SIIIII] 36x32[IIIIII] 16x48[BIIIII], not arch 2d "
                               "49x16[BIIIII] 49x32[IIIIII] 16x48[SIIIII] (pass arch= the architecture JSON "
                               "that run retrained)"),
    ("not_a_path_of_the_supernet", "is a supernet of space 'fmnist_2d', and arch 1d 49x16[SIIIII] 36x32[IIIIII] "
                                   "16x48[BIIIII] is not one of its paths (not in space 'fmnist_2d': pooling"),
    ("unknown_format", "error: format: 'tflite' is not allowed (allowed: onnx, torchscript, pt2)"),
    ("bad_batch", "error: batch: 0 is not allowed (allowed: an integer >= 1, or null)"),
    ("out_is_dir", "error: out: {tmp} is a directory"),
    ("out_other_format", "error: out: {tmp}/m.pt has the extension of format=torchscript, not format=onnx (name it "
                         "m.onnx or pass format=torchscript)"),
    ("out_is_arch", "error: out: {tmp}/2d.json is the arch file itself (write the onnx file to another name)"),
    ("no_onnxruntime", "error: format: onnx needs onnxruntime, which is not installed (pip install -e '.[export]'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ckpts, run_module, tmp_path: Path, monkeypatch, case: str,
                                                         fragment: str) -> None:
    args = {"arch": str(ckpts["2d"]), "checkpoint": str(ckpts["supernet"])}
    if case == "malformed_arch":
        (tmp_path / "bad.json").write_text('{"format": "psvit-arch/1", ')
        args["arch"] = str(tmp_path / "bad.json")
    elif case == "missing_arch":
        args["arch"] = str(tmp_path / "nope.json")
    elif case == "no_arch":
        del args["arch"]
    elif case == "missing_checkpoint":
        args["checkpoint"] = str(tmp_path / "nope.ckpt")
    elif case == "not_a_checkpoint":
        args["checkpoint"] = str(ckpts["2d"])
    elif case == "state_dict":
        args["checkpoint"] = str(tmp_path / "sd.pt")
        torch.save(PSViT(ARCHS["2d"]).state_dict(), args["checkpoint"])
    elif case == "retrained_another_arch":
        args["checkpoint"] = str(ckpts["retrain"])
    elif case == "not_a_path_of_the_supernet":
        args["arch"] = str(ckpts["1d"])
    elif case == "unknown_format":
        args["format"] = "tflite"
    elif case == "bad_batch":
        args["batch"] = "0"
    elif case == "out_is_dir":
        args["out"] = str(tmp_path)
    elif case == "out_other_format":
        args["out"] = str(tmp_path / "m.pt")
    elif case == "out_is_arch":
        args["arch"] = args["out"] = str(tmp_path / "2d.json")
        ARCHS["2d"].save(args["arch"])
    elif case == "no_onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when the extra is missing
    before = _ls(tmp_path, ckpts["supernet"].parent, ckpts["retrain"].parent.parent)
    r = run_module("supernet.export", *(f"{k}={v}" for k, v in args.items()), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert fragment.replace("{tmp}", str(tmp_path)) in r.stderr, r.stderr
    assert _ls(tmp_path, ckpts["supernet"].parent, ckpts["retrain"].parent.parent) == before


def test_a_file_that_fails_its_check_is_not_kept(ckpts, run_module, tmp_path: Path, monkeypatch) -> None:
    """A runtime that computes something else (here: logits off by 1e-3) exits 1 in one line; the file is removed,
    an earlier file at `out` stays as it was, and no scratch file is left behind."""
    load = deploy.load

    def off_by_a_little(fmt, path):
        run, stored = load(fmt, path)
        return (lambda x: run(x) + 1e-3), stored

    monkeypatch.setattr(deploy, "load", off_by_a_little)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    out = tmp_path / "m.pt"
    out.write_text("an earlier export")
    r = run_module("supernet.export", f"arch={ckpts['2d']}", "format=torchscript", f"out={out}", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: {out}: TorchScript failed the check, the logits differ (torch.jit.load vs PyTorch on random images, "
        "batch 1, 3: max |difference| 0.001 vs atol 0.0001); nothing was written"), r.stderr
    assert out.read_text() == "an earlier export" and _ls(tmp_path / "scratch") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "scratch"]
    res = export(config(arch=str(ckpts["2d"]), format="torchscript", out=str(out), atol=1e-2))
    assert res.ok and 0.9e-3 <= res.check.max_diff <= 1.1e-3 and out.read_bytes() != b"an earlier export"


class _Reached(Exception):
    """The app got past its checks to loading weights."""


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_config_is_one_line_or_passes_the_checks(data, tmp_path_factory) -> None:
    """Any value of any key: a one-line UserError, or the app gets to its work; either way nothing is written."""
    d = tmp_path_factory.getbasetemp() / "fuzz"
    d.mkdir(exist_ok=True)
    ARCHS["2d"].save(d / "2d.json")
    cfg = config(arch=str(d / "2d.json"), format="torchscript", out=str(d / "m.pt"))
    cfg[data.draw(st.sampled_from(sorted(EXPORT)))] = data.draw(st.one_of(
        st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
        st.lists(st.floats(allow_nan=True), max_size=3)))
    before = _ls(d)
    with mock.patch("supernet.export.load_weights", side_effect=_Reached):
        try:
            export(cfg)
        except _Reached:
            pass
        except UserError as e:
            assert "\n" not in str(e) and str(e).strip(), repr(e)
    assert _ls(d) == before


@pytest.mark.parametrize("key", ["arch", "out", "checkpoint"])
def test_a_nul_character_in_a_path_is_one_line(key, tmp_path):
    """Found by the fuzz above: ``arch='\\x00'`` reached ``Path.read_text``, whose ValueError ("embedded null byte")
    was a traceback. A string key holding a NUL character is refused by the schema now, before any work."""
    ARCHS["2d"].save(tmp_path / "2d.json")
    cfg = config(arch=str(tmp_path / "2d.json"), format="torchscript", out=str(tmp_path / "m.pt"))
    cfg[key] = "a\x00b"
    with pytest.raises(UserError) as e:
        export(cfg)
    assert str(e.value) == (f"{key}: 'a\\x00b' is not allowed (allowed: a non-empty string without NUL characters, "
                            "or null)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2d.json"]
