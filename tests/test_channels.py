"""Channel dependency analysis and physical channel removal (`passes/channels.py`).

One tiny graph per structure the analysis must follow. For each: the channels of one group are made idle by
zeroing the weights that *read* them, then `remove_channels` cuts them — the model must stay valid, shrink
(weights and intermediate tensors), and compute the same outputs to 1e-5. A wrong offset, a wrong H×W expansion
or a forgotten BN statistic shows up as a mismatch, because the writers' filters are cut independently of the
readers' zeroed columns. Then the structures the analysis must refuse, with the reason it gives.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from squeeze.model import to_model
from squeeze.passes.channel_plan import plan_removal, round_keep
from squeeze.passes.channel_space import Group
from squeeze.passes.coupling import channel_groups, describe, merged_axis
from squeeze.passes.cutting import apply_plan, expand, remove_channels
from squeeze.passes.graph_util import constant_value

OPSET = 13


class Tiny:
    """A few helpers over onnx.helper with seeded weights."""

    def __init__(self, seed: int = 0, opset: int = OPSET) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, *shape: int) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * 0.5).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int = 3, group: int = 1, **attrs) -> str:
        attrs.setdefault("pads", [k // 2] * 4)
        return self.node("Conv", [x, self.weight(name + ".w", c_out, c_in // group, k, k),
                                  self.weight(name + ".b", c_out)], name, kernel_shape=[k, k], group=group, **attrs)

    def model(self, inputs: dict[str, list], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                       for n, s in inputs.items()],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        for i, out in enumerate(inferred.graph.output):
            model.graph.output[i].CopyFrom(out)
        onnx.checker.check_model(model, full_check=True)
        return model


# -------------------------------------------------------------------------------------- prunable structures
# Each returns (model, a node that writes the group to cut, the group channels to remove).

def chain_bn_relu():
    """x ─ Conv p 3→6 ─ BN ─ Relu ─ Conv 6→4 ─ y"""
    t = Tiny()
    h = t.conv("x", "p", 3, 6)
    bn = [t.const(f"bn.{k}", v.astype(np.float32)) for k, v in (
        ("s", t.rng.uniform(0.5, 1.5, 6)), ("b", t.rng.normal(0, 0.1, 6)), ("m", t.rng.normal(0, 0.1, 6)),
        ("v", t.rng.uniform(0.5, 1.5, 6)))]
    h = t.node("BatchNormalization", [h] + bn, "bn")
    h = t.node("Relu", [h], "relu")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [1, 4]


def norm_and_activations():
    """x ─ Conv p 3→6 ─ InstanceNorm ─ Clip ─ Sigmoid ─ HardSwish ─ LeakyRelu ─ PRelu[6,1,1] ─ Conv ─ y"""
    t = Tiny(opset=14)  # HardSwish
    h = t.conv("x", "p", 3, 6)
    h = t.node("InstanceNormalization", [h, t.weight("in.s", 6), t.weight("in.b", 6)], "inorm")
    h = t.node("Clip", [h, t.const("lo", np.float32(-1)), t.const("hi", np.float32(3))], "clip")
    h = t.node("Sigmoid", [h], "sig")
    h = t.node("HardSwish", [h], "hswish")
    h = t.node("LeakyRelu", [h], "leaky", alpha=0.1)
    h = t.node("PRelu", [h, t.weight("slope", 6, 1, 1)], "prelu")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [0, 2, 5]


def broadcast_constants():
    """x ─ Conv p 3→6 ─ Add c[6,1,1] ─ Mul c[1,6,1,1] ─ Sub scalar ─ Div c[6,1,1] ─ Conv ─ y"""
    t = Tiny()
    h = t.conv("x", "p", 3, 6)
    h = t.node("Add", [h, t.weight("a", 6, 1, 1)], "add")
    h = t.node("Mul", [t.weight("m", 1, 6, 1, 1), h], "mul")
    h = t.node("Sub", [h, t.const("s", np.float32(0.3))], "sub")
    h = t.node("Div", [h, t.const("d", np.full((6, 1, 1), 2.0, np.float32))], "div")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [3]


def residual_add():
    """
    x ─ Conv a 3→6 ─ Relu ─┬─ Conv b1 6→6 ─ Relu ─ Conv b2 6→8 ─┐
                           └─ Conv sc 6→8 1×1 ─────────────────┴─ Add ─ Relu ─ Conv 8→4 ─ y
    (the group cut is the residual one, written by b2 and sc together)
    """
    t = Tiny()
    a = t.node("Relu", [t.conv("x", "a", 3, 6)], "relu_a")
    h = t.node("Relu", [t.conv(a, "b1", 6, 6)], "relu_b1")
    h = t.conv(h, "b2", 6, 8)
    s = t.conv(a, "sc", 6, 8, k=1)
    h = t.node("Relu", [t.node("Add", [h, s], "add")], "relu_add")
    t.conv(h, "y", 8, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "b2", [0, 5, 7]


def residual_input_group():
    """The same residual block, cutting the channels of `a`, read by b1 and by the shortcut sc."""
    model, _, _ = residual_add()
    return model, "a", [2, 3]


def concat_offsets():
    """x ─┬─ Conv p 3→4 ─┐
          └─ Conv q 3→6 ─┴─ Concat ─ Relu ─ Conv 10→4 ─ y      (q's channels sit at offset 4)"""
    t = Tiny()
    p, q = t.conv("x", "p", 3, 4), t.conv("x", "q", 3, 6)
    h = t.node("Relu", [t.node("Concat", [p, q], "cat", axis=1)], "relu")
    t.conv(h, "y", 10, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "q", [0, 5]


def split_channels():
    """x ─ Conv p 3→8 ─ Split [3, 5] ─┬─ Conv 3→4 ─┐
                                       └─ Conv 5→4 ─┴─ Add ─ y"""
    t = Tiny()
    p = t.conv("x", "p", 3, 8)
    s0, s1 = "s0", "s1"
    t.node("Split", [p, t.const("sizes", np.array([3, 5], np.int64))], "split", outputs=[s0, s1], axis=1)
    t.node("Add", [t.conv(s0, "r0", 3, 4), t.conv(s1, "r1", 5, 4)], "y")
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [1, 6]


def slice_channels():
    """x ─ Conv p 3→8 ─┬─ Slice [2:7] ─ Conv 5→4 ─┐
                        └─ Conv 8→4 ───────────────┴─ Add ─ y"""
    t = Tiny()
    p = t.conv("x", "p", 3, 8)
    s = t.node("Slice", [p, t.const("st", np.array([2], np.int64)), t.const("en", np.array([7], np.int64)),
                         t.const("ax", np.array([1], np.int64))], "slice")
    t.node("Add", [t.conv(s, "r0", 5, 4), t.conv(p, "r1", 8, 4)], "y")
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [0, 3, 6]


def pooling_pad_resize():
    """x ─ Conv p 3→6 ─ MaxPool ─ Pad (spatial) ─ AveragePool ─ Resize ×2 (scales) ─ Resize (sizes) ─ Conv ─ y"""
    t = Tiny()
    h = t.conv("x", "p", 3, 6)
    h = t.node("MaxPool", [h], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    h = t.node("Pad", [h, t.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], "pad")
    h = t.node("AveragePool", [h], "avgpool", kernel_shape=[3, 3])
    h = t.node("Resize", [h, "", t.const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")
    h = t.node("Resize", [h, "", "", t.const("sizes", np.array([1, 6, 8, 8], np.int64))], "up2", mode="nearest")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 8, 8]}, ["y"]), "p", [1, 2]


def flatten_gemm():
    """x ─ Conv p 3→6 ─ Relu ─ Flatten ─ Gemm 96→5 (transB) ─ y      (each channel owns 4×4 features)"""
    t = Tiny()
    h = t.node("Flatten", [t.node("Relu", [t.conv("x", "p", 3, 6)], "relu")], "flat", axis=1)
    t.node("Gemm", [h, t.weight("fc.w", 5, 96), t.weight("fc.b", 5)], "y", transB=1)
    return t.model({"x": [1, 3, 4, 4]}, ["y"]), "p", [0, 4]


def reshape_gemm():
    """x ─ Conv p 3→6 ─ Reshape [1, 96] ─ Gemm 96→5 ─ y      (the explicit 96 is rewritten)"""
    t = Tiny()
    h = t.node("Reshape", [t.conv("x", "p", 3, 6), t.const("shape", np.array([1, 96], np.int64))], "reshape")
    t.node("Gemm", [h, t.weight("fc.w", 96, 5), t.weight("fc.b", 5)], "y")
    return t.model({"x": [1, 3, 4, 4]}, ["y"]), "p", [5]


def global_pool_gemm():
    """x ─ Conv p 3→6 ─ GlobalAveragePool ─ Flatten ─ Gemm 6→5 ─ y"""
    t = Tiny()
    h = t.node("Flatten", [t.node("GlobalAveragePool", [t.conv("x", "p", 3, 6)], "gap")], "flat")
    t.node("Gemm", [h, t.weight("fc.w", 5, 6), t.weight("fc.b", 1, 5)], "y", transB=1)
    return t.model({"x": [1, 3, 4, 4]}, ["y"]), "p", [1, 2, 3]


def nhwc_matmul():
    """x[1,4,4,3] NHWC ─ Transpose ─ Conv p 3→6 ─ Relu ─ Transpose (NHWC) ─ Reshape [-1, 96] ─ MatMul ─ Add ─ y
    (tf2onnx style: each channel owns every 6th feature)"""
    t = Tiny()
    h = t.node("Transpose", ["x"], "to_nchw", perm=[0, 3, 1, 2])
    h = t.node("Relu", [t.conv(h, "p", 3, 6)], "relu")
    h = t.node("Transpose", [h], "to_nhwc", perm=[0, 2, 3, 1])
    h = t.node("Reshape", [h, t.const("shape", np.array([-1, 96], np.int64))], "reshape")
    h = t.node("MatMul", [h, t.weight("fc.w", 96, 5)], "mm")
    t.node("Add", [h, t.weight("fc.b", 5)], "y")
    return t.model({"x": [1, 4, 4, 3]}, ["y"]), "p", [0, 3, 4]


def depthwise():
    """x ─ Conv p 3→6 ─ Relu ─ depthwise Conv (group 6) ─ BN ─ Relu ─ Conv 6→4 ─ y"""
    t = Tiny()
    h = t.node("Relu", [t.conv("x", "p", 3, 6)], "relu")
    h = t.conv(h, "dw", 6, 6, group=6)
    bn = [t.const(f"bn.{k}", v.astype(np.float32)) for k, v in (
        ("s", t.rng.uniform(0.5, 1.5, 6)), ("b", t.rng.normal(0, 0.1, 6)), ("m", t.rng.normal(0, 0.1, 6)),
        ("v", t.rng.uniform(0.5, 1.5, 6)))]
    h = t.node("Relu", [t.node("BatchNormalization", [h] + bn, "bn")], "relu2")
    t.conv(h, "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [2, 5]


def depthwise_multiplier():
    """x ─ Conv p 3→4 ─ depthwise Conv 4→8 (group 4: two filters per channel) ─ Relu ─ Conv 8→4 ─ y"""
    t = Tiny()
    h = t.node("Relu", [t.conv(t.conv("x", "p", 3, 4), "dw", 4, 8, group=4)], "relu")
    t.conv(h, "y", 8, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [1]


def conv_transpose():
    """x ─ Conv p 3→6 ─ ConvTranspose 6→5 stride 2 ─ Relu ─ Conv 5→4 ─ y      (both groups are cut)"""
    t = Tiny()
    h = t.node("ConvTranspose", [t.conv("x", "p", 3, 6), t.weight("up.w", 6, 5, 2, 2), t.weight("up.b", 5)],
               "up", strides=[2, 2], kernel_shape=[2, 2])
    t.conv(t.node("Relu", [h], "relu"), "y", 5, 4)
    return t.model({"x": [1, 3, 4, 4]}, ["y"]), "p", [0, 1]


def conv_transpose_out():
    model, _, _ = conv_transpose()
    return model, "up", [2]


def squeeze_excite():
    """
    x ─ Conv p 3→6 ─ Relu ─┬──────────────────────────────────────────────────────────┬─ Mul ─ Conv 6→4 ─ y
                           └─ GlobalAveragePool ─ Conv 6→2 ─ Relu ─ Conv e 2→6 ─ Sigmoid ┘
    (p and e write the same group through the Mul)
    """
    t = Tiny()
    h = t.node("Relu", [t.conv("x", "p", 3, 6)], "relu")
    s = t.node("GlobalAveragePool", [h], "gap")
    s = t.node("Relu", [t.conv(s, "sq", 6, 2, k=1)], "relu_s")
    s = t.node("Sigmoid", [t.conv(s, "e", 2, 6, k=1)], "sig")
    t.conv(t.node("Mul", [h, s], "scale"), "y", 6, 4)
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "e", [0, 4]


def reduce_squeeze_gemm():
    """x ─ Conv p 3→6 ─ ReduceMean(H, W, keepdims) ─ Squeeze ─ Unsqueeze ─ Squeeze ─ Gemm 6→5 ─ y"""
    t = Tiny()
    h = t.node("ReduceMean", [t.conv("x", "p", 3, 6)], "mean", axes=[2, 3], keepdims=1)
    h = t.node("Squeeze", [h, t.const("ax", np.array([2, 3], np.int64))], "sq")
    h = t.node("Unsqueeze", [h, t.const("ax0", np.array([0], np.int64))], "unsq")
    h = t.node("Squeeze", [h, t.const("ax1", np.array([0], np.int64))], "sq2")
    t.node("Gemm", [h, t.weight("fc.w", 6, 5), t.weight("fc.b", 5)], "y")
    return t.model({"x": [1, 3, 4, 4]}, ["y"]), "p", [0]


def mlp_matmul_add():
    """x[1,8] ─ MatMul 8→16 ─ Add bias ─ Relu ─ Gemm 16→4 ─ y"""
    t = Tiny()
    h = t.node("Add", [t.node("MatMul", ["x", t.weight("w1", 8, 16)], "mm"), t.weight("b1", 16)], "bias")
    t.node("Gemm", [t.node("Relu", [h], "relu"), t.weight("w2", 16, 4), t.weight("b2", 4)], "y")
    return t.model({"x": [1, 8]}, ["y"]), "mm", [0, 7, 9, 15]


def opset9_attributes():
    """Older opsets keep Slice/Split/Pad parameters in attributes: x ─ Conv p 3→8 ─ Pad ─ Split ─ Slice ..."""
    t = Tiny(opset=9)
    p = t.conv("x", "p", 3, 8)
    p = t.node("Pad", [p], "pad", pads=[0, 0, 1, 1, 0, 0, 1, 1])
    t.node("Split", [p], "split", outputs=["s0", "s1"], axis=1, split=[4, 4])
    s1 = t.node("Slice", ["s1"], "slice", starts=[1], ends=[4], axes=[1])
    t.node("Add", [t.conv("s0", "r0", 4, 4, pads=[0, 0, 0, 0]), t.conv(s1, "r1", 3, 4, pads=[0, 0, 0, 0])], "y")
    return t.model({"x": [1, 3, 6, 6]}, ["y"]), "p", [0, 5, 7]


PRUNABLE = [chain_bn_relu, norm_and_activations, broadcast_constants, residual_add, residual_input_group,
            concat_offsets, split_channels, slice_channels, pooling_pad_resize, flatten_gemm, reshape_gemm,
            global_pool_gemm, nhwc_matmul, depthwise, depthwise_multiplier, conv_transpose, conv_transpose_out,
            squeeze_excite, reduce_squeeze_gemm, mlp_matmul_add, opset9_attributes]


# ----------------------------------------------------------------------------------------------- helpers

def group_written_by(groups: list[Group], writer: str) -> Group:
    matches = [g for g in groups if any(m.label == writer for m in g.producers)]
    assert len(matches) == 1, f"{writer}: {[g.name for g in groups]}"
    return matches[0]


def zero_readers(group: Group, removed: list[int]) -> None:
    """Zero the weights that read the removed channels, so cutting them must not change any output."""
    for m in group.consumers:
        s = m.slot
        mask = np.zeros(s.width, bool)
        for c in removed:
            if s.start <= c < s.start + s.length:
                mask[s.offset + c - s.start] = True
        idx = expand(mask, s.inner, s.outer)
        w = constant_value(m.node.inputs[1]).copy()
        if m.op == "Conv":
            w[:, idx] = 0
        elif m.op == "Gemm" and m.node.attrs.get("transB", 0):
            w[:, idx] = 0
        else:  # Gemm, MatMul [K, N]; ConvTranspose [C_in, ...]
            w[idx] = 0
        m.node.inputs[1].values = w


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}


def check_idle_channels_cut(build) -> None:
    """Removing channels whose readers' weights are zero changes no output, and every writer's weight and every
    tensor carrying the group shrinks by exactly the removed channels (also test_channels_mobile's check)."""
    model, writer, removed = build()
    graph = gs.import_onnx(model)
    group = group_written_by(channel_groups(graph), writer)
    assert group.prunable, group.reasons
    zero_readers(group, removed)
    reference_model = to_model(graph, like=model)
    before = inferred_shapes(reference_model)
    weights_before = {m.label: constant_value(m.node.inputs[1]).shape for m in group.producers}
    feeds = feeds_for(model)
    reference = run(reference_model, feeds)

    remove_channels(graph, group, [c for c in range(group.size) if c not in removed])
    graph.cleanup().toposort()
    pruned = to_model(graph, like=model)
    onnx.checker.check_model(pruned, full_check=True)
    after = inferred_shapes(pruned)

    for ref, new in zip(reference, run(pruned, feeds)):
        assert ref.shape == new.shape
        np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    for m in group.producers:  # the writers lost exactly the removed filters
        w = constant_value(m.node.inputs[1]).shape
        axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(m.op, 0 if m.node.attrs.get("transB", 0) else 1)
        assert w[axis] == weights_before[m.label][axis] - len(removed)
    for slot in group.slots:  # every tensor carrying the group is smaller by the removed channels' elements
        if slot.tensor in before and slot.tensor in after:
            gone = sum(slot.start <= c < slot.start + slot.length for c in removed)
            assert after[slot.tensor][slot.axis] == before[slot.tensor][slot.axis] - gone * slot.inner * slot.outer, \
                slot.tensor


# -------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("build", PRUNABLE, ids=lambda f: f.__name__)
def test_removing_idle_channels_is_exact_and_shrinks_everything(build):
    check_idle_channels_cut(build)


def test_residual_add_makes_one_group_of_both_writers():
    model, _, _ = residual_add()
    groups = channel_groups(gs.import_onnx(model))
    residual = group_written_by(groups, "b2")
    assert sorted(m.label for m in residual.producers) == ["b2", "sc"]
    assert [m.label for m in residual.consumers] == ["y"]
    inner = group_written_by(groups, "a")
    assert sorted(m.label for m in inner.consumers) == ["b1", "sc"]


def test_concat_and_split_record_offsets_and_parts():
    model, _, _ = concat_offsets()
    q = group_written_by(channel_groups(gs.import_onnx(model)), "q")
    (reader,) = q.consumers
    assert (reader.slot.offset, reader.slot.width) == (4, 10)
    model, _, _ = split_channels()
    p = group_written_by(channel_groups(gs.import_onnx(model)), "p")
    assert sorted(p.parts) == [(0, 3), (3, 8)]
    assert sorted((m.slot.offset, m.slot.width, m.slot.start) for m in p.consumers) == [(0, 3, 0), (0, 5, 3)]


def test_flatten_and_nhwc_reshape_expand_per_channel():
    model, _, _ = flatten_gemm()
    (reader,) = group_written_by(channel_groups(gs.import_onnx(model)), "p").consumers
    assert (reader.slot.inner, reader.slot.outer) == (16, 1)
    model, _, _ = nhwc_matmul()
    (reader,) = group_written_by(channel_groups(gs.import_onnx(model)), "p").consumers
    assert (reader.op, reader.slot.inner, reader.slot.outer) == ("MatMul", 1, 16)


def test_depthwise_is_pass_through_and_coupled():
    model, _, _ = depthwise()
    groups = channel_groups(gs.import_onnx(model))
    p = group_written_by(groups, "p")
    assert [m.label for m in p.with_port("dw")] == ["dw"]
    assert not any(m.label == "dw" for g in groups for m in g.producers)


def test_analysis_does_not_modify_the_graph():
    model, _, _ = residual_add()
    graph = gs.import_onnx(model)
    before = to_model(graph, like=model).SerializeToString()
    channel_groups(graph)
    assert to_model(graph, like=model).SerializeToString() == before


# --------------------------------------------------------------------------------------------- unprunable

def _blocked(model: onnx.ModelProto, writer: str) -> list[str]:
    return group_written_by(channel_groups(gs.import_onnx(model)), writer).reasons


def test_graph_output_and_graph_input_block():
    model, _, _ = chain_bn_relu()
    groups = channel_groups(gs.import_onnx(model))
    assert any("graph output 'y'" in r for r in group_written_by(groups, "y").reasons)
    assert any("graph input 'x'" in r for r in groups[0].reasons)


def test_unknown_op_blocks_with_its_name():
    t = Tiny()
    h = t.node("LRN", [t.conv("x", "p", 3, 6)], "lrn", size=3)
    t.conv(h, "y", 6, 4)
    reasons = _blocked(t.model({"x": [1, 3, 6, 6]}, ["y"]), "p")
    assert any("LRN 'lrn'" in r and "no channel rule" in r for r in reasons)


def test_shape_reading_the_channels_blocks_but_batch_only_does_not():
    for index, blocked in ((1, True), (0, False)):
        t = Tiny()
        h = t.node("Relu", [t.conv("x", "p", 3, 6)], "relu")
        shape = t.node("Shape", [h], "shape")
        t.node("Cast", [t.node("Gather", [shape, t.const("i", np.array(index, np.int64))], "gather", axis=0)],
               "n", to=TensorProto.FLOAT)
        t.conv(h, "y", 6, 4)
        reasons = _blocked(t.model({"x": [1, 3, 6, 6]}, ["y", "n"]), "p")
        assert any("read by Shape 'shape'" in r for r in reasons) == blocked, reasons


def test_grouped_conv_non_constant_weight_and_softmax_block():
    t = Tiny()
    h = t.conv(t.conv("x", "p", 3, 8), "g", 8, 8, group=2)
    t.conv(h, "y", 8, 4)
    model = t.model({"x": [1, 3, 6, 6]}, ["y"])
    assert any("grouped convolution (group=2" in r for r in _blocked(model, "p"))

    t = Tiny()
    h = t.conv("x", "p", 3, 6)
    t.node("Conv", [h, "w"], "y", kernel_shape=[1, 1])
    model = t.model({"x": [1, 3, 6, 6], "w": [4, 6, 1, 1]}, ["y"])
    assert any("non-constant weight" in r for r in _blocked(model, "p"))

    t = Tiny()
    h = t.node("Softmax", [t.conv("x", "p", 3, 6)], "softmax", axis=1)
    t.conv(h, "y", 6, 4)
    assert any("normalises across the channels" in r for r in _blocked(t.model({"x": [1, 3, 6, 6]}, ["y"]), "p"))


def test_reshape_that_splits_channels_blocks():
    t = Tiny()
    h = t.node("Reshape", [t.conv("x", "p", 3, 6), t.const("shape", np.array([1, 2, 3, 16], np.int64))], "r")
    t.node("Relu", [h], "y")
    assert any("splits or reorders the channel axis" in r
               for r in _blocked(t.model({"x": [1, 3, 4, 4]}, ["y"]), "p"))


def test_removal_refuses_unprunable_and_empty():
    model, _, _ = chain_bn_relu()
    graph = gs.import_onnx(model)
    groups = channel_groups(graph)
    with pytest.raises(ValueError, match="not prunable"):
        remove_channels(graph, group_written_by(groups, "y"), [0])
    with pytest.raises(ValueError, match="every channel"):
        remove_channels(graph, group_written_by(groups, "p"), [])


def test_several_groups_cut_at_once_through_one_concat():
    model, _, _ = concat_offsets()
    graph = gs.import_onnx(model)
    groups = channel_groups(graph)
    p, q = group_written_by(groups, "p"), group_written_by(groups, "q")
    zero_readers(p, [3])
    zero_readers(q, [0, 1])
    reference = run(to_model(graph, like=model), feeds_for(model))
    apply_plan(graph, {p: [0, 1, 2], q: [2, 3, 4, 5]})
    graph.cleanup().toposort()
    pruned = to_model(graph, like=model)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned, feeds_for(model))[0], reference[0], rtol=1e-5, atol=1e-5)
    assert constant_value([n for n in graph.nodes if n.name == "y"][0].inputs[1]).shape[1] == 7


# ----------------------------------------------------------------------------------------------- planning

def test_merged_axis():
    assert merged_axis((1, 6, 4, 4), (1, 96), 1) == (1, 1, 16)       # NCHW flatten
    assert merged_axis((1, 4, 4, 6), (1, 96), 3) == (1, 16, 1)       # NHWC flatten
    assert merged_axis((1, 6, 4, 4), (6, 16), 1) == (0, 1, 1)        # batch of one squeezed away
    assert merged_axis((1, 6, 4, 4), (1, 2, 3, 16), 1) is None       # channels split


def test_round_keep_and_plan_never_empty():
    assert round_keep(32, 16.4, 1) == 16
    assert round_keep(32, 13, 8) == 16
    assert round_keep(32, 2, 8) == 8
    assert round_keep(10, 0.2, 1) == 1
    model, _, _ = split_channels()
    graph = gs.import_onnx(model)
    p = group_written_by(channel_groups(graph), "p")
    scores = np.array([0.0, 0.0, 0.0, 5, 6, 7, 8, 9])  # the first Split part has the lowest scores
    plan = plan_removal({p: scores}, 0.5, "layer", 1)
    assert len(plan[p]) == 4 and any(c < 3 for c in plan[p])  # the first part keeps a channel


def test_describe_lists_sizes_members_and_reasons():
    model, _, _ = residual_add()
    text = describe(channel_groups(gs.import_onnx(model)))
    assert "channels, prunable" in text and "NOT prunable" in text
    assert "b2 (Conv)" in text and "sc (Conv)" in text and "read by: y (Conv)" in text
    assert "graph output" in text


# ------------------------------------------------------------------------------------------------- corpus

def _corpus_groups(corpus, name):
    from squeeze.model import load_model, to_graph
    return channel_groups(to_graph(load_model(corpus.model_path(name))))


def test_corpus_residual_concat_nhwc_and_bn_groups(corpus):
    resnet = _corpus_groups(corpus, "cifar10_resnet4b")
    assert sum(g.prunable for g in resnet) == 8
    assert max(len(g.producers) for g in resnet) == 3  # layer1's trunk: shortcut + two block outputs
    squeezenet = _corpus_groups(corpus, "squeezenet")
    assert sum(g.prunable for g in squeezenet) == 25
    assert any(m.slot.offset > 0 for g in squeezenet for m in g.consumers)  # expand3x3 after expand1x1 in Concat
    marabou = _corpus_groups(corpus, "marabou_cifar10_small")
    readers = [m for g in marabou if g.prunable for m in g.consumers if m.op == "MatMul" and m.slot.outer > 1]
    assert readers and readers[0].slot.outer == 36
    burn = _corpus_groups(corpus, "mnist_burn")
    assert any(m.op == "BatchNormalization" for g in burn if g.prunable for m in g.members)


def test_cli_inspect_prints_groups(corpus, capsys):
    from squeeze.cli import main
    assert main(["inspect", str(corpus.model_path("sri_resnet_a"))]) == 0
    out = capsys.readouterr().out
    assert "10 channel group(s), 8 prunable" in out
    assert "written by: Conv_14 (Conv), Conv_17 (Conv)" in out
    assert "not prunable: it reaches the graph output 'output'" in out
