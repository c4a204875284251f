"""targets/weight_storage.py: which weights firmware keeps compact, in what form, and that the form is exact.

No toolchain, no TVM: the analysis and the rewrite are checked with ONNX Runtime (the rewritten model fed the
decoded weights gives the original's outputs bit for bit); tests/test_mcu.py builds and runs the firmware.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from squeeze.targets import weight_storage as ws


def _model(nodes, inits, x_shape, y_shape, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]


def _same_outputs(model: onnx.ModelProto, plan: ws.Plan, x: np.ndarray) -> None:
    """The rewritten model fed the decoded weights computes what the model computes (ONNX Runtime pre-packs
    constant weights, so the summation order, not the weights, may differ in the last bits)."""
    feed = {"x": x, **{w.name: w.decode() for w in plan.weights}}
    np.testing.assert_allclose(_run(plan.model, feed), _run(model, {"x": x}), rtol=1e-5, atol=1e-5)


def _dq_conv_gemm(rng, q_range=127, zero=None, qtype=np.int8):
    """x[1,4,6,6] ─Conv(DQ(int8 W1, per-channel scale, axis 0))─ Relu ─ Flatten ─ Gemm(DQ(W2), transB=1) ─ y[1,10]"""
    w1 = rng.integers(-q_range, q_range + 1, (8, 4, 3, 3)).astype(qtype)
    w2 = rng.integers(-q_range, q_range + 1, (10, 8 * 4 * 4)).astype(qtype)
    if zero is not None:
        w1 = (w1.astype(np.int32) + zero).astype(qtype)
        w2 = (w2.astype(np.int32) + zero).astype(qtype)
    s1 = rng.uniform(0.001, 0.01, 8).astype(np.float32)
    s2 = np.float32(0.004)
    inits = {"w1_q": w1, "w1_s": s1, "w2_q": w2, "w2_s": np.array(s2), "b2": rng.normal(size=10).astype(np.float32)}
    dq1_in, dq2_in = ["w1_q", "w1_s"], ["w2_q", "w2_s"]
    if zero is not None:
        inits["w1_z"], inits["w2_z"] = np.full(8, zero, qtype), np.array(zero, qtype)
        dq1_in.append("w1_z")
        dq2_in.append("w2_z")
    nodes = [helper.make_node("DequantizeLinear", dq1_in, ["w1"], axis=0),
             helper.make_node("DequantizeLinear", dq2_in, ["w2"]),
             helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    return _model(nodes, inits, [1, 4, 6, 6], [1, 10])


def test_int8_dequantized_weights_stay_int8_and_the_gemm_weight_is_stored_transposed():
    rng = np.random.default_rng(0)
    model = _dq_conv_gemm(rng)
    plan = ws.plan(model)
    conv, gemm = plan.weights
    assert (conv.storage, gemm.storage) == ("int8", "int8")
    assert conv.stored_bytes == 8 * 4 * 9 and gemm.stored_bytes == 10 * 128   # one byte per weight
    assert conv.channels == 8 and conv.inner == 36 and conv.table_bytes == 8 * 4 + 8 * 4  # scales + zero points
    assert gemm.transposed and gemm.shape == (128, 10) and gemm.channels == 1
    gemm_node = next(n for n in plan.model.graph.node if n.op_type == "Gemm")
    assert {a.name: a.i for a in gemm_node.attribute}["transB"] == 0
    # the DequantizeLinear nodes and the int8 initializers are gone from the rewritten model: TVM folds nothing
    assert not any(n.op_type == "DequantizeLinear" for n in plan.model.graph.node)
    assert {i.name for i in plan.model.graph.input} == {"x", conv.name, gemm.name}
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


def test_narrow_integers_are_bit_packed_and_zero_points_kept():
    rng = np.random.default_rng(1)
    model = _dq_conv_gemm(rng, q_range=7, zero=100, qtype=np.uint8)  # uint8 around 100: 4 bits of range
    plan = ws.plan(model)
    conv, gemm = plan.weights
    assert conv.storage == "packed 4-bit int" and conv.stored_bytes == 288 * 4 // 8 + 1
    assert gemm.storage == "packed 4-bit int" and gemm.zero.tolist() == [7]  # 100 - the smallest stored (93)
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_packed_symbols_read_back(bits):
    rng = np.random.default_rng(bits)
    symbols = rng.integers(0, 1 << bits, 1001)
    data = ws.packed(symbols, bits)
    assert data.nbytes == (-(-1001 * bits // 8) + (1 if bits < 8 else 0))
    w = ws.CompactWeight("w", "w", [], (1001,), "codebook", bits, data, np.arange(1 << bits, dtype=np.float32))
    assert np.array_equal(w.symbols(), symbols)
    assert np.array_equal(w.decode(), symbols.astype(np.float32))


def _conv_with(weight: np.ndarray) -> onnx.ModelProto:
    """x ─Conv(W: a float initializer)─ y"""
    o, i, kh, kw = weight.shape
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kh, kw])], {"w": weight},
                  [1, i, 5, 5], [1, o, 5 - kh + 1, 5 - kw + 1])


def test_a_weight_with_16_values_becomes_4_bit_indices_and_a_codebook():
    rng = np.random.default_rng(2)
    table = rng.normal(size=16).astype(np.float32)
    weight = table[rng.integers(0, 16, (32, 16, 3, 3))]
    model = _conv_with(weight)
    (w,) = ws.plan(model).weights
    assert w.kind == "codebook" and w.bits == 4 and w.per == 1 and w.storage == "packed 4-bit + codebook[16]"
    assert w.stored_bytes == weight.size // 2 + 1 and w.table_bytes == 64
    assert np.array_equal(w.decode(), weight)
    _same_outputs(model, ws.plan(model), rng.random((1, 16, 5, 5), dtype=np.float32))


def test_few_distinct_kernels_become_a_kernel_codebook():
    rng = np.random.default_rng(3)
    kernels = rng.normal(size=(4, 3, 3)).astype(np.float32)      # 36 distinct values, 4 distinct kernels
    weight = kernels[rng.integers(0, 4, (64, 64))]
    (w,) = ws.plan(_conv_with(weight)).weights
    assert w.per == 9 and w.bits == 2 and w.storage == "packed 2-bit + codebook[4×9]"
    assert w.stored_bytes == 64 * 64 * 2 // 8 + 1 and w.table_bytes == 4 * 9 * 4
    assert np.array_equal(w.decode(), weight)


def test_float_weights_and_small_tensors_stay_float_with_the_reason():
    rng = np.random.default_rng(4)
    model = _conv_with(rng.normal(size=(16, 8, 3, 3)).astype(np.float32))
    plan = ws.plan(model)
    assert plan.weights == [] and plan.model is model
    assert "would be 4721 bytes of 4608" in plan.kept["w"]  # 128 distinct kernels: a table as big as the weight
    tiny = _conv_with(np.ones((2, 2, 3, 3), np.float32))  # 144 bytes: under MIN_BYTES, not even considered
    assert ws.plan(tiny).weights == [] and ws.plan(tiny).kept == {}


def test_layer_rows_give_storage_compute_and_macs():
    rng = np.random.default_rng(5)
    model = _dq_conv_gemm(rng)
    plan = ws.plan(model)
    rows = ws.layer_rows(model, {"x": (1, 4, 6, 6)}, plan)
    assert [(r["op"], r["macs"], r["storage"], r["compute"]) for r in rows] == [
        ("Conv", 8 * 4 * 4 * 4 * 9, "int8", "float32"), ("Gemm", 128 * 10, "int8", "float32")]
    assert rows[1]["flash_bytes"] == 1280 + 4 + 4 and rows[1]["float_bytes"] == 5120
    kept = ws.layer_rows(model, {"x": (1, 4, 6, 6)}, plan, as_float={plan.weights[1].name})
    assert kept[1]["storage"].startswith("float32") and kept[1]["flash_bytes"] == 5120
