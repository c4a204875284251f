"""Metrics: MACs per node computed by hand on one-node graphs, parameter counts, and what is not counted."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze import metrics
from squeeze.pipeline import model_stats


def _one_node(op: str, x_shape: list, weights: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    """x ─ op(x, *weights) ─ y   (the weights are initializers)"""
    g = graphs.Builder()
    names = [g.tensor(name, value) for name, value in weights.items()]
    g.node(op, ["x"] + names, "y", **attrs)
    return g.model({"x": x_shape}, "y")


def _w(*shape) -> np.ndarray:
    return np.ones(shape, np.float32)


def _macs(model, shapes=None) -> dict[str, int]:
    shapes = shapes or {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    per_node, _ = metrics.node_macs(model, shapes)
    return per_node


@pytest.mark.parametrize("x_shape, w_shape, attrs, expected", [
    # plain: out [1,4,8,8] × (C/g·kh·kw = 3·3·3)
    ([1, 3, 8, 8], (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), 4 * 8 * 8 * 27),
    # no padding, stride 2: out [1,4,3,3] (8 → (8−3)/2+1 = 3)
    ([1, 3, 8, 8], (4, 3, 3, 3), dict(strides=[2, 2]), 4 * 3 * 3 * 27),
    # batch 2
    ([2, 3, 8, 8], (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), 2 * 4 * 8 * 8 * 27),
    # grouped, 2 groups: W [6, 4/2, 3, 3]; out [1,6,6,6] × (2·3·3)
    ([1, 4, 8, 8], (6, 2, 3, 3), dict(group=2), 6 * 6 * 6 * 18),
    # depthwise, stride 2, pad 1: W [4,1,3,3]; out [1,4,4,4] × 9
    ([1, 4, 8, 8], (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1]), 4 * 4 * 4 * 9),
    # pointwise 1×1
    ([1, 8, 5, 5], (16, 8, 1, 1), {}, 16 * 5 * 5 * 8),
    # 1-D conv
    ([1, 2, 10], (3, 2, 4), {}, 3 * 7 * 8),
    # dilation 2: effective kernel 5 → out 4×4, still 3·3 taps per output
    ([1, 1, 8, 8], (2, 1, 3, 3), dict(dilations=[2, 2]), 2 * 4 * 4 * 9),
])
def test_conv_macs(x_shape, w_shape, attrs, expected):
    kernel = list(w_shape[2:])
    model = _one_node("Conv", x_shape, {"w": _w(*w_shape)}, kernel_shape=kernel, **attrs)
    assert _macs(model) == {"y": expected}


def test_conv_bias_does_not_change_macs():
    model = _one_node("Conv", [1, 3, 8, 8], {"w": _w(4, 3, 3, 3), "b": _w(4)}, kernel_shape=[3, 3])
    assert _macs(model) == {"y": 4 * 6 * 6 * 27}


@pytest.mark.parametrize("x_shape, w_shape, attrs, expected", [
    # every input element meets M/g·kh·kw weights: x [1,4,5,5], W [C=4, M=2, 3, 3] → 100 × 18
    ([1, 4, 5, 5], (4, 2, 3, 3), dict(strides=[2, 2]), 4 * 5 * 5 * 2 * 9),
    # grouped: W [4, 1, 3, 3], group 2 → 2 output channels; 100 × 9
    ([1, 4, 5, 5], (4, 1, 3, 3), dict(group=2), 4 * 5 * 5 * 9),
    # depthwise transpose, 2×2 kernel stride 2 (upsampling): 3·6·6 inputs × 4
    ([1, 3, 6, 6], (3, 1, 2, 2), dict(group=3, strides=[2, 2]), 3 * 6 * 6 * 4),
])
def test_conv_transpose_macs(x_shape, w_shape, attrs, expected):
    model = _one_node("ConvTranspose", x_shape, {"w": _w(*w_shape)}, kernel_shape=list(w_shape[2:]), **attrs)
    assert _macs(model) == {"y": expected}


@pytest.mark.parametrize("x_shape, w_shape, attrs, expected", [
    ([2, 16], (16, 8), {}, 2 * 8 * 16),
    ([16, 2], (16, 8), dict(transA=1), 2 * 8 * 16),
    ([2, 16], (8, 16), dict(transB=1), 2 * 8 * 16),
    ([1, 512], (10, 512), dict(transB=1, alpha=0.5), 10 * 512),
])
def test_gemm_macs(x_shape, w_shape, attrs, expected):
    model = _one_node("Gemm", x_shape, {"w": _w(*w_shape), "c": _w(w_shape[0] if attrs.get("transB") else w_shape[1])},
                      **attrs)
    assert _macs(model) == {"y": expected}


@pytest.mark.parametrize("x_shape, w_shape, expected", [
    ([3, 4], (4, 5), 3 * 5 * 4),
    ([2, 3, 4], (4, 5), 2 * 3 * 5 * 4),           # batched × shared matrix
    ([2, 3, 4], (2, 4, 5), 2 * 3 * 5 * 4),        # batched × batched
    ([3, 4], (2, 4, 5), 2 * 3 * 5 * 4),           # broadcast the first operand
    ([2, 3, 4], (4,), 2 * 3 * 4),                 # matrix × vector
    ([4], (4, 5), 5 * 4),                         # vector × matrix
])
def test_matmul_macs(x_shape, w_shape, expected):
    model = _one_node("MatMul", x_shape, {"w": _w(*w_shape)})
    assert _macs(model) == {"y": expected}


def test_dynamic_batch_is_measured_at_the_given_shape():
    model = graphs.dynamic_batch()
    assert _macs(model, {"x": (1, 16)}) == {"y": 160}
    assert _macs(model, {"x": (5, 16)}) == {"y": 800}


def test_macs_of_a_whole_graph_and_what_is_not_counted():
    per_node, uncounted = metrics.node_macs(graphs.residual_add(), {"x": (1, 4, 8, 8)})
    assert per_node == {"conv1": 4 * 64 * 36, "conv2": 4 * 64 * 36}
    assert uncounted == {"BatchNormalization": 2, "Relu": 2, "Add": 1}


def test_shapes_after_a_computed_reshape_come_from_onnx_runtime():
    """The Gemm after a Reshape whose shape is computed at run time (Shape → Gather → Concat) is still counted."""
    g = graphs.Builder()
    batch = g.node("Gather", [g.node("Shape", ["x"], "shape"), g.tensor("zero", np.array(0, np.int64))], "batch")
    batch = g.node("Unsqueeze", [batch, g.tensor("axes", np.array([0], np.int64))], "batch_1d")
    shape = g.node("Concat", [batch, g.tensor("minus_one", np.array([-1], np.int64))], "target", axis=0)
    flat = g.node("Reshape", ["x", shape], "flat")
    g.node("Gemm", [flat, g.weight("w", 48, 7)], "y")
    model = g.model({"x": ["N", 3, 4, 4]}, "y", output_shape=["N", 7])
    assert _macs(model, {"x": (2, 3, 4, 4)}) == {"y": 2 * 7 * 48}


def test_param_count_covers_float_initializers_and_constants_but_not_shapes():
    # constant_foldable: conv weight 4·3·3·3 = 108, Constant k (1) and v (4); int64 shapes are not parameters
    assert metrics.count_params(graphs.constant_foldable()) == 108 + 1 + 4
    # conv_bn_relu: 108 + 4 bias + 4×4 BN tensors
    assert metrics.count_params(graphs.conv_bn_relu()) == 108 + 4 + 16


def test_model_stats_of_the_shipped_model(repo):
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    stats = model_stats(model, {"input": (1, 1, 8, 8)})
    assert stats["param_count"] == 43_162  # models/README.md
    assert stats["nodes"] == 17
    assert stats["ops"] == {"Add": 1, "BatchNormalization": 4, "Conv": 4, "Flatten": 1, "Gemm": 2, "Relu": 5}
    # stem 16·64·9, block 2 × 16·64·144, down 32·16·144, fc1 512·64, fc2 64·10
    expected = 16 * 64 * 9 + 2 * 16 * 64 * 144 + 32 * 16 * 144 + 512 * 64 + 64 * 10
    assert stats["macs"] == expected == sum(stats["macs_per_node"].values())
    assert stats["bytes"]["onnx"] == model.ByteSize()
    assert stats["macs_not_counted"] == {"BatchNormalization": 4, "Relu": 5, "Add": 1, "Flatten": 1}
