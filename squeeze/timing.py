"""Latency measurement: warm-up, then many timed runs; median and p90 in milliseconds."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(fn: Callable[[], object], runs: int = 50, warmup: int = 5, min_seconds: float = 0.2) -> dict:
    """Call `fn` `warmup` times untimed, then at least `runs` times (more if they take under `min_seconds`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 100 * runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "min": float(ms.min()),
            "runs": int(len(ms))}
