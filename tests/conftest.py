"""Shared fixtures: the corpus (skipped cleanly when absent) and tiny graphs built in code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # for `benchmarks.corpus`; appended so the installed squeeze wins

from benchmarks import corpus as corpus_mod  # noqa: E402


@pytest.fixture(scope="session")
def corpus():
    """The corpus helper module; skips the test when ../shared/corpus is absent."""
    if not corpus_mod.available():
        pytest.skip(f"corpus not found at {corpus_mod.ROOT}")
    return corpus_mod


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
