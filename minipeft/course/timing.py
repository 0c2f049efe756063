"""Timing side by side: how the lessons (and bench/) compare the speed of models, kernels or
optimizers.

`interleaved_times(calls, repeats)` times every call `repeats` times; `fastest_ms(contestants,
run)` times `run(contestant)` for each contestant and returns each one's fastest run in
milliseconds (the benchmarks take medians instead, over more runs). Three rules make such a
comparison fair on a shared machine:

- a warm-up run each first (caches, lazy initialisation, the allocator's first requests);
- the contestants take turns, so that a slower moment of the machine hits them all alike;
- the fastest run is kept, not the mean or the median: whatever else runs on the machine (a
  second notebook, the other CI lane) only ever adds time, so the fastest run is the closest to
  the cost of the work itself.

On a GPU, work is queued and the call returns before it is done: each run waits for the device
(`torch.cuda.synchronize`) before the clock starts and before it stops.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


def _wait_for_gpu() -> None:
    """Wait until the GPU has finished its queued work (nothing to wait for without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(calls: Mapping[str, Callable[[], object]], repeats: int,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `repeats` timed calls of every call, after `warmup` untimed calls each;
    the calls take turns (see the module's docstring)."""
    if not calls:
        raise ValueError("nothing to time: pass at least one call, e.g. {'base': model}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time each call at least once")
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _wait_for_gpu()
            start = time.perf_counter()
            call()
            _wait_for_gpu()
            times[name].append(time.perf_counter() - start)
    return times


def fastest_ms(contestants: Mapping[str, T], run: Callable[[T], object],
               repeats: int = 10) -> pd.Series:
    """The fastest of `repeats` timed runs of `run(contestant)` for each contestant, in ms,
    after one warm-up run each; the contestants take turns (see the module's docstring).
    For example: `fastest_ms({"base": base_model, "merged": merged}, lambda m: m(**batch))`.
    """
    import pandas as pd     # the course's; bench/ uses interleaved_times, on machines without it

    times = interleaved_times({name: partial(run, contestant)
                               for name, contestant in contestants.items()}, repeats)
    return pd.Series({name: 1000 * min(t) for name, t in times.items()}, name="ms")
