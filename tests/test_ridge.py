"""`passes.ridge.Ridge`: the one ridge solver of compensation and blockperm, checked against the closed forms."""
from __future__ import annotations

import numpy as np
import pytest

from squeeze.passes.ridge import Ridge

SHAPES = ((50, 8), (8, 50))  # primal (more rows than columns) and dual


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_primal_and_dual_match_the_closed_form(dtype):
    rng = np.random.default_rng(1)
    for rows, cols in SHAPES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        r = rng.standard_normal((rows, 2))
        xd = x.astype(np.float64)
        lam = 0.1 * np.trace(xd.T @ xd) / cols
        expected = np.linalg.solve(xd.T @ xd + lam * np.eye(cols), xd.T @ r)
        ridge = Ridge(x, dtype=dtype)
        assert ridge.dual == (cols > rows)
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(ridge.solve(r, 0.1), expected, rtol=tol, atol=tol)


def test_coords_and_inverse_give_the_residual_form():
    """kᵀMy with M = I − x(xᵀx+λ)⁻¹xᵀ (what blockperm's scale elimination needs): kᵀy − Σ cₖ·c_y·inv in the
    primal, λ·Σ cₖ·c_y·inv in the dual."""
    rng = np.random.default_rng(2)
    for rows, cols in SHAPES:
        x = rng.standard_normal((rows, cols))
        k, y = rng.standard_normal((rows, 3)), rng.standard_normal((rows, 3))
        ridge = Ridge(x, dtype=np.float64)
        alpha = 0.05
        lam = alpha * ridge.scale
        m = np.eye(rows) - x @ np.linalg.solve(x.T @ x + lam * np.eye(cols), x.T)
        expected = (k * (m @ y)).sum(axis=0)
        form = (ridge.coords(k) * ridge.coords(y) * ridge.inverse(alpha)[:, None]).sum(axis=0)
        got = lam * form if ridge.dual else (k * y).sum(axis=0) - form
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_zero_input_gives_zero_correction():
    """All-zero inputs (a dead channel): the floor on λ keeps the solve finite and the correction zero."""
    ridge = Ridge(np.zeros((10, 4)), dtype=np.float64)
    out = ridge.solve(np.ones((10, 2)), 1e-3)
    assert np.isfinite(out).all() and not out.any()
