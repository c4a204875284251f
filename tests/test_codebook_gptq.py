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


def test_gram_normal_equations_equal_the_design_matrix_ones(monkeypatch):
    """The refit's normal equations from the inputs' Gram matrices (layers up to MAX_GRAM_INPUTS inputs) are those
    of the explicit design matrix Z (wider layers), with and without channel scales, across output chunks."""
    rng = np.random.default_rng(3)
    groups, outs, dim, count, rows = 2, 7, 23, 8, 120
    wm = rng.normal(size=(groups, outs, dim))
    labels = rng.integers(0, count, size=wm.shape)
    x = rng.normal(size=(groups, rows, dim)).astype(np.float32)
    x_in = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    for scales in (None, rng.uniform(0.5, 2.0, size=(groups, outs))):
        gram = cb._weight_system(wm, labels, x, x_in, count, scales)
        monkeypatch.setattr(cb, "MAX_Z", count * dim * 2)            # two outputs per Gram block
        chunked = cb._weight_system(wm, labels, x, x_in, count, scales)
        monkeypatch.setattr(cb, "MAX_GRAM_INPUTS", 0)                 # the design-matrix path, every row kept
        monkeypatch.setattr(cb, "MAX_Z", 10 ** 9)
        design = cb._weight_system(wm, labels, x, x_in, count, scales)
        monkeypatch.undo()
        for got in (gram, chunked):
            for a, b in zip(got, design):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())


def test_layers_too_wide_for_the_hessian_inverse_take_the_nearest_assignment(monkeypatch):
    """GPTQ inverts a D×D Hessian: above MAX_GPTQ_INPUTS inputs the layer is assigned nearest-centroid (recorded
    as gptq_damp None) and the pass still refits it."""
    model = graphs.flatten_gemm()
    data = graphs.random_inputs(model, 96, 0)
    data = Dataset(data.arrays, None, "test calibration", data.stacked)
    monkeypatch.setattr(cb, "MAX_GPTQ_INPUTS", 32)                   # the Gemm has 64 inputs, the Conv 27
    tried, choose = [], cb._choose_damp
    monkeypatch.setattr(cb, "_choose_damp", lambda layer, *a, **k: tried.append(layer.op) or choose(layer, *a, **k))
    _, steps = graphs.apply(model, "codebook(bits=2)", data=data, seed=2)
    rows = {e["op"]: e for e in steps[0]["details"]["per_layer"]}
    assert tried == ["Conv"]
    assert rows["Gemm"]["gptq_damp"] is None
    assert rows["Gemm"]["output_rel_err"] <= rows["Gemm"]["output_rel_err_kmeans"] + 1e-6
