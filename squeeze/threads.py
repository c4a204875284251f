"""One thread for BLAS and OpenMP inside the passes.

Results then do not depend on the core count (determinism), and the small LAPACK calls and k-means runs the
passes make are much faster than with threads spinning against each other on busy cores (scikit-learn's 1-D
k-means on 9k weights: 2.0 s with its default OpenMP threads on a loaded 2-core machine, 0.05 s with one).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def single_threaded(user_api: str | None = None) -> Iterator[None]:
    """Limit BLAS (`user_api="blas"`), OpenMP (`"openmp"`) or both (None) to one thread inside the block."""
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415  (installed with scikit-learn)
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api=user_api):
        yield
