"""Prints what the robustness suite ran (case counts by outcome, contained pass crashes) after the test summary."""
from __future__ import annotations

from robustness import fuzz


def pytest_terminal_summary(terminalreporter):
    if not fuzz.SUMMARIES:
        return
    terminalreporter.section("robustness")
    for line in fuzz.SUMMARIES:
        terminalreporter.write_line(line)
