"""Unusual and hostile ONNX models, built in code: the edge cases exporters produce and the ones attackers would.

Each builder returns a `ModelProto` (possibly one that must be refused: a cycle, a dangling input). `EDGE_CASES`
names every builder with what squeeze must do with it; the mutator (`robustness.mutate`) starts from these and
from `graphs.LOSSLESS` and breaks them further.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphs
from graphs import Builder

FLOAT = TensorProto.FLOAT
NEWEST_OPSET = onnx.defs.onnx_opset_version()
# The lowest IR version that can carry each default-domain opset (onnx/docs/Versioning.md).
_IR_FOR_OPSET = ((8, 3), (9, 4), (10, 5), (11, 6), (15, 7), (18, 8), (20, 9), (22, 10), (25, 11))


def ir_for_opset(opset: int) -> int:
    return next((ir for top, ir in _IR_FOR_OPSET if opset <= top), onnx.IR_VERSION)


def _finish(g: Builder, inputs: dict, output: str, opset: int = 13, **kw) -> onnx.ModelProto:
    ir_version = kw.pop("ir_version", ir_for_opset(opset))
    return g.model(inputs, output, opset=opset, ir_version=ir_version, initializers_as_inputs=ir_version < 4, **kw)


# ------------------------------------------------------------------------------------- opsets and IR versions

def opset_model(opset: int) -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ Conv 3→4 ─ BN ─ Relu ─ MaxPool 2 ─ Flatten ─ Gemm 36→5 ─ y[1,5]     (ops every opset ≥ 7 has)
    """
    g = Builder(opset)
    h = g.bn(g.conv("x", "conv", 3, 4), "bn", 4)
    h = g.node("MaxPool", [g.node("Relu", [h], "relu")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Flatten", [h], "flat", axis=1)
    g.node("Gemm", [h, g.weight("fc.weight", 5, 36), g.weight("fc.bias", 5)], "y", transB=1)
    return _finish(g, {"x": [1, 3, 8, 8]}, "y", opset=opset, output_shape=[1, 5])


def initializers_as_inputs(ir_version: int) -> onnx.ModelProto:
    """conv_bn_relu with every initializer also a graph input (IR ≥ 4: overridable defaults; IR 3: required)."""
    g = Builder(ir_version)
    h = g.bn(g.conv("x", "conv", 3, 4, pads=[1, 1, 1, 1]), "bn", 4)
    g.node("Relu", [h], "y")
    opset = 8 if ir_version == 3 else 13
    return g.model({"x": [1, 3, 8, 8]}, "y", opset=opset, ir_version=ir_version, initializers_as_inputs=True)


# ------------------------------------------------------------------------------------- weight dtypes and values

def fp16_model() -> onnx.ModelProto:
    """Everything in float16: x[1,3,8,8] fp16 ─ Conv ─ BN ─ Relu ─ y fp16 (as fp16 exporters write it)."""
    model = graphs.conv_bn_relu()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def _cast_weights(model: onnx.ModelProto, to: int) -> onnx.ModelProto:
    """Store every float initializer as `to` and insert a Cast back to float before its use."""
    casts = []
    for t in model.graph.initializer:
        if t.data_type != FLOAT:
            continue
        arr = numpy_helper.to_array(t)
        if to == TensorProto.BFLOAT16:
            stored = helper.make_tensor(t.name + "_stored", to, arr.shape, _bf16_bits(arr), raw=False)
        else:
            stored = numpy_helper.from_array(arr.astype(helper.tensor_dtype_to_np_dtype(to)), t.name + "_stored")
        casts.append(helper.make_node("Cast", [t.name + "_stored"], [t.name], name=t.name + "_cast", to=FLOAT))
        t.CopyFrom(stored)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bf16_bits(arr: np.ndarray) -> list[int]:
    bits = np.asarray(arr, np.float32).view(np.uint32) >> 16
    return [int(b) for b in bits.ravel()]


def fp16_weights() -> onnx.ModelProto:
    """Float16 initializers, each Cast to float before use (mixed-precision exporters)."""
    return _cast_weights(graphs.residual_add(), TensorProto.FLOAT16)


def bf16_weights() -> onnx.ModelProto:
    """Bfloat16 initializers, each Cast to float before use."""
    return _cast_weights(graphs.flatten_gemm(), TensorProto.BFLOAT16)


def int_weights() -> onnx.ModelProto:
    """
    x[1,16] ─ MatMul(Cast(int32 W)) ─ Add(int64 b → Cast) ─ y[1,4]      (integer weights, Cast to float)
    """
    g = Builder()
    g.tensor("w_int", g.rng.integers(-8, 8, (16, 4)).astype(np.int32))
    g.tensor("b_int", g.rng.integers(-8, 8, (4,)).astype(np.int64))
    w = g.node("Cast", ["w_int"], "w", to=FLOAT)
    b = g.node("Cast", ["b_int"], "b", to=FLOAT)
    g.node("Add", [g.node("MatMul", ["x", w], "mm"), b], "y")
    return _finish(g, {"x": [1, 16]}, "y")


def int8_dequantize() -> onnx.ModelProto:
    """
    int8 W ─ DequantizeLinear(scale, zero point) ─┐
    x[1,3,8,8] ─────────────────────────────── Conv ─ Relu ─ y      (an int8 weight-only model)
    """
    g = Builder()
    g.tensor("w_q", g.rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8))
    g.tensor("w_scale", np.float32(0.01))
    g.tensor("w_zp", np.int8(0))
    w = g.node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], "w")
    g.node("Relu", [g.node("Conv", ["x", w], "conv", kernel_shape=[3, 3])], "y")
    return _finish(g, {"x": [1, 3, 8, 8]}, "y")


def nan_inf_weights() -> onnx.ModelProto:
    """conv_bn_relu with NaN and ±Inf in the conv weight and an Inf in the BN scale."""
    model = graphs.conv_bn_relu()
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        if t.name == "conv.weight":
            arr.flat[0], arr.flat[1], arr.flat[2] = np.nan, np.inf, -np.inf
        elif t.name == "bn.scale":
            arr[1] = np.inf
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return model


def zero_size_tensors() -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ Conv 3→4 ─ Concat(axis 1, empty[1,0,6,6]) ─ Relu ─ y[1,4,6,6]      (a zero-size initializer)
    """
    g = Builder()
    g.tensor("empty", np.zeros((1, 0, 6, 6), np.float32))
    g.tensor("no_values", np.zeros((0,), np.float32))  # unused, zero-size
    h = g.node("Concat", [g.conv("x", "conv", 3, 4), "empty"], "cat", axis=1)
    g.node("Relu", [h], "y")
    return _finish(g, {"x": [1, 3, 8, 8]}, "y")


# ------------------------------------------------------------------------------------- shapes and layouts

def symbolic_dims() -> onnx.ModelProto:
    """x[N,3,H,W] ─ Conv ─ GlobalAveragePool ─ Flatten ─ y[N,4]: needs --input-shape or data."""
    return graphs.dynamic_dims()


def dynamic_batch() -> onnx.ModelProto:
    return graphs.dynamic_batch()


def unknown_rank_input() -> onnx.ModelProto:
    """An input with no shape at all (rank unknown): x ─ Relu ─ y (the checker wants a shape on graph inputs)."""
    g = Builder()
    g.node("Relu", ["x"], "y")
    return _finish(g, {"x": None}, "y", check=False)


def scalar_input() -> onnx.ModelProto:
    """A rank-0 input: x[] ─ Mul(2) ─ y[]."""
    g = Builder()
    g.node("Mul", ["x", g.tensor("two", np.float32(2.0))], "y")
    return _finish(g, {"x": []}, "y")


def nhwc() -> onnx.ModelProto:
    """
    x[1,8,8,3] NHWC ─ Transpose(0,3,1,2) ─ Conv 3→4 ─ BN ─ Relu ─ Transpose(0,2,3,1) ─ y[1,8,8,4]  (TF exporters)
    """
    g = Builder()
    h = g.node("Transpose", ["x"], "to_nchw", perm=[0, 3, 1, 2])
    h = g.node("Relu", [g.bn(g.conv(h, "conv", 3, 4, pads=[1, 1, 1, 1]), "bn", 4)], "relu")
    g.node("Transpose", [h], "y", perm=[0, 2, 3, 1])
    return _finish(g, {"x": [1, 8, 8, 3]}, "y")


def integer_input() -> onnx.ModelProto:
    """ids[1,5] int64 ─ Gather(embedding 10×4) ─ ReduceMean ─ y[1,4]."""
    g = Builder()
    g.weight("emb", 10, 4)
    h = g.node("Gather", ["emb", "ids"], "gather", axis=0)
    g.node("ReduceMean", [h], "y", axes=[1], keepdims=0)
    graph = helper.make_graph(g.nodes, "int_input", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def bool_input() -> onnx.ModelProto:
    """mask[1,4] bool, x[1,4] ─ Where(mask, x, 0) ─ y[1,4]."""
    g = Builder()
    g.node("Where", ["mask", "x", g.tensor("zero", np.float32(0))], "y")
    graph = helper.make_graph(g.nodes, "bool_input",
                              [helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 4]),
                               helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def string_input() -> onnx.ModelProto:
    """s[1] string ─ Identity ─ y[1] string (no tensor squeeze can synthesise)."""
    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["y"], name="id")], "string_input",
                              [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def no_inputs() -> onnx.ModelProto:
    """A graph with no inputs at all: Constant ─ Relu ─ y[4]."""
    g = Builder()
    g.node("Relu", [g.constant("c", np.array([-1, 0, 1, 2], np.float32))], "y")
    return _finish(g, {}, "y")


def output_is_input() -> onnx.ModelProto:
    """No nodes at all: the graph output is the input (x = y)."""
    graph = helper.make_graph([], "passthrough", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("x", FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def output_is_initializer() -> onnx.ModelProto:
    """x[1,4] ─ Relu ─ y, plus a second output that is an initializer."""
    g = Builder()
    g.node("Relu", ["x"], "y")
    g.tensor("w", np.ones((2, 2), np.float32))
    model = _finish(g, {"x": [1, 4]}, "y")
    model.graph.output.append(helper.make_tensor_value_info("w", FLOAT, [2, 2]))
    return model


def two_outputs_one_consumed() -> onnx.ModelProto:
    """x ─ Conv ─ h ─ Relu ─ y; both h and y are graph outputs."""
    model = graphs.conv_bn_relu()
    model.graph.output.append(helper.make_tensor_value_info("conv", FLOAT, [1, 4, 8, 8]))
    return model


# ------------------------------------------------------------------------------------- control flow

def _branch(name: str, nodes: list, out: str, shape) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, FLOAT, shape)])


def if_model() -> onnx.ModelProto:
    """
    x[1,3,8,8] ─ ReduceSum > 0 ─ cond
    If(cond) then: Conv(x, outer W) ─ BN ─ Relu     else: Conv(x, outer W) ─ Sigmoid    ─ y[1,4,8,8]
    (the branches read outer-scope initializers; passes must leave the If and its branches alone)
    """
    g = Builder()
    g.weight("w", 4, 3, 3, 3)
    for p, v in (("scale", np.ones(4)), ("bias", np.zeros(4)), ("mean", np.zeros(4)), ("var", np.ones(4))):
        g.tensor(f"bn_{p}", v.astype(np.float32))
    s = g.node("ReduceSum", ["x"], "sum", keepdims=0)
    cond = g.node("Greater", [s, g.tensor("zero", np.float32(0))], "cond")
    then = _branch("then", [
        helper.make_node("Conv", ["x", "w"], ["t_conv"], name="t_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["t_conv", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["t_bn"],
                         name="t_bn"),
        helper.make_node("Relu", ["t_bn"], ["t_out"], name="t_relu")], "t_out", [1, 4, 8, 8])
    other = _branch("else", [
        helper.make_node("Conv", ["x", "w"], ["e_conv"], name="e_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["e_conv"], ["e_out"], name="e_sig")], "e_out", [1, 4, 8, 8])
    g.node("If", [cond], "y", then_branch=then, else_branch=other)
    return _finish(g, {"x": [1, 3, 8, 8]}, "y", output_shape=[1, 4, 8, 8])


def if_after_conv_bn() -> onnx.ModelProto:
    """
    x ─ Conv ─ BN ─ Relu ─ h ─ If(ReduceMean(h) > 0) then: h·2  else: h+1 ─ y
    (the part before the If is ordinary and may be compressed; the If is untouchable)
    """
    g = Builder()
    h = g.node("Relu", [g.bn(g.conv("x", "conv", 3, 4, pads=[1, 1, 1, 1]), "bn", 4)], "h")
    m = g.node("ReduceMean", [h], "mean", keepdims=0)
    cond = g.node("Greater", [m, g.tensor("zero", np.float32(0))], "cond")
    g.tensor("two", np.float32(2))
    g.tensor("one", np.float32(1))
    then = _branch("then", [helper.make_node("Mul", [h, "two"], ["t_out"], name="t_mul")], "t_out", [1, 4, 8, 8])
    other = _branch("else", [helper.make_node("Add", [h, "one"], ["e_out"], name="e_add")], "e_out", [1, 4, 8, 8])
    g.node("If", [cond], "y", then_branch=then, else_branch=other)
    return _finish(g, {"x": [1, 3, 8, 8]}, "y", output_shape=[1, 4, 8, 8])


def if_reads_large_outer_weight() -> onnx.ModelProto:
    """
    if_model whose then-branch also adds ReduceSum(v) of an 80 kB outer-scope vector v: constant-foldable inside
    the branch, and large enough to take squeeze's large-weight export path
    """
    model = if_model()
    then = next(a for a in model.graph.node[-1].attribute if a.name == "then_branch").g
    model.graph.initializer.append(
        numpy_helper.from_array(np.random.default_rng(4).standard_normal(20000).astype(np.float32), "v"))
    then.node.append(helper.make_node("ReduceSum", ["v"], ["t_sum"], name="t_sum", keepdims=1))
    then.node.append(helper.make_node("Add", ["t_out", "t_sum"], ["t_out2"], name="t_add"))
    then.output[0].name = "t_out2"
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_model() -> onnx.ModelProto:
    """
    x[1,4] ─ Loop(3 iterations) body: acc ← Relu(MatMul(acc, W) + b) ─ y[1,4]      (outer-scope W, b)
    """
    g = Builder()
    g.weight("w", 4, 4)
    g.weight("b", 4, scale=0.1)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["acc_in", "w"], ["mm"], name="body_mm"),
         helper.make_node("Add", ["mm", "b"], ["pre"], name="body_add"),
         helper.make_node("Relu", ["pre"], ["acc_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", FLOAT, [1, 4])])
    g.tensor("trips", np.array(3, np.int64))
    g.tensor("true", np.array(True))
    g.node("Loop", ["trips", "true", "x"], "y", body=body)
    return _finish(g, {"x": [1, 4]}, "y", output_shape=[1, 4])


def scan_model() -> onnx.ModelProto:
    """
    x[5,4] (sequence of 5) ─ Scan body: state ← Tanh(state + x_t·W) ─ y[1,4]      (an RNN written as Scan)
    """
    g = Builder()
    g.weight("w", 4, 4)
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x_t", "axes0"], ["x_row"], name="row"),
         helper.make_node("MatMul", ["x_row", "w"], ["xw"], name="body_mm"),
         helper.make_node("Add", ["s_in", "xw"], ["pre"], name="body_add"),
         helper.make_node("Tanh", ["pre"], ["s_out"], name="body_tanh"),
         helper.make_node("Identity", ["s_out"], ["scan_out"], name="body_copy")],
        "body",
        [helper.make_tensor_value_info("s_in", FLOAT, [1, 4]), helper.make_tensor_value_info("x_t", FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", FLOAT, [1, 4]), helper.make_tensor_value_info("scan_out", FLOAT, [1, 4])])
    g.tensor("axes0", np.array([0], np.int64))
    g.tensor("s0", np.zeros((1, 4), np.float32))
    g.node("Scan", ["s0", "x"], "y", outputs=["y", "ys"], body=body, num_scan_inputs=1)
    return _finish(g, {"x": [5, 4]}, "y", output_shape=[1, 4])


# ------------------------------------------------------------------------------------- domains

def unknown_domain() -> onnx.ModelProto:
    """x ─ com.example.Frobnicate ─ Relu ─ y: an op no runtime knows (squeeze cannot verify it: refused)."""
    g = Builder()
    g.nodes.append(helper.make_node("Frobnicate", ["x"], ["f"], name="frob", domain="com.example", strength=3))
    g.node("Relu", ["f"], "y")
    graph = helper.make_graph(g.nodes, "custom", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 7
    return model


def contrib_domain() -> onnx.ModelProto:
    """x ─ Conv ─ BN ─ com.microsoft.Gelu ─ y: a domain onnx does not know but ONNX Runtime runs."""
    g = Builder()
    h = g.bn(g.conv("x", "conv", 3, 4, pads=[1, 1, 1, 1]), "bn", 4)
    g.nodes.append(helper.make_node("Gelu", [h], ["y"], name="gelu", domain="com.microsoft"))
    graph = helper.make_graph(g.nodes, "contrib", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 7
    return model


def local_function() -> onnx.ModelProto:
    """x ─ local.ConvBnRelu (a model-local function wrapping Conv+BN+Relu) ─ y."""
    g = Builder()
    g.weight("w", 4, 3, 3, 3)
    fn = helper.make_function(
        "local", "ConvRelu", ["inp", "weight"], ["out"],
        [helper.make_node("Conv", ["inp", "weight"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["out"])],
        [helper.make_opsetid("", 13)])
    g.nodes.append(helper.make_node("ConvRelu", ["x", "w"], ["y"], name="fn", domain="local"))
    graph = helper.make_graph(g.nodes, "functions", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)],
                              functions=[fn])
    model.ir_version = 8
    return model


# ------------------------------------------------------------------------------------- broken structure

def empty_graph() -> onnx.ModelProto:
    """A graph with no nodes, no inputs and no outputs."""
    model = helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def no_outputs() -> onnx.ModelProto:
    model = graphs.conv_bn_relu()
    del model.graph.output[:]
    return model


def cycle() -> onnx.ModelProto:
    """x ─ Add(x, b) ─ a ─ Relu ─ b ─ back into the Add: a cycle (not a DAG)."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["b"], name="relu")]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("b", FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def self_loop() -> onnx.ModelProto:
    """A node that reads its own output."""
    nodes = [helper.make_node("Add", ["x", "y"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "self", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def dangling_input() -> onnx.ModelProto:
    """A Conv whose weight names a tensor that nothing produces."""
    model = graphs.conv_bn_relu()
    model.graph.node[0].input[1] = "ghost"
    return model


def unused_input() -> onnx.ModelProto:
    """conv_bn_relu with a second graph input that nothing reads (kept: it is part of the interface)."""
    model = graphs.conv_bn_relu()
    model.graph.input.append(helper.make_tensor_value_info("unused", FLOAT, [1, 2]))
    return model


def duplicate_node_names() -> onnx.ModelProto:
    """Every node named "n" (legal in ONNX; names are not required to be unique)."""
    model = graphs.residual_add()
    for node in model.graph.node:
        node.name = "n"
    return model


def empty_node_names() -> onnx.ModelProto:
    model = graphs.concat()
    for node in model.graph.node:
        node.name = ""
    return model


def duplicate_outputs() -> onnx.ModelProto:
    """Two nodes write the same tensor (not SSA)."""
    model = graphs.residual_add()
    model.graph.node[2].output[0] = model.graph.node[1].output[0]
    return model


def duplicate_initializers() -> onnx.ModelProto:
    model = graphs.conv_bn_relu()
    model.graph.initializer.append(model.graph.initializer[0])
    return model


def duplicate_inputs() -> onnx.ModelProto:
    model = graphs.conv_bn_relu()
    model.graph.input.append(model.graph.input[0])
    return model


def hostile_names() -> onnx.ModelProto:
    """Tensor and node names that look like paths, plus control characters and a very long name."""
    model = graphs.conv_bn_relu()
    renames = {"conv.weight": "../../../../tmp/squeeze-escape", "bn.scale": "/etc/passwd", "bn.bias": "a\nb\x00c",
               "bn.mean": "C:\\Windows\\system32", "bn.var": "é" * 300, "conv": "~/.bashrc", "bn": "$(rm -rf)"}
    _rename(model.graph, renames)
    for node in model.graph.node:
        node.name = renames.get(node.name, node.name).replace("\x00", "")
    onnx.checker.check_model(model)
    return model


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for t in graph.initializer:
        t.name = renames.get(t.name, t.name)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = renames.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def training_dropout() -> onnx.ModelProto:
    """A Dropout in training mode with its mask used (cleanup must keep it)."""
    g = Builder()
    h = g.conv("x", "conv", 3, 4)
    g.node("Dropout", [h, g.tensor("ratio", np.float32(0.0)), g.tensor("train", np.array(True))], "drop",
           outputs=["d", "mask"])
    g.node("Mul", ["d", g.node("Cast", ["mask"], "mask_f", to=FLOAT)], "y")
    return _finish(g, {"x": [1, 3, 8, 8]}, "y")


def huge_attribute_values() -> onnx.ModelProto:
    """Conv with absurd but legal strides/dilations/pads (an exporter bug): the output shape collapses."""
    g = Builder()
    g.conv("x", "y", 3, 4, k=1, strides=[1000, 1000], pads=[0, 0, 0, 0])
    return _finish(g, {"x": [1, 3, 8, 8]}, "y")


def deep_chain(depth: int = 300) -> onnx.ModelProto:
    """A chain of 300 Relu/Identity nodes (deep graphs overflow recursive algorithms)."""
    g = Builder()
    h = "x"
    for i in range(depth):
        h = g.node("Relu" if i % 2 else "Identity", [h], f"n{i}")
    g.node("Identity", [h], "y")
    return _finish(g, {"x": [1, 4]}, "y")


# name -> (builder, expectation): "ok" (a valid output must come back), "error" (a SqueezeError), "either".
EDGE_CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    **{f"opset{v}": ((lambda v=v: opset_model(v)), "ok") for v in range(7, NEWEST_OPSET + 1)},
    **{f"ir{v}_initializers_as_inputs": ((lambda v=v: initializers_as_inputs(v)), "ok") for v in (3, 4, 7, 10)},
    "fp16_model": (fp16_model, "ok"),
    "fp16_weights": (fp16_weights, "ok"),
    "bf16_weights": (bf16_weights, "either"),
    "int_weights": (int_weights, "ok"),
    "int8_dequantize": (int8_dequantize, "ok"),
    "nan_inf_weights": (nan_inf_weights, "ok"),
    "zero_size_tensors": (zero_size_tensors, "ok"),
    "symbolic_dims": (symbolic_dims, "error"),  # without --input-shape: a DataError naming the flag
    "dynamic_batch": (dynamic_batch, "ok"),
    "unknown_rank_input": (unknown_rank_input, "error"),
    "scalar_input": (scalar_input, "ok"),
    "nhwc": (nhwc, "ok"),
    "integer_input": (integer_input, "ok"),
    "bool_input": (bool_input, "ok"),
    "string_input": (string_input, "either"),
    "no_inputs": (no_inputs, "either"),
    "output_is_input": (output_is_input, "either"),
    "output_is_initializer": (output_is_initializer, "either"),
    "two_outputs_one_consumed": (two_outputs_one_consumed, "ok"),
    "if": (if_model, "ok"),
    "if_after_conv_bn": (if_after_conv_bn, "ok"),
    "if_reads_large_outer_weight": (if_reads_large_outer_weight, "ok"),
    "loop": (loop_model, "ok"),
    "scan": (scan_model, "ok"),
    "unknown_domain": (unknown_domain, "error"),
    "contrib_domain": (contrib_domain, "ok"),
    "local_function": (local_function, "either"),
    "empty_graph": (empty_graph, "error"),
    "no_outputs": (no_outputs, "error"),
    "cycle": (cycle, "error"),
    "self_loop": (self_loop, "error"),
    "dangling_input": (dangling_input, "error"),
    "unused_input": (unused_input, "ok"),
    "duplicate_node_names": (duplicate_node_names, "either"),  # ONNX Runtime refuses them
    "empty_node_names": (empty_node_names, "ok"),
    "duplicate_outputs": (duplicate_outputs, "error"),
    "duplicate_initializers": (duplicate_initializers, "error"),
    "duplicate_inputs": (duplicate_inputs, "error"),
    "hostile_names": (hostile_names, "either"),
    "training_dropout": (training_dropout, "ok"),
    "huge_attribute_values": (huge_attribute_values, "either"),
    "deep_chain": (deep_chain, "ok"),
}
