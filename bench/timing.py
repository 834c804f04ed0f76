"""Interleaved timing: candidates run in alternation so machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved(fns: Sequence[Callable[[], object]], reps: int = 5, warmup: int = 1) -> list[float]:
    """Median seconds per call of each fn, measured round-robin ``reps`` times after ``warmup`` calls."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def interleaved_cpu(fns: Sequence[Callable[[], object]], reps: int = 5,
                    warmup: int = 1) -> tuple[list[float], list[float]]:
    """As :func:`interleaved`, with each call also timed on this process's CPU clock (``time.process_time``: every
    thread's CPU seconds, not the time the process waited for a core on a busy machine); returns the median wall
    seconds and the median CPU seconds per call of each fn."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            cpu[i].append(time.process_time() - c)
            wall[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]
