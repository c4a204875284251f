"""`codebook` assign=gptq: column-by-column assignment to the codebook with inverse-Hessian error feedback."""
from __future__ import annotations

import numpy as np

import graphs
from squeeze.data import Dataset
from squeeze.passes import codebook as cb


class DenseLayer:
    """The part of `weights.Layer` the GPTQ helpers use, for a [O, D] weight (a Gemm with transB=1)."""
    op = "Gemm"

    def matrix(self, w):
        return w[None]

    def from_matrix(self, m):
        return m[0]

    def output_scale(self):
        return 1.0


def correlated_inputs(rows: int, dim: int, seed: int, mix_seed: int = 0) -> np.ndarray:
    """[1, P, D] rows of one correlated distribution (fixed by mix_seed); `seed` draws the samples."""
    mix = np.random.default_rng(mix_seed).normal(size=(dim, dim)) * 0.3 + np.eye(dim)
    return (np.random.default_rng(seed).normal(size=(rows, dim)) @ mix)[None]


def output_error(x, w, shared):
    return np.linalg.norm(x[0] @ (w - shared).T) / np.linalg.norm(x[0] @ w.T)


def nearest_labels(w, table):
    return np.abs(w.reshape(-1, 1) - table[None]).argmin(1)


def test_gptq_lowers_the_output_error_on_unseen_inputs_of_the_same_kind():
    layer, rng = DenseLayer(), np.random.default_rng(0)
    w = rng.normal(size=(16, 24))
    table = np.linspace(-2, 2, 4)
    x, unseen = correlated_inputs(2000, 24, 1), correlated_inputs(2000, 24, 2)
    labels = cb._gptq_assign(layer, w, cb._gptq_problem(layer, w, x, x, True, 0.01), table, False)
    near = nearest_labels(w, table)
    assert not np.array_equal(labels, near)
    gptq_err = output_error(unseen, w, table[labels].reshape(w.shape))
    near_err = output_error(unseen, w, table[near].reshape(w.shape))
    assert gptq_err < 0.8 * near_err


def test_gptq_with_uncorrelated_inputs_is_the_nearest_centroid():
    layer, rng = DenseLayer(), np.random.default_rng(3)
    w = rng.normal(size=(8, 12))
    table = np.array([-1.5, -0.4, 0.3, 1.2])
    x = np.sqrt(500.0) * np.eye(12)[None]                                          # H ∝ I: no error to spread
    labels = cb._gptq_assign(layer, w, cb._gptq_problem(layer, w, x, x, True, 0.01), table, False)
    assert np.array_equal(labels, nearest_labels(w, table))


def test_gptq_keeps_exact_zeros_on_the_reserved_centroid():
    layer, rng = DenseLayer(), np.random.default_rng(4)
    w = rng.normal(size=(8, 16))
    w[:, ::3] = 0.0
    table = np.array([0.0, -1.0, -0.3, 0.4, 1.1])
    x = correlated_inputs(800, 16, 5)
    labels = cb._gptq_assign(layer, w, cb._gptq_problem(layer, w, x, x, True, 0.01), table, True)
    assert np.all(labels.reshape(w.shape)[:, ::3] == 0)
    assert np.all(labels.reshape(w.shape)[:, 1::3] > 0)


def test_weighted_kmeans_follows_the_weights():
    values = np.concatenate([np.full(50, -1.0), np.full(50, 0.0), np.full(50, 1.0)])[:, None]
    weights = np.where(values[:, 0] > 0.5, 1000.0, 1.0)
    centroids, labels, _ = cb.cluster(values + np.linspace(0, 0.01, 150)[:, None], 2, 0, weights)
    heavy = centroids[labels[values[:, 0] > 0.5]]
    assert np.all(np.abs(heavy - 1.0) < 0.02)              # the heavy group keeps a centroid of its own
    plain, _, _ = cb.cluster(values, 2, 0)
    assert len(plain) == 2


def test_pass_uses_gptq_by_default_and_is_deterministic():
    model = graphs.flatten_gemm()
    data = graphs.random_inputs(model, 96, 0)
    data = Dataset(data.arrays, None, "test calibration", data.stacked)
    a, steps = graphs.apply(model, "codebook(bits=2)", data=data, seed=2)
    b, _ = graphs.apply(model, "codebook(bits=2)", data=data, seed=2)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert all("gptq_damp" in e for e in steps[0]["details"]["per_layer"])
    _, near = graphs.apply(model, "codebook(bits=2,assign=nearest)", data=data, seed=2)
    assert not any("gptq_damp" in e for e in near[0]["details"]["per_layer"])
