"""What the study trains, in the order the workers take it. Every architecture set is drawn from fixed seeds by
space/samplers.py, so every machine plans the same units.

- pilot: 8 architectures (the range's smallest and largest, two more range points, 4 spread over the band) x
  2 seeds x doubling schedules (1, 2, 4, 8 epochs): picks the schedule E at which the ranking has settled.
- study: everything else, at the pilot's E, in the order that decides the answer first: F1's supernets
  (uniform and sandwich), the search on the uniform one, the searched net and its DeiT-like matches (F2/F3,
  3 seeds), F1's band ground truth, the pilot's 4E runs (do they keep E's ranking?), F3's plain-space
  supernet (beside F1's range ground truth), its search and its winner, F1's range ground truth, F3's nets
  again at 4E (the DeiT-like nets lie outside the pilot's space: does their gap hold with longer training?),
  then the pilot's longest runs. While no E is chosen (or a longer pair has unsettled it), the study's queue
  is the pilot's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from scripts.study.units import REPO, Standalone

if TYPE_CHECKING:
    from space.arch import ArchSpec

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
    """F1's stand-alone runs at schedule ``epochs`` (the pilot's runs at that schedule are among them): the band
    first (it decides F2 too), seed by seed (a set's first seeds give a usable ranking early), costliest first."""
    band = [Standalone.of(a.to_dict(), s, epochs) for a in band_set() for s in BAND_SEEDS]
    wide = [Standalone.of(a.to_dict(), s, epochs) for a in f1_range() for s in RANGE_SEEDS]
    return [u for units in (band, wide) for u in sorted(units, key=lambda u: (u.seed, -u.cost()))]


def supernets() -> list:
    """The default rule (uniform) and sandwich at equal training cost, each kept at 8 points of its run and
    scored there; then the same uniform training in fmnist_2d_plain (no pooling, no sharing) for F3."""
    from scripts.study.units import Supernet

    sandwich = 8 * round(SUPERNET_STEPS / SANDWICH_COST / 8)  # a multiple of its 8 kept points
    return [Supernet("uniform", SUPERNET_STEPS, SUPERNET_STEPS // 8, (), FIDELITY_SETS),
            Supernet("sandwich", sandwich, sandwich // 8, ("sampler=sandwich",), FIDELITY_SETS),
            Supernet("plain", SUPERNET_STEPS, SUPERNET_STEPS, (), (), space="fmnist_2d_plain")]


def searches() -> list:
    """The default search (evolve's defaults, seed 0) inside the band, on the uniform supernet (F2, F3) and on
    the plain-space one (F3)."""
    from scripts.study.units import Search

    by_rule = {s.rule: s for s in supernets()}
    return [Search(by_rule["uniform"], BAND), Search(by_rule["plain"], BAND)]


def searched(search) -> "ArchSpec | None":
    """The winner of ``search`` from its committed result file, or None while it has none."""
    import json

    from space.arch import ArchSpec

    return ArchSpec.from_dict(json.loads(search.result.read_text())["arch"]) if search.result.exists() else None


def deit_matches(arch) -> dict:
    """DeiT-like nets (one stage of basic layers, CLS token, no pooling or sharing) closest to ``arch`` in MACs
    and in parameters, over the same widths as `make demo`'s baseline."""
    from space.baselines import deit_like
    from space.cost import macs, params

    sp = space()
    return {by: deit_like(target, sp.img_size, sp.patch_size, sp.in_chans, sp.num_classes, sp.mlp_ratio,
                          sp.head_dim, dims=[16, 24, 32, 48, 64], by=by)
            for by, target in (("macs", macs(arch)), ("params", params(arch)))}


F23_SEEDS = (0, 1, 2)


def final_nets(epochs: int) -> list[Standalone]:
    """F2/F3's stand-alone runs at ``epochs``: each finished search's winner and, for the PSViT search, its two
    DeiT-like matches, 3 seeds each (the random band nets are F1's band set)."""
    units = []
    for search in searches():
        arch = searched(search)
        if arch is None:
            continue
        nets = [arch] + (list(deit_matches(arch).values()) if search.supernet.space == "fmnist_2d" else [])
        units += [Standalone.of(a.to_dict(), s, epochs) for a in nets for s in F23_SEEDS]
    return units


def study() -> list:
    """The whole queue at the pilot's schedule E, asked again after every unit (a finished search adds its
    nets' trainings; a longer pilot pair that unsettles E moves everything to the next settled E, or, when no
    longer schedule is left to settle, leaves no E: the queue is then the pilot's, and the page says that F1-F3
    describe nets trained for the first settled schedule). While the pilot has no E, the queue is the pilot's
    remaining runs."""
    from scripts.study.pilot import chosen_schedule

    e = chosen_schedule()
    if e is None:
        return pilot()
    uniform, sandwich, plain = supernets()
    psvit, plain_search = searches()
    truth = ground_truth(e)
    band = [u for u in truth if u.key in {arch_key(a) for a in band_set()}]
    confirm = [u for u in pilot() if u.epochs == 4 * e]  # tau(2E, 4E): does the ranking at E hold?
    # F1's supernets and F2 first (the answer a NAS framework exists for), then the pilot's next schedule (the
    # supernets rank the range's large nets higher than E's ground truth does: is E's ranking settled?), then
    # F3's plain supernet, which one worker trains while the other trains F1's range (its search and nets take
    # the next free worker once it is done), then F3's nets again at 4E, then the pilot's longest schedule
    wide = [u for u in truth if u not in band]
    return ([uniform, sandwich, psvit] + final_nets(e)[:9] + band + confirm + [plain, plain_search]
            + final_nets(e) + wide + f3_longer(e) + [u for u in pilot() if u.epochs > e])


def f3_longer(e: int) -> list[Standalone]:
    """F3's nets again at 4E, cheapest first: the DeiT-like and plain-space nets lie outside the pilot's space, so
    the pilot's settled ranking says nothing about whether their gap to PSViT at E is the nets' or the short
    schedule's."""
    return sorted(final_nets(4 * e), key=Standalone.cost)


def arch_key(arch) -> str:
    from scripts.study.units import arch_hash

    return arch_hash(arch.to_dict())
