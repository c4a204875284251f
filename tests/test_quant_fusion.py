"""`quant`'s speed-aware float choice: what a float tensor costs ONNX Runtime's int8 kernels (fusion units, not
single nodes), and the held-out gain a tensor must show to stay float given that cost."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze.passes import quant_sensitivity as qs


def _conv_relu_conv_matmul() -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv 4→8 ─ Relu ─ r ─ Conv 8→4 ─ c ─ Reshape [1,256] ─ f ─ MatMul 256→10 ─ m ─ Softmax ─ y
    """
    g = graphs.Builder(5)
    r = g.node("Relu", [g.conv("x", "conv1", 4, 8, pads=[1, 1, 1, 1])], "r")
    c = g.conv(r, "c", 8, 4, pads=[1, 1, 1, 1])
    f = g.node("Reshape", [c, g.tensor("shape", np.array([1, 256], np.int64))], "f")
    m = g.node("MatMul", [f, g.weight("fc", 256, 10)], "m")
    g.node("Softmax", [m], "y", axis=-1)
    return g.model({"x": [1, 4, 8, 8]}, "y", output_shape=[1, 10])


def test_fusion_costs_count_the_layers_whose_int8_kernel_a_float_tensor_breaks():
    """A float input costs every layer that reads it; a float output costs the Conv that writes it (also through
    its Relu), but not the MatMul (ORT runs DQ → MatMul as MatMulIntegerToFloat)."""
    model = _conv_relu_conv_matmul()
    conv1, conv2, fc = 4 * 8 * 9 * 64, 8 * 4 * 9 * 64, 256 * 10
    total = conv1 + conv2 + fc
    costs = qs.fusion_costs(model, ["x", "r", "c", "f", "m"], {"x": (1, 4, 8, 8)})
    assert costs["x"] == pytest.approx(conv1 / total)
    assert costs["r"] == pytest.approx((conv1 + conv2) / total)
    assert costs["c"] == pytest.approx(conv2 / total)
    assert costs["f"] == pytest.approx(fc / total)
    assert costs["m"] == 0


def test_a_cheap_tensor_stays_float_on_a_small_gain_a_costly_one_does_not(calib_data):
    """The same measured gain keeps a tensor float when that costs no int8 kernel and not when it costs them."""
    model = _conv_relu_conv_matmul()
    data = calib_data(model, 8)
    ranges = {"x": (0.03, 128), "r": (0.02, 0), "c": (0.02, 128), "m": (0.5, 128)}  # m: a coarse step
    probe = qs.Probe(model, ranges)
    impossible = 0.999  # no tensor lowers the error by 99.9 % unless the error vanishes: only NOISE_GAIN applies
    kept, trace = qs.validated_float(probe, ["m"], data, min_gain=impossible, costs={"m": 0.0})
    assert kept == ["m"] and trace[1] < (1 - qs.NOISE_GAIN) * trace[0]
    kept, _ = qs.validated_float(probe, ["m"], data, min_gain=impossible, costs={"m": 0.5})
    assert kept == []
    kept, _ = qs.validated_float(probe, ["c"], data, min_gain=impossible, costs={"c": 0.0})
    assert kept == [], "a tensor whose float form does not lower the error is not kept, cheap or not"


def test_float_tensors_stay_within_the_int8_mac_budget(calib_data):
    """A tensor whose float form would lower the error a lot still goes int8 when keeping it float would take more
    than the budget of MACs off the int8 kernels."""
    model = _conv_relu_conv_matmul()
    data = calib_data(model, 8)
    ranges = {"x": (0.03, 128), "r": (0.02, 0), "c": (0.02, 128), "m": (0.5, 128)}  # m: a coarse step
    probe = qs.Probe(model, ranges)
    kept, _ = qs.validated_float(probe, ["m"], data, min_gain=0.01, costs={"m": 0.05}, budget=0.06)
    assert kept == ["m"]
    kept, trace = qs.validated_float(probe, ["m"], data, min_gain=0.01, costs={"m": 0.05}, budget=0.04)
    assert kept == [] and len(trace) == 1
    kept, _ = qs.validated_float(probe, ["m"], data, min_gain=0.01, costs={"m": 0.0})  # the default budget
    assert kept == ["m"] and 0 < qs.FLOAT_BUDGET < qs.CHEAP


def _conv_hardswish_conv(op: bool = False) -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv 4→8 ─ h ─┬─ Add 3 ─ Clip 0..6 ─ Mul ─ Div 6 ─ Conv 8→4 ─ y
                               └─────────────────────┘
    (hard-swish as paddle2onnx writes it; `op`: the HardSwish op of opset 14, as torch exports it)
    """
    g = graphs.Builder(6)
    h = g.conv("x", "h", 4, 8, pads=[1, 1, 1, 1])
    if op:
        d = g.node("HardSwish", [h], "d")
    else:
        a = g.node("Add", [h, g.tensor("three", np.array(3.0, np.float32))], "a")
        c = g.node("Clip", [a, g.tensor("lo", np.array(0.0, np.float32)), g.tensor("hi", np.array(6.0, np.float32))],
                   "c")
        m = g.node("Mul", [h, c], "m")
        d = g.node("Div", [m, g.tensor("six", np.array(6.0, np.float32))], "d")
    g.conv(d, "y", 8, 4, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 4, 8, 8]}, "y", opset=14 if op else graphs.OPSET)


@pytest.mark.parametrize("op", [False, True], ids=["decomposed", "HardSwish-op"])
def test_hardswish_joins_the_int8_region(calib_data, tmp_path, op):
    """The Add/Clip/Mul/Div hard-swish, and the HardSwish op, become x·HardSigmoid(x): ONNX Runtime runs the Mul as
    QLinearMul, the gate as a QLinearAdd (HardSigmoid = Add(x, 3) clipped by the uint8 range of [0, 6], the 1/6 in
    the next DequantizeLinear's scale), and no float Add/Clip/Div/HardSigmoid/HardSwish remains after the
    QLinearConv; the outputs stay close to the float model's."""
    graphs.skip_unless_exact_int8()
    from test_quant import _ort_optimized_ops
    model = _conv_hardswish_conv(op)
    data = calib_data(model, 16)
    out, steps = graphs.apply(model, "quant(sensitive=0)", data=data)
    assert any("hard-swish" in n for n in steps[0]["notes"])
    ops = _ort_optimized_ops(out, tmp_path)
    # the last Conv writes the graph output, which stays float: ORT runs that one as a float Conv
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 1 and ops["QLinearMul"] == 1, ops
    assert ops["QLinearAdd"] == 1 and any("HardSigmoid(s) between int8 tensors" in n for n in steps[0]["notes"])
    assert not {"Add", "Clip", "Div", "HardSigmoid", "HardSwish"} & set(ops), ops
    assert graphs.max_rel_error(model, out, data) < 0.05


def test_a_hardswish_op_stays_one_op_when_activations_stay_float():
    """Weights-only quantization (no real calibration data): in float one HardSwish beats HardSigmoid and Mul."""
    out, steps = graphs.apply(_conv_hardswish_conv(op=True), "quant")  # synthetic inputs: activations stay float
    assert graphs.op_counts(out)["HardSwish"] == 1 and not any("hard-swish" in n for n in steps[0]["notes"])


def _conv_gelu_conv() -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv 4→8 ─ h ─┬─ Div √2 ─ Erf ─ Add 1 ─ Mul ─ Mul 0.5 ─ Conv 8→4 ─ y
                               └──────────────────────┘
    (GELU as exporters decompose it)
    """
    g = graphs.Builder(7)
    h = g.conv("x", "h", 4, 8, pads=[1, 1, 1, 1])
    d = g.node("Div", [h, g.tensor("sqrt2", np.array(np.sqrt(2.0), np.float32))], "d")
    e = g.node("Erf", [d], "e")
    a = g.node("Add", [e, g.tensor("one", np.array(1.0, np.float32))], "a")
    m = g.node("Mul", [h, a], "m")
    half = g.node("Mul", [m, g.tensor("c0.5", np.array(0.5, np.float32))], "half")
    g.conv(half, "y", 8, 4, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 4, 8, 8]}, "y")


def _fpn_resize_add() -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv 4→8 stride 2 ─ low ─ Resize ×2 ─ up ─┐
               └ Conv 4→8 ─ lateral ─────────────────── Add ─ s ─ Conv 8→4 ─ y
    (an FPN's top-down step)
    """
    g = graphs.Builder(8)
    low = g.conv("x", "low", 4, 8, pads=[1, 1, 1, 1], strides=[2, 2])
    up = g.node("Resize", [low, "", g.tensor("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")
    lateral = g.conv("x", "lateral", 4, 8, pads=[1, 1, 1, 1])
    s = g.node("Add", [lateral, up], "s")
    g.conv(s, "y", 8, 4, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 4, 8, 8]}, "y")


@pytest.mark.parametrize("build, fused, floats", [
    (_conv_gelu_conv, {"QLinearAdd": 1, "QLinearMul": 2}, {"Add", "Mul"}),  # Div and Erf stay float, as static's
    (_fpn_resize_add, {"QLinearAdd": 1}, {"Add"}),
])
def test_elementwise_tails_behind_cheap_functions_join_the_int8_region(build, fused, floats, calib_data, tmp_path):
    """As quantize_static does: the Add/Mul after a decomposed GELU's Erf and the Add after an FPN's Resize read
    int8 tensors, so ONNX Runtime runs them as QLinearAdd/QLinearMul instead of float ops over whole feature maps
    between a DequantizeLinear and a QuantizeLinear; the outputs stay close to the float model's."""
    graphs.skip_unless_exact_int8()
    from test_quant import _ort_optimized_ops
    model = build()
    data = calib_data(model, 16)
    out, _ = graphs.apply(model, "quant(sensitive=0)", data=data)
    ops = _ort_optimized_ops(out, tmp_path)
    assert all(ops.get(op, 0) == count for op, count in fused.items()), ops
    assert not floats & set(ops), ops
    assert graphs.max_rel_error(model, out, data) < 0.05


def test_a_max_pool_between_int8_tensors_keeps_its_input_quantization(calib_data, tmp_path):
    """Conv → Relu → MaxPool → Conv: the QuantizeLinear after the pool takes the scale and zero point of the
    DequantizeLinear before it (the pool picks input values: exact), so ONNX Runtime runs an int8 pool instead of
    a float MaxPool between a DequantizeLinear and a QuantizeLinear (squeezenet: 3.28 → 2.79 ms)."""
    graphs.skip_unless_exact_int8()
    from onnx import numpy_helper

    from test_quant import _ort_optimized_ops
    g = graphs.Builder(3)
    r = g.node("Relu", [g.conv("x", "conv1", 4, 8, pads=[1, 1, 1, 1])], "r")
    p = g.node("MaxPool", [r], "p", kernel_shape=[3, 3], strides=[2, 2])
    r2 = g.node("Relu", [g.conv(p, "conv2", 8, 8, pads=[1, 1, 1, 1])], "r2")
    g.conv(r2, "y", 8, 4, pads=[1, 1, 1, 1])
    model = g.model({"x": [1, 4, 15, 15]}, "y")
    data = calib_data(model, 16)
    out, _ = graphs.apply(model, "quant(sensitive=0)", data=data)
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node
                   if n.op_type == "Constant"})
    pool = next(n for n in out.graph.node if n.op_type == "MaxPool")
    before = next(n for n in out.graph.node if pool.input[0] in n.output)
    after = next(n for n in out.graph.node if pool.output[0] in n.input)
    assert (before.op_type, after.op_type) == ("DequantizeLinear", "QuantizeLinear")
    for i in (1, 2):
        assert values[before.input[i]] == values[after.input[i]]
    ops = _ort_optimized_ops(out, tmp_path)
    assert "MaxPool" not in ops, ops
    assert graphs.max_rel_error(model, out, data) < 0.05
