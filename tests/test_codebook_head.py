"""`codebook(head_bits=...)`: the small output layer of a model keeps more index bits than the rest."""
from __future__ import annotations

import pytest

import graphs
from squeeze.model import to_graph
from squeeze.passes.graph_util import nearest_to_outputs


def classifier(fc_out: int = 5):
    """
    x[1,3,8,8] ─ Conv 3→32 ─ Relu ─ Conv 32→64 ─ Relu ─ GlobalAveragePool ─ Flatten ─ Gemm 64→fc_out ─ Softmax ─ y
    (the Gemm holds 320 of the 19,616 clustered weights at fc_out=5: 1.6 %)
    """
    g = graphs.Builder(0)
    h = g.node("Relu", [g.conv("x", "conv1", 3, 32, pads=[1, 1, 1, 1])], "relu1")
    h = g.node("Relu", [g.conv(h, "conv2", 32, 64, pads=[1, 1, 1, 1])], "relu2")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h], "gap")], "flatten", axis=1)
    h = g.node("Gemm", [h, g.weight("fc.weight", fc_out, 64), g.weight("fc.bias", fc_out, scale=0.1)], "fc",
               transB=1)
    g.node("Softmax", [h], "y", axis=1)
    return g.model({"x": [1, 3, 8, 8]}, "y")


def bits_of(steps) -> dict[str, tuple[int, bool]]:
    return {e["layer"]: (e["index_bits"], e["head"]) for e in steps[-1]["details"]["per_layer"]}


@pytest.fixture(scope="module")
def data():
    return graphs.random_inputs(classifier(), count=16, seed=3)


def test_the_output_layer_takes_head_bits_and_the_report_says_so(data):
    model, steps = graphs.apply(classifier(), "codebook(bits=3)", data)
    assert bits_of(steps) == {"conv1": (3, False), "conv2": (3, False), "fc": (6, True)}
    assert any("fc 6 bits" in note and "head_bits" in note for note in steps[-1]["notes"])
    assert graphs.max_rel_error(classifier(), model, data) < 0.2


@pytest.mark.parametrize("spec, fc_bits", [("codebook(bits=3,head_bits=0)", 3),
                                           ("codebook(bits=3,layer_bits=['fc=4'])", 4),
                                           ("codebook(bits=5,head_bits=4)", 5)])
def test_head_bits_yields_to_layer_bits_and_never_lowers_bits(data, spec, fc_bits):
    _, steps = graphs.apply(classifier(), spec, data)
    assert bits_of(steps)["fc"] == (fc_bits, False)


def test_an_output_layer_holding_a_large_share_keeps_bits():
    model = classifier(fc_out=64)  # 4096 of 23,392 weights: 18 %
    _, steps = graphs.apply(model, "codebook(bits=3)", graphs.random_inputs(model, count=16, seed=3))
    assert bits_of(steps)["fc"] == (3, False)


def test_under_unit_kernel_only_per_weight_layers_are_heads():
    """unit=kernel clusters a k×k conv by kernels (`kernels` entries, not 2^bits), so a k×k conv head keeps its
    kernel codebook and is not reported as a head; a Gemm head still takes head_bits."""
    _, steps = graphs.apply(classifier(), "codebook(bits=3,unit=kernel)", graphs.random_inputs(classifier(), 16, 3))
    assert bits_of(steps)["fc"] == (6, True)
    g = graphs.Builder(0)
    h = g.node("Relu", [g.conv("x", "conv1", 3, 64, pads=[1, 1, 1, 1])], "relu1")
    h = g.node("Relu", [g.conv(h, "conv2", 64, 128, pads=[1, 1, 1, 1])], "relu2")
    g.conv(h, "y", 128, 1, pads=[1, 1, 1, 1])  # 1152 of 76,608 weights: 1.5 %
    model = g.model({"x": [1, 3, 8, 8]}, "y")
    for spec, head in (("codebook(bits=3)", True), ("codebook(bits=3,unit=kernel)", False)):
        _, steps = graphs.apply(model, spec, graphs.random_inputs(model, count=16, seed=3))
        assert bits_of(steps)["y"][1] is head, spec


def test_nearest_to_outputs_follows_every_path_back_to_the_first_weight_layer():
    """conv1 ─ Relu ─ conv2 ─ Add(·, Relu) ─ y: the skip path reaches conv1 without passing conv2."""
    g = graphs.Builder(0)
    r = g.node("Relu", [g.conv("x", "conv1", 4, 4, pads=[1, 1, 1, 1])], "relu")
    g.node("Add", [g.conv(r, "conv2", 4, 4, pads=[1, 1, 1, 1]), r], "y")
    graph = to_graph(g.model({"x": [1, 4, 5, 5]}, "y"))
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert [n.name for n in nearest_to_outputs(graph, convs)] == ["conv1", "conv2"]
    assert [n.name for n in nearest_to_outputs(graph, convs[:1])] == ["conv1"]
    plain = to_graph(classifier())
    layers = [n for n in plain.nodes if n.op in ("Conv", "Gemm")]
    assert [n.name for n in nearest_to_outputs(plain, layers)] == ["fc"]
