"""`quant`'s speed-aware float choice: what a float tensor costs ONNX Runtime's int8 kernels (fusion units, not
single nodes), and the held-out gain a tensor must show to stay float given that cost."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze.data import Dataset
from squeeze.passes import quant_sensitivity as qs


@pytest.fixture
def calib_data():
    def make(model: onnx.ModelProto, count: int, seed: int = 0) -> Dataset:
        data = graphs.random_inputs(model, count, seed)
        return Dataset(data.arrays, None, "test calibration", data.stacked)
    return make


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


def _conv_hardswish_conv() -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv 4→8 ─ h ─┬─ Add 3 ─ Clip 0..6 ─ Mul ─ Div 6 ─ Conv 8→4 ─ y
                               └─────────────────────┘
    (hard-swish as paddle2onnx writes it)
    """
    g = graphs.Builder(6)
    h = g.conv("x", "h", 4, 8, pads=[1, 1, 1, 1])
    a = g.node("Add", [h, g.tensor("three", np.array(3.0, np.float32))], "a")
    c = g.node("Clip", [a, g.tensor("lo", np.array(0.0, np.float32)), g.tensor("hi", np.array(6.0, np.float32))], "c")
    m = g.node("Mul", [h, c], "m")
    d = g.node("Div", [m, g.tensor("six", np.array(6.0, np.float32))], "d")
    g.conv(d, "y", 8, 4, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 4, 8, 8]}, "y")


def test_decomposed_hardswish_joins_the_int8_region(calib_data, tmp_path):
    """The Add/Clip/Mul/Div hard-swish becomes x·HardSigmoid(x): ONNX Runtime runs the Mul as QLinearMul and no
    float Add/Clip/Div remains after the QLinearConv; the outputs stay close to the float model's."""
    from test_quant import _ort_optimized_ops
    model = _conv_hardswish_conv()
    data = calib_data(model, 16)
    out, steps = graphs.apply(model, "quant(sensitive=0)", data=data)
    assert any("hard-swish" in n for n in steps[0]["notes"])
    ops = _ort_optimized_ops(out, tmp_path)
    # the last Conv writes the graph output, which stays float: ORT runs that one as a float Conv
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 1 and ops["QLinearMul"] == 1, ops
    assert not {"Add", "Clip", "Div"} & set(ops), ops
    assert graphs.max_rel_error(model, out, data) < 0.05
