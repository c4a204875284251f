"""This machine, as the caches name it: its CPU model (tuning records and goal latency tables are only valid on
the machine they were timed on)."""
from __future__ import annotations

import platform


def host_model() -> str:
    """This machine's CPU model ("AMD EPYC 9454 48-Core Processor"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Processor")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
