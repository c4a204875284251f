"""`fold-bn` folds inference-mode BatchNormalization into neighbouring linear layers, losslessly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from squeeze import runtime
from squeeze.model import load_model

TOLERANCE = 1e-5  # max abs error relative to the output scale

# BatchNormalization nodes each tiny graph keeps after fold-bn (the one after Concat has no linear neighbour)
KEPT = {"concat": 1}


@pytest.mark.parametrize("name", list(graphs.LOSSLESS))
def test_fold_bn_is_lossless_on_tiny_graphs(name):
    model = graphs.LOSSLESS[name]()
    out, (step,) = graphs.apply(model, "fold-bn")
    onnx.checker.check_model(out, full_check=True)
    before = graphs.op_counts(model)["BatchNormalization"]
    assert graphs.op_counts(out)["BatchNormalization"] == KEPT.get(name, 0)
    assert len(step["details"]["folded"]) == before - KEPT.get(name, 0)
    assert step["details"]["kept"] == KEPT.get(name, 0)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model, count=6, seed=12)) <= TOLERANCE
    assert step["fidelity"]["max_abs_rel"] <= TOLERANCE
    assert len(out.graph.node) == len(model.graph.node) - (before - KEPT.get(name, 0))


def test_notes_say_what_was_folded_and_why_a_bn_was_kept():
    _, (step,) = graphs.apply(graphs.concat(), "fold-bn")
    assert step["notes"] == ["kept bn_cat: preceded by Concat, not Conv/ConvTranspose/Gemm; and forward: "
                             "followed by Relu, not Conv/Gemm/Flatten→Gemm",
                             "folded 1 BatchNormalization node(s): bn_a"]
    _, (step,) = graphs.apply(graphs.flatten_gemm(), "fold-bn")
    assert step["notes"] == ["no BatchNormalization nodes in the model"]


def test_forward_fold_into_flatten_gemm_changes_the_gemm():
    model = graphs.conv_relu_bn_flatten_gemm()
    out, (step,) = graphs.apply(model, "fold-bn")
    assert graphs.op_counts(out) == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("beta", 1.0) == 1.0  # absent: the default
    conv_w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["conv.weight"]
    original_w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["conv.weight"]
    np.testing.assert_array_equal(conv_w, original_w)  # the Conv before the Relu is untouched


def test_forward_fold_into_a_padding_conv_is_refused():
    model = graphs.relu_bn_conv(pads=1)
    out, (step,) = graphs.apply(model, "fold-bn")
    assert graphs.op_counts(out)["BatchNormalization"] == 1
    assert "the following Conv pads its input" in step["notes"][0]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) == 0.0


def test_larger_epsilon_is_respected():
    model = graphs.conv_bn_relu()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute[0].f = 0.25
    out, _ = graphs.apply(model, "fold-bn")
    assert "BatchNormalization" not in graphs.op_counts(out)
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) <= TOLERANCE


def test_shared_weight_is_not_modified_for_the_other_user():
    """
    x ─┬─ Conv(w) ─ BN a ─┐
       └─ Conv(w) ─ BN b ─ Add ─ y       (one weight initializer, two different BNs)
    """
    g = graphs.Builder(3)
    w = g.weight("shared.weight", 4, 3, 3, 3)
    a = g.bn(g.node("Conv", ["x", w], "conv_a", kernel_shape=[3, 3]), "bn_a", 4)
    b = g.bn(g.node("Conv", ["x", w], "conv_b", kernel_shape=[3, 3]), "bn_b", 4)
    g.node("Add", [a, b], "y")
    model = g.model({"x": [1, 3, 6, 6]}, "y")
    out, (step,) = graphs.apply(model, "fold-bn")
    assert "BatchNormalization" not in graphs.op_counts(out)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]  # each Conv got its own folded weight
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) <= TOLERANCE


def test_conv_output_used_elsewhere_is_not_folded_backward():
    """
    x ─ Conv ─┬─ BN ─ Relu ─┐
              └──────────── Add ─ y
    """
    g = graphs.Builder(4)
    c = g.conv("x", "conv", 3, 3, pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(c, "bn", 3)], "relu")
    g.node("Add", [h, c], "y")
    model = g.model({"x": [1, 3, 5, 5]}, "y")
    out, (step,) = graphs.apply(model, "fold-bn")
    assert graphs.op_counts(out)["BatchNormalization"] == 1
    assert "is also used elsewhere" in step["notes"][0]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) == 0.0


def test_digits_cnn_loses_all_four_bn_and_no_accuracy(repo):
    from squeeze.data import input_specs, load_npz
    model = load_model(repo / "models" / "digits_cnn.onnx")
    test = load_npz(repo / "models" / "digits_test.npz", input_specs(model))
    out, (step,) = graphs.apply(model, "fold-bn", test.subset(0, 64))
    assert graphs.op_counts(out) == {"Conv": 4, "Relu": 5, "Add": 1, "Flatten": 1, "Gemm": 2}
    assert graphs.max_rel_error(model, out, test) <= TOLERANCE
    before, after = (runtime.run(m, test)["logits"].argmax(1) for m in (model, out))
    assert int((before == test.labels).sum()) == int((after == test.labels).sum()) == 536  # models/README.md


@pytest.mark.corpus
def test_mnist_burn_both_bn_removed_and_top1_unchanged(corpus):
    model = load_model(corpus.model_path("mnist_burn"))
    assert graphs.op_counts(model)["BatchNormalization"] == 2
    mnist = corpus.dataset("mnist_burn")  # the official 10k test set
    out, (step,) = graphs.apply(model, "fold-bn", mnist.subset(0, 64))
    assert "BatchNormalization" not in graphs.op_counts(out)
    assert len(step["details"]["folded"]) == 2
    before, after = (runtime.run(m, mnist) for m in (model, out))
    name = model.graph.output[0].name
    assert float(np.abs(after[name] - before[name]).max() / np.abs(before[name]).max()) <= TOLERANCE
    correct_before = int((before[name].argmax(1) == mnist.labels).sum())
    correct_after = int((after[name].argmax(1) == mnist.labels).sum())
    assert correct_before == correct_after == 9916  # 99.16 %, MANIFEST.md
    assert (before[name].argmax(1) == after[name].argmax(1)).all()


@pytest.mark.corpus
@pytest.mark.parametrize("name, count", [("cifar10_resnet4b", 16), ("squeezenet", 2), ("mnist8_zoo", 16),
                                         ("sri_resnet_a", 16)])
def test_fold_bn_leaves_bn_free_corpus_models_unchanged(corpus, name, count):
    model = load_model(corpus.model_path(name))
    data = corpus.dataset(name, count)
    out, (step,) = graphs.apply(model, "fold-bn", data)
    assert step["notes"] == ["no BatchNormalization nodes in the model"]
    assert graphs.op_counts(out) == graphs.op_counts(model)
    assert graphs.max_rel_error(model, out, data) <= TOLERANCE


def _conv_squeeze_bn(squeeze_axes: list[int], bn_channels: int = 6) -> onnx.ModelProto:
    """x[1,4,1,6] ─Conv(1×3, pads)→ Squeeze(axes) → BN → Relu → y: a sequence head's conv-then-norm."""
    b = graphs.Builder(seed=5)
    c = b.node("Conv", ["x", b.weight("conv.weight", 6, 4, 1, 3), b.weight("conv.bias", 6, scale=0.1)], "conv",
               kernel_shape=[1, 3], pads=[0, 1, 0, 1])
    s = b.node("Squeeze", [c, b.tensor("axes", np.array(squeeze_axes, np.int64))], "sq")
    n = b.bn(s, "bn", bn_channels)
    return b.model({"x": [1, 4, 1, 6]}, b.node("Relu", [n], "y"))


def test_backward_fold_through_a_squeeze_that_keeps_the_channel_axis():
    model = _conv_squeeze_bn([2])
    out, (step,) = graphs.apply(model, "fold-bn")
    assert graphs.op_counts(out) == {"Conv": 1, "Squeeze": 1, "Relu": 1}
    assert step["details"]["folded"] == ["bn"]
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model, count=4)) <= TOLERANCE


def test_no_backward_fold_through_a_squeeze_of_the_batch_axis():
    model = _conv_squeeze_bn([0], bn_channels=1)  # [1,6,1,6] → [6,1,6]: BN's axis 1 is not the conv's channels
    out, (step,) = graphs.apply(model, "fold-bn")
    assert graphs.op_counts(out)["BatchNormalization"] == 1
    assert "preceded by Squeeze" in step["notes"][0]
