"""Ranking fidelity of a trained supernet, the `python -m search.fidelity` app: do its inherited-weight
scores rank architectures the way training them from scratch does?

    python -m search.fidelity checkpoint=runs/supernet_fmnist_2d/last.ckpt band='[3e6,5e6]'
    torchrun --standalone --nproc_per_node=2 -m search.fidelity checkpoint=...   # stand-alone runs split over ranks

1. Picks ``archs`` architectures stratified over the space's whole FLOPs range and, with ``band=[lo, hi]``,
   ``band_archs`` more inside that band (space/samplers.py), deterministically from ``seed``.
2. Scores each with the supernet's inherited weights on the whole held-out validation split (what the search's
   finalists are ranked by) and on its first ``eval_images`` (the search's fitness set, what its evolution ranks
   by), decoded as the supernet's training validated on it (its data config and recipe); with
   ``checkpoints=[...]``, also each further checkpoint's (a curve of tau against training length).
3. Trains each from scratch through the retraining loop (supernet/retrain.py) with seeds 0..``seeds``-1 (init and
   data order) and the supernet's recipe (``recipe@standalone.recipe=NAME`` for another; each run is one process,
   so without repeated augmentation), scored on the same validation split; never the test split. Each run has its
   own resumable directory under ``standalone_dir``, so a rerun continues, and another supernet of the same space
   and data reuses them. Under torchrun, each rank trains its share of the runs alone (no DDP inside a run),
   balanced by MACs; a run's result does not depend on which rank trained it.
4. Reports Kendall tau, Spearman rho and top-k overlap between each inherited score and the stand-alone
   mean over seeds, and tau against single seeds, each with a bootstrap 95% interval, for the range and the
   band separately, next to the noise ceilings that apply to each: the tau that the architectures' true quality
   would reach against the mean of the seeds, and against one seed (search/ranking.py). Writes
   ``fidelity.json`` and ``fidelity.png`` to ``run_dir`` and prints a table. ``seeds=0`` trains nothing and
   reports the inherited scores only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from search.ranking import agreement, noise_ceiling, tau_single
from space.app import CONF_DIR, atomic_write, check_overrides, run_app, run_dir_lock
from space.arch import ArchSpec
from space.cost import macs, params
from space.errors import UserError
from space.samplers import band_archs, stratified_archs
from space.schema import FIDELITY, check_config
from space.space import SearchSpace

if TYPE_CHECKING:
    from supernet.data.recipe import RecipeConfig
    from supernet.engine.checkpoint import SupernetCheckpoint
    from supernet.engine.distributed import DistEnv


@dataclass(frozen=True)
class Job:
    """The validated command."""

    checkpoint: Path
    band: tuple[float, float] | None
    checkpoints: tuple[Path, ...] = ()  # more checkpoints of the same space, scored against the same ground truth


@dataclass(frozen=True)
class Picked:
    """The architectures under study: ``range`` (stratified over the space) and ``band`` (inside the band)."""

    range: list[ArchSpec]
    band: list[ArchSpec]

    @property
    def unique(self) -> list[ArchSpec]:
        return list(dict.fromkeys(self.range + self.band))


def fidelity(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the study described by ``cfg`` (conf/fidelity.yaml); returns what fidelity.json holds
    (empty when a stand-alone run was stopped by a signal)."""
    from supernet.engine.checkpoint import load_supernet  # torch only once the command is known to be valid
    from supernet.engine.distributed import distributed

    job = validate(cfg)
    with distributed(cfg.device) as env:
        sck = load_supernet(job.checkpoint, env.device)
        picked = pick(sck.net.space, cfg, job)
        data_cfg = dict(sck.data, eval_batch_size=cfg.eval_batch_size)
        if cfg.data_root is not None:
            data_cfg["root"] = str(cfg.data_root)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else job.checkpoint.parent / "fidelity"
        recipe = standalone_recipe(cfg, sck.recipe, env.is_main)
        with run_dir_lock(run_dir, env.is_main):
            inherited = score_inherited(picked.unique, sck, data_cfg, cfg, env)
            curve = []
            for path in job.checkpoints:  # the same architectures and images, another checkpoint's weights
                other = load_supernet(path, env.device)
                if other.net.space.to_config() != sck.net.space.to_config():
                    raise UserError(f"checkpoints: {path} is a supernet of space {other.net.space.name!r}, not of "
                                    f"checkpoint's {sck.net.space.name!r}; give checkpoints of one space")
                curve.append((path, other, score_inherited(picked.unique, other, data_cfg, cfg, env)))
            standalone = train_standalone(picked.unique, data_cfg, cfg, env, run_dir, recipe) if cfg.seeds else {}
            if standalone is None:
                return {}
            result = summarize(picked, inherited, standalone, cfg, sck, data_cfg, recipe, curve)
            if env.is_main:
                write_outputs(run_dir, result)
            return result


# ----------------------------------------------------------------------------- config
def validate(cfg: DictConfig) -> Job:
    """Check every value that needs no checkpoint, before anything is loaded or written.

    Raises:
        UserError: naming the first bad field.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_config(plain, FIDELITY)
    if not cfg.checkpoint:
        raise UserError("checkpoint: required, the supernet checkpoint to study "
                        "(e.g. checkpoint=runs/supernet_fmnist_2d/last.ckpt)")
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_file():
        raise UserError(f"checkpoint: {ckpt} does not exist (train one with `make supernet`)")
    more = []
    for c in plain.get("checkpoints") or []:
        if not isinstance(c, str) or not Path(c).is_file():
            raise UserError(f"checkpoints: {c!r} is not a checkpoint file (give supernet checkpoints of the same "
                            "run or space, e.g. checkpoints='[runs/sn/step_600.ckpt,runs/sn/step_1200.ckpt]')")
        more.append(Path(c))
    band = plain.get("band")
    if band is None:
        return Job(ckpt, None, tuple(more))
    if (not isinstance(band, list) or len(band) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in band) or band[0] >= band[1]):
        raise UserError(f"band: {band!r} is not allowed (allowed: [lo, hi] in MACs with lo < hi, e.g. [3e6,5e6], "
                        "or null)")
    return Job(ckpt, (float(band[0]), float(band[1])), tuple(more))


def pick(space: SearchSpace, cfg: DictConfig, job: Job) -> Picked:
    """The architectures of the study, from ``cfg.seed``.

    Raises:
        UserError: the band lies outside the space's FLOPs range, or holds too few architectures.
    """
    band: list[ArchSpec] = []
    if job.band is not None:
        lo, hi = space.macs_range()
        if job.band[1] < lo or job.band[0] > hi:
            raise UserError(f"band: [{job.band[0]:g}, {job.band[1]:g}] MACs lies outside the space's FLOPs range "
                            f"[{lo:g}, {hi:g}]; pick a band inside it (`make info` prints the range)")
        band = band_archs(space, cfg.band_archs, *job.band, seed=cfg.seed)
    return Picked(stratified_archs(space, cfg.archs, cfg.seed), band)


def standalone_recipe(cfg: DictConfig, supernet: dict[str, Any] | None, announce: bool) -> RecipeConfig:
    """The recipe the stand-alone runs train with: ``standalone.recipe`` when given (``recipe@standalone.recipe=NAME``),
    else the supernet's. Each run trains on one process, where repeated augmentation is refused
    (supernet/data/recipe.py): the supernet's repeats are dropped, saying so.

    Raises:
        UserError: a given recipe with repeated augmentation.
    """
    from supernet.data.recipe import RecipeConfig

    given = cfg.standalone.get("recipe")
    if given is not None:
        recipe = RecipeConfig.from_cfg(given)
        if recipe.repeated_aug > 1:
            raise UserError(f"standalone.recipe.repeated_aug: {recipe.repeated_aug}, but each stand-alone run trains "
                            "on one process, where repeats are refused; set standalone.recipe.repeated_aug=1")
        return recipe
    recipe = RecipeConfig.from_cfg(supernet)
    if recipe.repeated_aug > 1:
        if announce:
            print(f"stand-alone runs: the supernet's recipe {recipe.name!r} without its repeated augmentation "
                  f"(x{recipe.repeated_aug}): each run trains on one process")
        recipe = replace(recipe, repeated_aug=1)
    return recipe


def standalone_cfg(cfg: DictConfig, data_cfg: dict[str, Any], seed: int, run_dir: Path,
                   recipe: RecipeConfig) -> dict[str, Any]:
    """The retraining config (conf/retrain.yaml's keys) of one stand-alone run: seed ``seed`` for the init
    and the data order, ``recipe``, no validation during training (the study scores the whole split at the end)."""
    s = cfg.standalone
    return {"arch": None, "init": "scratch", "supernet": None, "run_dir": str(run_dir), "resume": "auto",
            "resume_lr": None, "seed": seed, "device": cfg.device, "amp": cfg.amp, "max_steps": s.max_steps,
            "ckpt_every": s.ckpt_every, "log_every": 50, "progress": False, "compile": cfg.compile,
            "optim": OmegaConf.to_container(s.optim, resolve=True), "eval": {"every": 0, "max_batches": None},
            "data": {**data_cfg, "seed": seed}, "recipe": asdict(recipe)}


# ----------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Inherited:
    """Inherited-weight top-1 of each architecture on the whole validation split (what the search's finalists
    are ranked by) and on its first ``eval_images`` (the search's fitness set, what the evolution ranks by)."""

    whole: dict[ArchSpec, float]
    fitness: dict[ArchSpec, float]
    images: int  # the whole split
    fitness_images: int


def score_inherited(archs: list[ArchSpec], sck: SupernetCheckpoint, data_cfg: dict[str, Any], cfg: DictConfig,
                    env: DistEnv) -> Inherited:
    """Both inherited scores of each architecture from one pass over the whole split (architectures dealt
    to the ranks; the per-image results gathered)."""
    from search.inherited import InheritedAccuracy, validation_batches
    from supernet.engine.distributed import gather_objects

    batches = validation_batches(data_cfg, None, cfg.eval_batch_size, env.device, sck.recipe, sck.source_digest)
    scorer = InheritedAccuracy(sck.net, batches, env, amp=cfg.amp, compile=cfg.compile)
    n = min(cfg.eval_images, scorer.images)
    whole: dict[ArchSpec, float] = {}
    fitness: dict[ArchSpec, float] = {}
    bar = tqdm(total=len(archs), desc="inherited", disable=not env.is_main or not cfg.progress, dynamic_ncols=True)
    for i in range(0, len(archs), env.world_size):
        chunk = archs[i:i + env.world_size]
        mine = scorer.correct(chunk[env.rank]) if env.rank < len(chunk) else None
        for a, bits in zip(chunk, gather_objects(mine, env)):
            whole[a], fitness[a] = float(bits.mean()), float(bits[:n].mean())
        bar.update(len(chunk))
    bar.close()
    return Inherited(whole, fitness, scorer.images, n)


def run_id(arch: ArchSpec, seed: int) -> str:
    return f"{hashlib.sha256(arch.to_json().encode()).hexdigest()[:16]}_seed{seed}"


def train_standalone(archs: list[ArchSpec], data_cfg: dict[str, Any], cfg: DictConfig, env: DistEnv,
                     run_dir: Path, recipe: RecipeConfig) -> dict[ArchSpec, list[float]] | None:
    """Each architecture's validation top-1 after training from scratch, one score per seed; None if a run
    was stopped by a signal (every finished run is kept; a rerun continues)."""
    from supernet.engine.distributed import balance, gather_objects

    root = Path(cfg.standalone_dir) if cfg.standalone_dir else run_dir / "standalone"
    runs = [(a, s) for a in archs for s in range(cfg.seeds)]
    mine = balance([macs(a) for a, _ in runs], env.world_size)[env.rank]
    done: dict[int, float | None] = {}
    datasets: dict[int, Any] = {}  # seed -> its DataBundle, loaded once
    bar = tqdm(total=len(mine), desc=f"stand-alone (rank {env.rank})" if env.distributed else "stand-alone",
               disable=not env.is_main or not cfg.progress, dynamic_ncols=True)
    for i in mine:
        arch, seed = runs[i]
        done[i] = standalone_run(arch, seed, root / run_id(arch, seed), data_cfg, cfg, env, datasets, recipe)
        bar.update(1)
        if done[i] is None:
            break
    bar.close()
    merged: dict[int, float | None] = {}
    for part in gather_objects(done, env):
        merged.update(part)
    if len(merged) < len(runs) or any(v is None for v in merged.values()):
        if env.is_main:
            print(f"stopped by signal; finished stand-alone runs are kept in {root}; rerun the same command to resume")
        return None
    return {a: [merged[i] for i, (b, _) in enumerate(runs) if b == a] for a in archs}


def standalone_run(arch: ArchSpec, seed: int, run_dir: Path, data_cfg: dict[str, Any], cfg: DictConfig,
                   env: DistEnv, datasets: dict[int, Any], recipe: RecipeConfig) -> float | None:
    """Validation top-1 of ``arch`` trained from scratch with ``seed`` (result.json caches it); None if stopped.

    Raises:
        UserError: ``run_dir`` holds a result of another training setup.
    """
    from supernet.data import build_data
    from supernet.engine.distributed import DistEnv
    from supernet.engine.loop import DATA_NOT_IN_IDENTITY, top1
    from supernet.engine.standalone import train_arch

    rcfg = OmegaConf.create(standalone_cfg(cfg, data_cfg, seed, run_dir, recipe))
    setup = {k: v for k, v in OmegaConf.to_container(rcfg).items() if k in ("seed", "max_steps", "optim", "amp")}
    setup["data"] = {k: v for k, v in rcfg.data.items() if k not in DATA_NOT_IN_IDENTITY}
    setup["arch"] = arch.to_dict()
    if recipe.identity() is not None:  # a light recipe adds nothing: results from before the recipe still count
        setup["recipe"] = recipe.identity()
    result_path = run_dir / "result.json"
    if result_path.exists():
        saved = json.loads(result_path.read_text(encoding="utf-8"))
        if saved.get("setup") != setup:
            raise UserError(f"standalone_dir: {run_dir} holds a stand-alone result trained with other settings; "
                            "use another standalone_dir= (or run_dir=)")
        return float(saved["val_top1"])
    solo = DistEnv(0, 1, env.local_rank, env.device)  # this rank alone: no collective inside a run
    if seed not in datasets:
        datasets[seed] = build_data(rcfg.data, 0, 1, env.device, recipe=recipe,
                                    label_smoothing=rcfg.optim.label_smoothing)
    data = datasets[seed]
    model, res = train_arch(arch, run_id(arch, seed), rcfg, data, solo)
    if res.stopped:
        return None
    acc = top1(model, data.val, solo, None, cfg.amp)
    atomic_write(result_path, json.dumps({"val_top1": acc, "steps": res.step, "setup": setup}, indent=1) + "\n")
    return acc


# ----------------------------------------------------------------------------- report
def summarize(picked: Picked, inherited: Inherited, standalone: dict[ArchSpec, list[float]], cfg: DictConfig,
              sck: SupernetCheckpoint, data_cfg: dict[str, Any], recipe: RecipeConfig,
              curve: list[tuple[Path, SupernetCheckpoint, Inherited]] | None = None) -> dict[str, Any]:
    """What fidelity.json holds: every architecture's scores, per group the agreement statistics of both
    inherited scores against the stand-alone ground truth (none without stand-alone runs), and with several
    checkpoints the statistics of each."""
    groups = {"range": picked.range, "band": picked.band}
    stats = {name: group_stats(archs, inherited, standalone, cfg) for name, archs in groups.items() if archs}
    rows = [{"arch": a.to_dict(), "short": a.short(), "macs": macs(a), "params": params(a),
             "groups": [g for g, archs in groups.items() if a in archs], "inherited_val_top1": inherited.whole[a],
             "inherited_fitness_top1": inherited.fitness[a]} for a in picked.unique]
    for r, a in zip(rows, picked.unique):
        if a in standalone:
            r.update(standalone_val_top1=standalone[a], standalone_mean=sum(standalone[a]) / len(standalone[a]))
    s = cfg.standalone
    return {"checkpoint": str(cfg.checkpoint), "checkpoint_sha256": sck.sha256, "step": sck.step,
            "total_steps": sck.total_steps, "seed": cfg.seed,
            "band": list(cfg.band) if cfg.band is not None else None, "seeds": cfg.seeds,
            "standalone": {"max_steps": s.max_steps, "optim": OmegaConf.to_container(s.optim, resolve=True),
                           "recipe": asdict(recipe)},
            "data": {**{k: data_cfg.get(k) for k in ("name", "val_size", "split_seed")},
                     "val_images": inherited.images, "fitness_images": inherited.fitness_images},
            "stats": stats, "archs": rows,
            "curve": [{"checkpoint": str(path), "step": other.step, "total_steps": other.total_steps,
                       "inherited_val_top1": [inh.whole[a] for a in picked.unique],
                       "inherited_fitness_top1": [inh.fitness[a] for a in picked.unique],
                       "stats": {n: group_stats(archs, inh, standalone, cfg) for n, archs in groups.items() if archs}}
                      for path, other, inh in (curve or [])]}


def group_stats(archs: list[ArchSpec], inherited: Inherited, standalone: dict[ArchSpec, list[float]],
                cfg: DictConfig) -> dict[str, Any]:
    """One group's statistics: for the whole-split and the fitness-subset inherited scores, Kendall tau,
    Spearman rho and top-k overlap against the stand-alone mean over seeds, and tau against single seeds;
    and the ground truth's noise ceilings (search/ranking.py: against one seed and against the mean)."""
    out: dict[str, Any] = {"archs": len(archs), "macs_min": min(map(macs, archs)), "macs_max": max(map(macs, archs))}
    if not standalone:
        return out
    runs = [standalone[a] for a in archs]
    truth = [sum(r) / len(r) for r in runs]
    for name, scores in (("whole", inherited.whole), ("fitness", inherited.fitness)):
        proxy = [scores[a] for a in archs]
        agree = {k: v.to_dict() for k, v in agreement(proxy, truth, cfg.topk, cfg.bootstrap, cfg.seed).items()}
        single = tau_single(proxy, runs, cfg.bootstrap, cfg.seed).to_dict() if len(runs[0]) > 1 else None
        out[name] = {**agree, "kendall_tau_single_seed": single}
    ceiling = noise_ceiling(runs, cfg.bootstrap, cfg.seed)
    out["ceiling"] = None if ceiling is None else {k: v.to_dict() for k, v in ceiling.items()}
    return out


def write_outputs(run_dir: Path, result: dict[str, Any]) -> None:
    """fidelity.json, fidelity.png and the table on stdout."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "fidelity.json", json.dumps(result, indent=1) + "\n")
    plot(run_dir / "fidelity.png", result)
    print_table(run_dir, result)


def print_table(run_dir: Path, result: dict[str, Any]) -> None:
    n, k = result["data"]["val_images"], result["data"]["fitness_images"]
    print(f"\n{'arch':52s} {'MACs':>8s} {'inh. all':>8s} {'inh. fit':>8s} {'stand-alone (per seed)':>24s}")
    for r in sorted(result["archs"], key=lambda r: r["macs"]):
        seeds = ", ".join(f"{v:.4f}" for v in r.get("standalone_val_top1", []))
        tag = "*" if "band" in r["groups"] else " "
        print(f"{tag}{r['short'][:51]:51s} {r['macs'] / 1e6:7.2f}M {r['inherited_val_top1']:8.4f} "
              f"{r['inherited_fitness_top1']:8.4f} {seeds:>24s}")
    print(f"(* = in the band; inh. all: inherited top-1 on all {n} validation images, what the search's finalists "
          f"are ranked by; inh. fit: on the first {k}, the search's fitness set)")
    if not any("ceiling" in st for st in result["stats"].values()):
        print(f"no stand-alone runs (seeds=0): inherited scores only -> {run_dir / 'fidelity.json'}")
        return
    print(f"\n{'group':6s} {'proxy':7s} {'Kendall tau vs mean':22s} {'ceiling (mean)':22s} "
          f"{'tau vs one seed':22s} {'ceiling (one seed)':22s} {'Spearman rho':22s}")
    for name, st in result["stats"].items():
        c = st["ceiling"] or {}
        for proxy in ("whole", "fitness"):
            p = st[proxy]
            print(f"{name:6s} {proxy:7s} {_ci(p['kendall_tau']):22s} {_ci(c.get('mean')):22s} "
                  f"{_ci(p['kendall_tau_single_seed']):22s} {_ci(c.get('single')):22s} {_ci(p['spearman_rho']):22s}")
    for point in result["curve"]:
        taus = ", ".join(f"{g} {_ci(st['whole']['kendall_tau'])}" for g, st in point["stats"].items())
        print(f"step {point['step']}/{point['total_steps']}: Kendall tau (all images) {taus}")
    print(f"(95% bootstrap intervals over architectures; a ceiling is the tau that the architectures' true quality "
          f"would reach against this noisy ground truth) -> {run_dir / 'fidelity.json'}")


def _ci(e: dict[str, float | None] | None) -> str:
    if e is None:
        return "n/a"
    if e["value"] is None:
        return "undefined (constant)"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def plot(path: Path, result: dict[str, Any]) -> None:
    """Inherited vs stand-alone top-1, error bars spanning the seeds, band points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for group, style in (("range", dict(marker="o", color="tab:blue")), ("band", dict(marker="s", color="tab:red"))):
        rows = [r for r in result["archs"] if group in r["groups"] and "standalone_mean" in r]
        if not rows:
            continue
        x = [r["inherited_val_top1"] for r in rows]
        y = [r["standalone_mean"] for r in rows]
        err = [[m - min(r["standalone_val_top1"]) for r, m in zip(rows, y)],
               [max(r["standalone_val_top1"]) - m for r, m in zip(rows, y)]]
        ax.errorbar(x, y, yerr=err, linestyle="none", capsize=2, alpha=0.8, **style,
                    label=f"{group} ({len(rows)} archs): Kendall tau "
                          f"{_ci(result['stats'][group]['whole']['kendall_tau'])}")
    ax.set_xlabel("inherited-weight validation top-1")
    ax.set_ylabel("stand-alone validation top-1 (mean, range over seeds)")
    ax.set_title("ranking fidelity of the supernet")
    if ax.get_legend_handles_labels()[0]:  # nothing to label without stand-alone runs (seeds=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fidelity")
def main(cfg: DictConfig) -> None:
    run_app(lambda: fidelity(cfg))


if __name__ == "__main__":
    check_overrides("fidelity")
    main()
