"""Latency measurement: warm-up, then many timed runs; median and p90 in milliseconds, and how busy the machine
was with other work meanwhile (`busy_elsewhere`, Linux: cores' worth of CPU time other processes and the
hypervisor took during the timed runs)."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np


def time_calls(fn: Callable[[], object], runs: int = 50, warmup: int = 5, min_seconds: float = 0.2) -> dict:
    """Call `fn` `warmup` times untimed, then at least `runs` times (more if they take under `min_seconds`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    before = _cpu_ticks()
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 100 * runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    result = {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "min": float(ms.min()),
              "runs": int(len(ms))}
    elsewhere = _busy_elsewhere(before, _cpu_ticks(), time.perf_counter() - start)
    if elsewhere is not None:
        result["busy_elsewhere"] = elsewhere
    return result


#: other work (in cores) above which a timing gets a note (`contention_note`)
BUSY_ELSEWHERE_NOTE = 0.25


def _cpu_ticks() -> tuple[int, int] | None:
    """(ticks all CPUs spent busy or stolen by the hypervisor, ticks this process spent) or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy, int(own[11]) + int(own[12])  # utime + stime of every thread of this process


def _busy_elsewhere(before, after, seconds: float) -> float | None:
    """Cores' worth of CPU that processes other than this one (and the hypervisor) used between two snapshots."""
    if before is None or after is None or seconds <= 0:
        return None
    ticks = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, ticks / os.sysconf("SC_CLK_TCK") / seconds), 2)


def contention_note(latency: dict, threads: int, engine: str) -> str | None:
    """A note for a timing taken while other work kept cores busy (None when the machine was quiet or unknown).

    TVM's thread pool splits every parallel loop statically and the caller waits for all threads at each kernel,
    so one descheduled thread stalls the kernel: measured with two other busy processes on 2 cores, a 2-thread
    squeezenet took 9-200 ms from run to run where ONNX Runtime (whose pool rebalances) took 9-15 ms.
    """
    busy = latency.get("busy_elsewhere")
    if busy is None or busy < BUSY_ELSEWHERE_NOTE:
        return None
    note = f"{engine} timed while other processes kept {busy:.2f} core(s) busy"
    if engine == "TVM" and threads > 1:
        return note + (f": at {threads} threads TVM's pool waits at every parallel kernel for each thread, so a "
                       "descheduled thread stalls it; this latency can be several times an idle machine's")
    return note + ": expect it above an idle machine's"
