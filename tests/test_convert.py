"""`supernet.convert`: timm's DeiT-Ti and DeiT-S, every parameter random, converted into the PSViT of
conf/baselines/deit_tiny.json / deit_small.json compute the same logits to 1e-9 in float64; the CLI writes a
state dict PSViT loads; and every bad input is one `error:` line on stderr, exit status 2, no file written."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm  # the DeiT reference; `make install` installs it (the imagenet extra), so this never skips
import torch
from torch import nn

from space.arch import ArchSpec
from space.errors import UserError
from supernet.pretrained import deit_to_psvit, load_deit, qkv_per_head
from supernet.model.psvit import PSViT

REPO = Path(__file__).resolve().parents[1]
TINY, SMALL = (str(REPO / "conf" / "baselines" / f"deit_{n}.json") for n in ("tiny", "small"))
MODELS = {"tiny": ("deit_tiny_patch16_224", TINY), "small": ("deit_small_patch16_224", SMALL)}


def random_deit(name: str, seed: int = 0) -> nn.Module:
    """timm's ``name`` (no download) with every parameter drawn at random, biases and norms included, so that
    a wrong row order, norm or bias cannot match by chance (timm initializes biases to 0 and norms to 1)."""
    model = timm.create_model(name, pretrained=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            base = 1.0 if "norm" in n and n.endswith(".weight") else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def deit() -> Callable[[str], nn.Module]:
    """``deit("tiny" | "small")``: the random timm model, built once per module."""
    cache: dict[str, nn.Module] = {}
    return lambda size: cache.setdefault(size, random_deit(MODELS[size][0]))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, deit: Callable[[str], nn.Module]) -> dict[str, Path]:
    """Checkpoint files, written once: DeiT-Ti (plain and as DeiT releases it) and DeiT-S."""
    d = tmp_path_factory.mktemp("ckpts")
    out = {"tiny": d / "tiny.pth", "tiny_wrapped": d / "tiny_release.pth", "small": d / "small.pth"}
    torch.save(deit("tiny").state_dict(), out["tiny"])
    torch.save({"model": deit("tiny").state_dict()}, out["tiny_wrapped"])
    torch.save(deit("small").state_dict(), out["small"])
    return out


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_converted_deit_computes_deit_logits(deit: Callable[[str], nn.Module], size: str) -> None:
    ref = copy.deepcopy(deit(size)).double()
    model = load_deit(deit(size).state_dict(), MODELS[size][1]).double().eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (2, 1000)
    assert want.std() > 0.3 and (want[0] - want[1]).abs().max() > 0.3  # not a degenerate network
    diff = (got - want).abs().max().item()
    assert diff <= 1e-9, f"DeiT-{size} logits differ by {diff:.3g}"


def test_qkv_rows_are_regrouped_per_head() -> None:
    # timm: [q; k; v], heads contiguous in each; ours: [q_h; k_h; v_h] per head. 2 heads of dim 2, C = 4:
    rows = torch.arange(12)  # q0 q0 q1 q1 | k0 k0 k1 k1 | v0 v0 v1 v1
    assert qkv_per_head(rows, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    w = torch.arange(24.0).view(12, 2)
    assert torch.equal(qkv_per_head(w, 2)[:, 1], qkv_per_head(w[:, 1], 2))  # whole rows move


def test_every_psvit_parameter_comes_from_the_checkpoint(deit: Callable[[str], nn.Module]) -> None:
    state = deit_to_psvit({"model": deit("tiny").state_dict()}, ArchSpec.load(TINY))
    model = PSViT.from_json(TINY)
    assert set(state) == set(model.state_dict())
    assert torch.equal(state["stages.0.cells.11.layer.mlp.fc2.bias"], deit("tiny").blocks[11].mlp.fc2.bias)
    assert torch.equal(state["pos_embed"], deit("tiny").pos_embed)


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("kind", ["tiny", "tiny_wrapped", "safetensors"])
def test_cli_writes_a_state_dict_psvit_loads(tmp_path: Path, run_module, files: dict[str, Path],
                                             deit: Callable[[str], nn.Module], kind: str) -> None:
    src = files.get(kind)
    if kind == "safetensors":  # timm's Hugging Face release
        from safetensors.torch import save_file

        src = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in deit("tiny").state_dict().items()}, str(src))
    out = tmp_path / "deit_tiny_psvit.pt"
    r = run_module("supernet.convert", f"checkpoint={src}", f"arch={TINY}", f"out={out}", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith(f"{src} -> {out}: PSViT 196x192[{'B' * 12}], 5.72 M params, DeiT's weights exactly")
    model = PSViT.from_json(TINY)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict
    want = load_deit(deit("tiny").state_dict(), TINY).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert _entries(tmp_path) == sorted([out.name] + ([src.name] if src.parent == tmp_path else []))


def _write_case(case: str, tmp: Path, files: dict[str, Path], deit: Callable[[str], nn.Module]) -> dict[str, str]:
    """The overrides of one bad-input case, writing its input file into ``tmp`` if it needs one."""
    args = {"checkpoint": str(files["tiny"]), "arch": TINY, "out": str(tmp / "out.pt")}
    sd = deit("tiny").state_dict()
    bad: object = None
    if case == "missing_file":
        args["checkpoint"] = str(tmp / "nope.pth")
    elif case == "not_a_checkpoint":
        args["checkpoint"] = TINY
    elif case == "small_into_tiny":
        args["checkpoint"] = str(files["small"])
    elif case == "distilled":
        bad = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).state_dict()
    elif case == "resnet_like":
        bad = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    elif case == "unexpected_key":
        bad = {**sd, "extra.weight": torch.zeros(1)}
    elif case == "missing_key":
        bad = {k: v for k, v in sd.items() if k != "blocks.3.mlp.fc2.bias"}
    elif case == "fewer_blocks":
        bad = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    elif case == "not_a_dict":
        bad = [torch.zeros(2)]
    elif case == "not_deit_layout":
        spec = json.loads(Path(TINY).read_text())
        spec["stages"][0]["cells"] = ["shared"] * 6
        args["arch"] = str(tmp / "shared.json")
        Path(args["arch"]).write_text(json.dumps(spec))
    elif case == "no_checkpoint":
        del args["checkpoint"]
    elif case == "out_is_dir":
        args["out"] = str(tmp)
    elif case == "out_is_checkpoint":
        bad = sd
    if bad is not None:
        args["checkpoint"] = str(tmp / f"{case}.pth")
        torch.save(bad, args["checkpoint"])
    if case == "out_is_checkpoint":
        args["out"] = args["checkpoint"]
    return args


@pytest.mark.parametrize("case, fragment", [
    ("missing_file", "checkpoint: {tmp}/nope.pth does not exist"),
    ("not_a_checkpoint", "deit_tiny.json is not a readable checkpoint ("),
    ("small_into_tiny", "does not fit the arch: cls_token is (1, 1, 384), the arch needs (1, 1, 192) (the checkpoint "
                        "has dim 384, 197 tokens with CLS, 1000 classes; pass an arch of those sizes, e.g. "
                        "conf/baselines/deit_small.json)"),
    ("distilled", "distilled.pth is a distilled DeiT (dist_token, head_dist.weight, head_dist.bias), not a PSViT "
                  "baseline"),
    ("resnet_like", "is not a DeiT state dict (missing cls_token, pos_embed, patch_embed.proj.weight, ... (152 in "
                    "all); unexpected conv1.weight, fc.weight;"),
    ("unexpected_key", "is not a DeiT state dict (unexpected extra.weight; allowed: timm's"),
    ("missing_key", "is not a DeiT state dict (missing blocks.3.mlp.fc2.bias; allowed"),
    ("fewer_blocks", "fewer_blocks.pth has 11 blocks but the arch has 12 cells (pass an arch with 11 basic cells)"),
    ("not_a_dict", "not_a_dict.pth holds a list, not a DeiT state dict"),
    ("not_deit_layout", "arch: {tmp}/shared.json: 1d 196x192[SSSSSS] is not DeiT's layout (allowed: 1d pooling and "
                        "one stage of basic cells"),
    ("no_checkpoint", "checkpoint: required (e.g. checkpoint="),
    ("out_is_dir", "out: {tmp} is a directory (give a file name"),
    ("out_is_checkpoint", "out: {tmp}/out_is_checkpoint.pth is the checkpoint itself (write the PSViT weights to"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, run_module, files: dict[str, Path],
                                                         deit: Callable[[str], nn.Module], case: str,
                                                         fragment: str) -> None:
    args = _write_case(case, tmp_path, files, deit)
    before = _entries(tmp_path)
    r = run_module("supernet.convert", *(f"{k}={v}" for k, v in args.items()), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert fragment.replace("{tmp}", str(tmp_path)) in r.stderr, r.stderr
    assert _entries(tmp_path) == before  # no output, no temp file


def _six_heads(tmp: Path) -> str:
    """DeiT-Ti's arch with 6 heads of 32 dims instead of 3 of 64: every tensor has the same shape."""
    spec = json.loads(Path(TINY).read_text())
    spec["stages"][0]["num_heads"] = 6
    path = tmp / "deit_tiny_6_heads.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_wrong_head_count_is_refused_and_an_explicit_one_is_converted_with(tmp_path: Path, run_module,
                                                                            files: dict[str, Path],
                                                                            deit: Callable[[str], nn.Module]) -> None:
    """The weights do not record the head count: a 3-head DeiT-Ti converted as 6 heads has the same shapes and was
    written as "DeiT's weights exactly", with logits 0.4 off. It is refused in one line naming both fixes; with
    num_heads=6 (a checkpoint really trained with 6 heads) the qkv rows are regrouped for 6 heads."""
    six = _six_heads(tmp_path)
    out = tmp_path / "out.pt"
    r = run_module("supernet.convert", f"checkpoint={files['tiny']}", f"arch={six}", f"out={out}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"error: arch: 6 heads, but {files['tiny']} is a DeiT of dim 192, whose heads are 64-dim: 3 "
                        "heads (its weights do not record the count, and another one regroups the qkv rows wrongly); "
                        "pass an arch with 3 heads, e.g. conf/baselines/deit_tiny.json, or num_heads=6 if the "
                        "checkpoint was trained with 6 heads\n")
    assert not out.exists()
    r = run_module("supernet.convert", f"checkpoint={files['tiny']}", f"arch={six}", f"out={out}", "num_heads=3",
                   cwd=tmp_path)
    assert r.returncode == 2 and "error: num_heads: 3 but the arch has 6 heads" in r.stderr and not out.exists()
    r = run_module("supernet.convert", f"checkpoint={files['tiny']}", f"arch={six}", f"out={out}", "num_heads=6",
                   cwd=tmp_path)
    assert r.returncode == 0 and "6 heads (num_heads as given)" in r.stdout, r.stderr
    sd = deit("tiny").state_dict()
    assert torch.equal(torch.load(out, weights_only=True)["stages.0.cells.0.layer.attn.qkv.weight"],
                       qkv_per_head(sd["blocks.0.attn.qkv.weight"], 6))
    with pytest.raises(UserError, match=r"^arch: 6 heads, but checkpoint is a DeiT of dim 192"):
        load_deit(sd, six)  # the library call and init=pretrained refuse it the same way


@pytest.mark.parametrize("wrapping, args, said", [
    ("module", [], "dropped the 'module.' prefix of DistributedDataParallel from every name"),
    ("state_dict", [], "took the 'state_dict' entry"),
    ("model_and_ema", [], "the file also holds 'model_ema' (weights=ema takes those)"),
    ("model_and_ema", ["weights=ema"], "took the 'model_ema' entry; the file also holds 'model' (weights=model"),
    ("timm_ema_with_module", ["weights=ema"], "took the 'state_dict_ema' entry; the file also holds 'state_dict' "
                                              "(weights=model takes those); dropped the 'module.' prefix"),
])
def test_wrapped_and_prefixed_checkpoints_are_unwrapped_saying_so(tmp_path: Path, run_module,
                                                                 deit: Callable[[str], nn.Module], wrapping: str,
                                                                 args: list[str], said: str) -> None:
    sd = deit("tiny").state_dict()
    ema = {k: v + 1.0 for k, v in sd.items()}  # an average that differs from the weights everywhere
    module = {f"module.{k}": v for k, v in sd.items()}
    ck = {"module": module, "state_dict": {"state_dict": sd, "epoch": torch.tensor(3)},
          "model_and_ema": {"model": sd, "model_ema": ema},
          "timm_ema_with_module": {"state_dict": sd, "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}},
          }[wrapping]
    src, out = tmp_path / "ck.pth", tmp_path / "out.pt"
    torch.save(ck, src)
    r = run_module("supernet.convert", f"checkpoint={src}", f"arch={TINY}", f"out={out}", *args, cwd=tmp_path)
    assert r.returncode == 0 and said in r.stdout, (r.stdout, r.stderr)
    want = load_deit(ema if args else sd, TINY).state_dict()
    got = torch.load(out, weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("ck, args, message", [
    ({"model_ema": "{sd}"}, [], "holds only a moving average of the weights ('model_ema'); pass weights=ema to "
                                "convert it"),
    ("{sd}", ["weights=ema"], "error: weights: ema but {src} holds no moving average of the weights (none of "
                              "model_ema, state_dict_ema); use weights=model"),
])
def test_the_weights_asked_for_and_not_there_name_the_fix(tmp_path: Path, run_module, deit, ck, args,
                                                         message) -> None:
    sd = deit("tiny").state_dict()
    src = tmp_path / "ck.pth"
    torch.save(sd if ck == "{sd}" else {k: sd for k in ck}, src)
    r = run_module("supernet.convert", f"checkpoint={src}", f"arch={TINY}", f"out={tmp_path / 'o.pt'}", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message.replace("{src}", str(src)) in r.stderr, r.stderr
    assert not (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- retraining from pretrained weights
FMNIST_ARCH = REPO / "conf" / "baselines" / "deit_fmnist.json"


def test_retraining_starts_from_pretrained_weights(fake_fmnist, run_module, tmp_path):
    """``init=pretrained`` loads the weights as they are: with max_steps=0 retraining evaluates exactly the
    model it was given; weights of another arch are one line, exit 2, and no run directory."""
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import top1

    root = fake_fmnist(tmp_path / "data", n_train=60, n_test=40)
    torch.manual_seed(3)
    model = PSViT.from_json(FMNIST_ARCH).eval()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    test = build_data({"name": "fashion_mnist", "root": str(root), "val_size": 10, "batch_size": 16}, test=True).test
    expected = top1(model, test, DistEnv(0, 1, 0, torch.device("cpu")), None, False)
    common = [f"arch={FMNIST_ARCH}", f"data.root={root}", "data.val_size=10", "data.batch_size=16", "progress=false",
              "device=cpu", "init=pretrained"]
    res = run_module("supernet.retrain", *common, f"pretrained={weights}", "max_steps=0",
                     f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["init"] == "pretrained" and result["test_top1"] == expected

    other = tmp_path / "other.pt"
    torch.save(PSViT(ArchSpec.load(TINY)).state_dict(), other)
    res = run_module("supernet.retrain", *common, f"pretrained={other}", f"run_dir={tmp_path / 'bad'}")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"error: pretrained: {other} does not fit arch "), res.stderr
    res = run_module("supernet.retrain", *common, f"run_dir={tmp_path / 'bad'}")
    assert res.stderr.strip() == ("error: pretrained: init=pretrained needs pretrained=FILE (a supernet.convert output "
                                  "or a DeiT checkpoint)")
    assert not (tmp_path / "bad").exists()
