"""Latency as a search constraint: the lookup table measured on one device, and an architecture's predicted
latency as the sum of its blocks (as once-for-all and HAT predict it). Pure Python, no torch: the table is
measured by `python -m supernet.latency` (supernet/latency.py) and read here by the search.

A block is what a PSViT runs once per forward at given sizes, named by a key:

* ``embed:D``: patch embedding (+ CLS) + position embedding into dim D;
* ``basic:NxD`` / ``shared:NxD``: one cell of that op on N patch tokens of dim D (heads and MLP width follow
  from D, as the space fixes ``head_dim`` and ``mlp_ratio``);
* ``pool:N0xD0>N1xD1``: token pooling between stages;
* ``head:NxD``: the final norm and the classifier.

Identity cells cost nothing. ``predict(arch) = overhead_ms + scale * sum(blocks)``: a block timed alone is not
exactly what it costs inside a network (calls between modules, caches, threads waking), so ``overhead_ms`` and
``scale`` are fitted on calibration architectures timed end to end, spread over the whole range from all-identity
networks up, by least squares on the relative error (supernet/timing.py): fitted on random networks alone, whose
cell counts cluster mid-range, the line's intercept was extrapolated to the small end and dominated it there. A
table reports its error on the space's smallest and largest networks next to random ones.

A table identifies the machine it was measured on (device, CPU or GPU model, torch version; threads and batch are
its settings); the search refuses a table of another machine, or one that does not say which, unless told to use
it anyway (``latency_other_machine=true``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from space.app import atomic_write, config_hash
from space.arch import ArchSpec
from space.errors import UserError
from space.space import SearchSpace

FORMAT = "psvit-latency/1"


class LatencyError(UserError, ValueError):
    """A latency table that cannot serve this request; the message is one line naming the field."""


def block_keys(arch: ArchSpec) -> list[str]:
    """The blocks ``PSViT(arch)`` runs, in forward order (identity cells left out)."""
    s0 = arch.stages[0]
    keys = [f"embed:{s0.dim}"]
    for i, s in enumerate(arch.stages):
        if i > 0:
            p = arch.stages[i - 1]
            keys.append(f"pool:{p.tokens}x{p.dim}>{s.tokens}x{s.dim}")
        keys += [f"{op}:{s.tokens}x{s.dim}" for op in s.cells if op != "identity"]
    last = arch.stages[-1]
    keys.append(f"head:{last.tokens}x{last.dim}")
    return keys


def space_blocks(space: SearchSpace) -> list[str]:
    """Every block some architecture of ``space`` runs, sorted (what a table of the space must time)."""
    keys: set[str] = set()
    for chain in space.chains:
        keys.add(f"embed:{chain[0][1]}")
        for i, (t, d) in enumerate(chain):
            if i > 0:
                keys.add(f"pool:{chain[i - 1][0]}x{chain[i - 1][1]}>{t}x{d}")
            keys.update(f"{op}:{t}x{d}" for op in space.ops if op != "identity")
        keys.add(f"head:{chain[-1][0]}x{chain[-1][1]}")
    return sorted(keys)


def parse_block(key: str) -> tuple[str, tuple[int, ...]]:
    """``"pool:49x32>16x48"`` -> ``("pool", (49, 32, 16, 48))``; ``"embed:32"`` -> ``("embed", (32,))``."""
    kind, _, sizes = key.partition(":")
    return kind, tuple(int(v) for v in sizes.replace(">", "x").split("x"))


# What platform.machine() says when a table could not read its CPU model: such a table identifies no machine.
NO_MODEL = ("", "x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "ppc64le", "s390x", "riscv64", "unknown")


@dataclass(frozen=True)
class Accuracy:
    """How well the table predicts whole forwards it was not calibrated on."""

    archs: int  # random architectures measured end to end
    mape: float  # mean absolute percentage error of predicted vs measured, in %
    kendall_tau: float  # rank agreement of predicted vs measured
    max_ape: float  # the worst architecture's absolute percentage error, in %
    # the space's smallest and largest networks (by MACs): {"arch", "macs", "predicted_ms", "measured_ms",
    # "error_pct"} (signed: + = predicted slower than measured); None in tables from before they were measured
    smallest: dict[str, Any] | None = None
    largest: dict[str, Any] | None = None


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per block of one space on one device, and where and how they were measured."""

    space: str  # the space's name
    space_hash: str  # of its config (as a supernet checkpoint's space_hash): a table fits exactly one space
    device: str  # "cpu" or "cuda"
    device_name: str  # the processor or GPU model it was measured on
    torch: str  # torch version
    threads: int  # torch intra-op threads
    batch: int  # images per forward
    dtype: str  # float32, or bfloat16 (CUDA autocast)
    overhead_ms: float  # a whole forward beyond the sum of its blocks
    blocks: dict[str, float]  # block key -> median milliseconds
    scale: float = 1.0  # milliseconds of a whole forward per millisecond of its blocks timed alone (fitted)
    accuracy: Accuracy | None = None  # on architectures other than the calibration ones
    drift: float | None = None  # the machine's slowest / fastest speed while the table was timed (1.0: steady)
    timing: dict[str, int] | None = None  # how: {"warmup", "repeats", "rounds"} (None: a table from before it was kept)
    cores: int | None = None  # CPU cores the measuring process could use (None: a table from before it was kept)
    format: str = field(default=FORMAT)

    @property
    def machine(self) -> dict[str, str]:
        """What identifies the machine the table was measured on."""
        return {"device": self.device, "device_name": self.device_name, "torch": self.torch}

    def check_machine(self, here: dict[str, str], allow_other: bool = False, source: str = "latency_table") -> None:
        """Raise LatencyError unless the table was measured on the machine ``here`` describes (``machine``'s keys),
        or ``allow_other``; a table that does not name its CPU or GPU model identifies no machine.

        Raises:
            LatencyError: one line naming both machines and the two ways out.
        """
        if allow_other:
            return
        way = ("measure a table here (python -m supernet.latency), or pass latency_other_machine=true to predict "
               "with it anyway")
        if self.device_name.strip().lower() in NO_MODEL:
            raise LatencyError(f"{source}: the table does not identify its machine (device_name {self.device_name!r}: "
                               f"measured before tables recorded the CPU model); {way}")
        diff = [k for k in ("device", "device_name", "torch") if self.machine[k] != here.get(k)]
        if diff:
            theirs = ", ".join(f"{k} {self.machine[k]!r}" for k in diff)
            ours = ", ".join(f"{k} {here.get(k)!r}" for k in diff)
            raise LatencyError(f"{source}: measured on another machine ({theirs}; this one: {ours}); {way}")

    def missing(self, space: SearchSpace) -> list[str]:
        """The blocks of ``space`` the table lacks (a truncated or edited file)."""
        return [k for k in space_blocks(space) if k not in self.blocks]

    def check_space(self, space: SearchSpace, source: str = "latency_table") -> None:
        """Raise LatencyError unless the table was measured for ``space`` and holds every block of it."""
        if self.space_hash != config_hash(space.to_config()):
            raise LatencyError(f"{source}: the table was measured for space {self.space!r} (hash {self.space_hash}), "
                               f"not for {space.name!r} (hash {config_hash(space.to_config())}); measure one with "
                               f"python -m supernet.latency space={space.name}")
        missing = self.missing(space)
        if missing:
            raise LatencyError(f"{source}: the table lacks {len(missing)} of the {len(space_blocks(space))} blocks of "
                               f"space {space.name!r} (e.g. {missing[0]!r}): a truncated or edited file; measure it "
                               f"again with python -m supernet.latency space={space.name}")

    def check_device(self, device: str, threads: int | None, batch: int | None,
                     source: str = "latency_table") -> None:
        """Raise LatencyError unless the table was measured on ``device`` with these threads and batch (the
        setting a measured latency is compared with)."""
        want = {"device": device, "threads": threads, "batch": batch}
        for k, v in want.items():
            if v is not None and getattr(self, k) != v:
                raise LatencyError(f"{source}: measured with {k}={getattr(self, k)}, not {k}={v}; measure a table "
                                   f"for this setting (python -m supernet.latency {k}={v} ...)")

    def predict(self, arch: ArchSpec) -> float:
        """Predicted milliseconds of one forward of ``PSViT(arch)`` at the table's batch.

        Raises:
            LatencyError: a block of ``arch`` is not in the table (an architecture of another space).
        """
        total = 0.0
        for key in block_keys(arch):
            ms = self.blocks.get(key)
            if ms is None:
                raise LatencyError(f"arch: block {key!r} is not in the latency table of space {self.space!r} (the "
                                   "architecture is not in that space)")
            total += ms
        return self.overhead_ms + self.scale * total

    def predicted_range(self, space: SearchSpace) -> tuple[float, float]:
        """The exact smallest and largest prediction over ``space``: cells are chosen independently, so per
        (tokens, dim) chain the fixed blocks plus, per stage, its cells times its fastest / slowest op."""
        fast, slow = self.extreme_archs(space)
        return self.predict(fast), self.predict(slow)

    def extreme_archs(self, space: SearchSpace) -> tuple[ArchSpec, ArchSpec]:
        """The fastest and the slowest predicted architectures of ``space``: cells are chosen independently, so per
        (tokens, dim) chain the fixed blocks plus, per stage, its cells times its fastest / slowest op.

        Raises:
            LatencyError: the table lacks a block of the space.
        """
        missing = self.missing(space)
        if missing:
            raise LatencyError(f"latency_table: the table lacks block {missing[0]!r} of space {space.name!r} "
                               f"({len(missing)} missing); measure it again with python -m supernet.latency")

        def op_ms(op: str, t: int, d: int) -> float:
            return 0.0 if op == "identity" else self.blocks[f"{op}:{t}x{d}"]

        ends: dict[str, tuple[float, ArchSpec]] = {}
        for chain in space.chains:
            (t_last, d_last) = chain[-1]
            fixed = self.blocks[f"embed:{chain[0][1]}"] + self.blocks[f"head:{t_last}x{d_last}"]
            fixed += sum(self.blocks[f"pool:{a[0]}x{a[1]}>{b[0]}x{b[1]}"] for a, b in zip(chain, chain[1:]))
            for which, pick in (("fast", min), ("slow", max)):
                ops = [pick(space.ops, key=lambda op, t=t, d=d: op_ms(op, t, d)) for t, d in chain]
                ms = fixed + sum(s.cells * op_ms(op, t, d) for op, (t, d), s in zip(ops, chain, space.stages))
                better = which not in ends or (ms < ends[which][0] if which == "fast" else ms > ends[which][0])
                if better:
                    ends[which] = (ms, space._build(chain, tuple((op,) * s.cells for op, s in zip(ops, space.stages))))
        return ends["fast"][1], ends["slow"][1]

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": d.pop("format"), **d}

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=1) + "\n"))

    @classmethod
    def load(cls, path: str | Path, source: str = "latency_table") -> LatencyTable:
        """Read a table written by :meth:`save`.

        Raises:
            LatencyError: missing file, not JSON, another format version, or a malformed field.
        """
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise LatencyError(f"{source}: {p} does not exist (measure one with python -m supernet.latency)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LatencyError(f"{source}: {p} is not a latency table ({type(e).__name__})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise LatencyError(f"{source}: {p} has format {got!r}, not {FORMAT!r} (measure it again with "
                               "python -m supernet.latency)")
        try:
            acc = d.get("accuracy")
            table = cls(**{**d, "accuracy": Accuracy(**acc) if acc is not None else None})
            if not isinstance(table.device_name, str) or not isinstance(table.blocks, dict):
                raise TypeError("device_name must be a string, blocks a mapping")
        except TypeError as e:
            raise LatencyError(f"{source}: {p} is malformed ({e})") from None
        if table.timing is not None and not (
                isinstance(table.timing, dict) and set(table.timing) == {"warmup", "repeats", "rounds"}
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in table.timing.values())):
            raise LatencyError(f"{source}: {p} has a malformed timing (warmup, repeats and rounds: integers >= 0)")
        bad = [k for k, v in table.blocks.items() if not isinstance(v, (int, float)) or not v >= 0]
        if bad or not isinstance(table.overhead_ms, (int, float)) or not isinstance(table.scale, (int, float)) \
                or not table.scale > 0:
            raise LatencyError(f"{source}: {p} has a malformed time (block {bad[0] if bad else 'overhead_ms/scale'!r})")
        return table

