"""``torch.compile`` of a model's cells (the ``compile`` setting of every app that runs the model): each basic
cell, shared pair and pooling module is compiled in place, never the whole supernet, whose Python control flow
(which op, which sizes) changes every step.

``nn.Module.compile`` swaps only the module's call for a compiled one, so parameters, ``state_dict`` keys and
checkpoints are those of the eager model (a run resumes across compile on and off). Each module is compiled with
``dynamic=False``: every call shape is its own specialisation, and a path's sizes pick among a few dozen of them.
Dynamo keeps those specialisations per code object (one ``forward`` per module class, shared by every instance
with the same shapes) and stops compiling past ``torch._dynamo.config.recompile_limit`` (8 by default), so
:func:`compile_cells` raises that limit to what the model's space can ask for, computed from its (tokens, dim)
chains, and says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from space.arch import ArchSpec
from space.errors import UserError
from space.space import Chain, SearchSpace
from supernet.model.layers import BasicCell, Pool1d, Pool2d, SharedPair

COMPILED = (BasicCell, SharedPair, Pool1d, Pool2d)
# A call shape is compiled once per batch context it meets in one process: the training batch (with gradients),
# the full and the last partial validation batch and the test split's last batch (no_grad), the search's full and
# last batch (inference_mode); 8 leaves room for two more.
BATCH_CONTEXTS = 8
_entries: Counter[str] = Counter()  # specialisations the models compiled in this process can ask for, per class


@dataclass(frozen=True)
class CompilePlan:
    """What :func:`compile_cells` did."""

    modules: int  # modules compiled
    shapes: dict[str, int]  # module class -> distinct call shapes over the model's paths (one batch context)
    recompile_limit: int  # torch._dynamo.config.recompile_limit now

    def describe(self) -> str:
        """One line for the log."""
        shapes = ", ".join(f"{n} {name}" for name, n in self.shapes.items())
        return (f"compile: {self.modules} cell and pooling modules compiled (torch.compile, dynamic=False); "
                f"call shapes per batch context: {shapes}; torch._dynamo recompile limit raised to "
                f"{self.recompile_limit} (the most shapes of one class x {BATCH_CONTEXTS} batch contexts)")


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """Whether ``compile=setting`` compiles on ``device``: ``auto`` on CUDA only (on the CPU the compile time
    outweighs the gain for the small models run there), ``true`` / ``false`` as said.

    Raises:
        UserError: any other value.
    """
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise UserError(f"compile: {setting!r} is not allowed (allowed: auto, true or false)")


def check_entangle(setting: bool | str, entangle: str) -> None:
    """Refuse ``compile=true`` with a supernet's ``entangle=slice``: that takes each weight's slice as an autograd leaf
    while the cell runs (model/entangle.py), which would break a compiled cell's graph at every weight, so that
    compiling buys nothing. (``compile=auto`` leaves such cells eager.)

    Raises:
        UserError: ``compile=true`` with ``entangle=slice``.
    """
    if setting is True and entangle == "slice":
        raise UserError("compile: true is not allowed with entangle=slice (each weight's slice leaf is taken inside "
                        "the cell, which would break a compiled graph at every weight); use compile=false or auto, "
                        "or entangle=dense")


def call_shape_keys(chains: Iterable[Chain], stage_ops: Sequence[Iterable[str]],
                    pooling: str) -> dict[str, set[tuple]]:
    """The distinct call shapes per compiled class over the paths of ``chains`` (per stage (tokens, dim)) when stage
    ``i`` runs the ops ``stage_ops[i]``: a cell's input is fixed by its stage, tokens and dim (heads and MLP width
    follow the dim), a pooling's by its stage and the (tokens, dim) it goes from and to."""
    chains, stage_ops = list(chains), [set(ops) for ops in stage_ops]
    out = {}
    for op, name in (("basic", "BasicCell"), ("shared", "SharedPair")):
        cells = {(i, *td) for chain in chains for i, td in enumerate(chain) if op in stage_ops[i]}
        if cells:
            out[name] = cells
    pools = {(i, chain[i - 1], chain[i]) for chain in chains for i in range(1, len(chain))}
    if pools:
        out["Pool1d" if pooling == "1d" else "Pool2d"] = pools
    return out


def call_shapes(chains: Iterable[Chain], stage_ops: Sequence[Iterable[str]], pooling: str) -> dict[str, int]:
    """How many :func:`call_shape_keys` each compiled class has."""
    return {name: len(keys) for name, keys in call_shape_keys(chains, stage_ops, pooling).items()}


def model_shapes(net: nn.Module) -> dict[str, int]:
    """:func:`call_shapes` of a supernet (every path of its ``space``) or of a PSViT (its ``arch``)."""
    space = getattr(net, "space", None)
    if isinstance(space, SearchSpace):
        return call_shapes(space.chains, [space.ops] * len(space.stages), space.pooling)
    arch = getattr(net, "arch", None)
    if isinstance(arch, ArchSpec):
        return call_shapes([SearchSpace.chain_of(arch)], [s.cells for s in arch.stages], arch.pooling)
    raise TypeError(f"compile_cells: {type(net).__name__} has neither a SearchSpace .space nor an ArchSpec .arch")


def compile_cells(net: nn.Module, setting: bool | str, device: torch.device,
                  announce: bool = False) -> CompilePlan | None:
    """Compile ``net``'s cells and poolings in place when :func:`compile_wanted`, and when the net is not a supernet
    with ``entangle=slice`` (``compile=auto`` then compiles nothing); None when nothing was compiled.

    Args:
        net: a ``Supernet`` or a ``PSViT``.
        setting: the app's ``compile`` value (auto, true or false).
        device: where the model runs.
        announce: print :meth:`CompilePlan.describe` (rank 0).

    Raises:
        UserError: ``compile=true`` for a supernet with ``entangle=slice``.
    """
    if not compile_wanted(setting, device):
        return None
    if getattr(net, "slices", None) is not None:
        check_entangle(setting, "slice")
        if announce:
            print("compile: auto leaves the cells eager with entangle=slice (docs/pipeline.md)", flush=True)
        return None
    shapes = model_shapes(net)
    fresh = [m for m in net.modules() if isinstance(m, COMPILED) and m._compiled_call_impl is None]
    for m in fresh:
        m.compile(dynamic=False)
    if fresh:  # specialisations accumulate over every model compiled in the process (fidelity trains many)
        _entries.update({name: n * BATCH_CONTEXTS for name, n in shapes.items()})
    import torch._dynamo  # 2-3 s of imports: only where something is compiled

    cfg = torch._dynamo.config
    need = max(_entries.values(), default=0)
    cfg.recompile_limit = max(cfg.recompile_limit, need)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, need)  # per code object, all regions
    plan = CompilePlan(len(fresh), shapes, cfg.recompile_limit)
    if announce:
        print(plan.describe(), flush=True)
    return plan
