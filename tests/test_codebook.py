"""`codebook`: per-layer k-means over weights or k×k kernels, packed indices rebuilt by standard ONNX ops."""
from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper
from squeeze.passes import codebook as codebook_mod
from squeeze.passes.weights import Builder

from squeeze import pack, runtime
from squeeze.data import Dataset

SMOKE = dict(graphs.LOSSLESS)


def weight_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The weight every Conv/Gemm/MatMul sees, evaluated by ONNX Runtime (through any rebuild subgraph)."""
    layers = {n.name: n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    values = runtime.activations(model, graphs.random_inputs(model, 1), sorted(set(layers.values())))
    return {name: values[w][0] if values[w].shape[0] == 1 and values[w].ndim > 2 else values[w]
            for name, w in layers.items()}


@pytest.mark.parametrize("name", list(SMOKE))
def test_runs_on_every_tiny_graph(name):
    """
    Every structure: the pass verifies (checker, strict shape inference, ORT), and every Conv/Gemm/MatMul weight
    now takes at most 2^bits distinct values per output channel (the default channel scales), and at most 2^bits
    in all with scale=layer.
    """
    model = SMOKE[name]()
    out, steps = graphs.apply(model, "codebook(bits=3)")
    assert "failed" not in steps[0]
    onnx.checker.check_model(out, full_check=True)
    axes = {n.name: (1 if n.op_type == "ConvTranspose" else 0) for n in model.graph.node}
    for name_, w in weight_values(out).items():
        if name_ in axes and w.ndim > 1 and not (graphs.op_counts(model).get("MatMul") and w.ndim == 2):
            for channel in np.moveaxis(w, axes[name_], 0):
                assert len(np.unique(channel)) <= 8, name_
    # the largest relative output error over a handful of outputs of random weights: a loose sanity bound (on
    # flatten_gemm the default's weight errors are no larger than scale=layer's, its largest output error 0.52)
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) < 0.6
    layer, steps = graphs.apply(model, "codebook(bits=3,scale=layer)")
    assert "failed" not in steps[0]
    for name_, w in weight_values(layer).items():
        assert len(np.unique(w)) <= 8, name_
    assert graphs.max_rel_error(model, layer, graphs.random_inputs(model)) < 0.5


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("opset", [8, 9, 13])
@pytest.mark.parametrize("count", [5, 16, 37])
def test_index_rebuild_in_onnx_runtime(bits, opset, count):
    """The packed-index rebuild (Cast, Gather, Add, Mul, Div, Sub, Reshape, Slice) decodes exactly, per opset."""
    symbols = np.random.default_rng(bits).integers(0, 1 << bits, count)
    graph = gs.Graph(opset=opset)
    index, stored = Builder(graph).indices(symbols, bits, "idx")
    index.dtype, index.shape = np.int64, [count]
    graph.outputs = [index]
    model = gs.export_onnx(graph)
    model.ir_version = {8: 4, 9: 4, 13: 7}[opset]
    onnx.checker.check_model(model, full_check=True)
    got = runtime.session(model).run(None, {})[0]
    assert got.dtype == np.int64 and np.array_equal(got, symbols)
    if bits < 8:
        assert stored.values.nbytes == -(-count // 8) * bits  # bit-packed: bits per index, not a byte


def test_weights_are_rebuilt_exactly_from_codebook_and_indices():
    model = graphs.gemm()
    layer, _ = graphs.apply(model, "codebook(bits=4,scale=layer)")
    assert len(np.unique(weight_values(layer)["y"])) == 16
    out, steps = graphs.apply(model, "codebook(bits=4)")              # default: float16 channel scales
    entry = {e["layer"]: e for e in steps[0]["details"]["per_layer"]}["y"]
    assert entry["centroids"] == 16 and entry["index_bits"] == 4 and entry["channel_scales"] == 64
    w = weight_values(out)["y"]
    assert max(len(np.unique(row)) for row in w) <= 16
    assert np.abs(w - numpy_helper.to_array(model.graph.initializer[0])).max() < 0.2
    report = pack.size_report(out)
    assert report["bits_per_param"]["layers"]["y"] < 4.2          # 4-bit indices, a 16-entry codebook, 64 scales
    assert out.ByteSize() < model.ByteSize() / 6                  # and the ONNX file itself is that small


def test_kernel_unit_shares_whole_kernels_and_quantizes_the_codebook():
    model = graphs.concat()
    out, steps = graphs.apply(model, "codebook(unit=kernel,kernels=4,codebook_bits=3)")
    per_layer = {e["layer"]: e for e in steps[0]["details"]["per_layer"]}
    assert per_layer["conv_a"]["unit"] == "kernel" and per_layer["y"]["unit"] == "weight"  # 1×1 conv
    w = weight_values(out)["conv_a"]                                         # [4, 3, 3, 3]
    kernels = np.unique(w.reshape(-1, 9), axis=0)
    assert len(kernels) <= 4
    assert len(np.unique(w)) <= 8                                            # codebook values on 3 bits
    steps_ = np.diff(np.unique(w))
    assert np.allclose(steps_ / steps_.min(), np.round(steps_ / steps_.min()), atol=1e-3)  # one uniform grid


def test_kernel_unit_reaches_about_one_bit_per_weight():
    """Kernel Quantization's headline: 3×3 kernels from a 64-entry codebook cost ~6/9 bit each + codebook."""
    g = graphs.Builder(0)
    h = g.conv("x", "conv", 32, 64, pads=[1, 1, 1, 1])
    model = g.model({"x": [1, 32, 8, 8]}, h)
    out, _ = graphs.apply(model, "codebook(unit=kernel,kernels=64)")
    bits = pack.size_report(out)["bits_per_param"]["layers"]["conv"]
    assert 0.6 < bits < 1.3


def test_exact_zeros_stay_zero():
    """Pruned (exactly zero) weights keep a reserved zero centroid."""
    model = graphs.flatten_gemm()
    w = numpy_helper.to_array(model.graph.initializer[2]).copy()  # fc.weight [5, 64]
    mask = np.random.default_rng(0).random(w.shape) < 0.6
    w[mask] = 0
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[2].name))
    out, steps = graphs.apply(model, "codebook(bits=2)")
    got = weight_values(out)["y"]
    assert np.all(got[mask] == 0)
    assert {e["layer"]: e for e in steps[0]["details"]["per_layer"]}["y"]["zero_reserved"]


def test_few_distinct_values_are_kept_exactly():
    model = graphs.flatten_gemm()
    w = np.random.default_rng(1).choice([-0.5, 0.25, 1.0], size=(5, 64)).astype(np.float32)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[2].name))
    out, _ = graphs.apply(model, "codebook(bits=2,compensate=false)")
    assert np.array_equal(weight_values(out)["y"], w)


def test_compensation_reduces_the_output_error(calib_data):
    model = graphs.flatten_gemm()
    data = calib_data(model, 64)
    plain, _ = graphs.apply(model, "codebook(bits=2,compensate=false)", data=data)
    refit, steps = graphs.apply(model, "codebook(bits=2)", data=data)
    held_out = calib_data(model, 64, seed=7)
    assert graphs.max_rel_error(model, refit, held_out) < graphs.max_rel_error(model, plain, held_out)
    assert "least-squares refit" in " ".join(steps[0]["notes"])


def test_compensation_is_skipped_on_synthetic_data():
    _, steps = graphs.apply(graphs.flatten_gemm(), "codebook(bits=2)")
    assert any("synthetic" in n for n in steps[0]["notes"])


def test_deterministic_with_the_seed():
    model = graphs.residual_add()
    a, _ = graphs.apply(model, "codebook(unit=kernel,kernels=3)", seed=3)
    b, _ = graphs.apply(model, "codebook(unit=kernel,kernels=3)", seed=3)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_skip_keeps_layers_in_float():
    model = graphs.concat()
    out, steps = graphs.apply(model, "codebook(bits=2,skip=[conv_b,last])")
    inits = {t.name for t in out.graph.initializer}
    assert "conv_b.weight" in inits and "y.weight" in inits and "conv_a.weight" not in inits
    assert set(steps[0]["details"]["skipped"]) == {"conv_b", "y"}
    assert steps[0]["details"]["layers"] == ["conv_a"]


def test_unknown_skip_entry_is_an_error():
    from squeeze.data import input_specs, resolve_shapes
    from squeeze.pipeline import run_pipeline
    from squeeze.registry import get_pass
    from squeeze.spec import bind
    model = graphs.concat()
    data = graphs.random_inputs(model)
    result = run_pipeline(model, bind("codebook(skip=[conv_z])", get_pass), data,
                          resolve_shapes(input_specs(model), {}, data))
    assert result.failure and "conv_z" in result.failure and "conv_a" in result.failure


def test_ir3_opset8_model_is_upgraded_to_opset10():
    """Before opset 10 the index trim could only be an attribute Slice (TVM rejects it) or a Split (TVM does not
    fold it): codebook upgrades the model to opset 10, says so, and the model still shrinks."""
    model = graphs.ir3_initializers_as_inputs()
    out, steps = graphs.apply(model, "codebook(bits=4)")
    assert out.opset_import[0].version == 10
    assert any("opset upgraded 8 → 10" in n for n in steps[0]["notes"])
    assert out.ByteSize() < model.ByteSize()


def test_compressed_weights_are_left_alone_by_a_second_run():
    out, _ = graphs.apply(graphs.flatten_gemm(), "codebook(bits=4)")
    again, steps = graphs.apply(out, "codebook(bits=2)")
    assert "already compressed" in " ".join(steps[0]["notes"])
    assert again.ByteSize() == pytest.approx(out.ByteSize(), rel=0.01)


def test_cluster_linear_init_spans_the_range():
    values = np.linspace(-1, 1, 1000)[:, None]
    centroids, labels, zero = codebook_mod.cluster(values, 8, seed=0)
    assert not zero and len(centroids) == 8
    assert np.abs(centroids[labels] - values).max() < 0.15


# ---------------------------------------------------------------------------------------------- TVM

@pytest.mark.tvm
def test_tvm_runs_the_rebuild_and_matches_onnx_runtime(tmp_path):
    import squeeze
    model = graphs.flatten_gemm()
    result = squeeze.compress(model, "codebook(unit=kernel,kernels=8),codebook(bits=3)", targets="cpu", runs=3)
    check = result.report["targets"][0]["numeric_check"]
    assert check["ok"], check


# ---------------------------------------------------------------------------------------------- corpus

@pytest.mark.slow
@pytest.mark.corpus
def test_mnist_burn_six_times_smaller_within_a_third_of_a_point(corpus, tmp_path):
    import squeeze
    calib, test = corpus.split(corpus.dataset("mnist_burn"), 256)
    result = squeeze.compress(corpus.model_path("mnist_burn"), "codebook(bits=4)", calib=calib, eval=test,
                              targets="")
    rep = result.report
    assert rep["original"]["bytes"]["onnx"] / rep["final"]["bytes"]["onnx"] >= 6
    assert rep["accuracy"]["drop_pts"] <= 0.3
    data = pack.pack(result.model).data
    assert pack.unpack(data).SerializeToString(deterministic=True) == \
        result.model.SerializeToString(deterministic=True)


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("name", ["mnist_ortjava", "mnist8_zoo", "cifar10_resnet2b", "cifar10_resnet4b",
                                  "sri_resnet_a", "oval21_cifar_base", "oval21_cifar_wide", "oval21_cifar_deep",
                                  "marabou_cifar10_small", "marabou_cifar10_medium", "marabou_cifar10_large",
                                  "cifar10_winml_tutorial", "squeezenet", "ultraface", "mnist_burn"])
@pytest.mark.parametrize("unit", ["weight", "kernel"])
def test_corpus_pack_round_trip_after_codebook(corpus, name, unit):
    """Every corpus model after codebook: verified by the pass manager, and the container restores it exactly."""
    model = onnx.load(str(corpus.model_path(name)))
    data = Dataset({corpus._input_name(name): corpus.arrays(name, 8)[0]}, None, f"corpus:{name}", {}) \
        if name != "ultraface" else graphs.random_inputs(model, 4)
    # nearest assignment: the container is under test here, and GPTQ's fit on 30 corpus models took ~16 min of CI
    out, _ = graphs.apply(model, f"codebook(unit={unit},assign=nearest)", data=data)
    restored = pack.unpack(pack.pack(out).data)
    assert restored.SerializeToString(deterministic=True) == out.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------- composition

def _graph_weight(graph, node_name: str, index: int = 1):
    return next(n for n in graph.nodes if n.name == node_name).inputs[index]


@pytest.mark.parametrize("spec,layer", [
    ("codebook(bits=3)", "y"), ("codebook(unit=kernel,kernels=4)", "conv_a"),
    ("codebook(unit=kernel,kernels=4,codebook_bits=0)", "conv_a"), ("quant(activations=false)", "y"),
    ("quant(bits=4,activations=false)", "conv_a"), ("quant(bits=4,int4=onnx,activations=false)", "conv_a"),
])
@pytest.mark.parametrize("axis", [0, 1])
def test_compressed_weights_can_be_read_and_cut(spec, layer, axis):
    """What prune/slim need to run after codebook or quant: the dense values, and a channel cut that keeps the
    weight compressed (checked against ONNX Runtime evaluating the rebuilt graph)."""
    from squeeze.passes.weights import compressed_value, take_compressed

    from squeeze.model import to_model
    model = graphs.concat()
    out, _ = graphs.apply(model, spec)
    dense = weight_values(out)[layer]
    graph = gs.import_onnx(out)
    value = compressed_value(_graph_weight(graph, layer))
    assert value is not None and np.array_equal(value, dense)
    keep = np.array([0, 2])
    node = next(n for n in graph.nodes if n.name == layer)
    assert take_compressed(graph, node, 1, keep, axis)
    weight = node.inputs[1]
    assert not isinstance(weight, gs.Constant)          # still rebuilt from compressed storage
    graph.outputs = [weight]                             # evaluate just the rebuilt weight
    graph.inputs = []
    weight.dtype = weight.dtype or np.float32
    graph.cleanup().toposort()
    got = runtime.session(to_model(graph, like=out), optimize=False).run(None, {})[0]
    assert np.array_equal(got, np.take(dense, keep, axis=axis))


def test_int32_bias_can_be_cut(calib_data):
    from squeeze.passes.weights import compressed_value, take_compressed
    model = graphs.concat()
    out, _ = graphs.apply(model, "quant", data=calib_data(model, 8))
    graph = gs.import_onnx(out)
    node = next(n for n in graph.nodes if n.name == "conv_a")
    bias = compressed_value(node.inputs[2])
    assert bias is not None and bias.shape == (4,)
    assert take_compressed(graph, node, 2, np.array([1, 3]), 0)
    assert np.array_equal(compressed_value(node.inputs[2]), bias[[1, 3]])


@pytest.mark.parametrize("spec", ["codebook(bits=3)", "quant(activations=false)"])
def test_non_finite_weights_are_left_alone(spec):
    model = graphs.flatten_gemm()
    w = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[2].name))
    out, steps = graphs.apply(model, spec)
    assert steps[0]["details"]["skipped"] == {"y": "its weight holds NaN or inf"}
    assert "fc.weight" in {t.name for t in out.graph.initializer}


@pytest.mark.parametrize("bits", [3, 4])
def test_opset8_rebuild_compiles_with_tvm(bits):
    """An opset-8 model is upgraded (to opset 13 by the canonical front end; codebook itself needs 10), so the index
    trim is a tensor-input Slice that TVM imports and folds (attribute-form Slice made TVM fail: 'Cannot cast NoneType to list of Expr'; a Split was imported but
    not folded, 14× slower on pruned resnet4b); TVM compiles it and matches ONNX Runtime."""
    pytest.importorskip("tvm")
    import squeeze  # noqa: PLC0415
    model = graphs.ir3_initializers_as_inputs()
    result = squeeze.compress(model, f"codebook(bits={bits})", targets="cpu", runs=3)
    assert result.failure is None
    ops = {n.op_type for n in result.model.graph.node}
    assert "Slice" in ops and "Split" not in ops and result.model.opset_import[0].version >= 10
    row = result.report["targets"][0]
    assert "error" not in row, row.get("error")
    assert row["numeric_check"]["ok"], row["numeric_check"]
