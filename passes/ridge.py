"""Ridge least squares from one eigendecomposition, for any right-hand side and any strength: the one solver of
compensation's refits (`compensate.refit`, also used by lowrank) and of blockperm's block refits
(`blockperm_fit`). Each caller keeps its own grid of strengths α (a parameter of every call).
"""
from __future__ import annotations

import numpy as np


class Ridge:
    """Δ = argmin ‖xΔ − r‖² + λ‖Δ‖², λ = α·mean(diag xᵀx), for any r [rows, k] and α, from one eigendecomposition:
    of xᵀx (primal) or, with more columns than rows, of xxᵀ (dual).

    `dtype` is the precision of the products with x (float32 halves the time on large im2col matrices); the Gram
    matrix, its eigenbasis and the solutions are float64.
    """

    def __init__(self, x: np.ndarray, dtype=np.float32) -> None:
        rows, cols = x.shape
        self.x = x.astype(dtype, copy=False)
        self.dual = cols > rows
        gram = (self.x @ self.x.T if self.dual else self.x.T @ self.x).astype(np.float64)
        self.scale = max(np.trace(gram) / cols, 1e-12)
        evals, self.q = np.linalg.eigh(gram)
        self.evals = np.maximum(evals, 0.0)

    def solve(self, resid: np.ndarray, alpha: float) -> np.ndarray:
        """Δ [cols, k] for the right-hand side `resid` [rows, k] at strength α."""
        if self.dual:
            coef = self.q @ ((self.q.T @ resid.astype(np.float64)) / (self.evals + alpha * self.scale)[:, None])
            return (self.x.T @ coef.astype(self.x.dtype)).astype(np.float64)
        xr = (self.x.T @ resid.astype(self.x.dtype)).astype(np.float64)
        return self.q @ ((self.q.T @ xr) / (self.evals + alpha * self.scale)[:, None])

    def coords(self, v: np.ndarray) -> np.ndarray:
        """v [rows, k] in the eigenbasis: qᵀxᵀv (primal) or qᵀv (dual), for quadratic forms in (gram + λ)⁻¹."""
        if self.dual:
            return self.q.T @ v.astype(np.float64)
        return self.q.T @ (self.x.T @ v.astype(self.x.dtype)).astype(np.float64)

    def inverse(self, alpha: float) -> np.ndarray:
        """The eigenvalues of (gram + λ)⁻¹ at strength α, in the order of `coords`."""
        return 1.0 / (self.evals + alpha * self.scale)
