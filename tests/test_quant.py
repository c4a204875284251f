"""`quant`: int8 QDQ weights (per channel), calibrated uint8 activations, opset upgrade, learned rounding."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from squeeze import pack, runtime
from squeeze.data import Dataset
from squeeze.passes import quant as quant_mod

SMOKE = dict(graphs.LOSSLESS)


@pytest.fixture
def calib_data():
    """Real-looking calibration data (a non-synthetic source, so data-driven steps run)."""
    def make(model: onnx.ModelProto, count: int, seed: int = 0) -> Dataset:
        data = graphs.random_inputs(model, count, seed)
        return Dataset(data.arrays, None, "test calibration", data.stacked)
    return make


def _gemm(inputs: int = 256, outputs: int = 64) -> onnx.ModelProto:
    """
    x[1,inputs] ─ Gemm (transB) ─ y[1,outputs]
    """
    g = graphs.Builder(0)
    g.node("Gemm", ["x", g.weight("fc.weight", outputs, inputs), g.weight("fc.bias", outputs, scale=0.1)], "y",
           transB=1)
    return g.model({"x": [1, inputs]}, "y")


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _weight_dq(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Layer name → the DequantizeLinear node that produces its weight."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            p = producer.get(n.input[1])
            if p is not None and p.op_type == "DequantizeLinear":
                out[n.name] = p
    return out


@pytest.mark.parametrize("name", list(SMOKE))
def test_runs_on_every_tiny_graph(name, calib_data):
    """Every structure verifies; every weight becomes int8 + DequantizeLinear; outputs stay close."""
    model = SMOKE[name]()
    data = calib_data(model, 16)
    out, steps = graphs.apply(model, "quant", data=data)
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version >= 13
    layers = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    assert len(_weight_dq(out)) == len(layers)
    assert graphs.max_rel_error(model, out, data) < 0.1
    assert steps[0]["details"]["compute"] == "int8 storage, float compute"


def test_weights_are_int8_per_channel_within_half_a_step():
    model = graphs.flatten_gemm()
    out, _ = graphs.apply(model, "quant(activations=false)")
    inits = _inits(out)
    dq = _weight_dq(out)["y"]
    q, scale = inits[dq.input[0]], inits[dq.input[1]]
    assert q.dtype == np.int8 and scale.shape == (5,)
    assert {a.name: a.i for a in dq.attribute}["axis"] == 0                    # Gemm transB: rows are outputs
    w = _inits(model)["fc.weight"]
    assert np.abs(q * scale[:, None] - w).max() <= scale.max() / 2 + 1e-7
    assert np.allclose(np.abs(q).max(axis=1), 127)                             # each row uses the full range
    assert Counter(n.op_type for n in out.graph.node)["QuantizeLinear"] == 0
    # int8 storage: the file shrinks about 4× in those tensors
    big = _gemm()
    small, _ = graphs.apply(big, "quant(activations=false)")
    assert small.ByteSize() < big.ByteSize() / 3.5


def test_gemm_without_transb_quantizes_along_columns():
    out, _ = graphs.apply(graphs.gemm_bn1d(), "quant(activations=false)")
    dq = _weight_dq(out)["fc1"]
    assert {a.name: a.i for a in dq.attribute}["axis"] == 1


def test_per_tensor_keeps_the_opset_and_uses_one_scale():
    model = graphs.ir3_initializers_as_inputs()         # opset 8
    out, steps = graphs.apply(model, "quant(per_channel=false,activations=false)")
    assert out.opset_import[0].version == 10            # DequantizeLinear exists from opset 10
    assert all(_inits(out)[dq.input[1]].size == 1 for dq in _weight_dq(out).values())


def test_per_channel_upgrades_old_opsets_and_verifies():
    model = graphs.ir3_initializers_as_inputs()
    out, steps = graphs.apply(model, "quant")
    assert out.opset_import[0].version == 13
    assert steps[0]["details"]["opset"] == {"from": 8, "to": 13}
    assert any("opset upgraded 8 → 13" in n for n in steps[0]["notes"])


def test_activations_default_follows_the_calibration_data(calib_data):
    model = graphs.residual_add()
    synthetic, steps = graphs.apply(model, "quant")
    assert Counter(n.op_type for n in synthetic.graph.node)["QuantizeLinear"] == 0
    assert steps[0]["details"]["activations"] is None
    real, steps = graphs.apply(model, "quant", data=calib_data(model, 16))
    # conv1 reads x, conv2 reads relu1: two quantized layer inputs, each one Q/DQ pair
    assert Counter(n.op_type for n in real.graph.node)["QuantizeLinear"] == 2
    # the residual Add still reads the float x (only the layers' inputs are quantized)
    add = next(n for n in real.graph.node if n.op_type == "Add")
    assert "x" in add.input


def test_biases_become_int32_with_the_product_scale(calib_data):
    model = graphs.flatten_gemm()
    out, _ = graphs.apply(model, "quant", data=calib_data(model, 16))
    producer = {o: n for n in out.graph.node for o in n.output}
    gemm = next(n for n in out.graph.node if n.name == "y")
    dq = producer[gemm.input[2]]
    assert dq.op_type == "DequantizeLinear" and _inits(out)[dq.input[0]].dtype == np.int32


def test_onnx_runtime_optimizer_does_not_change_the_result(calib_data):
    """With int32 biases in the graph, ORT's optimizer has nothing to requantize: same outputs on or off."""
    model = graphs.residual_add()
    data = calib_data(model, 16)
    out, _ = graphs.apply(model, "quant", data=data)
    plain = runtime.run(out, data, sess=runtime.session(out, optimize=False))
    optimized = runtime.run(out, data)
    assert all(np.allclose(plain[k], optimized[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_calibration_methods(method, calib_data):
    model = graphs.conv_bn_relu()
    out, steps = graphs.apply(model, f"quant(method={method})", data=calib_data(model, 16))
    entry = steps[0]["details"]["per_layer"][0]
    assert entry["input_scale"] > 0 and 0 <= entry["input_zero_point"] <= 255
    assert steps[0]["details"]["activations"]["method"] == method


def test_range_methods_on_heavy_tails():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(100_000), [60.0, -55.0]]).astype(np.float32)
    stats = quant_mod._ActivationStats([], 0, chunks=1)
    stats.lo, stats.hi, stats.samples, stats.seen = {"t": -55.0}, {"t": 60.0}, {"t": [values]}, {"t": values.size}
    s_minmax, _ = stats.range("t", "minmax", 99.99)
    s_pct, _ = stats.range("t", "percentile", 99.9)
    s_mse, zp_mse = stats.range("t", "mse", 99.99)
    assert s_minmax == pytest.approx(115 / 255, rel=1e-6)
    assert s_pct < s_minmax / 5

    def err(scale, zp):
        return np.mean((quant_mod._fake_quant(values, scale, zp) - values) ** 2)
    assert err(s_mse, zp_mse) <= err(*stats.range("t", "minmax", 99.99))
    assert err(s_mse, zp_mse) < err(*stats.range("t", "percentile", 99.9))  # clipping 2 outliers costs more
    # with a fat tail of moderate outliers, clipping pays: mse picks a range well inside the extremes
    tails = np.concatenate([rng.standard_normal(100_000), rng.standard_normal(3000) * 20]).astype(np.float32)
    stats.lo, stats.hi, stats.samples = {"t": float(tails.min())}, {"t": float(tails.max())}, {"t": [tails]}
    s_tail, zp_tail = stats.range("t", "mse", 99.99)
    assert s_tail < 0.95 * stats.range("t", "minmax", 99.99)[0]
    assert err_of(tails, s_tail, zp_tail) < err_of(tails, *stats.range("t", "minmax", 99.99))


def err_of(values, scale, zp):
    return np.mean((quant_mod._fake_quant(values, scale, zp) - values) ** 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_low_bit_weights_are_packed(bits):
    model = graphs.flatten_gemm()
    out, _ = graphs.apply(model, f"quant(bits={bits},activations=false)")
    w = runtime.activations(out, graphs.random_inputs(out, 1), [_gemm_weight(out)])[_gemm_weight(out)]
    assert all(len(np.unique(row)) <= 2 ** bits - 1 for row in w)  # symmetric levels, one scale per row
    bits_per_param = pack.size_report(out)["bits_per_param"]["layers"]["y"]
    assert bits_per_param < bits + 1.5  # the packed indices + one scale per row


def _gemm_weight(model):
    return next(n for n in model.graph.node if n.name == "y").input[1]


def test_int4_onnx_tensors():
    model = graphs.flatten_gemm()
    out, steps = graphs.apply(model, "quant(bits=4,int4=onnx,activations=false)")
    assert out.opset_import[0].version == 21
    assert any(t.data_type == onnx.TensorProto.INT4 for t in out.graph.initializer)
    assert any("TVM 0.27 cannot load INT4" in n for n in steps[0]["notes"])
    assert graphs.max_rel_error(model, out, graphs.random_inputs(model)) < 0.3


def test_skip_first_and_last_and_sensitivity_hint(calib_data):
    model = graphs.concat()
    out, steps = graphs.apply(model, "quant(skip=[first,last])", data=calib_data(model, 16))
    assert set(_weight_dq(out)) == {"conv_b"}
    assert set(steps[0]["details"]["skipped"]) == {"conv_a", "y"}
    three, steps = graphs.apply(model, "quant", data=calib_data(model, 16))
    table = steps[0]["details"]["per_layer"]
    assert all(np.isfinite(e["sqnr_db"]) and e["sqnr_db"] > 20 for e in table)
    assert any("most sensitive layers" in n for n in steps[0]["notes"])


def test_bias_correction_removes_the_mean_output_error(calib_data):
    model = graphs.flatten_gemm()
    data = calib_data(model, 64)
    ref = runtime.run(model, data)["y"]
    errors = {}
    for rounding in ("nearest", "bias-correct"):
        out, _ = graphs.apply(model, f"quant(bits=3,activations=false,rounding={rounding})", data=data)
        errors[rounding] = np.abs((runtime.run(out, data)["y"] - ref).mean(axis=0)).max()
    assert errors["bias-correct"] < errors["nearest"] / 3


def test_adaround_lowers_the_layer_output_error():
    """On one layer with correlated inputs (where rounding each weight to nearest is far from optimal),
    learned rounding halves the output error on the data it was fitted on."""
    import onnx_graphsurgeon as gs
    from squeeze.passes.weights import Layer
    model = graphs.flatten_gemm()
    graph = gs.import_onnx(model)
    layer = Layer(next(n for n in graph.nodes if n.op == "Gemm"), 1)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 512, 64)) @ rng.standard_normal((64, 64))).astype(np.float32)
    w = layer.values.astype(np.float32)
    scale = quant_mod._weight_scale(w, 0, 3)[:, None]
    learned, ratio = quant_mod._adaround(layer, w, scale, 3, x, 300, seed=0)
    assert learned is not None and ratio < 0.6
    nearest = np.clip(np.round(w / scale), -3, 3)
    assert np.abs(learned - nearest).max() == 1  # every weight still rounds to a neighbour of w/s


def test_adaround_through_the_pass(calib_data):
    model = graphs.flatten_gemm()
    data = calib_data(model, 64)
    out, steps = graphs.apply(model, "quant(bits=3,activations=false,rounding=adaround,iters=200)", data=data)
    entry = {e["layer"]: e for e in steps[0]["details"]["per_layer"]}["y"]
    assert entry.get("adaround_error_ratio", 1.0) < 1.0


def test_already_compressed_weights_only_get_activation_quantization(calib_data):
    model = graphs.flatten_gemm()
    data = calib_data(model, 16)
    cb, _ = graphs.apply(model, "codebook(bits=4)", data=data)
    out, steps = graphs.apply(cb, "quant", data=data)
    assert not _weight_dq(out)
    assert Counter(n.op_type for n in out.graph.node)["QuantizeLinear"] == 2


# ---------------------------------------------------------------------------------------------- TVM

@pytest.mark.tvm
def test_tvm_runs_qdq_like_onnx_runtime(calib_data):
    import squeeze
    model = graphs.residual_add()
    result = squeeze.compress(model, "quant", calib=calib_data(model, 16), targets="cpu", runs=3)
    check = result.report["targets"][0]["numeric_check"]
    assert check["ok"], check
    assert check["max_abs_rel"] < 1e-3


# ---------------------------------------------------------------------------------------------- corpus

@pytest.mark.slow
@pytest.mark.corpus
def test_resnet4b_int8_drops_at_most_one_point(corpus):
    import squeeze
    calib, test = corpus.split(corpus.dataset("cifar10_resnet4b"), 256)
    result = squeeze.compress(corpus.model_path("cifar10_resnet4b"), "quant", calib=calib, eval=test, targets="")
    assert result.report["accuracy"]["drop_pts"] <= 1.0
    assert result.report["final"]["bytes"]["onnx"] < result.report["original"]["bytes"]["onnx"] / 3
