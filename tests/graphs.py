"""Tiny ONNX graphs built in code with seeded weights: one builder per structure the core must handle.

Every builder returns a model that passes `onnx.checker` (full check), with one float input `x` and one output
`y` unless its docstring says otherwise, small enough that ONNX Runtime runs it in microseconds. `LOSSLESS`
names the builders that lossless passes (cleanup, fold-bn) are checked on. Below the builders are the checks the
tests share: running a spec through the real pass manager, op counts, and the output error against a reference.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
FLOAT = TensorProto.FLOAT


class Builder:
    """Collects nodes and seeded initializers; `model()` assembles and checks them."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.constant_nodes = 0

    def weight(self, name: str, *shape: int, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        arr = self.rng.standard_normal(shape) * (scale if scale is not None else 1.0 / np.sqrt(fan_in))
        return self.tensor(name, arr.astype(np.float32))

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def constant(self, name: str, array: np.ndarray) -> str:
        self.constant_nodes += 1
        return self.node("Constant", [], name, value=numpy_helper.from_array(np.asarray(array), name + "_value"))

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int = 3, bias: bool = True, group: int = 1,
             **attrs) -> str:
        inputs = [x, self.weight(name + ".weight", c_out, c_in // group, k, k)]
        if bias:
            inputs.append(self.weight(name + ".bias", c_out, scale=0.1))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], group=group, **attrs)

    def bn(self, x: str, name: str, channels: int) -> str:
        rng = self.rng
        params = [self.tensor(f"{name}.{p}", v.astype(np.float32)) for p, v in (
            ("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.standard_normal(channels) * 0.1),
            ("mean", rng.standard_normal(channels) * 0.1), ("var", rng.uniform(0.5, 1.5, channels)))]
        return self.node("BatchNormalization", [x] + params, name, epsilon=1e-5)

    def model(self, inputs: dict[str, list], output: str, opset: int = OPSET, ir_version: int | None = None,
              initializers_as_inputs: bool = False, check: bool = True, output_shape: list | None = None
              ) -> onnx.ModelProto:
        graph_inputs = [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs.items()]
        if initializers_as_inputs:
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, "tiny", graph_inputs,
                                  [helper.make_tensor_value_info(output, FLOAT, output_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="squeeze-tests")
        model.ir_version = ir_version or {8: 3, 13: 7}.get(opset, 8)
        if check and output_shape is None:  # give the output its inferred shape (the full checker wants one)
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            model.graph.output[0].CopyFrom(inferred.graph.output[0])
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


# ------------------------------------------------------------------------------------------------- builders

def conv_bn_relu(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ Conv 3→4 3×3 pad 1 ─ BN ─ Relu ─ y[1,4,8,8]
    """
    g = Builder(seed)
    h = g.conv("x", "conv", 3, 4, pads=[1, 1, 1, 1])
    h = g.bn(h, "bn", 4)
    g.node("Relu", [h], "y")
    return g.model({"x": [1, 3, 8, 8]}, "y")


def residual_add(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,4,8,8] ─┬─ Conv ─ BN ─ Relu ─ Conv ─ BN ─ Add ─ Relu ─ y[1,4,8,8]
                └──────────────────────────────────┘
    """
    g = Builder(seed)
    h = g.conv("x", "conv1", 4, 4, bias=False, pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(h, "bn1", 4)], "relu1")
    h = g.conv(h, "conv2", 4, 4, bias=False, pads=[1, 1, 1, 1])
    h = g.node("Add", [g.bn(h, "bn2", 4), "x"], "add")
    g.node("Relu", [h], "y")
    return g.model({"x": [1, 4, 8, 8]}, "y")


def concat(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,8,8] ─┬─ Conv 3→4 ─ BN ─┐
                └─ Conv 3→2 ──────┴─ Concat ─ BN ─ Relu ─ Conv 6→4 1×1 ─ y[1,4,6,6]
    (the BN after Concat has no Conv to fold into: fold-bn keeps it)
    """
    g = Builder(seed)
    a = g.bn(g.conv("x", "conv_a", 3, 4), "bn_a", 4)
    b = g.conv("x", "conv_b", 3, 2)
    h = g.node("Concat", [a, b], "concat", axis=1)
    h = g.node("Relu", [g.bn(h, "bn_cat", 6)], "relu")
    g.conv(h, "y", 6, 4, k=1)
    return g.model({"x": [1, 3, 8, 8]}, "y")


def split(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ Conv 3→8 ─ BN ─ Split(4,4) ─┬─ Relu ────┐
                                              └─ Sigmoid ─ Mul ─ y[1,4,8,8]
    """
    g = Builder(seed)
    h = g.bn(g.conv("x", "conv", 3, 8, pads=[1, 1, 1, 1]), "bn", 8)
    sizes = g.tensor("split_sizes", np.array([4, 4], np.int64))
    g.node("Split", [h, sizes], "split", outputs=["half_a", "half_b"], axis=1)
    a = g.node("Relu", ["half_a"], "relu")
    b = g.node("Sigmoid", ["half_b"], "sigmoid")
    g.node("Mul", [a, b], "y")
    return g.model({"x": [1, 3, 8, 8]}, "y")


def depthwise(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,4,8,8] ─ Conv dw 3×3 group 4 ─ BN ─ Relu ─ Conv pw 1×1 4→6 ─ BN ─ y[1,6,8,8]
    """
    g = Builder(seed)
    h = g.bn(g.conv("x", "dw", 4, 4, group=4, pads=[1, 1, 1, 1]), "bn_dw", 4)
    h = g.node("Relu", [h], "relu")
    h = g.conv(h, "pw", 4, 6, k=1, bias=False)
    g.bn(h, "y", 6)
    return g.model({"x": [1, 4, 8, 8]}, "y")


def flatten_gemm(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,6,6] ─ Conv 3→4 3×3 ─ Relu ─ Flatten ─ Gemm 64→5 (transB) ─ y[1,5]
    """
    g = Builder(seed)
    h = g.node("Relu", [g.conv("x", "conv", 3, 4)], "relu")
    h = g.node("Flatten", [h], "flatten", axis=1)
    g.node("Gemm", [h, g.weight("fc.weight", 5, 64), g.weight("fc.bias", 5, scale=0.1)], "y", transB=1)
    return g.model({"x": [1, 3, 6, 6]}, "y")


def gemm_bn1d(seed: int = 0) -> onnx.ModelProto:
    """
    x[2,16] ─ Gemm 16→8 ─ BN (1-D) ─ Relu ─ Gemm 8→3 ─ y[2,3]
    """
    g = Builder(seed)
    h = g.node("Gemm", ["x", g.weight("fc1.weight", 16, 8), g.weight("fc1.bias", 8, scale=0.1)], "fc1")
    h = g.node("Relu", [g.bn(h, "bn", 8)], "relu")
    g.node("Gemm", [h, g.weight("fc2.weight", 3, 8)], "y", transB=1, alpha=0.5)
    return g.model({"x": [2, 16]}, "y")


def conv_relu_bn_flatten_gemm(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,6,6] ─ Conv 3→4 3×3 ─ Relu ─ BN ─ Flatten ─ Gemm 64→5 ─ y[1,5]
    (nothing foldable precedes the BN: fold-bn folds it forward into the Gemm)
    """
    g = Builder(seed)
    h = g.node("Relu", [g.conv("x", "conv", 3, 4)], "relu")
    h = g.node("Flatten", [g.bn(h, "bn", 4)], "flatten", axis=1)
    g.node("Gemm", [h, g.weight("fc.weight", 64, 5), g.weight("fc.bias", 5, scale=0.1)], "y", beta=0.5)
    return g.model({"x": [1, 3, 6, 6]}, "y")


def relu_bn_conv(seed: int = 0, pads: int = 0) -> onnx.ModelProto:
    """
    x[1,4,6,6] ─ Relu ─ BN ─ Conv 4→6 3×3 group 2, pads `pads` ─ y
    (fold-bn folds the BN forward into the Conv, unless the Conv pads its input)
    """
    g = Builder(seed)
    h = g.bn(g.node("Relu", ["x"], "relu"), "bn", 4)
    g.conv(h, "y", 4, 6, group=2, pads=[pads] * 4)
    return g.model({"x": [1, 4, 6, 6]}, "y")


def conv_transpose_bn(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,4,5,5] ─ ConvTranspose 4→6 3×3 stride 2 group 2 ─ BN ─ y[1,6,11,11]
    """
    g = Builder(seed)
    h = g.node("ConvTranspose", ["x", g.weight("deconv.weight", 4, 3, 3, 3), g.weight("deconv.bias", 6, scale=0.1)],
               "deconv", kernel_shape=[3, 3], strides=[2, 2], group=2)
    g.bn(h, "y", 6)
    return g.model({"x": [1, 4, 5, 5]}, "y")


def identity_dropout_chain(seed: int = 0) -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ Identity ─ Conv 3→4 ─ Dropout ─ Identity ─ Relu ─ Dropout ─ Identity ─ y[1,4,6,6]
    (inference-mode Dropouts and Identities; the graph output is an Identity's output)
    """
    g = Builder(seed)
    h = g.node("Identity", ["x"], "id_in")
    h = g.node("Dropout", [g.conv(h, "conv", 3, 4)], "drop1")
    h = g.node("Relu", [g.node("Identity", [h], "id_mid")], "relu")
    h = g.node("Dropout", [h], "drop2")
    g.node("Identity", [h], "y")
    return g.model({"x": [1, 3, 8, 8]}, "y")


def constant_foldable(seed: int = 0) -> onnx.ModelProto:
    """
    Constant k ─┐
    Constant v ─ Mul ─ Reshape([1,4,1,1]) ─┐
    x[1,3,6,6] ─ Conv 3→4 (no bias) ────── Add ─ Reshape ─ y[1,64]
         └─ Shape ─ Gather(0) ─ Unsqueeze ─ Concat([-1]) ─┘
    (everything but Conv, Add and the last Reshape folds into constants)
    """
    g = Builder(seed)
    k = g.constant("k", np.float32(0.5))
    v = g.constant("v", g.rng.standard_normal(4).astype(np.float32))
    bias = g.node("Mul", [k, v], "bias_mul")
    bias = g.node("Reshape", [bias, g.constant("bias_shape", np.array([1, 4, 1, 1], np.int64))], "bias")
    h = g.node("Add", [g.conv("x", "conv", 3, 4, bias=False), bias], "add")
    batch = g.node("Gather", [g.node("Shape", ["x"], "shape"), g.constant("zero", np.array(0, np.int64))],
                   "batch", axis=0)
    batch = g.node("Unsqueeze", [batch, g.tensor("axes0", np.array([0], np.int64))], "batch_1d")
    shape = g.node("Concat", [batch, g.tensor("minus_one", np.array([-1], np.int64))], "out_shape", axis=0)
    g.node("Reshape", [h, shape], "y")
    return g.model({"x": [1, 3, 6, 6]}, "y", output_shape=[1, 64])


def ir3_initializers_as_inputs(seed: int = 0) -> onnx.ModelProto:
    """
    IR 3, opset 8, every initializer also listed in graph.input (like the CNTK/caffe2-era zoo models):
    x[1,3,8,8] ─ Conv 3→4 ─ BN ─ Relu ─ Dropout ─ Reshape([1,-1]) ─ MatMul 144→10 ─ Add ─ y[1,10]
    """
    g = Builder(seed)
    h = g.node("Relu", [g.bn(g.conv("x", "conv", 3, 4), "bn", 4)], "relu")
    h = g.node("Dropout", [h], "dropout")
    h = g.node("Reshape", [h, g.tensor("flat_shape", np.array([1, -1], np.int64))], "flat")
    h = g.node("MatMul", [h, g.weight("fc.weight", 144, 10)], "fc")
    g.node("Add", [h, g.weight("fc.bias", 1, 10, scale=0.1)], "y")
    return g.model({"x": [1, 3, 8, 8]}, "y", opset=8, ir_version=3, initializers_as_inputs=True)


LOSSLESS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu": conv_bn_relu,
    "residual_add": residual_add,
    "concat": concat,
    "split": split,
    "depthwise": depthwise,
    "flatten_gemm": flatten_gemm,
    "gemm_bn1d": gemm_bn1d,
    "conv_relu_bn_flatten_gemm": conv_relu_bn_flatten_gemm,
    "relu_bn_conv": relu_bn_conv,
    "conv_transpose_bn": conv_transpose_bn,
    "identity_dropout_chain": identity_dropout_chain,
    "constant_foldable": constant_foldable,
    "ir3_initializers_as_inputs": ir3_initializers_as_inputs,
}


# ------------------------------------------------------------------------- graphs for data and I/O tests

def gemm(inputs: int = 256, outputs: int = 64) -> onnx.ModelProto:
    """
    x[1,inputs] ─ Gemm (transB) ─ y[1,outputs]
    """
    g = Builder(0)
    g.node("Gemm", ["x", g.weight("fc.weight", outputs, inputs), g.weight("fc.bias", outputs, scale=0.1)], "y",
           transB=1)
    return g.model({"x": [1, inputs]}, "y")


def two_inputs() -> onnx.ModelProto:
    """
    a[1,4] ─┐
    b[1,4] ─ Add ─ y[1,4]
    """
    g = Builder()
    g.node("Add", ["a", "b"], "y")
    return g.model({"a": [1, 4], "b": [1, 4]}, "y")


def dynamic_dims() -> onnx.ModelProto:
    """
    x[N,3,H,W] ─ Conv 3→4 3×3 pad 1 ─ GlobalAveragePool ─ Flatten ─ y[N,4]
    """
    g = Builder()
    h = g.node("GlobalAveragePool", [g.conv("x", "conv", 3, 4, pads=[1, 1, 1, 1])], "gap")
    g.node("Flatten", [h], "y", axis=1)
    return g.model({"x": ["N", 3, "H", "W"]}, "y")


def dynamic_batch() -> onnx.ModelProto:
    """
    x[N,16] ─ Gemm 16→10 ─ y[N,10]     (only the batch dimension is dynamic)
    """
    g = Builder()
    g.node("Gemm", ["x", g.weight("fc.weight", 16, 10), g.weight("fc.bias", 10)], "y")
    return g.model({"x": ["N", 16]}, "y")


def fails_checker() -> onnx.ModelProto:
    """A Relu that reads a tensor nothing produces: parses as ONNX, fails `onnx.checker`."""
    g = Builder()
    g.node("Relu", ["nowhere"], "y")
    return g.model({"x": [1, 4]}, "y", check=False)


# ------------------------------------------------------------------------------------------------- checks

# scales and zero points of qdq_model's activation (x) and output (y)
QDQ_XS, QDQ_XZ, QDQ_YS, QDQ_YZ = np.float32(0.02), np.uint8(100), np.float32(0.05), np.uint8(7)


def host_target():
    """An LLVM target for this host's CPU (what the schedule and int8 tests build for)."""
    import tvm

    from squeeze.targets import tvm_build
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


@lru_cache(maxsize=None)
def host_weight_limit() -> int:
    """The largest |int8 weight| the tests' QDQ models use on this host: 127 where its int8 dot product is exact
    for any weights (VNNI, aarch64 sdot) or where there is none; 63 where it is `vpmaddubsw` (AVX2 / AVX-512BW
    without VNNI), which adds two products into a saturating int16, exact only while |w₀|+|w₁| ≤ 128
    (`dot_intrinsics.pairs_fit`): squeeze keeps a layer whose weights break that in float, and ONNX Runtime's
    kernels on such a CPU saturate, so neither would be the int8 computation a test means to compare."""
    from squeeze.targets.schedules import int8
    found = int8.dot_intrinsic(host_target())
    return 127 if found is None or found[2] else 63


def skip_unless_exact_int8() -> None:
    """Skip a test of `quant`'s full-range 8-bit weights in int8 kernels (ONNX Runtime's or squeeze's) on a CPU
    whose int8 dot product is `vpmaddubsw` (`host_weight_limit` 63): there ONNX Runtime's kernels saturate and
    squeeze keeps such layers in float, so the int8 result the test checks does not exist."""
    if host_weight_limit() != 127:
        import pytest
        pytest.skip("this CPU's int8 dot product is vpmaddubsw (no VNNI): ONNX Runtime's int8 kernels saturate on "
                    "full-range 8-bit weights and squeeze keeps those layers in float")


def qdq_weights(rng, shape, axis_len, limit: int | None = None):
    """Symmetric int8 weights of `shape` quantized per `axis_len` channels (axis 0 or the last), |w| ≤ `limit`
    (default `host_weight_limit`), and their scales."""
    limit = host_weight_limit() if limit is None else limit
    w = rng.normal(size=shape).astype(np.float32)
    scale = (np.abs(w).reshape(axis_len, -1).max(1) / limit).astype(np.float32) if shape[0] == axis_len else \
        (np.abs(w).reshape(-1, axis_len).max(0) / limit).astype(np.float32)
    full = scale.reshape((-1,) + (1,) * (len(shape) - 1)) if shape[0] == axis_len else scale
    return np.clip(np.round(w / full), -limit, limit).astype(np.int8), scale


def qdq_model(op: str = "Conv", *, c=16, k=32, hw=(12, 12), ksize=3, stride=1, pad=1, quant_out=True, bias=True,
              seed=0, weight_zero_point=0, trans_b=False, dilation=1, pads=None, groups=1,
              weight_limit: int | None = None) -> onnx.ModelProto:
    """x → Q → DQ ─┐
       W_s8 → DQ ──┼→ Conv/Gemm/MatMul (+ DQ(b_s32)) → Q → DQ → out          (the form `quant` writes)

    Input `x`, output `out` (`y` with quant_out=False). `trans_b`: a Gemm with its weight stored [k, c] and
    transB=1, as exporters and `quant` write it; `pads`: a Conv's 4 pads (default `pad` on every side); `groups`:
    a grouped Conv (c = k = groups: depthwise); `weight_limit`: the largest |int8 weight| (`qdq_weights`)."""
    rng = np.random.default_rng(seed)
    if op == "Conv":
        wq, ws = qdq_weights(rng, (k, c // groups, ksize, ksize), k, weight_limit)
        xshape = [1, c, *hw]
        axis = 0
    elif trans_b:
        wq, ws = qdq_weights(rng, (k, c), k, weight_limit)
        xshape, axis = [1, c], 0
    else:
        wq, ws = qdq_weights(rng, (c, k), k, weight_limit)
        xshape = [3, c] if op == "MatMul" else [1, c]
        axis = 1
    bq = rng.integers(-3000, 3000, size=k).astype(np.int32)
    arrays = {"wq": wq, "ws": ws, "xs": np.array(QDQ_XS), "xz": np.array(QDQ_XZ), "ys": np.array(QDQ_YS),
              "yz": np.array(QDQ_YZ), "bq": bq, "bs": (QDQ_XS * ws).astype(np.float32),
              "wz": np.array(weight_zero_point, np.int8)}
    inits = [numpy_helper.from_array(v, name) for name, v in arrays.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"] + (["wz"] if weight_zero_point else []), ["wd"],
                          axis=axis if not weight_zero_point else 0),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0)]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["xd", "wd"] + (["bd"] if bias else []), ["y"], pads=pads or [pad] * 4,
                                  strides=[stride, stride], kernel_shape=[ksize, ksize],
                                  dilations=[dilation, dilation], group=groups))
    elif op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd"] + (["bd"] if bias else []), ["y"], transB=int(trans_b)))
    else:
        nodes += [helper.make_node("MatMul", ["xd", "wd"], ["mm"]), helper.make_node("Add", ["mm", "bd"], ["y"])]
    out = "y"
    if quant_out:
        nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
        out = "out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, xshape)],
                          [helper.make_tensor_value_info(out, FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def random_inputs(model: onnx.ModelProto, count: int = 4, seed: int = 1):
    """A squeeze Dataset of N(0,1) samples for `model`'s inputs (static shapes)."""
    from squeeze.data import input_specs, resolve_shapes, synthesize
    specs = input_specs(model)
    return synthesize(specs, resolve_shapes(specs, {}), count, seed)


def outputs(model: onnx.ModelProto, data) -> dict[str, np.ndarray]:
    from squeeze import runtime
    return runtime.run(model, data)


def max_rel_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, data) -> float:
    """max |candidate − reference| / max |reference| over every output and sample (ONNX Runtime)."""
    ref, new = outputs(reference, data), outputs(candidate, data)
    assert sorted(ref) == sorted(new), f"output names differ: {sorted(ref)} vs {sorted(new)}"
    worst = 0.0
    for name in ref:
        assert ref[name].shape == new[name].shape, name
        r, n = ref[name].astype(np.float64), new[name].astype(np.float64)
        worst = max(worst, float(np.abs(r - n).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def apply(model: onnx.ModelProto, spec: str, data=None, seed: int = 0):
    """Run `spec` through the real pass manager; return (final model, per-pass steps). Fails on a pass failure."""
    from squeeze.data import input_specs, resolve_shapes
    from squeeze.pipeline import run_pipeline
    from squeeze.registry import get_pass
    from squeeze.spec import bind
    data = data if data is not None else random_inputs(model, count=8, seed=seed)
    shapes = resolve_shapes(input_specs(model), {}, data)
    result = run_pipeline(model, bind(spec, get_pass), data, shapes, seed=seed)
    assert result.failure is None, result.failure
    return result.model, result.steps


def qdq_upsample(c_in: int, c_out: int, k: tuple[int, int], hw: tuple[int, int], axis_scale: bool = True,
                 seed: int = 3) -> onnx.ModelProto:
    """x → Q → DQ ─ ConvTranspose k = stride ─ Q → DQ → out, the weight Cast(int8) · scale per output channel (what
    `quant` writes for a ConvTranspose: the foldable form, ONNX Runtime runs the layer in float)."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, size=(c_in, c_out, *k)).astype(np.int8)
    scale = (rng.random(c_out).astype(np.float32) * 0.01 + 0.002).reshape(1, c_out, 1, 1) if axis_scale \
        else np.float32(0.004)
    inits = {"xs": np.float32(0.03), "xz": np.uint8(120), "wq": wq, "wscale": scale, "ys": np.float32(0.07),
             "yz": np.uint8(110)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("Cast", ["wq"], ["wf"], to=FLOAT),
             helper.make_node("Mul", ["wf", "wscale"], ["w"]),
             helper.make_node("ConvTranspose", ["xd", "w"], ["y"], kernel_shape=list(k), strides=list(k)),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1, c_in, *hw])],
                              [helper.make_tensor_value_info("out", FLOAT, [1, c_out, hw[0] * k[0], hw[1] * k[1]])],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model
