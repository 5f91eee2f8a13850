"""Timing helpers that ``bench`` and ``measure`` share: milliseconds per step, and the
memory bandwidth a matrix-vector product reaches on this machine."""

from __future__ import annotations

import time
from typing import Callable, List

import numpy as np


def time_steps(step: Callable[[int], object], tokens: List[int], warmup: int = 2) -> List[float]:
    for t in tokens[:warmup]:
        step(t)
    out = []
    for t in tokens[warmup:]:
        t0 = time.perf_counter()
        step(t)
        out.append(1000.0 * (time.perf_counter() - t0))
    return out


def gemv_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Bytes of a float32 matrix read per second by a matrix-vector product (best of repeats)."""
    n = int(np.sqrt(mb * 1024 * 1024 / 4))
    a = np.ones((n, n), np.float32)
    x = np.ones(n, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9
