"""Side-by-side timing shared by the benchmarks: the implementations' calls interleaved, so that a
slower moment of a shared machine hits all of them alike."""
from __future__ import annotations

import time
from typing import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of every fn, after `warmup` calls each; calls interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
