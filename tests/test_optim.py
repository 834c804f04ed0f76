"""The optimizer recipe (supernet/engine/optim.py, conf/optim/adamw.yaml) as the README states it: linear warmup
then cosine to min_lr, a peak lr scaled linearly with the global batch, no weight decay on biases, norms, position
embedding and CLS token; and, through the real training step (engine/loop.py `Trainer.train_step`), label
smoothing and gradient clipping applied as configured."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from space.arch import ArchSpec
from space.space import SearchSpace
from supernet.engine.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
DEIT_FMNIST = REPO / "conf" / "baselines" / "deit_fmnist.json"


def _optim(**overrides) -> object:
    """The shipped recipe (conf/optim/adamw.yaml) with ``overrides``."""
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml"), overrides)


def _lrs(opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    """The lr each of ``steps`` optimizer steps runs with (as the loop steps: optimizer, then scheduler)."""
    out = []
    for _ in range(steps):
        assert len({g["lr"] for g in opt.param_groups}) == 1  # decay and no-decay groups share the schedule
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_is_linear_warmup_then_cosine_to_min_lr():
    """1 warmup epoch of 10 steps, 100 steps in all, lr 1e-3 -> min_lr 1e-5 at a global batch of 256."""
    model = nn.Linear(4, 4)
    opt, sched = build_optimizer(model, _optim(lr=1e-3, min_lr=1e-5, warmup_epochs=1), global_batch=256,
                                 steps_per_epoch=10, total_steps=100, device=torch.device("cpu"))
    lr = _lrs(opt, sched, 120)
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3,  # (step + 1) / 10 of the peak
                10: 1e-3, 40: 7.525e-4, 55: 5.05e-4, 70: 2.575e-4,  # 1e-5 + (1e-3 - 1e-5) (1 + cos(pi t)) / 2
                100: 1e-5, 119: 1e-5}  # the floor, also past the end
    for step, value in expected.items():
        assert lr[step] == pytest.approx(value, rel=1e-9), step
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))  # rising through the warmup
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # never rising after it


@pytest.mark.parametrize("global_batch", [32, 256, 1024])
def test_peak_lr_scales_linearly_with_the_global_batch(global_batch: int):
    model = nn.Linear(4, 4)
    opt, sched = build_optimizer(model, _optim(lr=1e-3, min_lr=1e-5, warmup_epochs=0.5), global_batch=global_batch,
                                 steps_per_epoch=8, total_steps=40, device=torch.device("cpu"))
    lr = _lrs(opt, sched, 5)
    assert max(lr) == lr[4] == pytest.approx(1e-3 * global_batch / 256, rel=1e-12)  # the peak, after 4 warmup steps


@pytest.mark.parametrize("global_batch", [32, 256, 1024])
def test_the_floor_is_min_lr_whatever_the_global_batch(global_batch: int):
    """min_lr is the cosine's floor as written, not scaled with the batch like the peak."""
    opt, sched = build_optimizer(nn.Linear(4, 4), _optim(lr=1e-3, min_lr=1e-5, warmup_epochs=0.5),
                                 global_batch=global_batch, steps_per_epoch=8, total_steps=40,
                                 device=torch.device("cpu"))
    lr = _lrs(opt, sched, 45)
    assert lr[40] == lr[44] == pytest.approx(1e-5, rel=1e-12) and min(lr[4:]) == lr[40]


def test_a_floor_above_the_peak_is_the_peak():
    """A tiny global batch whose scaled peak lies under min_lr: a flat lr after the warmup, never above the peak."""
    opt, sched = build_optimizer(nn.Linear(4, 4), _optim(lr=1e-3, min_lr=1e-5, warmup_epochs=0.5), global_batch=1,
                                 steps_per_epoch=8, total_steps=40, device=torch.device("cpu"))
    lr = _lrs(opt, sched, 41)
    assert lr[4:] == pytest.approx([1e-3 / 256] * 37, rel=1e-12)


def test_deit_imagenet_is_deits_schedule():
    """conf/optim/deit_imagenet.yaml against DeiT's main.py (Touvron et al. 2021): lr 5e-4 x global batch / 512,
    5 warmup epochs, cosine to 1e-5 over 300 epochs, AdamW (0.9, 0.999) with weight decay 0.05, label smoothing
    0.1, no gradient clipping; DeiT-S's global batch of 1024 here, 10 steps an epoch."""
    optim = OmegaConf.load(REPO / "conf" / "optim" / "deit_imagenet.yaml")
    assert (optim.epochs, optim.label_smoothing, optim.grad_clip) == (300, 0.1, 0.0)
    opt, sched = build_optimizer(nn.Linear(4, 4), optim, global_batch=1024, steps_per_epoch=10, total_steps=3000,
                                 device=torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    lr = _lrs(opt, sched, 3001)
    assert max(lr) == lr[49] == pytest.approx(5e-4 * 1024 / 512, rel=1e-12)  # the peak after 5 epochs of warmup
    assert lr[3000] == pytest.approx(1e-5, rel=1e-12)


def _no_decay_expected(model: nn.Module) -> tuple[set[str], dict[str, set[str]]]:
    """Names that must train without weight decay, found from the modules (not from the tensor ranks), and the
    kinds found, so the test fails if a kind is absent."""
    norms = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if "norm" in type(mod).__name__.lower()
             for p, _ in mod.named_parameters(recurse=False)}
    names = [n for n, _ in model.named_parameters()]
    kinds = {"bias": {n for n in names if n.endswith(".bias")}, "norm": norms,
             "embedding": {n for n in names if n in ("pos_embed", "cls_token")}}
    return set().union(*kinds.values()), kinds


@pytest.mark.parametrize("which", ["psvit", "supernet"])
def test_weight_decay_only_on_weight_matrices_and_kernels(which: str):
    from supernet.model.psvit import PSViT
    from supernet.model.supernet import Supernet

    torch.manual_seed(0)
    model = (PSViT(ArchSpec.load(DEIT_FMNIST)) if which == "psvit" else
             Supernet(SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_1d.yaml"))))
    opt, _ = build_optimizer(model, _optim(weight_decay=0.05), global_batch=256, steps_per_epoch=10,
                             total_steps=100, device=torch.device("cpu"))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(decay_of) == len(list(model.parameters()))
    no_decay, kinds = _no_decay_expected(model)
    assert kinds["embedding"] == {"pos_embed", "cls_token"} and kinds["bias"] and kinds["norm"], kinds
    for name, p in model.named_parameters():
        if name in no_decay:
            assert decay_of[id(p)] == 0.0, name
        else:
            assert p.ndim >= 2 and decay_of[id(p)] == 0.05, name  # every weight matrix and conv kernel


# ----------------------------------------------------------------------------- through the real training step
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, fake_fmnist):
    from supernet.data import build_data

    root = fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=80, n_test=10)
    return root, build_data({"name": "fashion_mnist", "root": str(root), "val_size": 16, "batch_size": 16})


def _trainer(tmp_path: Path, data, net: nn.Module, *overrides: str, world_size: int = 1):
    """A real `Trainer` of the retraining config around ``net`` (nothing is written before `fit`)."""
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import Task, Trainer

    class Fixed(Task):
        name = "fixed"

        def __init__(self) -> None:
            self.net, self.identity = net, {}

        def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
            return self.net(x)

    root, bundle = data
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("retrain", overrides=[f"run_dir={tmp_path}", f"data.root={root}", "data.val_size=16",
                                            "data.batch_size=16", "max_steps=10", *overrides])
    return Trainer(Fixed(), bundle, cfg, DistEnv(0, world_size, 0, torch.device("cpu")))


def _net() -> nn.Module:
    from supernet.model.psvit import PSViT

    torch.manual_seed(0)
    return PSViT(ArchSpec.load(DEIT_FMNIST))


def test_trainer_peak_lr_is_for_the_global_batch(tmp_path, data):
    """Per-rank batch 16 on 4 ranks is a global batch of 64: a quarter of the recipe's lr (given for 256)."""
    for world_size in (1, 4):
        tr = _trainer(tmp_path, data, _net(), "optim.lr=1e-3", world_size=world_size)
        assert tr.sched.base_lrs == pytest.approx([1e-3 * 16 * world_size / 256] * 2, rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_is_applied_to_the_loss(tmp_path, data, eps: float):
    net = _net()
    x, y = next(iter(data[1].train.epoch(0)))
    with torch.no_grad():
        logp = F.log_softmax(copy.deepcopy(net)(x).double(), -1)
    nll, uniform = -logp.gather(1, y[:, None]).mean().item(), -logp.mean().item()
    assert abs(uniform - nll) > 0.01  # smoothing visibly changes the loss of this batch
    stats = _trainer(tmp_path, data, net, f"optim.label_smoothing={eps}").train_step(x, y)
    assert float(stats.loss) == pytest.approx((1 - eps) * nll + eps * uniform, rel=1e-5)


def _update_norms(tmp_path: Path, data, clip: float) -> tuple[float, float | None]:
    """The global norm of the gradient AdamW is handed in the first step, and the step's reported norm."""
    tr = _trainer(tmp_path, data, _net(), f"optim.grad_clip={clip}")
    seen = []
    tr.opt.register_step_pre_hook(lambda opt, *_: seen.append(math.sqrt(sum(
        float(p.grad.double().pow(2).sum()) for g in opt.param_groups for p in g["params"] if p.grad is not None))))
    x, y = next(iter(data[1].train.epoch(0)))
    stats = tr.train_step(x, y)
    return seen[0], None if stats.grad_norm is None else float(stats.grad_norm)


def test_gradient_clipping_caps_the_global_norm_and_reports_it_before_clipping(tmp_path, data):
    natural, reported = _update_norms(tmp_path, data, 0)
    assert reported is None and natural > 0.5  # clipping off: the raw gradient, no norm computed
    clipped, reported = _update_norms(tmp_path, data, 0.05)
    assert clipped == pytest.approx(0.05, rel=1e-4)
    assert reported == pytest.approx(natural, rel=1e-4)  # TensorBoard's train/grad_norm: before clipping
    loose, _ = _update_norms(tmp_path, data, 1e6)
    assert loose == pytest.approx(natural, rel=1e-6)  # a cap above the norm changes nothing
