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
