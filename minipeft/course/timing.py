"""Timing side by side: how the lessons compare the speed of models, kernels or optimizers.

`fastest_ms(contestants, run)` times `run(contestant)` for each contestant and returns each
one's fastest run in milliseconds. Three rules make such a comparison fair on a shared machine:

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
from typing import TypeVar

import pandas as pd
import torch

T = TypeVar("T")


def _wait_for_gpu() -> None:
    """Wait until the GPU has finished its queued work (nothing to wait for without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def fastest_ms(contestants: Mapping[str, T], run: Callable[[T], object],
               repeats: int = 10) -> pd.Series:
    """The fastest of `repeats` timed runs of `run(contestant)` for each contestant, in ms,
    after one warm-up run each; the contestants take turns (see the module's docstring).
    For example: `fastest_ms({"base": base_model, "merged": merged}, lambda m: m(**batch))`.
    """
    if not contestants:
        raise ValueError("nothing to time: pass at least one contestant, e.g. {'base': model}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time each contestant at least once")
    for contestant in contestants.values():
        run(contestant)
    fastest = dict.fromkeys(contestants, float("inf"))
    for _ in range(repeats):
        for name, contestant in contestants.items():
            _wait_for_gpu()
            start = time.perf_counter()
            run(contestant)
            _wait_for_gpu()
            fastest[name] = min(fastest[name], 1000 * (time.perf_counter() - start))
    return pd.Series(fastest, name="ms")
