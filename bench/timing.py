"""Timing helper shared by the `bench/` scripts (run as `python bench/NAME.py`, so this directory
is on `sys.path`)."""

from __future__ import annotations

import time


def best_seconds(fn, repeats: int = 5, iters: int = 1) -> float:
    """Seconds per call of `fn`: the best of `repeats` rounds of `iters` calls each, after one
    warm-up call (compilation, allocator warm-up). `fn` must block until its result is ready."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return min(times)
