"""The report of bench/gpu_check.py: its figures, the kernel counts they contradict, and the tables it prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.gpu_steady import Profile, Rate, WarmUp
from space.arch import ArchSpec
from space.cost import fmt_macs

DEIT = "deit_tiny_patch16_224"
MODELS = ("supernet", "same_paths", "extracted", "psvit_deit", "timm_deit")
LABELS = {"supernet": "supernet, sampled paths", "same_paths": "supernet, the extracted paths",
          "extracted": "the same paths, extracted", "psvit_deit": "PSViT, DeiT-Ti spec", "timm_deit": f"timm {DEIT}"}
TARGETS = {"per_mac": 0.9, "deit": 0.95}  # supernet / extracted per MAC; PSViT DeiT-Ti / timm DeiT-Ti img/s


def ops_of(arch: ArchSpec) -> Counter[str]:
    """Cells per op of an architecture."""
    return Counter(op for s in arch.stages for op in s.cells)


@dataclass(frozen=True)
class Kernels:
    """What one step of a model dispatched, and the host syncs of steady-state steps (CUDA)."""

    sdpa: Counter[str]  # fused attention kernels of the step's forward
    softmax: int  # explicit softmax calls of that forward: attention maps
    syncs: tuple[str, ...] = ()  # synchronizing CUDA calls (a training step should make none)
    synced_steps: int = 0  # the steps checked for them (none off CUDA)


@dataclass
class Run:
    """Everything measured, filled in as the worker goes."""

    warm: WarmUp | None = None
    steady: list[int] = field(default_factory=list)  # the supernet's timed steps (steady state), then profiled ones
    rates: dict[tuple[str, bool], Rate] = field(default_factory=dict)  # (model, compiled) -> its timed steps
    profiles: dict[str, Profile] = field(default_factory=dict)  # eager models
    supernet_kernels: Kernels | None = None
    checked: ArchSpec | None = None  # the path whose kernels were counted
    deit_kernels: Kernels | None = None
    deit_blocks: int = 0
    compiled_note: str = ""


@dataclass(frozen=True)
class Figures:
    """Everything the report prints."""

    device: str
    backend: str
    batch: int
    run: Run
    evals_per_s: float
    eval_images: int
    eval_batch: int
    peak_gib: float | None  # peak GPU memory allocated
    wall_s: float


def problems(f: Figures) -> list[str]:
    """What the kernel counts of the checked steps contradict, one line each."""
    r = f.run
    out, checked, sup, deit = [], ops_of(r.checked), r.supernet_kernels, r.deit_kernels
    if sum(sup.sdpa.values()) != checked["basic"]:
        out.append(f"supernet: {sum(sup.sdpa.values())} fused SDPA calls for {checked['basic']} basic cells "
                   f"({dict(sup.sdpa) or 'none: the math fallback'})")
    if sup.softmax != checked["shared"]:
        out.append(f"supernet: {sup.softmax} attention maps (softmax) for {checked['shared']} shared pairs")
    if sum(deit.sdpa.values()) != r.deit_blocks:
        out.append(f"{DEIT}: {sum(deit.sdpa.values())} fused SDPA calls for {r.deit_blocks} blocks")
    for name, k in (("supernet", sup), (DEIT, deit)):
        if k.syncs:
            out.append(f"{name}: {len(k.syncs)} host syncs in {k.synced_steps} training steps (first: {k.syncs[0]})")
    return out


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def ratios(rates: dict[tuple[str, bool], Rate], compiled: bool) -> tuple[float, float] | None:
    """(supernet / extracted per MAC on the same paths, PSViT DeiT-Ti / timm DeiT-Ti img/s), eager or compiled,
    where measured."""
    if not all((m, compiled) in rates for m in MODELS[1:]):
        return None
    return (rates["same_paths", compiled].gmacs_per_s / rates["extracted", compiled].gmacs_per_s,
            rates["psvit_deit", compiled].img_per_s / rates["timm_deit", compiled].img_per_s)


def report_models(f: Figures) -> None:
    """The per-model table and the two ratios the issue sets goals for."""
    rates = f.run.rates
    timm = {c: rates.get(("timm_deit", c)) for c in (False, True)}
    print("| model | compiled | timed steps | img/s | MACs/img | GMAC/s (per-MAC throughput) | per MAC vs timm "
          "DeiT-Ti |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, compiled), r in sorted(rates.items(), key=lambda kv: (kv[0][1], MODELS.index(kv[0][0]))):
        vs = "-" if timm[compiled] is None else f"{r.gmacs_per_s / timm[compiled].gmacs_per_s:.2f}"
        print(f"| {LABELS[name]} | {'yes' if compiled else 'no'} | {r.steps} | {_rate(r.img_per_s)} | "
              f"{fmt_macs(r.macs / r.images)} | {r.gmacs_per_s:.3g} | {vs} |")
    for compiled in (False, True):
        got = ratios(rates, compiled)
        if got is not None:
            print(f"  {'compiled' if compiled else 'eager'}: supernet / extracted per MAC {got[0]:.2f} (goal >= "
                  f"{TARGETS['per_mac']}); PSViT DeiT-Ti / timm DeiT-Ti img/s {got[1]:.2f} (goal >= {TARGETS['deit']})")


def report_profiles(f: Figures) -> None:
    """Where one steady-state step of each eager model goes."""
    print("| model (eager) | wall ms/step | host CPU ms/step | kernel ms/step | top kernels, ms/step |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, p in f.run.profiles.items():
        top = "; ".join(f"{k} {v:.2f}" for k, v in p.top)
        device = "-" if p.device_ms is None else f"{p.device_ms:.2f}"
        print(f"| {LABELS[name]} | {p.wall_ms:.2f} | {p.host_ms:.2f} | {device} | {top} |")


def report(args: Any, f: Figures) -> None:
    """A few lines of context, the model and profile tables, then the one-row table to paste."""
    r, amp = f.run, "bf16 autocast" if args.device == "cuda" else "fp32 (autocast is CUDA-only)"
    checked, sup, deit = ops_of(r.checked), r.supernet_kernels, r.deit_kernels
    print(f"gpu-check: {f.device}, torch {torch.__version__} (CUDA {torch.version.cuda}), 1-process torchrun, "
          f"backend {f.backend} (all_reduce ok), {amp}; FLOPs are MACs")
    steady = r.rates["supernet", False]
    print(f"  {args.preset} supernet, entangle={args.entangle}, batch {f.batch}, synthetic data: {r.warm.line()}; "
          f"then {args.steps} steady-state steps on new paths ({fmt_macs(steady.macs / steady.images)} MACs/img on "
          f"average, {1e3 * steady.seconds / steady.steps:.1f} ms each)")
    print(f"  attention in one step: fused SDPA ({', '.join(sorted(sup.sdpa)) or 'none'}) {sum(sup.sdpa.values())} "
          f"calls for {checked['basic']} basic cells; {sup.softmax} attention maps for {checked['shared']} shared "
          f"pairs; {DEIT}: {sum(deit.sdpa.values())} fused SDPA calls for {r.deit_blocks} blocks")
    if sup.synced_steps:
        print(f"  host syncs (torch.cuda.set_sync_debug_mode) in {sup.synced_steps} steady-state steps: supernet "
              f"{len(sup.syncs)}, {DEIT} {len(deit.syncs)}")
    print(f"  extracted: the first {args.paths} steady-state paths, {args.extracted_steps} timed steps each; "
          f"compiled: {r.compiled_note or f'not measured (--compile {args.compile}; auto compiles on CUDA only)'}")
    report_models(f)
    report_profiles(f)
    print(f"  search: {args.evals} inherited-weight evaluations of {f.eval_images} synthetic validation images "
          f"(batch {f.eval_batch}): {f.evals_per_s:.1f}/s; wall {f.wall_s:.0f} s"
          + ("" if f.peak_gib is None else f", peak GPU memory {f.peak_gib:.1f} GiB"))
    eager, comp = ratios(r.rates, False), ratios(r.rates, True)
    print("| device | torch | batch | supernet / extracted per MAC | PSViT DeiT-Ti / timm DeiT-Ti | compiled: "
          "supernet / extracted | compiled: PSViT / timm | timm DeiT-Ti img/s | search evals/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {f.device} | {torch.__version__} | {f.batch} | {eager[0]:.2f} | {eager[1]:.2f} | "
          f"{'-' if comp is None else f'{comp[0]:.2f}'} | {'-' if comp is None else f'{comp[1]:.2f}'} | "
          f"{_rate(r.rates['timm_deit', False].img_per_s)} | {f.evals_per_s:.1f} |")


