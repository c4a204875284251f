"""Channel analysis and removal on weights that `codebook` or `quant` already compressed (issue 5).

After `codebook` a weight is packed indices + a Gather from the codebook; after `quant` it is integers + a
DequantizeLinear (and `quant` puts QuantizeLinear → DequantizeLinear pairs on the layers' inputs). The channel
analysis reads such weights through `channels.weight_value` and cuts them in their compressed form
(`weights.take_compressed`), so `prune`/`slim` compose with `codebook`/`quant` in either order.

The exactness check: cutting a compressed weight must give the same model as cutting its decompressed values —
every tiny structure of test_channels, each compression, the same channels removed from both, outputs equal.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from helpers import calibration
import squeeze
from squeeze import runtime
from squeeze.data import Dataset
from squeeze.model import to_model
from squeeze.passes import compensate as compensate_module
from squeeze.passes import prune as prune_module
from squeeze.passes.coupling import channel_groups
from squeeze.passes.cutting import apply_plan, remove_channels
from squeeze.passes.graph_util import constant_value, set_constant_input, weight_shape, weight_value
from squeeze.passes.weights import WEIGHT_OPS, compressed_kind, compressed_value
from test_channels import PRUNABLE, Tiny, feeds_for, group_written_by, zero_readers

REPO = Path(__file__).resolve().parents[1]

#: prune's filter-norm criteria read the writers' weights in prune.py, and compensation refits the readers in
#: compensate.py: both read weights with `constant_value` (plain constants only) until they switch to
#: `channels.weight_value`. Until then prune(criterion=l1) after codebook/quant cannot rank the channels, and the
#: compressed layers are not refit (the cut still works: see the activation-criterion and slim tests).
PRUNE_READS_COMPRESSED = "weight_value" in inspect.getsource(prune_module)
COMPENSATE_READS_COMPRESSED = "weight_value" in inspect.getsource(compensate_module)

COMPRESSIONS = ["codebook(bits=4)", "codebook(unit=kernel,kernels=4)", "quant(activations=false)",
                "quant(bits=4,activations=false)", "quant"]


def _calib(model: onnx.ModelProto, count: int = 16) -> Dataset:
    """Real-looking calibration data (a non-synthetic source, so quant also quantizes the activations)."""
    return calibration(model, count, seed=3)


def _decompressed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every compressed weight/bias replaced by a plain constant of its values."""
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS:
            continue
        for i, t in enumerate(node.inputs[1:3], 1):
            value = compressed_value(t) if t.name else None
            if value is not None:
                node.inputs[i] = gs.Constant(f"{t.name}_dense", np.ascontiguousarray(value))
    graph.cleanup().toposort()
    return to_model(graph, like=model)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime without graph optimizations: a DequantizeLinear is then computed in float, as
    `compressed_value` computes it (optimized, ORT runs QDQ layers with integer kernels, which a dense model
    cannot match)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _cut(model: onnx.ModelProto, writer: str, removed: list[int]) -> tuple[onnx.ModelProto, gs.Graph]:
    graph = gs.import_onnx(model)
    group = group_written_by(channel_groups(graph), writer)
    assert group.prunable, group.reasons
    remove_channels(graph, group, [c for c in range(group.size) if c not in removed])
    graph.cleanup().toposort()
    return to_model(graph, like=model), graph


def _weight_shapes(graph: gs.Graph) -> dict[str, tuple[int, ...]]:
    return {n.name: weight_shape(n.inputs[1]) for n in graph.nodes if n.op in WEIGHT_OPS}


@pytest.mark.parametrize("spec", COMPRESSIONS)
@pytest.mark.parametrize("build", PRUNABLE, ids=lambda f: f.__name__)
def test_cutting_a_compressed_weight_equals_cutting_its_values(build, spec):
    model, writer, removed = build()
    compressed, _ = graphs.apply(model, spec, data=_calib(model))
    graph = gs.import_onnx(compressed)
    kinds = {compressed_kind(n.inputs[1]) for n in graph.nodes if n.op in WEIGHT_OPS}
    if kinds == {None}:
        pytest.skip(f"{spec} compressed no layer of {build.__name__}")
    cut, cut_graph = _cut(compressed, writer, removed)
    reference, _ = _cut(_decompressed(compressed), writer, removed)
    onnx.checker.check_model(cut, full_check=True)
    # still compressed: no layer's weight became a plain float constant
    after = {compressed_kind(n.inputs[1]) for n in cut_graph.nodes if n.op in WEIGHT_OPS}
    assert after == kinds
    feeds = feeds_for(model)
    for got, want in zip(run(cut, feeds), run(reference, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    before = _weight_shapes(gs.import_onnx(compressed))
    shrunk = {k: v for k, v in _weight_shapes(cut_graph).items() if v != before[k]}
    assert shrunk, "no weight lost a channel"


@pytest.mark.parametrize("spec", ["quant(activations=false)", "quant"])
def test_idle_channels_of_a_compressed_model_are_removed_exactly(spec):
    """Zero (in the compressed form: integers 0) what reads two channels, cut them: the outputs do not move.
    (A codebook need not hold 0, so there the readers cannot be made idle.)"""
    model, writer, removed = PRUNABLE[0]()  # chain_bn_relu
    compressed, _ = graphs.apply(model, spec, data=_calib(model))
    graph = gs.import_onnx(compressed)
    group = group_written_by(channel_groups(graph), writer)
    for m in group.consumers:  # what zero_readers does, through set_constant_input (keeps the form)
        w = weight_value(m.node.inputs[1]).copy()
        w[:, removed] = 0
        set_constant_input(graph, m.node, 1, w)
    graph.cleanup().toposort()
    idle = to_model(graph, like=compressed)
    cut, cut_graph = _cut(idle, writer, removed)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(cut, feeds)[0], run(idle, feeds)[0], rtol=1e-5, atol=1e-5)
    assert _weight_shapes(cut_graph)["p"][0] == 6 - len(removed)


def test_activation_qdq_pairs_pass_channels_and_per_channel_scales_are_cut():
    """
    x ─ Conv p 3→6 ─ QuantizeLinear(scale[6], axis 1) ─ DequantizeLinear ─ Relu ─ QuantizeLinear(scalar) ─
      DequantizeLinear ─ Conv 6→4 ─ y
    """
    t = Tiny()
    h = t.conv("x", "p", 3, 6)
    scale = t.const("s6", np.full(6, 0.05, np.float32))
    zero = t.const("z6", np.full(6, 128, np.uint8))
    h = t.node("QuantizeLinear", [h, scale, zero], "q6", axis=1)
    h = t.node("DequantizeLinear", [h, scale, zero], "dq6", axis=1)
    h = t.node("Relu", [h], "relu")
    s1, z1 = t.const("s1", np.float32(0.05)), t.const("z1", np.uint8(0))
    h = t.node("DequantizeLinear", [t.node("QuantizeLinear", [h, s1, z1], "q1"), s1, z1], "dq1")
    t.conv(h, "y", 6, 4)
    model = t.model({"x": [1, 3, 6, 6]}, ["y"])
    graph = gs.import_onnx(model)
    group = group_written_by(channel_groups(graph), "p")
    assert group.prunable, group.reasons
    assert {m.label for m in group.with_port("param")} == {"q6", "dq6"}
    zero_readers(group, [1, 4])
    idle = to_model(graph, like=model)
    remove_channels(graph, group, [0, 2, 3, 5])
    cut = to_model(graph, like=model)
    onnx.checker.check_model(cut, full_check=True)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(cut, feeds)[0], run(idle, feeds)[0], rtol=1e-5, atol=1e-5)
    sizes = {n.name: [constant_value(i).size for i in n.inputs[1:]] for n in graph.nodes if n.op.endswith("Linear")}
    assert sizes == {"q6": [4, 4], "dq6": [4, 4], "q1": [1, 1], "dq1": [1, 1]}


def test_a_compressed_weight_that_cannot_be_cut_blocks_its_group_with_the_reason():
    """
    x ─ Conv p 3→6 (weight: block-quantized DequantizeLinear, opset 21) ─ Relu ─ Conv y 6→4 ─ y
    (the block scales cannot be cut per channel: the groups p reads and writes are left alone, and say why)
    """
    t = Tiny(opset=21)
    q = t.rng.integers(-7, 8, (6, 3, 3, 3)).astype(np.int8)
    w = t.node("DequantizeLinear", [t.const("p.q", q), t.const("p.s", np.full((6, 1, 3, 3), 0.1, np.float32))],
               "p.dq", axis=1, block_size=3)
    t.node("Conv", ["x", w, t.weight("p.b", 6)], "p", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = t.node("Relu", ["p"], "relu")
    t.conv(h, "y", 6, 4)
    graph = helper.make_graph(t.nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], t.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    graph = gs.import_onnx(model)
    p = next(n for n in graph.nodes if n.name == "p")
    np.testing.assert_allclose(weight_value(p.inputs[1]), q.astype(np.float32) * 0.1, rtol=1e-6)
    group = group_written_by(channel_groups(graph), "p")
    assert not group.prunable
    assert any("Conv 'p' has a compressed weight that cannot be cut" in r and "block-quantized" in r
               for r in group.reasons), group.reasons


# --------------------------------------------------------------------------------- refits stay compressed


def test_a_refit_of_a_quantized_weight_is_requantized_with_its_bias():
    model = graphs.concat()
    compressed, _ = graphs.apply(model, "quant", data=_calib(model))
    graph = gs.import_onnx(compressed)
    node = next(n for n in graph.nodes if n.name == "conv_a")
    w, b = weight_value(node.inputs[1]), weight_value(node.inputs[2])
    ratio = _bias_over_weight_scale(node)
    new = w * np.linspace(0.5, 2.0, w.shape[0], dtype=np.float32)[:, None, None, None]
    set_constant_input(graph, node, 1, new)
    assert compressed_kind(node.inputs[1]) == "quant" and compressed_kind(node.inputs[2]) == "quant"
    scale = _dq_scale(node.inputs[1])
    assert np.abs(weight_value(node.inputs[1]) - new).max() <= scale.max() / 2 + 1e-7
    np.testing.assert_allclose(scale, np.abs(new).reshape(len(new), -1).max(axis=1) / 127, rtol=1e-6)
    # the int32 bias still has scale = input scale × weight scale, and the same values (to its new step)
    np.testing.assert_allclose(_bias_over_weight_scale(node), ratio, rtol=1e-5)
    assert np.abs(weight_value(node.inputs[2]) - b).max() <= _dq_scale(node.inputs[2]).max() / 2 + 1e-7
    set_constant_input(graph, node, 2, b + 0.25)
    assert compressed_kind(node.inputs[2]) == "quant"
    assert np.abs(weight_value(node.inputs[2]) - (b + 0.25)).max() <= _dq_scale(node.inputs[2]).max() / 2 + 1e-7
    graph.cleanup().toposort()
    onnx.checker.check_model(to_model(graph, like=compressed), full_check=True)


def test_a_refit_of_a_codebook_weight_is_snapped_to_the_codebook():
    model = graphs.concat()
    compressed, _ = graphs.apply(model, "codebook(bits=3,scale=layer)")  # one table for the layer (test_codebook_scale
    graph = gs.import_onnx(compressed)                                      # checks the channel-scaled refit)
    node = next(n for n in graph.nodes if n.name == "conv_a")
    w = weight_value(node.inputs[1])
    entries = np.unique(w)
    noisy = w + np.random.default_rng(0).uniform(-0.3, 0.3, w.shape).astype(np.float32) * np.diff(entries).min()
    set_constant_input(graph, node, 1, noisy)
    assert compressed_kind(node.inputs[1]) == "codebook"
    np.testing.assert_array_equal(weight_value(node.inputs[1]), w)  # every weight back on its own entry
    set_constant_input(graph, node, 1, np.full_like(w, entries[-1] * 10))
    assert np.all(weight_value(node.inputs[1]) == entries[-1])  # nothing outside the codebook


def _dq_scale(tensor: gs.Tensor) -> np.ndarray:
    """The scale of the DequantizeLinear that makes `tensor` (quant stores some as a Cast or a Mul of constants)."""
    from squeeze.passes.weights import folded
    return folded(tensor.inputs[0].inputs[1]).astype(np.float64).ravel()


def _bias_over_weight_scale(node: gs.Node) -> np.ndarray:
    return _dq_scale(node.inputs[2]) / _dq_scale(node.inputs[1])


# ------------------------------------------------------------------------------------------ through passes


@pytest.mark.parametrize("first", ["codebook(bits=4)", "quant"])
def test_activation_ranked_prune_after_compression_removes_channels(first):
    """prune with a criterion that reads no weight runs after codebook/quant today (tiny graph)."""
    model = graphs.concat()
    data = _calib(model, 32)
    out, steps = graphs.apply(model, f"{first},prune(ratio=0.5,criterion=activation,scope=layer)", data=data)
    graph = gs.import_onnx(out)
    shapes = _weight_shapes(graph)
    assert shapes["conv_a"][0] == 2 and shapes["conv_b"][0] == 1 and shapes["y"][1] == 3, shapes
    assert {compressed_kind(n.inputs[1]) for n in graph.nodes if n.op in WEIGHT_OPS} == {first.split("(")[0]}
    assert steps[1]["param_count"] < steps[0]["param_count"]


DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
EVAL = REPO / "models" / "digits_test.npz"
#: Kept channels of digits_cnn after prune(ratio=0.3) or slim(ratio=0.3): output channels per layer.
PRUNED = {"/stem/stem.0/Conv": 11, "/block/conv1/Conv": 11, "/block/conv2/Conv": 11, "/down/down.0/Conv": 22,
          "/fc1/Gemm": 45, "/fc2/Gemm": 10}


def _digits(spec: str):
    result = squeeze.compress(DIGITS, spec, calib=CALIB, eval=EVAL, targets="", threads=1, runs=1)
    assert result.ok, result.failure
    graph = gs.import_onnx(result.model)
    layers = {n.name: n for n in graph.nodes if n.op in WEIGHT_OPS}
    outputs = {name: (weight_shape(n.inputs[1])[0] if n.op == "Conv" or n.attrs.get("transB", 0)
                      else weight_shape(n.inputs[1])[1]) for name, n in layers.items()}
    kinds = {name: compressed_kind(n.inputs[1]) for name, n in layers.items()}
    return result, outputs, kinds


@pytest.mark.parametrize("compression", ["codebook(bits=4)", "quant"])
def test_digits_pruned_then_compressed(compression):
    if compression == "quant":
        graphs.skip_unless_exact_int8()
    result, outputs, kinds = _digits(f"prune(ratio=0.3,scope=layer),{compression}")
    assert outputs == PRUNED
    assert set(kinds.values()) == {compression.split("(")[0]}
    acc = result.report["accuracy"]
    assert acc["final"]["top1"] >= acc["original"]["top1"] - 0.02


@pytest.mark.parametrize("compression", ["codebook(bits=4)", "quant"])
def test_digits_compressed_then_pruned(compression):
    if compression == "quant":
        graphs.skip_unless_exact_int8()
    if not PRUNE_READS_COMPRESSED:
        pytest.xfail("prune.py ranks filters with constant_value: it must read channels.weight_value to rank "
                     "compressed filters (requested change in prune.output_filters)")
    result, outputs, kinds = _digits(f"{compression},prune(ratio=0.3,scope=layer)")
    assert outputs == PRUNED  # the channels really went, from the compressed weights
    assert set(kinds.values()) == {compression.split("(")[0]}  # and every layer stayed compressed
    steps = result.report["passes"]
    assert steps[1]["bytes"]["packed"] < 0.75 * steps[0]["bytes"]["packed"]
    assert steps[1]["macs"] < 0.5 * steps[0]["macs"]
    if not COMPENSATE_READS_COMPRESSED:
        pytest.xfail("compensate.py does not refit compressed layers until it reads channels.weight_value")
    acc = result.report["accuracy"]
    assert acc["final"]["top1"] >= acc["original"]["top1"] - 0.02


@pytest.mark.parametrize("compression", ["codebook(bits=4)", "quant(fold_bn=false)"])  # quant folds BNs by default
def test_digits_compressed_then_slimmed(compression):
    result, outputs, kinds = _digits(f"{compression},slim(ratio=0.3)")
    reference, float_outputs, _ = _digits("slim(ratio=0.3)")
    assert outputs == float_outputs  # the same channels go as from the float model
    assert outputs["/down/down.0/Conv"] < 32 and outputs["/block/conv1/Conv"] < 16
    assert set(kinds.values()) == {compression.split("(")[0]}
    if not COMPENSATE_READS_COMPRESSED:
        pytest.xfail("compensate.py does not refit compressed layers until it reads channels.weight_value")
    acc = result.report["accuracy"]
    assert acc["final"]["top1"] >= reference.report["accuracy"]["final"]["top1"] - 0.02
