"""What the study trains, in the order the workers take it. Every architecture set is drawn from fixed seeds by
space/samplers.py, so every machine plans the same units.

- pilot: 8 architectures (the range's smallest and largest, two more range points, 4 spread over the band) x
  2 seeds x doubling schedules (1, 2, 4, 8 epochs): picks the schedule E at which the ranking has settled.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from scripts.study.units import REPO, Standalone

BAND = (3.5e6, 4.5e6)  # MACs: candidates of about the demo's 4 M budget
PILOT_SCHEDULES = (1, 2, 4, 8)
PILOT_SEEDS = (0, 1)


def space():
    from space.space import SearchSpace

    return SearchSpace.from_config(OmegaConf.load(REPO / "conf" / "space" / "fmnist_2d.yaml"))


def range_archs():
    """F1's range set: 24 architectures stratified over fmnist_2d's whole FLOPs range (seed 0), by MACs."""
    from space.samplers import stratified_archs

    return stratified_archs(space(), 24, 0)


def band_set():
    """F1's band set and F2's random architectures: 12 uniform architectures inside the band (seed 0)."""
    from space.samplers import band_archs

    return band_archs(space(), 12, *BAND, seed=0)


def pilot_archs():
    r, b = range_archs(), band_set()
    return [r[0], r[1], b[0], b[4], b[7], b[11], r[8], r[-1]]


def pilot() -> list[Standalone]:
    units = [Standalone.of(a.to_dict(), s, e) for e in PILOT_SCHEDULES for a in pilot_archs() for s in PILOT_SEEDS]
    # shortest schedules first (their figures are usable early), the costliest first within one
    return sorted(units, key=lambda u: (u.epochs, -u.cost()))


# ----------------------------------------------------------------------------- F1 at the chosen schedule
F1_RANGE = 12  # every other architecture of the 24-architecture range set: the range's largest cost up to 6x a
# band net, so the range set is half of F1's old one and the band (where the search decides) keeps all 12
RANGE_SEEDS, BAND_SEEDS = (0, 1), (0, 1, 2)  # the band's third seed also serves F2 (>= 3 seeds per random net)
SUPERNET_STEPS = 8000  # uniform: about 41 epochs of the 50k training split at batch 256, kept every 1000 steps
SANDWICH_COST = 5.51  # sandwich's cost per step relative to uniform's (make bench, "by sampler")
FIDELITY_SETS = ("archs=24", "band_archs=12", f"band=[{BAND[0]:g},{BAND[1]:g}]", "seed=0")


def f1_range():
    return range_archs()[::2]


def ground_truth(epochs: int) -> list[Standalone]:
    """F1's stand-alone runs at schedule ``epochs`` (the pilot's runs at that schedule are among them)."""
    units = [Standalone.of(a.to_dict(), s, epochs) for a in band_set() for s in BAND_SEEDS]
    units += [Standalone.of(a.to_dict(), s, epochs) for a in f1_range() for s in RANGE_SEEDS]
    return sorted(units, key=lambda u: -u.cost())


def supernets() -> list:
    """The default rule (uniform) and sandwich at equal training cost, each kept at 8 points of its run."""
    from scripts.study.units import Supernet

    sandwich = 8 * round(SUPERNET_STEPS / SANDWICH_COST / 8)  # a multiple of its 8 kept points
    return [Supernet("uniform", SUPERNET_STEPS, SUPERNET_STEPS // 8, (), FIDELITY_SETS),
            Supernet("sandwich", sandwich, sandwich // 8, ("sampler=sandwich",), FIDELITY_SETS)]


def f1() -> list:
    """The supernets first (the longest units), then the ground truth at the pilot's schedule E."""
    from scripts.study.pilot import chosen_schedule

    e = chosen_schedule()
    if e is None:
        raise SystemExit("f1: the pilot has not chosen a schedule yet (see docs/results.md); run the pilot first")
    return supernets() + ground_truth(e)
