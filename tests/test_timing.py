"""Latency figures say how busy the machine was with other work while they were taken (`busy_elsewhere`), and a
row timed on a busy machine says so in the terminal and in report.md (TVM's thread pool stalls when a thread is
descheduled, so such a figure can be several times an idle machine's)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cleanup_report
from squeeze import report as report_mod
from squeeze.timing import BUSY_ELSEWHERE_NOTE, contention_note, time_calls

linux = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="CPU accounting from /proc (Linux)")


@linux
def test_timing_counts_the_cpu_other_processes_take():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the spinner is running
        busy = time_calls(lambda: time.sleep(0.002), runs=10, min_seconds=1.0)["busy_elsewhere"]
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.7  # one core spun the whole time (plus whatever else this machine runs)
    own = time_calls(lambda: sum(range(20_000)), runs=10, min_seconds=0.5)
    assert "busy_elsewhere" in own and own["busy_elsewhere"] >= 0.0  # this process's own work is not counted


def test_contention_note_only_when_other_work_ran():
    assert contention_note({"p50": 1.0, "busy_elsewhere": BUSY_ELSEWHERE_NOTE / 2}, 2, "TVM") is None
    assert contention_note({"p50": 1.0}, 2, "TVM") is None  # not measured (not Linux)
    tvm = contention_note({"p50": 1.0, "busy_elsewhere": 1.3}, 2, "TVM")
    assert tvm.startswith("TVM timed while other processes kept 1.30 core(s) busy") and "stalls" in tvm
    assert "stalls" not in contention_note({"p50": 1.0, "busy_elsewhere": 1.3}, 1, "TVM")


def test_a_busy_timing_is_shown_in_the_terminal_and_report(tmp_path):
    rep = cleanup_report(tmp_path)
    busy = contention_note({"busy_elsewhere": 1.1}, 2, "TVM")
    rep["targets"] = [{"name": "cpu", "spec": "cpu", "method": "native", "latency_ms": {"p50": 5.0, "p90": 6.0},
                       "notes": ["a target note"], "contention": busy}]
    rep["onnxruntime"]["original"] = {"p50": 4.0, "p90": 4.1, "busy_elsewhere": 1.1}
    assert f"note: cpu: {busy}" in report_mod.terminal_table(rep)
    md = report_mod.markdown(rep)
    assert f"- **cpu**: {busy}" in md and "- **cpu**: a target note" in md
    assert "ONNX Runtime timed while other processes kept 1.10 core(s) busy" in md
