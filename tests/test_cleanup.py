"""`cleanup` is lossless on every tiny graph and on the corpus, and removes exactly what it should."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze.model import load_model

TOLERANCE = 1e-5  # max abs error relative to the output scale


@pytest.mark.parametrize("name", list(graphs.LOSSLESS))
def test_cleanup_is_lossless_on_tiny_graphs(name):
    model = graphs.LOSSLESS[name]()
    out, (step,) = graphs.apply(model, "cleanup")
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in out.graph.input if i.name == "x"] == ["x"]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model, count=6, seed=11)) <= TOLERANCE
    assert step["fidelity"]["max_abs_rel"] <= TOLERANCE
    assert step["nodes"] <= len(model.graph.node)


def test_identity_and_dropout_chain_is_removed_and_the_output_name_kept():
    model = graphs.identity_dropout_chain()
    out, (step,) = graphs.apply(model, "cleanup")
    assert graphs.op_counts(out) == {"Conv": 1, "Relu": 1}
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.node[-1].output[0] == "y"  # the Relu now writes the graph output directly
    assert step["notes"] == ["removed 3 Identity node(s)", "removed 2 Dropout node(s)"]


def test_constant_subgraphs_are_folded():
    model = graphs.constant_foldable()
    assert len(model.graph.node) == 13
    out, (step,) = graphs.apply(model, "cleanup")
    assert graphs.op_counts(out) == {"Conv": 1, "Add": 1, "Reshape": 1}
    assert "folded 10 node(s) into constants (4 were Constant nodes)" in step["notes"]
    assert step["details"] == {"nodes": {"before": 13, "after": 3}}
    shape = next(t for t in out.graph.initializer if t.name == out.graph.node[-1].input[1])
    assert onnx.numpy_helper.to_array(shape).tolist() == [1, -1]


def test_folding_can_be_switched_off_or_limited():
    model = graphs.constant_foldable()
    out, _ = graphs.apply(model, "cleanup(fold_constants=false)")
    assert graphs.op_counts(out) == graphs.op_counts(model)
    out, _ = graphs.apply(model, "cleanup(max_folded_mb=0)")  # no result is small enough to fold
    assert graphs.op_counts(out)["Mul"] == 1


def _chain(*ops, opset=13):
    """x[1,4] ─ op ─ op ─ … ─ y; an op given as (op, extra inputs, n outputs)."""
    g = graphs.Builder()
    h = "x"
    for i, (op, extra, n_out) in enumerate(ops):
        names = [f"t{i}_{k}" for k in range(n_out)]
        h = g.node(op, [h] + extra, names[0], outputs=names)
    g.nodes[-1].output[0] = "y"
    return g, g.model({"x": [1, 4]}, "y", opset=opset)


def test_identity_between_graph_input_and_output_is_kept():
    _, model = _chain(("Identity", [], 1))
    out, _ = graphs.apply(model, "cleanup")
    assert graphs.op_counts(out) == {"Identity": 1}
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_dropout_whose_mask_is_used_is_kept():
    g = graphs.Builder()
    g.node("Dropout", ["x"], "drop", outputs=["d", "mask"])
    g.node("Cast", ["mask"], "mask_f", to=onnx.TensorProto.FLOAT)
    g.node("Add", ["d", "mask_f"], "y")
    model = g.model({"x": [1, 4]}, "y")
    out, _ = graphs.apply(model, "cleanup")
    assert graphs.op_counts(out)["Dropout"] == 1
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) == 0.0


def test_training_mode_dropout_is_kept():
    g = graphs.Builder()
    g.node("Relu", ["x"], "relu")
    g.node("Dropout", ["relu", g.tensor("ratio", np.array(0.5, np.float32)), g.tensor("train", np.array(True))], "y")
    model = g.model({"x": [1, 64]}, "y")
    out, _ = graphs.apply(model, "cleanup")
    assert graphs.op_counts(out) == {"Relu": 1, "Dropout": 1}


def test_identity_feeding_two_graph_outputs():
    """x ─ Relu ─┬─ Identity ─ y        (the Relu output is itself a graph output: renaming it is unsafe)
                 └────────────── r"""
    g = graphs.Builder()
    g.node("Relu", ["x"], "r")
    g.node("Identity", ["r"], "y")
    model = g.model({"x": [1, 4]}, "y")
    model.graph.output.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 4]))
    out, _ = graphs.apply(model, "cleanup")
    assert sorted(o.name for o in out.graph.output) == ["r", "y"]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) == 0.0


def test_dead_nodes_are_removed_and_initializer_inputs_kept():
    model = graphs.conv_bn_relu()
    dead = onnx.helper.make_node("Sigmoid", ["x"], ["unused"], name="dead")
    model.graph.node.append(dead)
    out, _ = graphs.apply(model, "cleanup")
    assert "Sigmoid" not in graphs.op_counts(out)
    assert [i.name for i in out.graph.input] == ["x"]


CORPUS = [("mnist_burn", 32), ("cifar10_resnet4b", 32), ("squeezenet", 3), ("mnist8_zoo", 32), ("sri_resnet_a", 32)]


@pytest.mark.corpus
@pytest.mark.parametrize("name, count", CORPUS, ids=[c[0] for c in CORPUS])
def test_cleanup_is_lossless_on_the_corpus(corpus, name, count):
    model = load_model(corpus.model_path(name))
    data = corpus.dataset(name, count)
    out, (step,) = graphs.apply(model, "cleanup", data)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert graphs.max_rel_error(model, out, data) <= TOLERANCE
    assert step["fidelity"]["max_abs_rel"] <= TOLERANCE
    if "top1_agreement" in step["fidelity"]:
        assert step["fidelity"]["top1_agreement"] == 1.0
    if model.ir_version < 4:  # squeezenet and mnist8_zoo: IR 3 keeps every initializer listed as an input
        assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    if name == "squeezenet":
        assert graphs.op_counts(model)["Dropout"] == 1 and "Dropout" not in graphs.op_counts(out)
        assert step["notes"][0] == "removed 1 Dropout node(s)"
