"""One unit of the study = one small committed JSON file under docs/study/. A unit is done when its file
exists; a worker claims a unit with an flock on a file under runs/study/claims/ (this machine only), runs it
through the project's own apps, and writes its file atomically. A fresh machine with the repository
continues where the last one stopped: nothing but the result files is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The checkout whose docs/study/ receives (and whose git commits) the result files: the code may run from a
# frozen copy of the repository (a git worktree) while the main checkout changes under development.
HOME = Path(os.environ.get("PSVIT_STUDY_HOME", REPO))
RESULTS = HOME / "docs" / "study"
WORK = HOME / "runs" / "study"
PY = sys.executable


def arch_hash(arch_dict: dict) -> str:
    from space.arch import ArchSpec

    return hashlib.sha256(ArchSpec.from_dict(arch_dict).to_json().encode()).hexdigest()[:12]


def machine() -> dict[str, Any]:
    """Where a unit ran: CPU model, cores, torch, threads."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "host": platform.node(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


@dataclass(frozen=True)
class Standalone:
    """``arch`` trained from scratch by `python -m supernet.retrain` for ``epochs`` epochs with ``seed``
    (init and data order): warmup 10% of the schedule, then cosine (conf/optim/adamw.yaml otherwise), light
    recipe, batch 256, Fashion-MNIST's 50k training split; scored on the 10k held-out validation split (the
    ranking's ground truth) and on the official 10k test split (F2/F3)."""

    arch: dict = field(hash=False, compare=False)
    seed: int
    epochs: int
    key: str = ""  # the architecture's hash

    @staticmethod
    def of(arch_dict: dict, seed: int, epochs: int) -> "Standalone":
        return Standalone(arch_dict, seed, epochs, arch_hash(arch_dict))

    @property
    def name(self) -> str:
        return f"standalone/{self.key}_s{self.seed}_e{self.epochs}"

    @property
    def result(self) -> Path:
        return RESULTS / f"{self.name}.json"

    def cost(self) -> float:
        """Relative cost (MACs, with a floor for the per-step overhead of tiny nets) x epochs."""
        from space.arch import ArchSpec
        from space.cost import macs

        return max(macs(ArchSpec.from_dict(self.arch)), 1.5e6) * self.epochs

    def run(self) -> dict[str, Any]:
        from space.arch import ArchSpec
        from space.cost import macs, params

        run_dir = WORK / self.name
        run_dir.mkdir(parents=True, exist_ok=True)
        arch_file = run_dir / "arch.json"
        ArchSpec.from_dict(self.arch).save(arch_file)
        cmd = [PY, "-m", "supernet.retrain", f"arch={arch_file}", f"run_dir={run_dir}", f"seed={self.seed}",
               f"optim.epochs={self.epochs}", f"optim.warmup_epochs={0.1 * self.epochs:g}", "eval.every=100000000",
               "progress=false", "compile=false", "ckpt_every=200", "log_every=50"]
        t, cpu = time.time(), child_cpu()
        app(cmd, run_dir)
        res = json.loads((run_dir / "result.json").read_text())
        a = ArchSpec.from_dict(self.arch)
        return {"unit": "standalone", "arch": self.arch, "short": a.short(), "macs": macs(a), "params": params(a),
                "seed": self.seed, "epochs": self.epochs, "steps": res["steps"],
                "schedule": {"batch": 256, "lr": 1e-3, "warmup_epochs": 0.1 * self.epochs, "cosine_to": 1e-5,
                             "weight_decay": 0.05, "label_smoothing": 0.1, "recipe": res["recipe"]},
                "val_top1": res["val_top1"], "test_top1": res["test_top1"], "wall_s": round(time.time() - t, 1),
                "cpu_s": round(child_cpu() - cpu, 1),
                # a run resumed from an earlier process (a worker stopped mid-way) spans several event files
                "train_wall_s": round(train_wall_seconds(run_dir / "tb"), 1),
                "machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(cmd[1:])}


def child_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: a unit's cost, whatever the load."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def app(cmd: list[str], run_dir: Path) -> None:
    """Run one of the project's apps on one thread, its output appended to run_dir/log.txt."""
    with open(run_dir / "log.txt", "a") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {rc}; see {run_dir / 'log.txt'}")


@dataclass(frozen=True)
class Supernet:
    """A supernet of ``space`` trained by `python -m supernet.train` with ``rule``'s sampler for ``steps``
    steps, keeping every ``keep``-th step's checkpoint; then, with ``fidelity`` sets, each kept checkpoint's
    inherited scores of the study's architectures (whole split and the search's 1000-image fitness set) by
    `python -m search.fidelity seeds=0`. The result file holds those scores per checkpoint; the checkpoints stay
    in runs/ (never committed: a unit that needs one on a fresh machine trains the supernet again, bit-identical
    for the same seed)."""

    rule: str
    steps: int
    keep: int
    overrides: tuple[str, ...]
    fidelity: tuple[str, ...]  # the architecture sets (archs, band, band_archs, seed); () = train only
    space: str = "fmnist_2d"

    @property
    def name(self) -> str:
        return f"supernet/{self.rule}_{self.steps}"

    @property
    def result(self) -> Path:
        return RESULTS / f"{self.name}.json"

    @property
    def run_dir(self) -> Path:
        return WORK / self.name

    def train_command(self) -> list[str]:
        return [PY, "-m", "supernet.train", f"run_dir={self.run_dir}", f"space={self.space}",
                f"max_steps={self.steps}", f"keep_every={self.keep}", "ckpt_every=100", "eval.every=0",
                "progress=false", *self.overrides]

    def checkpoint(self) -> Path:
        """The trained supernet's last.ckpt, training it first (or resuming it) when this machine lacks it."""
        last = self.run_dir / "last.ckpt"
        final = self.run_dir / f"step_{self.steps}.ckpt"
        if not final.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            app(self.train_command(), self.run_dir)
        return last

    def run(self) -> dict[str, Any]:
        t, cpu = time.time(), child_cpu()
        self.checkpoint()
        train_cpu = child_cpu() - cpu
        scored = []
        for step in range(self.keep, self.steps + 1, self.keep) if self.fidelity else ():
            out = self.run_dir / f"fidelity_{step}"
            if not (out / "fidelity.json").exists():  # a restarted unit keeps the checkpoints already scored
                app([PY, "-m", "search.fidelity", f"checkpoint={self.run_dir / f'step_{step}.ckpt'}",
                     f"run_dir={out}", "seeds=0", "progress=false", "eval_images=1000", *self.fidelity], self.run_dir)
            scored.append((step, json.loads((out / "fidelity.json").read_text())))
        return {"unit": "supernet", "rule": self.rule, "space": self.space, "steps": self.steps,
                "keep_every": self.keep, "overrides": list(self.overrides), "fidelity": list(self.fidelity),
                **compact_points(scored), "train_cpu_s": round(train_cpu, 1),
                "train_wall_s": round(train_wall_seconds(self.run_dir / "tb"), 1),
                "cpu_s": round(child_cpu() - cpu, 1), "wall_s": round(time.time() - t, 1), "machine": machine(),
                "date": time.strftime("%Y-%m-%d"), "command": " ".join(map(str, self.train_command()[1:]))}


def compact_points(scored: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The fidelity app's outputs of several checkpoints (step, fidelity.json) as one small record: the
    architectures and their groups once, then per checkpoint the inherited top-1 of each, in that order, on the
    whole validation split and on the fitness set."""
    if not scored:
        return {"archs": [], "groups": [], "points": []}
    first = scored[0][1]
    archs = [r["arch"] for r in first["archs"]]
    points = []
    for step, fid in scored:
        if [r["arch"] for r in fid["archs"]] != archs:
            raise RuntimeError(f"step {step}: the fidelity app scored other architectures than at step {scored[0][0]}")
        points.append({"step": step, "whole": [r["inherited_val_top1"] for r in fid["archs"]],
                       "fitness": [r["inherited_fitness_top1"] for r in fid["archs"]]})
    return {"archs": archs, "groups": [r["groups"] for r in first["archs"]], "points": points,
            "val_images": first["data"]["val_images"], "fitness_images": first["data"]["fitness_images"]}


def train_wall_seconds(tb: Path) -> float:
    """Wall time of a training's processes (a supernet's or a stand-alone run's), from their TensorBoard event
    files (one per process: a resumed training spans several): the sum of each file's first-to-last event. A
    training interrupted and resumed by another worker process is counted whole, where the unit's own CPU clock
    sees only its last part."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    total = 0.0
    for path in sorted(tb.glob("events.out.tfevents.*")):
        times = [e.wall_time for e in EventFileLoader(str(path)).Load()]
        if len(times) > 1:
            total += max(times) - min(times)
    return total


@dataclass(frozen=True)
class Search:
    """`python -m search.evolve` with its defaults (evolution, 1000 fitness images, 10 finalists re-scored on
    the whole validation split) on ``supernet``'s final checkpoint, inside the FLOPs band ``band``; ready once
    the supernet's unit has its result file. The result file holds the winner and what the search said of it."""

    supernet: Supernet
    band: tuple[float, float]
    seed: int = 0
    overrides: tuple[str, ...] = ()  # more search.evolve overrides (tests: a tiny evolution)

    @property
    def name(self) -> str:
        return f"search/{self.supernet.rule}_{self.supernet.steps}_s{self.seed}"

    @property
    def result(self) -> Path:
        return RESULTS / f"{self.name}.json"

    def ready(self) -> bool:
        return self.supernet.result.exists()

    def run(self) -> dict[str, Any]:
        from space.arch import ArchSpec
        from space.cost import macs, params

        run_dir = WORK / self.name
        run_dir.mkdir(parents=True, exist_ok=True)
        t, cpu = time.time(), child_cpu()
        ckpt = self.supernet.checkpoint()
        cmd = [PY, "-m", "search.evolve", f"checkpoint={ckpt}", f"run_dir={run_dir}", f"seed={self.seed}",
               f"flops_min={self.band[0]:g}", f"flops_max={self.band[1]:g}", "progress=false", *self.overrides]
        app(cmd, run_dir)
        best = run_dir / "best_arch.json"
        arch, meta = ArchSpec.load(best), json.loads(best.read_text())["meta"]
        import re

        said = (run_dir / "log.txt").read_text()
        scored = re.findall(r"scored (\d+) candidates in ([\d.]+) s", said)
        rescored = re.findall(r"re-scored (\d+) finalists in ([\d.]+) s", said)
        return {"unit": "search", "supernet": self.supernet.name, "space": self.supernet.space,
                "band": list(self.band), "seed": self.seed, "arch": arch.to_dict(), "short": arch.short(),
                "macs": macs(arch), "params": params(arch), "fitness_acc": meta.get("fitness_acc"),
                "val_acc": meta["val_acc"], "finalists": meta.get("finalists"),
                "lead_over_runner_up": meta.get("lead_over_runner_up"),
                "proposals": sum(1 for _ in open(run_dir / "history.jsonl")),
                # the scoring time the evolve app reported (its last run: a resumed search counts only its rest)
                "scored": int(scored[-1][0]) if scored else None,
                "scoring_s": float(scored[-1][1]) if scored else None,
                "rescored": int(rescored[-1][0]) if rescored else None,
                "rescoring_s": float(rescored[-1][1]) if rescored else None,
                "cpu_s": round(child_cpu() - cpu, 1), "wall_s": round(time.time() - t, 1), "machine": machine(),
                "date": time.strftime("%Y-%m-%d"), "command": " ".join(map(str, cmd[1:]))}


# ----------------------------------------------------------------------------- the queue
def done(unit) -> bool:
    return unit.result.exists()


_HELD: dict[str, int] = {}  # unit name -> the open descriptor whose flock is this process's claim


def _claim_path(unit) -> Path:
    return WORK / "claims" / (unit.name.replace("/", "__") + ".lock")


def claim(unit) -> bool:
    """Take ``unit`` for this process unless another process holds it. A claim is an flock on the unit's lock
    file, held until its result is written: the kernel drops it when its process dies (kill -9 included), so a
    dead worker's claim frees itself, and no two processes can hold one at once."""
    import fcntl

    path = _claim_path(unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # for a person looking at the file; the flock is the claim
    _HELD[unit.name] = fd
    return True


def release(unit) -> None:
    fd = _HELD.pop(unit.name, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def write_result(unit, record: dict[str, Any], commit: bool) -> None:
    """Write the unit's result file; with ``commit``, also re-render docs/results.md from every result file and
    commit both (under a lock: two workers never interleave), so every commit's page is its files' page."""
    import fcntl

    unit.result.parent.mkdir(parents=True, exist_ok=True)
    tmp = unit.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, unit.result)
    if not commit:
        return
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "commit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # the page is rendered by the receiving checkout's own code (the worker's may be a frozen copy), so a
        # renderer improved under development needs no restart; if it fails, the result file is committed alone
        rendered = subprocess.run([PY, str(HOME / "scripts" / "experiments.py"), "render", "--page"], cwd=HOME,
                              env={k: v for k, v in os.environ.items() if k != "PSVIT_STUDY_HOME"},
                              capture_output=True, text=True)
        if rendered.returncode != 0:
            print(f"study: docs/results.md not rendered: {rendered.stderr.strip()[-500:]}", flush=True)
        pages = rendered.stdout.split() if rendered.returncode == 0 else []
        what = record.get("short") or ", ".join(f"{k} {record[k]}" for k in ("space", "steps") if k in record)
        msg = f"study: {unit.name} ({what}): " + ", ".join(
            f"{k} {record[k]:.4f}" for k in ("val_top1", "test_top1", "val_acc") if isinstance(record.get(k), float))
        paths = [str(unit.result), *pages]
        for _ in range(30):  # the developer may be committing too: retry while the index is locked
            added = subprocess.run(["git", "add", "--", *paths], cwd=HOME, capture_output=True).returncode == 0
            if added and subprocess.run(["git", "commit", "-q", "-m", msg, "--", *paths], cwd=HOME,
                                        capture_output=True).returncode == 0:
                return
            time.sleep(10)
        print(f"study: could not commit {unit.result}", flush=True)


def held_by_another(unit) -> bool:
    """Whether a process other than this one holds ``unit``'s claim."""
    import fcntl

    if unit.name in _HELD:
        return False
    try:
        fd = os.open(_claim_path(unit), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def drain(plan, commit: bool, wait: float = 0.0) -> None:
    """Run every unit not yet done, in the plan's order, skipping those another worker holds and those not
    ready (a search before its supernet). ``plan`` is a list, or a callable that is asked again after each
    unit (a finished search adds its architecture's trainings). With ``wait`` > 0, a worker that finds nothing
    to start while another worker still holds a unit polls every ``wait`` seconds instead of exiting."""
    while True:
        units = plan() if callable(plan) else plan
        todo = [u for u in units if not done(u)]
        unit = next((u for u in todo if getattr(u, "ready", lambda: True)() and claim(u)), None)
        if unit is None:
            if wait > 0 and any(held_by_another(u) for u in todo):
                time.sleep(wait)
                continue
            return
        if done(unit):  # another worker finished it after this one listed what was left
            release(unit)
            continue
        t = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {unit.name} ...", flush=True)
        record = unit.run()
        write_result(unit, record, commit)
        release(unit)
        print(f"[{time.strftime('%H:%M:%S')}] {unit.name} done in {(time.time() - t) / 60:.1f} min: "
              + ", ".join(f"{k} {record[k]:.4f}" for k in ("val_top1", "test_top1", "val_acc")
                          if isinstance(record.get(k), float)), flush=True)
