"""`slim` (passes/slim.py): Network Slimming by BatchNormalization |γ|."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from squeeze import metrics, runtime, verify

from test_channels import Tiny
from test_prune import calibration, prune_model


def conv_bn_model(gammas):
    """x ─ Conv p 3→6 ─ BN(γ) ─ Relu ─ Conv 6→4 ─ y; BN β = 0 and μ = 0 where γ = 0, so those channels are 0."""
    t = Tiny(seed=7)
    h = t.conv("x", "p", 3, 6)
    gammas = np.asarray(gammas, np.float32)
    beta = np.where(gammas == 0, 0, 0.1).astype(np.float32)
    mean = np.where(gammas == 0, 0, 0.05).astype(np.float32)
    bn = [t.const("bn.s", gammas), t.const("bn.b", beta), t.const("bn.m", mean),
          t.const("bn.v", np.full(6, 1.5, np.float32))]
    h = t.node("Relu", [t.node("BatchNormalization", [h] + bn, "bn")], "relu")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"])


def test_sparse_gamma_channels_are_removed_exactly():
    model = conv_bn_model([1.0, 0.0, 0.8, 0.0, 1.2, 0.9])
    data = calibration(model, 8)
    pruned, step = prune_model(model, "slim(ratio=0.3,compensate=false)", data)
    weights = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert weights["p.w"][0] == 4 and weights["bn.s"] == [4] and weights["y.w"][1] == 4
    np.testing.assert_allclose(runtime.run(pruned, data)["y"], runtime.run(model, data)["y"], rtol=1e-5, atol=1e-5)
    assert not any("not sparse" in n for n in step["notes"])
    assert step["details"]["gamma"]["near_zero_share"] == pytest.approx(2 / 6)


def test_dense_gamma_is_reported_and_still_pruned():
    model = conv_bn_model([1.0, 0.7, 0.8, 0.6, 1.2, 0.9])
    pruned, step = prune_model(model, "slim(ratio=0.5)")
    assert any("γ is not sparse" in n for n in step["notes"])
    assert {i.name: list(i.dims) for i in pruned.graph.initializer}["bn.s"] == [3]
    kept = onnx.numpy_helper.to_array([i for i in pruned.graph.initializer if i.name == "bn.s"][0])
    assert sorted(kept.tolist()) == pytest.approx([0.9, 1.0, 1.2])  # the three largest |γ|


def test_threshold_removes_the_channels_below_it():
    model = conv_bn_model([1.0, 0.05, 0.8, 0.02, 1.2, 0.9])
    pruned, _ = prune_model(model, "slim(threshold=0.1)")
    assert {i.name: list(i.dims) for i in pruned.graph.initializer}["bn.s"] == [4]
    pruned, step = prune_model(model, "slim(threshold=0.01)")
    assert {i.name: list(i.dims) for i in pruned.graph.initializer}["bn.s"] == [6]
    assert any("no channel falls below the threshold" in n for n in step["notes"])


def test_no_batchnorm_is_a_clear_no_op():
    t = Tiny()
    t.conv(t.node("Relu", [t.conv("x", "p", 3, 6)], "relu"), "y", 6, 4)
    model = t.model({"x": [1, 3, 6, 6]}, ["y"])
    pruned, step = prune_model(model, "slim(ratio=0.5)")
    assert any("no BatchNormalization" in n and "before fold-bn" in n for n in step["notes"])
    assert pruned.graph.initializer[0].dims == model.graph.initializer[0].dims
    assert step["macs"] == metrics.summary(model, {"x": (1, 3, 6, 6)})["macs"]


def test_slim_then_fold_bn():
    model = conv_bn_model([1.0, 0.0, 0.8, 0.0, 1.2, 0.9])
    data = calibration(model, 8)
    pruned, step = prune_model(model, "slim(ratio=0.3),fold-bn", data)
    assert not any(n.op_type == "BatchNormalization" for n in pruned.graph.node)
    np.testing.assert_allclose(runtime.run(pruned, data)["y"], runtime.run(model, data)["y"], rtol=1e-4, atol=1e-4)


def test_mnist_burn_slim(corpus):
    from squeeze.model import load_model
    model = load_model(corpus.model_path("mnist_burn"))
    ds = corpus.dataset("mnist_burn", 1256)
    calib, test = corpus.split(ds, 256)
    pruned, step = prune_model(model, "slim(ratio=0.3)", calib)
    assert any("γ is not sparse" in n for n in step["notes"])
    assert step["macs"] < 0.85 * metrics.summary(model, {"input.1": (1, 1, 28, 28)})["macs"]
    rows = {r["name"]: r for r in step["details"]["groups"]}
    assert rows["/conv3/Conv"]["channels_after"] == 17
    before = verify.accuracy(runtime.run(model, test), test.labels)["top1"]
    after = verify.accuracy(runtime.run(pruned, test), test.labels)["top1"]
    assert after > before - 0.02
