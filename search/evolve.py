"""Evolutionary search over a trained supernet, the `python -m search.evolve` app.

    python -m search.evolve checkpoint=runs/supernet_fmnist_2d/last.ckpt flops_max=6e6
    python -m search.evolve checkpoint=... flops_budgets='[[0,3e6],[3e6,6e6],[6e6,1e7]]'   # one best per band
    torchrun --standalone --nproc_per_node=8 -m search.evolve checkpoint=...   # candidates split over ranks

The search space comes from the checkpoint. Candidates are scored by inherited-weight top-1 on a fixed
subset of the held-out validation split (search/evaluate.py); the loop itself is search/evolution.py.
FLOPs are multiply-accumulates (MACs) everywhere. Outputs go to ``run_dir`` (default: ``search/`` next to
the checkpoint): best_arch.json (retrain it with `make retrain ARCH=...`), history.jsonl, pareto.png,
state.json (rerunning the same command resumes from it) and TensorBoard scalars.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from search.evolution import (Constraint, Evolution, EvolutionConfig, RandomSearch, Record,
                              best_per_budget, check_feasible, pareto_front)
from space.app import CONF_DIR, atomic_write, run_app
from space.cost import fmt_macs, fmt_params
from space.errors import UserError
from space.space import SearchSpace
from supernet.engine.distributed import distributed

STRATEGIES = {"evolution": Evolution, "random": RandomSearch}


def _num(v: Any, field: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{field}: {v!r} is not a number (give MACs, e.g. 6e6, or null)")
    return int(v)


def constraints_of(cfg: DictConfig) -> list[Constraint]:
    """One constraint per FLOPs band: ``flops_budgets`` if given, else the single [flops_min, flops_max]."""
    pmax = _num(cfg.params_max, "params_max")
    if cfg.flops_budgets:
        out = []
        for i, band in enumerate(cfg.flops_budgets):
            if len(band) != 2:
                raise UserError(f"flops_budgets[{i}]: {list(band)} must be [flops_min, flops_max] in MACs")
            out.append(Constraint(_num(band[0], f"flops_budgets[{i}][0]"), _num(band[1], f"flops_budgets[{i}][1]"),
                                  pmax))
        return out
    return [Constraint(_num(cfg.flops_min, "flops_min"), _num(cfg.flops_max, "flops_max"), pmax)]


def evolve(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the search described by ``cfg`` (conf/evolve.yaml); returns the summary it writes."""
    if not cfg.checkpoint:
        raise UserError("checkpoint: required, the supernet checkpoint to search "
                        "(e.g. checkpoint=runs/supernet_fmnist_2d/last.ckpt)")
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_file():
        raise UserError(f"checkpoint: {ckpt} does not exist (train one with `make supernet`)")
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"strategy: {cfg.strategy!r} (allowed: {', '.join(STRATEGIES)})")
    try:
        ecfg = EvolutionConfig(**OmegaConf.to_container(cfg.evolution))
        constraints = constraints_of(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    if not isinstance(cfg.eval_images, int) or cfg.eval_images < 1:
        raise UserError(f"eval_images: {cfg.eval_images!r} (allowed: a positive integer)")

    with distributed(cfg.device) as env:
        return _search(cfg, ckpt, ecfg, constraints, env)


def _search(cfg: DictConfig, ckpt: Path, ecfg: EvolutionConfig, constraints: list[Constraint], env: Any,
            ) -> dict[str, Any]:
    from search.inherited import SupernetEvaluator, validation_batches
    from supernet.engine.checkpoint import load_supernet

    sck = load_supernet(ckpt, env.device)
    net = sck.net
    space = net.space
    if cfg.get("space") is not None:
        given = SearchSpace.from_config(cfg.space)
        if given.to_config() != space.to_config():
            raise UserError(f"space: {given.name!r} differs from the checkpoint's space {space.name!r}; "
                            f"drop space= (the space comes from the checkpoint)")
    for c in constraints:  # fail before any evaluation, with the space's exact range
        check_feasible(space, c, random.Random(0), ecfg.max_tries)

    data_cfg = sck.data
    if cfg.data_root is not None:
        data_cfg["root"] = str(cfg.data_root)
    batches = validation_batches(data_cfg, cfg.eval_images, cfg.eval_batch_size, env.device)
    evaluator = SupernetEvaluator(net, batches, env, amp=cfg.amp)

    run_dir = Path(cfg.run_dir) if cfg.run_dir else ckpt.parent / "search"
    state_path = run_dir / "state.json"
    ckpt_hash = sck.sha256
    searches = [STRATEGIES[cfg.strategy](space, evaluator, random.Random(f"psvit-search:{cfg.seed}:{i}"), c, ecfg)
                for i, c in enumerate(constraints)]
    cache: dict[str, float] = {}
    for s in searches:  # one shared cache: no architecture is evaluated twice, across budgets too
        s.cache = cache
    if state_path.exists() and cfg.resume == "auto":
        state = json.loads(state_path.read_text())
        if state.get("checkpoint_sha256") != ckpt_hash:
            raise UserError(f"resume: {state_path} belongs to another checkpoint; use another run_dir= or resume=never")
        if state.get("eval_images", evaluator.images) != evaluator.images:  # cached scores would not compare
            raise UserError(f"resume: {state_path} scored candidates on {state['eval_images']} validation images, "
                            f"this command on {evaluator.images} (eval_images=); use another run_dir= or resume=never")
        if len(state.get("searches", [])) != len(searches):
            raise UserError(f"resume: {state_path} has {len(state.get('searches', []))} budgets, this command "
                            f"{len(searches)}; use another run_dir= or resume=never")
        try:
            for s, st in zip(searches, state["searches"]):
                s.load_state_dict(st)
        except (KeyError, ValueError) as e:
            raise UserError(f"resume: {state_path} does not match this command ({e}); use another run_dir= "
                            f"or resume=never") from None
        if env.is_main:
            print(f"resumed {state_path} at generation {searches[0].generation}/{ecfg.generations}")
    elif cfg.resume not in ("auto", "never"):
        raise UserError(f"resume: {cfg.resume!r} (allowed: auto, never)")

    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir / "tb"))
        if sck.step < sck.total_steps:
            print(f"note: {ckpt} is a supernet at step {sck.step}/{sck.total_steps} (training not finished)")

    def save_state() -> None:
        if env.is_main:
            atomic_write(state_path, json.dumps({"checkpoint_sha256": ckpt_hash, "eval_images": evaluator.images,
                                                  "searches": [s.state_dict() for s in searches]}))

    total = len(searches) * ecfg.generations
    done = sum(s.generation for s in searches)
    bar = tqdm(total=total, initial=done, desc=f"search ({cfg.strategy})", disable=not env.is_main or not cfg.progress,
               dynamic_ncols=True)
    for b, s in enumerate(searches):
        def after_generation(search: RandomSearch, b: int = b) -> None:
            save_state()
            bar.update(1)
            recs = [r for r in search.history if r.generation == search.generation - 1]
            if writer is not None and recs:
                g = b * ecfg.generations + search.generation
                writer.add_scalar("search/best_acc", search.best.score, g)
                writer.add_scalar("search/mean_acc", sum(r.score for r in recs) / len(recs), g)
                writer.add_scalar("search/mean_macs", sum(r.flops for r in recs) / len(recs), g)
                bar.set_postfix(best=f"{search.best.score:.4f}", evals=len(cache))
        s.run(after_generation)
    bar.close()
    if writer is not None:
        writer.close()

    summary = {"run_dir": str(run_dir), "evaluations": len(cache),
               "proposals": sum(len(s.history) for s in searches), "best": []}
    if env.is_main:
        summary = write_outputs(run_dir, searches, constraints, cfg, ckpt, ckpt_hash, space, evaluator.images)
    return summary


def write_outputs(run_dir: Path, searches: list[RandomSearch], constraints: list[Constraint], cfg: DictConfig,
                  ckpt: Path, ckpt_hash: str, space: SearchSpace, eval_images: int) -> dict[str, Any]:
    """best_arch.json (one per budget when several), history.jsonl, pareto.png and the final table."""
    history = [r for s in searches for r in s.history]
    bests = best_per_budget(history, space, [(c.flops_min, c.flops_max) for c in constraints])
    search_cfg = OmegaConf.to_container(cfg, resolve=True)
    paths = []
    for i, (c, best) in enumerate(zip(constraints, bests)):
        if best is None:
            continue
        name = "best_arch.json" if len(constraints) == 1 else f"best_arch_{i}.json"
        meta = {"flops_macs": best.flops, "params": best.params, "val_acc": best.score,
                "val_images": eval_images, "constraint": c.describe(), "checkpoint": str(ckpt),
                "checkpoint_sha256": ckpt_hash, "search": search_cfg}
        best.spec().save(run_dir / name, meta=meta)
        paths.append(run_dir / name)
    atomic_write(run_dir / "history.jsonl", "".join(
        json.dumps({"budget": b, "generation": r.generation, "flops_macs": r.flops, "params": r.params,
                    "val_acc": r.score, "arch": json.loads(r.arch)}) + "\n"
        for b, s in enumerate(searches) for r in s.history))
    plot_pareto(run_dir / "pareto.png", history, constraints, [b for b in bests if b is not None])

    top = sorted({r.arch: r for r in history}.values(), key=lambda r: (-r.score, r.flops, r.arch))[:cfg.show_top]
    print(f"\nsearch: {cfg.strategy}, {sum(len(s.history) for s in searches)} candidates, "
          f"{len(searches[0].cache)} evaluated on {eval_images} held-out validation images")
    print(f"{'rank':>4}  {'val top-1':>9}  {'FLOPs (MACs)':>12}  {'params':>9}  arch")
    for k, r in enumerate(top):
        print(f"{k + 1:>4}  {r.score:>9.4f}  {fmt_macs(r.flops):>12}  {fmt_params(r.params):>9}  {r.spec().short()}")
    for c, best, p in zip(constraints, [b for b in bests if b is not None], paths):
        print(f"best under {c.describe()}: val top-1 {best.score:.4f}, {fmt_macs(best.flops)} MACs, "
              f"{fmt_params(best.params)} params -> {p}")
    for name in ("history.jsonl", "pareto.png", "state.json", "tb/"):
        print(f"  {run_dir / name}")
    return {"run_dir": str(run_dir), "evaluations": len(searches[0].cache), "proposals": len(history),
            "best": [str(p) for p in paths], "best_records": [b for b in bests if b is not None]}


def plot_pareto(path: Path, history: list[Record], constraints: list[Constraint], bests: list[Record]) -> None:
    """Accuracy vs FLOPs: all candidates, the Pareto front, the constraint bands and the chosen archs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r.flops / 1e6 for r in history], [r.score for r in history], s=8, alpha=0.35, label="candidates")
    front = pareto_front(history)
    ax.plot([r.flops / 1e6 for r in front], [r.score for r in front], "-o", ms=3, color="C1", label="Pareto front")
    for c in constraints:
        lo = (c.flops_min or 0) / 1e6
        hi = c.flops_max / 1e6 if c.flops_max is not None else max(r.flops for r in history) / 1e6
        ax.axvspan(lo, hi, color="C2", alpha=0.08)
    ax.scatter([b.flops / 1e6 for b in bests], [b.score for b in bests], marker="*", s=160, color="C3",
               zorder=5, label="chosen")
    ax.set_xlabel("FLOPs (M MACs)")
    ax.set_ylabel("inherited-weight val top-1")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evolve")
def main(cfg: DictConfig) -> None:
    run_app(lambda: evolve(cfg))


if __name__ == "__main__":
    main()
