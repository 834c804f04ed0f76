"""Evolutionary search over a trained supernet, the `python -m search.evolve` app.

    python -m search.evolve checkpoint=runs/supernet_fmnist_2d/last.ckpt flops_max=6e6
    python -m search.evolve checkpoint=... flops_budgets='[[0,3e6],[3e6,6e6],[6e6,1e7]]'   # one best per band
    torchrun --standalone --nproc_per_node=8 -m search.evolve checkpoint=...   # candidates dealt to ranks by MACs
    (`make search NPROC=8 ARGS=...` runs the latter through supernet.engine.launch)

The search space comes from the checkpoint, and so does everything that shapes the held-out images (the data
config and the recipe's interpolation): candidates are scored by inherited-weight top-1 on a fixed subset of the
validation images training validated on (search/inherited.py); the loop itself is search/evolution.py and
the outputs search/report.py. FLOPs are multiply-accumulates (MACs) everywhere. Outputs go to ``run_dir``
(default: ``search/`` next to the checkpoint): best_arch.json (retrain it with `make retrain ARCH=...`),
history.jsonl, pareto.png, state.json (rerunning the same command resumes from it) and TensorBoard scalars.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from search.constraint import Constraint
from search.evolution import Evolution, EvolutionConfig, RandomSearch, Search
from search.report import Provenance, write_report
from space.app import CONF_DIR, atomic_write, check_overrides, run_app, run_dir_lock
from space.arch import ArchSpec
from space.errors import UserError
from space.latency import LatencyTable
from space.schema import EVOLVE, check_config
from space.space import SearchSpace
from supernet.engine.distributed import DistEnv, distributed

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from search.inherited import InheritedAccuracy, WholeSplit
    from supernet.engine.checkpoint import SupernetCheckpoint

STRATEGIES: dict[str, type[Search]] = {"evolution": Evolution, "random": RandomSearch}


@dataclass(frozen=True)
class Job:
    """The validated command: which checkpoint, which strategy and loop settings, one constraint per budget."""

    checkpoint: Path
    strategy: type[Search]
    evolution: EvolutionConfig
    constraints: tuple[Constraint, ...]  # one per budget
    seed: int  # of the search's random.Random streams


@dataclass
class Session:
    """One rank's run, set up: the supernet, its scorer and one search per budget sharing one cache."""

    job: Job
    env: DistEnv
    supernet: SupernetCheckpoint
    scorer: InheritedAccuracy
    searches: list[Search]
    run_dir: Path
    whole: WholeSplit | None = None  # the finalists' scorer on the whole validation split (finalists > 0)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def save_state(self) -> None:
        """state.json: what a rerun needs to resume, and what it must agree with (checkpoint, eval subset)."""
        if self.env.is_main:
            atomic_write(self.state_path, json.dumps({
                "checkpoint_sha256": self.supernet.sha256, "eval_images": self.scorer.images,
                "eval_digest": self.scorer.digest,
                "seed": self.job.seed, "searches": [s.state_dict() for s in self.searches]}))


def evolve(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the search described by ``cfg`` (conf/evolve.yaml); returns the summary it writes."""
    job = validate(cfg)
    with distributed(cfg.device) as env:
        session = setup(cfg, job, env)
        with run_dir_lock(session.run_dir, env.is_main):
            resume(cfg, session)
            run(cfg, session)
            return finish(cfg, session)


# ----------------------------------------------------------------------------- config
def _num(v: Any, field: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{field}: {v!r} is not a number (give MACs, e.g. 6e6, or null)")
    return int(v)


def constraints_of(cfg: DictConfig) -> list[Constraint]:
    """One constraint per FLOPs band: ``flops_budgets`` if given, else the single [flops_min, flops_max]; each
    with the params bound and the latency bound (predicted by ``latency_table``)."""
    pmax = _num(cfg.params_max, "params_max")
    table = LatencyTable.load(cfg.latency_table) if cfg.latency_table else None
    if cfg.latency_max is not None and table is None:
        raise UserError("latency_max: needs latency_table=FILE, the lookup table that predicts latency (measure one "
                        "with python -m supernet.latency)")
    rest = {"params_max": pmax, "latency_max": cfg.latency_max, "latency": table}
    if cfg.flops_budgets:
        out = []
        for i, band in enumerate(cfg.flops_budgets):
            if len(band) != 2:
                raise UserError(f"flops_budgets[{i}]: {list(band)} must be [flops_min, flops_max] in MACs")
            out.append(Constraint(_num(band[0], f"flops_budgets[{i}][0]"), _num(band[1], f"flops_budgets[{i}][1]"),
                                  **rest))
        return out
    return [Constraint(_num(cfg.flops_min, "flops_min"), _num(cfg.flops_max, "flops_max"), **rest)]


def validate(cfg: DictConfig) -> Job:
    """Check every config value that needs no checkpoint, before anything is loaded or written.

    Raises:
        UserError: naming the first bad field.
    """
    check_config(OmegaConf.to_container(cfg, resolve=True), EVOLVE)
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
    if cfg.resume not in ("auto", "never"):
        raise UserError(f"resume: {cfg.resume!r} (allowed: auto, never)")
    return Job(ckpt, STRATEGIES[cfg.strategy], ecfg, tuple(constraints), cfg.seed)


# ----------------------------------------------------------------------------- setup and resume
def setup(cfg: DictConfig, job: Job, env: DistEnv) -> Session:
    """Load the supernet and the validation subset; build one search per budget. Writes nothing.

    Raises:
        UserError: the checkpoint or its data is unusable, ``space=`` disagrees with it, or a budget is
            infeasible in its space (each search checks its own constraint once, before any evaluation).
    """
    from search.inherited import InheritedAccuracy, WholeSplit, validation_batches, validation_loader  # torch: now
    from supernet.engine.checkpoint import load_supernet

    sck = load_supernet(job.checkpoint, env.device)
    space = sck.net.space
    if job.constraints[0].latency is not None:
        check_table(job.constraints[0].latency, space, cfg, env)
    if cfg.get("space") is not None:
        given = SearchSpace.from_config(cfg.space)
        if given.to_config() != space.to_config():
            raise UserError(f"space: {given.name!r} differs from the checkpoint's space {space.name!r}; "
                            f"drop space= (the space comes from the checkpoint)")
    data_cfg = sck.data
    if cfg.data_root is not None:
        data_cfg["root"] = str(cfg.data_root)
    batches = validation_batches(data_cfg, cfg.eval_images, cfg.eval_batch_size, env.device, sck.recipe,
                                 sck.source_digest)
    scorer = InheritedAccuracy(sck.net, batches, env, amp=cfg.amp, compile=cfg.compile)
    cache: dict[ArchSpec, float] = {}  # one shared cache: no architecture is evaluated twice, across budgets too
    searches = [job.strategy(space, scorer, random.Random(f"psvit-search:{cfg.seed}:{i}"), c, job.evolution, cache)
                for i, c in enumerate(job.constraints)]
    run_dir = Path(cfg.run_dir) if cfg.run_dir else job.checkpoint.parent / "search"
    whole = None
    if cfg.finalists:  # this rank's block of the whole split (the vectors are gathered)
        val = validation_loader(data_cfg, cfg.eval_batch_size, env.device, sck.recipe, sck.source_digest, env.rank,
                                env.world_size)
        whole = WholeSplit(sck.net, val, env, amp=cfg.amp)
    return Session(job, env, sck, scorer, searches, run_dir, whole)


def check_table(table: LatencyTable, space: SearchSpace, cfg: DictConfig, env: DistEnv) -> None:
    """The latency table must be of this space (every block of it), of this machine unless
    ``latency_other_machine=true``, and of the threads and batch ``latency_threads`` / ``latency_batch`` name.

    Raises:
        LatencyError: one line naming what differs and the way out.
    """
    from supernet.timing import machine

    table.check_space(space)
    table.check_machine(machine(env.device), bool(cfg.get("latency_other_machine", False)))
    table.check_device(table.device, cfg.get("latency_threads"), cfg.get("latency_batch"))


RETRY = "use another run_dir= or resume=never"


def resume(cfg: DictConfig, s: Session) -> None:
    """Continue from run_dir/state.json (``resume=auto``, the default), on every rank.

    Raises:
        UserError: the saved state is unreadable or would not compare with this command (another checkpoint,
            seed, validation subset, other budgets, strategy, space, constraint or loop config); it is left
            untouched.
    """
    path = s.state_path
    if cfg.resume != "auto" or not path.exists():
        return
    state = read_state(path)
    if state.get("checkpoint_sha256") != s.supernet.sha256:
        raise UserError(f"resume: {path} belongs to another checkpoint; {RETRY}")
    images = s.scorer.images
    if state.get("eval_images", images) != images:  # cached scores would not compare
        raise UserError(f"resume: {path} scored candidates on {state['eval_images']} validation images, "
                        f"this command on {images} (eval_images=); {RETRY}")
    if state.get("eval_digest") != s.scorer.digest:  # the same count of other images (or of other pixels)
        raise UserError(f"resume: {path} scored candidates on another fitness set than this command's "
                        f"{images} validation images (other data, split, preprocessing, or a state from before the "
                        f"fitness set was fixed); {RETRY}")
    if state.get("seed", s.job.seed) != s.job.seed:  # the saved RNG streams are another seed's
        raise UserError(f"resume: {path} was searched with seed={state['seed']}, this command has "
                        f"seed={s.job.seed}; {RETRY}")
    load_searches(s.searches, state.get("searches"), path)
    if s.env.is_main:
        print(f"resumed {path} at generation {s.searches[0].generation}/{s.job.evolution.generations}")


def read_state(path: Path) -> dict[str, Any]:
    """The JSON object of a state.json, or a one-line :class:`UserError`."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"resume: {path} is not a readable search state ({type(e).__name__}); {RETRY}") from None
    if not isinstance(state, dict):
        raise UserError(f"resume: {path} is not a search state (a JSON object); {RETRY}")
    return state


def load_searches(searches: list[Search], saved: Any, path: Path) -> None:
    """Restore each budget's search from the saved list, or raise a one-line :class:`UserError`."""
    if not isinstance(saved, list) or len(saved) != len(searches):
        n = len(saved) if isinstance(saved, list) else "no list of"
        raise UserError(f"resume: {path} has {n} budgets, this command {len(searches)}; {RETRY}")
    try:
        for search, st in zip(searches, saved):
            search.load_state_dict(st)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise UserError(f"resume: {path} does not match this command ({type(e).__name__}: "
                        f"{' '.join(str(e).splitlines())[:200]}); {RETRY}") from None


# ----------------------------------------------------------------------------- the run
def run(cfg: DictConfig, s: Session) -> None:
    """Run every budget's remaining generations, saving state.json after each; rank 0 shows a tqdm bar and
    logs TensorBoard scalars (run_dir/tb)."""
    writer = None
    if s.env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        s.run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(s.run_dir / "tb"))
        if s.supernet.step < s.supernet.total_steps:
            print(f"note: {s.job.checkpoint} is a supernet at step {s.supernet.step}/{s.supernet.total_steps} "
                  f"(training not finished)")
    generations = s.job.evolution.generations
    bar = tqdm(total=len(s.searches) * generations, initial=sum(x.generation for x in s.searches),
               desc=f"search ({cfg.strategy})", disable=not s.env.is_main or not cfg.progress, dynamic_ncols=True)
    for b, search in enumerate(s.searches):
        def after_generation(search: Search, b: int = b) -> None:
            s.save_state()
            bar.update(1)
            if writer is not None:
                log_generation(writer, bar, search, b * generations + search.generation)
        search.run(after_generation)
    bar.close()
    if writer is not None:
        writer.close()


def log_generation(writer: SummaryWriter, bar: tqdm, search: Search, step: int) -> None:
    """TensorBoard scalars of the generation just run (step counts generations over all budgets)."""
    recs = [r for r in search.history if r.generation == search.generation - 1]
    best = search.best
    if not recs or best is None:  # a generation that found nothing new to propose
        return
    writer.add_scalar("search/best_acc", best.score, step)
    writer.add_scalar("search/mean_acc", sum(r.score for r in recs) / len(recs), step)
    writer.add_scalar("search/mean_macs", sum(r.macs for r in recs) / len(recs), step)
    bar.set_postfix(best=f"{best.score:.4f}", evals=len(search.cache))


def finish(cfg: DictConfig, s: Session) -> dict[str, Any]:
    """Re-score each budget's finalists on the whole split (every rank), then rank 0 writes the outputs and
    prints the table; every rank returns the summary, with what its own scorers did (architectures scored,
    seconds spent scoring)."""
    finals = None
    if s.whole is not None:
        from search.finalists import finalists, rescore

        history = [r for x in s.searches for r in x.history]
        chosen = [finalists(history, c, cfg.finalists) for c in s.job.constraints]
        finals = rescore(chosen, s.whole, cfg.bootstrap, cfg.seed)
    if s.env.is_main:
        prov = Provenance(s.job.checkpoint, s.supernet.sha256, s.scorer.images,
                          OmegaConf.to_container(cfg, resolve=True))
        summary = write_report(s.run_dir, s.searches, s.job.constraints, prov, cfg.show_top, winner_latency(s),
                               finals)
        print(f"time (this process, rank 0): scored {s.scorer.evaluations} candidates in {s.scorer.seconds:.1f} s "
              f"on {s.scorer.images} images each" + (
                  f"; re-scored {s.whole.evaluations} finalists in {s.whole.seconds:.1f} s on the whole "
                  "validation split" if s.whole is not None else ""))
    else:
        summary = {"run_dir": str(s.run_dir), "evaluations": len(s.searches[0].cache),
                   "proposals": sum(len(x.history) for x in s.searches), "best": []}
    rescored = {"rescored": s.whole.evaluations, "rescoring_s": s.whole.seconds} if s.whole is not None else {}
    return {**summary, "scored": s.scorer.evaluations, "scoring_s": s.scorer.seconds, **rescored}


def winner_latency(s: Session) -> Callable[[ArchSpec], float] | None:
    """Measures an architecture as the latency table was measured (threads, batch, warmup, repeats, rounds), when
    the table was measured on this machine (device, model, torch); None otherwise, or without a table."""
    table = s.job.constraints[0].latency
    if table is None:
        return None
    from supernet.timing import Timing, machine, measure_arch

    if table.machine != machine(s.env.device):
        return None
    how = table.timing or {"warmup": 3, "repeats": 10, "rounds": 10}  # a table from before it recorded how
    timing = Timing(s.env.device, table.batch, warmup=how["warmup"], repeats=how["repeats"],
                    amp=table.dtype == "bfloat16")

    def measure(arch: ArchSpec) -> float:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(table.threads)
        try:
            return measure_arch(arch, timing, rounds=how["rounds"])  # as the table's networks were timed
        finally:
            torch.set_num_threads(threads)
    return measure


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evolve")
def main(cfg: DictConfig) -> None:
    run_app(lambda: evolve(cfg))


if __name__ == "__main__":
    check_overrides("evolve")
    main()
