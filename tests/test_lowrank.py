"""`lowrank`: Conv/Gemm/MatMul layers factorized into two thin ones, fitted to calibration activations."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from helpers import calibration
from squeeze import metrics, runtime
from squeeze.data import Dataset
from squeeze.passes import lowrank as lowrank_mod
from squeeze.registry import get_pass


def real(model: onnx.ModelProto, count: int, seed: int = 0, x: np.ndarray | None = None) -> Dataset:
    """Calibration data from a non-synthetic source (so the activation-aware steps run): N(0,1) or `x`."""
    data = calibration(model, count, seed)
    return data if x is None else Dataset({"x": x}, None, data.source, data.stacked)


def set_weight(model: onnx.ModelProto, name: str, values: np.ndarray) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
            return model
    raise KeyError(name)


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}


def conv(c_in: int = 8, c_out: int = 16, k: int = 3, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """
    x[1,c_in,size,size] ─ Conv c_in→c_out k×k pad k//2 ─ y
    """
    g = graphs.Builder(seed)
    g.conv("x", "conv", c_in, c_out, k=k, pads=[k // 2] * 4)
    return g.model({"x": [1, c_in, size, size]}, "conv")


def gemm(d: int = 64, n: int = 32, seed: int = 0) -> onnx.ModelProto:
    """
    x[1,d] ─ Gemm d→n (transB, alpha 0.5, bias) ─ y[1,n]
    """
    g = graphs.Builder(seed)
    g.node("Gemm", ["x", g.weight("fc.weight", n, d), g.weight("fc.bias", n, scale=0.1)], "fc", transB=1, alpha=0.5)
    return g.model({"x": [1, d]}, "fc")


def matmul_add(d: int = 48, n: int = 24, seed: int = 0) -> onnx.ModelProto:
    """
    x[1,5,d] ─ MatMul [d,n] ─ Add bias ─ y[1,5,n]
    """
    g = graphs.Builder(seed)
    h = g.node("MatMul", ["x", g.weight("w", d, n)], "mm")
    g.node("Add", [h, g.weight("b", n, scale=0.1)], "y")
    return g.model({"x": [1, 5, d]}, "y")


def two_convs(seed: int) -> onnx.ModelProto:
    """
    x[1,16,8,8] ─ conv1 16→32 3×3 ─ Relu ─ conv2 32→32 3×3 ─ y
    """
    g = graphs.Builder(seed)
    h = g.node("Relu", [g.conv("x", "conv1", 16, 32, pads=[1, 1, 1, 1])], "relu")
    g.conv(h, "conv2", 32, 32, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 16, 8, 8]}, "conv2")


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int) -> np.ndarray:
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)


# ------------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("name", list(graphs.LOSSLESS))
def test_runs_on_every_tiny_graph(name):
    """Every structure verifies (checker, strict shape inference, ORT) with every layer considered."""
    model = graphs.LOSSLESS[name]()
    out, steps = graphs.apply(model, "lowrank(rank=0.5,min_share=0)", data=real(model, 8))
    assert "failed" not in steps[0]
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_an_exactly_low_rank_conv_is_reproduced_at_its_rank(form):
    """A conv whose weight has rank 4 (as [N, C·k²] for the channel form, as [(N,kw), (C,kh)] for the spatial
    one) comes back to float32 precision from two convs at rank 4."""
    rng = np.random.default_rng(0)
    model = conv()
    if form == "channel":
        w = low_rank(rng, 16, 8 * 9, 4).reshape(16, 8, 3, 3)
    else:
        w = low_rank(rng, 16 * 3, 8 * 3, 4).reshape(16, 3, 8, 3).transpose(0, 2, 3, 1)
    set_weight(model, "conv.weight", w)
    out, steps = graphs.apply(model, f"lowrank(layer_rank=['conv=4'],form={form})", data=real(model, 16))
    entry = steps[0]["details"]["per_layer"][0]
    assert (entry["form"], entry["rank"]) == (form, 4)
    assert graphs.op_counts(out)["Conv"] == 2
    kernels = sorted(tuple(numpy_helper.to_array(t).shape[2:]) for t in out.graph.initializer if t.dims
                     and len(t.dims) == 4)
    assert kernels == ([(1, 1), (3, 3)] if form == "channel" else [(1, 3), (3, 1)])
    assert graphs.max_rel_error(model, out, real(model, 8, seed=5)) < 1e-5


@pytest.mark.parametrize("auto_pad", ["VALID", b"VALID", "SAME_UPPER"])
def test_auto_pad_valid_factorizes_spatially_and_same_keeps_the_channel_form(auto_pad):
    """
    x[1,8,8,8] ─ Conv 8→16 3×3 auto_pad=… (no pads) ─ y     (weight of spatial rank 4)
    VALID (str or bytes, as exporters write it) has fixed pads: the k×1 / 1×k pair reproduces the conv. SAME_UPPER's
    pads depend on the input size: the spatial form is refused with the reason and the channel form is used.
    """
    rng = np.random.default_rng(0)
    g = graphs.Builder(0)
    g.conv("x", "conv", 8, 16, k=3, auto_pad=auto_pad)
    model = g.model({"x": [1, 8, 8, 8]}, "conv")
    set_weight(model, "conv.weight", low_rank(rng, 16 * 3, 8 * 3, 4).reshape(16, 3, 8, 3).transpose(0, 2, 3, 1))
    out, steps = graphs.apply(model, "lowrank(layer_rank=['conv=4'])", data=real(model, 16))
    assert steps[0]["details"]["per_layer"][0]["form"] == ("channel" if auto_pad == "SAME_UPPER" else "spatial")
    onnx.checker.check_model(out, full_check=True)
    if auto_pad != "SAME_UPPER":
        assert graphs.max_rel_error(model, out, real(model, 8, seed=5)) < 1e-5
        return
    _, steps = graphs.apply(model, "lowrank(layer_rank=['conv=4'],form=spatial)", data=real(model, 16))
    assert "the spatial form does not apply: auto_pad=SAME_UPPER" in steps[0]["details"]["skipped"]["conv"]


@pytest.mark.parametrize("build", [gemm, matmul_add])
def test_an_exactly_low_rank_gemm_or_matmul_is_reproduced_at_its_rank(build):
    rng = np.random.default_rng(1)
    model = build()
    name = "fc.weight" if build is gemm else "w"
    shape = next(tuple(t.dims) for t in model.graph.initializer if t.name == name)
    set_weight(model, name, low_rank(rng, shape[0], shape[1], 6))
    layer = "fc" if build is gemm else "mm"
    out, steps = graphs.apply(model, f"lowrank(layer_rank=['{layer}=6'])", data=real(model, 16))
    assert steps[0]["details"]["per_layer"][0]["rank"] == 6
    assert graphs.op_counts(out)["MatMul"] == (1 if build is gemm else 2)
    assert graphs.max_rel_error(model, out, real(model, 8, seed=5)) < 1e-5


def test_macs_and_params_drop_as_the_rank_says():
    """Conv 32→32 3×3 on 16×16 at rank 8 (a quarter): 8·(288 + 32) MACs per pixel instead of 288·32."""
    model = conv(32, 32, size=16)
    out, steps = graphs.apply(model, "lowrank(rank=0.25,form=channel)", data=real(model, 8))
    shapes = shapes_of(model)
    before, after = metrics.summary(model, shapes), metrics.summary(out, shapes)
    assert after["macs"] / before["macs"] == pytest.approx(8 * (288 + 32) / (288 * 32))
    assert after["params"] == 8 * 288 + 8 * 32 + 32 and before["params"] == 288 * 32 + 32
    entry = steps[0]["details"]["per_layer"][0]
    assert entry["macs"] == [before["macs"], after["macs"]] and entry["rank"] == 8 and entry["full_rank"] == 32


def test_auto_form_compares_both_at_equal_macs_and_keeps_the_better():
    """A spatially separable kernel: the k×1 / 1×k form is exact, the channel form is not; auto keeps the first,
    at no more MACs than the channel form would cost."""
    rng = np.random.default_rng(2)
    model = conv(16, 16, size=8)
    w = low_rank(rng, 16 * 3, 16 * 3, 6).reshape(16, 3, 16, 3).transpose(0, 2, 3, 1)
    set_weight(model, "conv.weight", w)
    out, steps = graphs.apply(model, "lowrank(rank=0.5)", data=real(model, 16))
    entry = steps[0]["details"]["per_layer"][0]
    assert entry["form"] == "spatial"
    assert entry["loss_by_form"]["spatial"] < 1e-3 * entry["loss_by_form"]["channel"]
    channel_macs = 64 * 8 * (144 + 16)                       # rank 8 of 16, per output pixel
    assert entry["macs"][1] <= channel_macs
    assert graphs.max_rel_error(model, out, real(model, 8, seed=5)) < 1e-4


def test_depthwise_and_no_gain_layers_are_skipped_with_a_note():
    """
    x ─ Conv dw 3×3 group 4 ─ BN ─ Relu ─ Conv pw 1×1 4→6 ─ BN ─ y   (rank 0.9: the 1×1 gains nothing)
    """
    model = graphs.depthwise()
    out, steps = graphs.apply(model, "lowrank(rank=0.9,min_share=0)", data=real(model, 8))
    skipped = steps[0]["details"]["skipped"]
    assert "depthwise" in skipped["dw"] and "no gain" in skipped["pw"]
    notes = " ".join(steps[0]["notes"])
    assert "depthwise conv (group=4)" in notes and "no gain" in notes and "no layer factorized" in notes
    assert graphs.op_counts(out) == graphs.op_counts(model)


def test_a_tiny_share_of_the_macs_is_left_alone_unless_named():
    """
    x[1,3,6,6] ─ Conv 3→4 3×3 ─ Relu ─ Flatten ─ Gemm 64→5 ─ y   (the Gemm: 320 of 2048 MACs, 16 %)
    """
    model = graphs.flatten_gemm()
    _, steps = graphs.apply(model, "lowrank(rank=0.5,min_share=0.2)", data=real(model, 8))
    assert steps[0]["details"]["skipped"]["y"] == "16 % of the model's MACs < min_share=0.2"
    assert steps[0]["details"]["layers"] == ["conv"]
    _, steps = graphs.apply(model, "lowrank(rank=0.5,min_share=0.2,layer_rank=['y=2'])", data=real(model, 8))
    assert steps[0]["details"]["layers"] == ["conv", "y"]


def test_layer_rank_overrides_rank_and_typos_are_errors():
    from squeeze.data import input_specs, resolve_shapes
    from squeeze.pipeline import run_pipeline
    from squeeze.spec import bind
    model = conv(32, 32)
    _, steps = graphs.apply(model, "lowrank(rank=0.5,form=channel,layer_rank=['co*=3'])", data=real(model, 8))
    assert steps[0]["details"]["per_layer"][0]["rank"] == 3
    _, steps = graphs.apply(model, "lowrank(form=channel,layer_rank=['conv=0.25'])", data=real(model, 8))
    assert steps[0]["details"]["per_layer"][0]["rank"] == 8
    data = real(model, 4)
    for entry, words in (("convx=3", "matches no layer"), ("conv=0", "LAYER=R"), ("conv", "LAYER=R")):
        result = run_pipeline(model, bind(f"lowrank(layer_rank=['{entry}'])", get_pass), data,
                              resolve_shapes(input_specs(model), {}, data))
        assert result.failure and words in result.failure and "layer_rank" in result.failure


def test_bias_goes_on_the_second_factor():
    model = conv(16, 16)
    out, _ = graphs.apply(model, "lowrank(rank=0.25,form=channel)", data=real(model, 8))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    first, second = [n for n in out.graph.node if n.op_type == "Conv"]
    if second.input[0] != first.output[0]:
        first, second = second, first
    assert len(first.input) == 2                       # no bias on the k×k C→r conv
    assert inits[second.input[2]].shape == (16,)       # the 1×1 r→N conv carries it


# ------------------------------------------------------------------------------------------------ numbers


def test_activation_aware_init_beats_plain_weight_svd_on_correlated_inputs():
    """Inputs that live near a few directions the weight's top singular vectors do not favour: fitting the output
    covariance (≡ SVD of W·Σ^½) loses far less on unseen inputs than truncating W's SVD."""
    rng = np.random.default_rng(3)
    d = 64
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.concatenate([np.full(8, 3.0), np.full(d - 8, 0.05)])
    mix = basis * scales                                # x = mix · z: 8 strong directions, the rest faint

    def inputs(count: int, seed: int) -> np.ndarray:
        return (np.random.default_rng(seed).standard_normal((count, d)) @ mix.T).astype(np.float32)

    model = gemm(d, 32)
    data = real(model, 256, x=inputs(256, 0))
    held_out = real(model, 128, x=inputs(128, 1))
    errors = {}
    for init in ("activation", "weight"):
        out, _ = graphs.apply(model, f"lowrank(rank=0.25,init={init},compensate=false)", data=data)
        ref, new = graphs.outputs(model, held_out)["fc"], graphs.outputs(out, held_out)["fc"]
        errors[init] = float(np.linalg.norm(new - ref) / np.linalg.norm(ref))
    assert errors["activation"] < 0.25 * errors["weight"], errors


def test_refit_lowers_the_error_of_the_network_after_an_earlier_factorized_layer():
    """Two stacked convs: the second one's refit sees the first one's error and absorbs part of it."""
    model = two_convs(4)
    data, held_out = real(model, 64), real(model, 32, seed=9)
    plain, _ = graphs.apply(model, "lowrank(rank=0.25,compensate=false)", data=data)
    refit, steps = graphs.apply(model, "lowrank(rank=0.25)", data=data)
    assert graphs.max_rel_error(model, refit, held_out) < graphs.max_rel_error(model, plain, held_out)
    assert all("refit" in e for e in steps[0]["details"]["per_layer"])


def test_layers_left_as_they_are_downstream_of_an_implant_are_refit():
    """conv1 factorized, conv2 skipped: conv2 is refit like pruning's downstream compensation (on the factorized
    network's inputs, against the original outputs), and the network is closer to the original on unseen inputs
    than with conv2's original weights put back."""
    model = two_convs(5)
    data, held_out = real(model, 64), real(model, 32, seed=9)
    out, steps = graphs.apply(model, "lowrank(rank=0.25,skip=[conv2])", data=data)
    assert steps[0]["details"]["layers"] == ["conv1"]
    assert any(n.startswith("compensation refit 1 of 1") and "conv2" in n for n in steps[0]["notes"])
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not np.allclose(weights[conv2.input[1]], original["conv2.weight"])
    put_back = onnx.ModelProto()
    put_back.CopyFrom(out)
    set_weight(put_back, conv2.input[1], original["conv2.weight"])
    if len(conv2.input) > 2:
        set_weight(put_back, conv2.input[2], original["conv2.bias"])
    assert graphs.max_rel_error(model, out, held_out) < graphs.max_rel_error(model, put_back, held_out)


def test_synthetic_calibration_falls_back_to_weight_svd():
    model = conv(16, 16)
    _, steps = graphs.apply(model, "lowrank(rank=0.5)")   # graphs.apply's default data is synthetic
    assert any("synthetic" in n for n in steps[0]["notes"])
    assert "weight_rel_err" in steps[0]["details"]["per_layer"][0]


def test_deterministic_with_the_seed():
    model = graphs.residual_add()
    data = real(model, 16)
    a, _ = graphs.apply(model, "lowrank(rank=0.5,min_share=0)", data=data, seed=3)
    b, _ = graphs.apply(model, "lowrank(rank=0.5,min_share=0)", data=data, seed=3)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_the_guard_raises_the_rank_step_by_step():
    backoff = get_pass("lowrank").backoff
    assert backoff.param == "rank" and backoff.skip == "skip"
    steps, value = [], 0.25
    while (value := backoff.weaken(value)) is not None:
        steps.append(value)
    assert steps == [0.625, 0.8125, 0.9062]
    assert lowrank_mod.weaker_rank(0.95) is None


# ------------------------------------------------------------------------------------------------ TVM, corpus


@pytest.mark.tvm
def test_tvm_runs_the_factorized_model_and_matches_onnx_runtime():
    import squeeze
    model = graphs.flatten_gemm()
    result = squeeze.compress(model, "lowrank(rank=0.5,min_share=0)", calib=real(model, 16), targets="cpu",
                              runs=3)
    assert result.report["passes"][0]["details"]["layers"]
    check = result.report["targets"][0]["numeric_check"]
    assert check["ok"], check


@pytest.mark.corpus
def test_corpus_cifar10_resnet4b_at_rank_half_keeps_top1_within_six_points(corpus):
    """Rank 0.5 (about 44 % fewer MACs): calibration on the first 256 images, top-1 on the 761 after them."""
    import squeeze
    calib, test = corpus.split(corpus.dataset("cifar10_resnet4b"), 256)
    result = squeeze.compress(corpus.model_path("cifar10_resnet4b"), "lowrank(rank=0.5)", calib=calib, eval=test,
                              targets="")
    rep = result.report
    assert rep["final"]["macs"] <= 0.6 * rep["original"]["macs"]
    assert rep["accuracy"]["drop_pts"] <= 6.0
    assert runtime.run(result.model, test.subset(0, 2))  # ORT runs the saved model
