"""`prune(criterion=hessian)`: HAP's relative Hessian trace per channel (passes/prune.py, hessian.channel_traces)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from squeeze.context import Context
from squeeze.data import Dataset, input_specs, synthesize
from squeeze.model import to_graph
from squeeze.passes import hessian
from squeeze.passes import prune as prune_module
from squeeze.passes.coupling import channel_groups
from squeeze.passes.prune import rank_channels

from test_prune import calibration, prune_model


def mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [N, a] ─ Gemm h (w1 [b, a], transB) ─ Gemm y (w2 [c, b], transB) ─ y: class scores."""
    inits = [onnx.numpy_helper.from_array(np.asarray(a, np.float32), n)
             for n, a in (("h.w", w1), ("h.b", np.zeros(len(w1))), ("y.w", w2), ("y.b", np.zeros(len(w2))))]
    nodes = [helper.make_node("Gemm", ["x", "h.w", "h.b"], ["h"], name="h", transB=1),
             helper.make_node("Gemm", ["h", "y.w", "y.b"], ["y"], name="y", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w1.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", len(w2)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reads_unequally():
    """x ─ Conv p 2→3 (1×1, three filters of equal norm) ─ Relu ─ Conv q 3→4 ─ GlobalAveragePool ─ Flatten ─ y.
    q reads p's channel 0 with weights ×10, channel 1 with ×0.01, channel 2 with ×1: the loss is sensitive to
    channel 0 and nearly blind to channel 1, which no filter norm of p can tell."""
    rng = np.random.default_rng(0)
    p = np.array([[1.0, 0.5], [0.5, 1.0], [-1.0, 0.5]], np.float32).reshape(3, 2, 1, 1)
    q = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    q[:, 0] *= 10.0
    q[:, 1] *= 0.01
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in
             (("p.w", p), ("p.b", np.zeros(3, np.float32)), ("q.w", q), ("q.b", np.zeros(4, np.float32)))]
    nodes = [helper.make_node("Conv", ["x", "p.w", "p.b"], ["p"], name="p", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["p"], ["r"], name="r"),
             helper.make_node("Conv", ["r", "q.w", "q.b"], ["q"], name="q", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["q"], ["g"], name="g"),
             helper.make_node("Flatten", ["g"], ["y"], name="y")]
    graph = helper.make_graph(nodes, "unequal", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def scores_of(model, criterion, data, seed=0):
    shapes = {s.name: (1,) + tuple(data.arrays[s.name].shape[1:]) for s in input_specs(model)}
    ctx = Context(calib=data, seed=seed, model=model, input_shapes=shapes)
    ranking = rank_channels(channel_groups(to_graph(model), shapes), ctx, criterion=criterion, scope="layer",
                            multiple=1, compensate=False)
    return {g.name: ranking.scores[g] for g in ranking.groups}, ctx


def test_channel_trace_is_the_exact_hessian_block_of_the_kl_loss():
    """One input feature: each hidden channel of the MLP has one weight, so v_cᵀH_ccv_c = H_cc exactly and only the
    finite differences can err. For logits z = W2·h the KL loss's Hessian in z is diag(p) − ppᵀ, so
    H_cc = mean_n x_n² · w2_cᵀ (diag(p_n) − p_n p_nᵀ) w2_c."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((3, 1)), rng.standard_normal((4, 3))
    model = mlp(w1, w2)
    x = rng.standard_normal((40, 1)).astype(np.float32)
    data = Dataset({"x": x}, None, "test", {"x": True})
    traces = hessian.channel_traces(model, {"h": [hessian.ChannelSlice("h.w", 0, 0, 0, 3)]}, {"h": 3}, data,
                                    probes=1)["h"]
    z = (x.astype(np.float64) @ w1.T) @ w2.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    exact = np.array([np.mean([x[n, 0] ** 2 * (w2[:, c] @ (np.diag(p[n]) - np.outer(p[n], p[n])) @ w2[:, c])
                               for n in range(len(x))]) for c in range(3)])
    np.testing.assert_allclose(traces.trace, exact, rtol=2e-2)
    assert list(traces.params) == [1, 1, 1]
    assert traces.runs == 1 + 2 * 3 + 2 + 4 * traces.shrinks  # reference, ±ε per channel, ±2ε check


def test_hessian_sees_what_the_readers_ignore_and_l1_cannot():
    model = reads_unequally()
    data = calibration(model, 32)
    l1, _ = scores_of(model, "l1", data)
    hess, ctx = scores_of(model, "hessian", data)
    np.testing.assert_allclose(l1["p"], l1["p"][0])  # equal filter norms: l1 cannot rank them
    assert list(np.argsort(hess["p"])) == [1, 2, 0]
    assert hess["p"][1] < 1e-3 * hess["p"][2]
    assert ctx.details["hessian"]["samples"] == 32 and ctx.details["hessian"]["runs"] > 0
    pruned, step = prune_model(model, "prune(ratio=0.34,criterion=hessian,scope=layer,compensate=false)", data)
    kept = onnx.numpy_helper.to_array({i.name: i for i in pruned.graph.initializer}["p.w"])
    original = onnx.numpy_helper.to_array({i.name: i for i in model.graph.initializer}["p.w"])
    np.testing.assert_array_equal(kept, original[[0, 2]])  # channel 1 went
    assert step["details"]["criterion"] == "hessian"


def test_hessian_is_deterministic_and_seeded():
    model = reads_unequally()
    data = calibration(model, 16)
    a, _ = scores_of(model, "hessian", data, seed=0)
    b, _ = scores_of(model, "hessian", data, seed=0)
    c, _ = scores_of(model, "hessian", data, seed=5)
    np.testing.assert_array_equal(a["p"], b["p"])
    assert not np.array_equal(a["p"], c["p"])  # the probes come from the seed
    assert list(np.argsort(c["p"])) == [1, 2, 0]


def test_hessian_probes_an_ir3_model_whose_initializers_are_inputs():
    """IR 3 lists every initializer among the graph inputs and ONNX Runtime folds them as constants, so feeding a
    probed weight failed ("Invalid input name": squeezenet of the corpus). The probe session uses IR 4 semantics:
    the probed weights are overridable inputs, the others constants; the traces are those of the IR 4 model."""
    import graphs
    ir3 = graphs.ir3_initializers_as_inputs()
    ir4 = onnx.ModelProto()
    ir4.CopyFrom(ir3)
    ir4.ir_version = 4
    inits = {t.name for t in ir4.graph.initializer}
    kept = [i for i in ir4.graph.input if i.name not in inits]
    del ir4.graph.input[:]
    ir4.graph.input.extend(kept)
    data = calibration(ir3, 16)
    shapes = {"x": (1, 3, 8, 8)}
    scores = []
    for probed in (ir3, ir4):  # the model the probes run (the pass manager hands the pass the model as loaded)
        ctx = Context(calib=data, seed=0, model=probed, input_shapes=shapes)
        ranking = rank_channels(channel_groups(to_graph(ir4), shapes), ctx, criterion="hessian", scope="layer",
                                multiple=1, compensate=False)
        assert "hessian" in ctx.details
        scores.append({g.name: ranking.scores[g] for g in ranking.groups})
    assert scores[0].keys() == scores[1].keys() and scores[0]
    for name in scores[0]:
        np.testing.assert_array_equal(scores[0][name], scores[1][name])


def test_hessian_without_calibration_data_ranks_by_l1_with_a_note():
    model = reads_unequally()
    data = synthesize(input_specs(model), {"x": (1, 2, 4, 4)}, 8, seed=0)
    scores, ctx = scores_of(model, "hessian", data)
    l1, _ = scores_of(model, "l1", data)
    np.testing.assert_array_equal(scores["p"], l1["p"])
    assert any("criterion=hessian ranks by l1" in n and "synthetic" in n for n in ctx.notes)
    assert "hessian" not in ctx.details


def test_hessian_over_its_cost_budget_probes_less_then_ranks_the_widest_groups_by_l1(monkeypatch):
    from test_channels import residual_add
    from squeeze import metrics
    model, _, _ = residual_add()
    data = calibration(model, 32)
    groups = [g for g in channel_groups(to_graph(model), {"x": (1, 3, 6, 6)}) if g.prunable and g.producers]
    widest = max(g.size for g in groups)
    macs = metrics.summary(model, {"x": (1, 3, 6, 6)})["macs"]
    samples = prune_module.HESSIAN_MIN_SAMPLES
    # room for every group but the widest at one probe per channel on the fewest samples
    monkeypatch.setattr(prune_module, "HESSIAN_MAX_MACS", 2 * (sum(g.size for g in groups) - widest) * samples * macs)
    scores, ctx = scores_of(model, "hessian", data)
    l1, _ = scores_of(model, "l1", data)
    over = [g.name for g in groups if g.size == widest]
    assert any("by l1" in n and "would cost more" in n and over[0] in n for n in ctx.notes)
    np.testing.assert_array_equal(scores[over[0]], l1[over[0]])
    assert ctx.details["hessian"]["probes"] == 1 and ctx.details["hessian"]["samples"] == samples
    assert any(not np.array_equal(scores[g.name], l1[g.name]) for g in groups if g.size < widest)


@pytest.mark.parametrize("scope", ["layer", "sensitivity"])
def test_hessian_prunes_a_residual_model_in_every_scope(scope):
    from test_channels import residual_add
    from squeeze import metrics
    model, _, _ = residual_add()
    pruned, step = prune_model(model, f"prune(ratio=0.4,criterion=hessian,scope={scope})")
    onnx.checker.check_model(pruned, full_check=True)
    assert step["macs"] < metrics.summary(model, {"x": (1, 3, 6, 6)})["macs"]
