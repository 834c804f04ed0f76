"""``compile=auto|true|false`` (supernet/engine/compile.py): compiled cells compute what eager ones do, forward and
backward, with the same parameters and state_dict keys; the recompile limit covers every call shape of the space;
auto is off on the CPU; the apps compile when asked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from space.arch import ArchSpec
from space.errors import UserError
from space.space import SearchSpace
from supernet.engine import compile as C
from supernet.engine.compile import BATCH_CONTEXTS, call_shapes, compile_cells, compile_wanted, model_shapes
from supernet.engine.distributed import DistEnv
from supernet.model.psvit import PSViT
from supernet.model.supernet import Supernet

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_space(pooling: str) -> SearchSpace:
    """8x8 images in 2x2 patches (a 4x4 grid); two stages, the second with a token and a dim choice."""
    tokens = [16, 4] if pooling == "2d" else [16, 9]
    return SearchSpace.from_config({
        "name": f"tiny_{pooling}", "pooling": pooling, "img_size": 8, "patch_size": 2, "in_chans": 1,
        "num_classes": 3, "mlp_ratio": 2.0, "head_dim": 4, "ops": ["basic", "shared", "identity"],
        "stages": [{"cells": 2, "tokens": [16], "dims": [8]}, {"cells": 1, "tokens": tokens, "dims": [8, 12]}]})


def pick(space: SearchSpace, tokens: int, dim: int, cells: tuple[tuple[str, ...], ...]) -> ArchSpec:
    """The path of ``space`` with these cells whose last stage has ``tokens`` and ``dim``."""
    return next(a for a in space.all_archs() if (a.stages[-1].tokens, a.stages[-1].dim) == (tokens, dim)
                and tuple(s.cells for s in a.stages) == cells)


def test_auto_is_off_on_the_cpu_and_on_on_cuda():
    assert not compile_wanted("auto", CPU) and compile_wanted("auto", torch.device("cuda"))
    assert compile_wanted(True, CPU) and not compile_wanted(False, torch.device("cuda"))
    with pytest.raises(UserError, match=r"^compile: 'yes' is not allowed \(allowed: auto, true or false\)$"):
        compile_wanted("yes", CPU)
    net = Supernet(tiny_space("2d"))
    assert compile_cells(net, "auto", CPU) is None
    assert all(m._compiled_call_impl is None for m in net.modules())


def test_a_bad_compile_value_is_one_line_exit_2(run_module, tmp_path):
    r = run_module("supernet.train", "compile=yes", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: compile: 'yes' is not allowed (allowed: auto, true or false)\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pooling", ["2d", "1d"])
def test_call_shapes_are_the_shapes_every_path_calls(pooling):
    """The count the recompile limit is raised by equals the distinct (class, weights, input, sizes) calls of every
    path of a small space (and of one PSViT)."""
    space = tiny_space(pooling)
    net = Supernet(space)
    seen: set[tuple] = set()

    def record(module, args, kwargs):
        seen.add((type(module).__name__, tuple(p.shape for p in module.parameters()), tuple(args[0].shape[1:]),
                  args[1:], tuple(sorted(kwargs.items()))))

    for m in net.modules():
        if isinstance(m, C.COMPILED):
            m.register_forward_pre_hook(record, with_kwargs=True)
    x = torch.zeros(1, 1, 8, 8)
    with torch.no_grad():
        for arch in space.all_archs():
            net(x, arch)
    assert dict(Counter(name for name, *_ in seen)) == model_shapes(net) == \
        call_shapes(space.chains, [space.ops] * 2, pooling)
    arch = pick(space, 4 if pooling == "2d" else 9, 12, (("shared", "shared"), ("basic",)))
    cells = "Pool2d" if pooling == "2d" else "Pool1d"
    assert model_shapes(PSViT(arch)) == {"BasicCell": 1, "SharedPair": 1, cells: 1}


def test_the_recompile_limit_is_raised_to_what_the_space_needs(monkeypatch):
    monkeypatch.setattr(C, "_entries", Counter())
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", self))
    space = SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "imagenet_tiny_2d.yaml"))
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256), torch.device("meta"):
        plan = compile_cells(Supernet(space), True, CPU)
        assert plan.shapes == {"BasicCell": 16, "SharedPair": 16, "Pool2d": 51}  # 3 stages' (tokens, dim) chains
        assert plan.modules == 18 * 2 + 2
        assert torch._dynamo.config.recompile_limit == plan.recompile_limit == 51 * BATCH_CONTEXTS
        assert torch._dynamo.config.accumulated_recompile_limit == 51 * BATCH_CONTEXTS
        assert f"Pool2d; torch._dynamo recompile limit raised to {51 * BATCH_CONTEXTS}" in plan.describe()
        # A second model in the same process (fidelity trains many) adds its own shapes to the limit.
        arch = space.extreme("max")
        assert compile_cells(PSViT(arch), True, CPU).recompile_limit == (51 + 2) * BATCH_CONTEXTS  # its 2 poolings


def _step(net: Supernet, x: torch.Tensor, arch: ArchSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = net(x, arch)
    out.logsumexp(-1).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_cells_equal_eager_outputs_and_gradients_and_keep_the_state_dict():
    """Inductor on the CPU: a 2D path of two shared pairs (whose first layers run a basic layer's attention) and
    stride-2 pooling into a sliced dim gives eager's logits and every gradient to 1e-5; the modules ran compiled (one
    graph per class and call shape, the two equal pairs sharing one; no graph break); parameters and state_dict
    keys are unchanged, so checkpoints load across compile on and off. (Two graphs, forward and backward: inductor
    takes tens of seconds for each on a CPU, so the 1D pooling is left to the call-shape and wiring tests.)"""
    torch.manual_seed(0)
    s2 = tiny_space("2d")
    cases = [(s2, pick(s2, 4, 8, (("shared", "shared"), ("identity",))))]
    nets = {s.pooling: Supernet(s).train() for s in (s2,)}
    x = {p: torch.randn(3, 1, 8, 8) for p in nets}
    eager = [_step(nets[s.pooling], x[s.pooling], a) for s, a in cases]
    keys = {p: list(n.state_dict()) for p, n in nets.items()}
    params = {p: [id(q) for q in n.parameters()] for p, n in nets.items()}
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for net in nets.values():
        assert compile_cells(net, True, CPU).modules > 0
    for (space, arch), (out, grads) in zip(cases, eager):
        out_c, grads_c = _step(nets[space.pooling], x[space.pooling], arch)
        torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, atol=1e-5, rtol=1e-5, msg=name)
    # the pairs at (16, 8), pooling (16, 8) -> (4, 8) through a 12-wide conv
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert sum(counters["graph_break"].values()) == breaks
    for p, net in nets.items():
        assert list(net.state_dict()) == keys[p] and [id(q) for q in net.parameters()] == params[p]
        fresh = Supernet(net.space)
        fresh.load_state_dict(net.state_dict())  # strict: a compiled run's weights resume in an eager one
        net.load_state_dict(fresh.state_dict())


# ----------------------------------------------------------------------------- the apps
@pytest.fixture
def compiled(monkeypatch) -> Counter[str]:
    """Counts ``nn.Module.compile`` calls per class instead of compiling (the apps' wiring, not inductor)."""
    seen: Counter[str] = Counter()
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update([type(self).__name__]))
    monkeypatch.setattr(C, "_entries", Counter())
    return seen


def _cfg(app: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(app, overrides=["device=cpu", "max_steps=1", "eval.every=0", "progress=false",
                                       "data.val_size=12", "data.batch_size=16", *overrides])


@pytest.mark.parametrize("setting, cells", [("auto", 0), ("true", 18)])
def test_supernet_training_compiles_its_cells_when_asked(tmp_path, fake_fmnist, compiled, setting, cells):
    from supernet.train import train

    root = fake_fmnist(tmp_path / "fmnist")
    train(_cfg("supernet", f"run_dir={tmp_path / 'run'}", f"data.root={root}", f"compile={setting}"))
    expected = {"BasicCell": cells, "SharedPair": cells, "Pool2d": 2} if cells else {}
    assert dict(compiled) == expected  # fmnist_2d: 18 cells with both ops, 2 poolings


def test_retraining_and_the_search_compile_when_asked(tmp_path, fake_fmnist, compiled):
    from search.inherited import InheritedAccuracy
    from supernet.retrain import retrain

    root = fake_fmnist(tmp_path / "fmnist")
    arch = REPO / "conf" / "baselines" / "deit_fmnist.json"
    retrain(_cfg("retrain", f"arch={arch}", f"run_dir={tmp_path / 'run'}", f"data.root={root}", "compile=true"))
    assert dict(compiled) == {"BasicCell": ArchSpec.load(arch).depth}
    compiled.clear()
    env = DistEnv(0, 1, 0, CPU)
    InheritedAccuracy(Supernet(tiny_space("1d")), [], env)  # the scorer's default: as it was, eager
    assert not compiled
    InheritedAccuracy(Supernet(tiny_space("1d")), [], env, compile=True)
    assert dict(compiled) == {"BasicCell": 3, "SharedPair": 3, "Pool1d": 1}


@pytest.mark.parametrize("app", ["supernet", "retrain", "evolve", "fidelity"])
def test_every_app_that_runs_the_model_ships_compile_auto(app):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose(app).compile == "auto"
