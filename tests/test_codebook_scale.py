"""`codebook(scale=channel)`: one shared codebook over weights divided by their output channel's RMS, multiplied
back by float16 channel scales in the rebuild (w = s_c · q)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import graphs
from squeeze import pack, runtime
from squeeze.data import Dataset
from squeeze.model import to_model
from squeeze.passes.weights import compressed_kind, compressed_value, replace_compressed, take_compressed


def weight_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    layers = {n.name: n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    values = runtime.activations(model, graphs.random_inputs(model, 1), sorted(set(layers.values())))
    return {name: values[w][0] if values[w].shape[0] == 1 and values[w].ndim > 2 else values[w]
            for name, w in layers.items()}


def ranged_gemm(outputs: int = 12, inputs: int = 48, spread: float = 100.0) -> onnx.ModelProto:
    """A Gemm (transB=1) whose output channels' weight ranges differ by `spread`× (as in the OCR recogniser)."""
    g = graphs.Builder(0)
    w = np.random.default_rng(5).normal(size=(outputs, inputs)) * np.geomspace(1.0, spread, outputs)[:, None]
    g.node("Gemm", ["x", g.tensor("fc.weight", w.astype(np.float32)), g.weight("fc.bias", outputs, scale=0.1)], "y",
           transB=1)
    return g.model({"x": [1, inputs]}, "y")


def real(data) -> Dataset:
    return Dataset(data.arrays, None, "test calibration", data.stacked)


def test_each_channel_is_its_float16_scale_times_the_shared_codebook():
    model = ranged_gemm()
    out, steps = graphs.apply(model, "codebook(bits=3,scale=channel)")
    entry = steps[0]["details"]["per_layer"][0]
    assert entry["channel_scales"] == 12 and entry["centroids"] == 8
    scales = [numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(scales) == 1 and scales[0].shape == (12, 1)
    w = weight_values(out)["y"]
    levels = w / scales[0].astype(np.float32)
    assert len(np.unique(np.round(levels, 5))) <= 8                     # one codebook shared by every channel
    for row in w:
        assert len(np.unique(row)) <= 8


def test_channel_scales_keep_small_channels_that_one_codebook_loses():
    """100× range between channels: a plain 3-bit codebook rounds the small channels to (nearly) one level; with
    channel scales every channel keeps its relative error near the codebook's."""
    model = ranged_gemm()
    w = numpy_helper.to_array(model.graph.initializer[0])
    plain = weight_values(graphs.apply(model, "codebook(bits=3,scale=layer)")[0])["y"]
    scaled = weight_values(graphs.apply(model, "codebook(bits=3,scale=channel)")[0])["y"]

    def worst_row_error(got):
        return max(np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in zip(got, w))
    assert worst_row_error(scaled) < 0.3
    assert worst_row_error(plain) > 2 * worst_row_error(scaled)


def test_channel_scales_with_calibration_lower_the_output_error():
    model = ranged_gemm()
    data, held = real(graphs.random_inputs(model, 96, 0)), real(graphs.random_inputs(model, 64, 9))
    plain, _ = graphs.apply(model, "codebook(bits=3,scale=layer)", data=data)
    scaled, steps = graphs.apply(model, "codebook(bits=3,scale=channel)", data=data)
    assert "gptq_damp" in steps[0]["details"]["per_layer"][0]
    ref = next(iter(graphs.outputs(model, held).values()))

    def worst_channel_error(candidate):                   # the small channels are what one codebook loses
        got = next(iter(graphs.outputs(candidate, held).values()))
        return float((np.linalg.norm(got - ref, axis=0) / np.linalg.norm(ref, axis=0)).max())
    assert worst_channel_error(scaled) < 0.5 * worst_channel_error(plain)


@pytest.mark.parametrize("name", ["concat", "depthwise", "conv_transpose_bn", "residual_add"])
def test_deterministic_and_packs_exactly(name):
    model = getattr(graphs, name)()
    data = real(graphs.random_inputs(model, 16, 0))
    a, steps = graphs.apply(model, "codebook(bits=3,scale=channel)", data=data, seed=4)
    b, _ = graphs.apply(model, "codebook(bits=3,scale=channel)", data=data, seed=4)
    assert "failed" not in steps[0]
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert pack.unpack(pack.pack(a).data).SerializeToString(deterministic=True) == \
        a.SerializeToString(deterministic=True)


@pytest.mark.parametrize("layer,axis", [("y", 0), ("y", 1), ("conv_a", 0), ("conv_a", 1)])
def test_scaled_codebook_weights_can_be_read_cut_and_refit(layer, axis):
    """prune/slim after codebook(scale=channel): the dense value, a channel cut that stays compressed (the scales
    cut with it on the output axis), and a refit snapped to the scaled codebook."""
    model = graphs.concat()
    out, _ = graphs.apply(model, "codebook(bits=3,scale=channel)")
    dense = weight_values(out)[layer]
    graph = gs.import_onnx(out)
    node = next(n for n in graph.nodes if n.name == layer)
    assert compressed_kind(node.inputs[1]) == "codebook"
    assert np.array_equal(compressed_value(node.inputs[1]), dense)
    keep = np.array([0, 2])
    assert take_compressed(graph, node, 1, keep, axis)
    cut = np.take(dense, keep, axis=axis)
    assert np.array_equal(compressed_value(node.inputs[1]), cut)
    assert replace_compressed(graph, node, 1, cut * 1.01)               # near the same levels: snaps back
    assert np.array_equal(compressed_value(node.inputs[1]), cut)
    weight = node.inputs[1]
    assert not isinstance(weight, gs.Constant)
    graph.outputs, graph.inputs = [weight], []
    weight.dtype = weight.dtype or np.float32
    graph.cleanup().toposort()
    got = runtime.session(to_model(graph, like=out), optimize=False).run(None, {})[0]
    assert np.array_equal(got, cut)


def test_prune_after_scaled_codebook_keeps_it_compressed():
    model = graphs.concat()
    data = real(graphs.random_inputs(model, 16, 0))
    out, steps = graphs.apply(model, "codebook(bits=3,scale=channel),prune(ratio=0.5,scope=layer)", data=data)
    assert all("failed" not in s for s in steps)
    graph = gs.import_onnx(out)
    kinds = {compressed_kind(n.inputs[1]) for n in graph.nodes if n.op in ("Conv", "Gemm")}
    assert kinds == {"codebook"}


def test_the_packed_size_counts_the_channel_scales():
    """The float16 scales are stored tensors of the layer: its bits per weight grow by 16·O / (O·D)."""
    model = ranged_gemm(outputs=64, inputs=256)
    per_layer = {}
    for scale in ("layer", "channel"):
        out, _ = graphs.apply(model, f"codebook(bits=3,scale={scale},compensate=false)")
        per_layer[scale] = pack.size_report(out)["bits_per_param"]["layers"]["y"]
        assert pack.unpack(pack.pack(out).data).SerializeToString() == out.SerializeToString()
    assert per_layer["channel"] - per_layer["layer"] >= 16 * 64 / (64 * 256) * 0.9
