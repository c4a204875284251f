"""targets/weight_storage.py: which weights firmware keeps compact, in what form, and that the form is exact.

No toolchain, no TVM: the analysis and the rewrite are checked with ONNX Runtime (the rewritten model fed the
decoded weights gives the original's outputs bit for bit); tests/test_mcu.py builds and runs the firmware.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from squeeze.targets import weight_storage as ws


def _model(nodes, inits, x_shape, y_shape, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]


def _same_outputs(model: onnx.ModelProto, plan: ws.Plan, x: np.ndarray) -> None:
    """The rewritten model fed the decoded weights computes what the model computes (ONNX Runtime pre-packs
    constant weights, so the summation order, not the weights, may differ in the last bits)."""
    feed = {"x": x, **{w.name: w.decode() for w in plan.weights}}
    np.testing.assert_allclose(_run(plan.model, feed), _run(model, {"x": x}), rtol=1e-5, atol=1e-5)


def _dq_conv_gemm(rng, q_range=127, zero=None, qtype=np.int8):
    """x[1,4,6,6] ─Conv(DQ(int8 W1, per-channel scale, axis 0))─ Relu ─ Flatten ─ Gemm(DQ(W2), transB=1) ─ y[1,10]"""
    w1 = rng.integers(-q_range, q_range + 1, (8, 4, 3, 3)).astype(qtype)
    w2 = rng.integers(-q_range, q_range + 1, (10, 8 * 4 * 4)).astype(qtype)
    if zero is not None:
        w1 = (w1.astype(np.int32) + zero).astype(qtype)
        w2 = (w2.astype(np.int32) + zero).astype(qtype)
    s1 = rng.uniform(0.001, 0.01, 8).astype(np.float32)
    s2 = np.float32(0.004)
    inits = {"w1_q": w1, "w1_s": s1, "w2_q": w2, "w2_s": np.array(s2), "b2": rng.normal(size=10).astype(np.float32)}
    dq1_in, dq2_in = ["w1_q", "w1_s"], ["w2_q", "w2_s"]
    if zero is not None:
        inits["w1_z"], inits["w2_z"] = np.full(8, zero, qtype), np.array(zero, qtype)
        dq1_in.append("w1_z")
        dq2_in.append("w2_z")
    nodes = [helper.make_node("DequantizeLinear", dq1_in, ["w1"], axis=0),
             helper.make_node("DequantizeLinear", dq2_in, ["w2"]),
             helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    return _model(nodes, inits, [1, 4, 6, 6], [1, 10])


def test_int8_dequantized_weights_stay_int8_and_the_gemm_weight_is_stored_transposed():
    rng = np.random.default_rng(0)
    model = _dq_conv_gemm(rng)
    plan = ws.plan(model)
    conv, gemm = plan.weights
    assert (conv.storage, gemm.storage) == ("int8", "int8")
    assert conv.stored_bytes == 8 * 4 * 9 and gemm.stored_bytes == 10 * 128   # one byte per weight
    assert conv.channels == 8 and conv.inner == 36 and conv.table_bytes == 8 * 4 + 8 * 4  # scales + zero points
    assert gemm.transposed and gemm.shape == (128, 10) and gemm.channels == 1
    gemm_node = next(n for n in plan.model.graph.node if n.op_type == "Gemm")
    assert {a.name: a.i for a in gemm_node.attribute}["transB"] == 0
    # the DequantizeLinear nodes and the int8 initializers are gone from the rewritten model: TVM folds nothing
    assert not any(n.op_type == "DequantizeLinear" for n in plan.model.graph.node)
    assert {i.name for i in plan.model.graph.input} == {"x", conv.name, gemm.name}
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


def test_integers_cast_and_scaled_per_channel_stay_int8():
    """quant's form for a layer that runs in float, Mul(Cast(int8 W), scale[8,1,1,1] as float16 + Cast), is the
    affine form with zero point 0: one byte per weight, no codebook table."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, (8, 1, 1, 1)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["w_s16"], ["w_s"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["w_f", "w_s"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])]
    model = _model(nodes, {"w_q": w, "w_s16": scale}, [1, 4, 6, 6], [1, 8, 4, 4])
    plan = ws.plan(model)
    (conv,) = plan.weights
    assert conv.kind == "affine" and conv.storage == "int8" and conv.stored_bytes == w.size
    assert conv.channels == 8 and conv.inner == 36 and not np.any(conv.zero)
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


def test_narrow_integers_are_bit_packed_and_zero_points_kept():
    rng = np.random.default_rng(1)
    model = _dq_conv_gemm(rng, q_range=7, zero=100, qtype=np.uint8)  # uint8 around 100: 4 bits of range
    plan = ws.plan(model)
    conv, gemm = plan.weights
    assert conv.storage == "packed 4-bit int" and conv.stored_bytes == 288 * 4 // 8 + 1
    assert gemm.storage == "packed 4-bit int" and gemm.zero.tolist() == [7]  # 100 - the smallest stored (93)
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_packed_symbols_read_back(bits):
    rng = np.random.default_rng(bits)
    symbols = rng.integers(0, 1 << bits, 1001)
    data = ws.packed(symbols, bits)
    assert data.nbytes == (-(-1001 * bits // 8) + (1 if bits < 8 else 0))
    w = ws.CompactWeight("w", "w", [], (1001,), "codebook", bits, data, np.arange(1 << bits, dtype=np.float32))
    assert np.array_equal(w.symbols(), symbols)
    assert np.array_equal(w.decode(), symbols.astype(np.float32))


def _conv_with(weight: np.ndarray) -> onnx.ModelProto:
    """x ─Conv(W: a float initializer)─ y"""
    o, i, kh, kw = weight.shape
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kh, kw])], {"w": weight},
                  [1, i, 5, 5], [1, o, 5 - kh + 1, 5 - kw + 1])


def test_a_weight_with_16_values_becomes_4_bit_indices_and_a_codebook():
    rng = np.random.default_rng(2)
    table = rng.normal(size=16).astype(np.float32)
    weight = table[rng.integers(0, 16, (32, 16, 3, 3))]
    model = _conv_with(weight)
    (w,) = ws.plan(model).weights
    assert w.kind == "codebook" and w.bits == 4 and w.per == 1 and w.storage == "packed 4-bit + codebook[16]"
    assert w.stored_bytes == weight.size // 2 + 1 and w.table_bytes == 64
    assert np.array_equal(w.decode(), weight)
    _same_outputs(model, ws.plan(model), rng.random((1, 16, 5, 5), dtype=np.float32))


def test_few_distinct_kernels_become_a_kernel_codebook():
    rng = np.random.default_rng(3)
    kernels = rng.normal(size=(4, 3, 3)).astype(np.float32)      # 36 distinct values, 4 distinct kernels
    weight = kernels[rng.integers(0, 4, (64, 64))]
    (w,) = ws.plan(_conv_with(weight)).weights
    assert w.per == 9 and w.bits == 2 and w.storage == "packed 2-bit + codebook[4×9]"
    assert w.stored_bytes == 64 * 64 * 2 // 8 + 1 and w.table_bytes == 4 * 9 * 4
    assert np.array_equal(w.decode(), weight)


def test_float_weights_and_small_tensors_stay_float_with_the_reason():
    rng = np.random.default_rng(4)
    model = _conv_with(rng.normal(size=(16, 8, 3, 3)).astype(np.float32))
    plan = ws.plan(model)
    assert plan.weights == [] and plan.model is model
    assert "would be 4721 bytes of 4608" in plan.kept["w"]  # 128 distinct kernels: a table as big as the weight
    tiny = _conv_with(np.ones((2, 2, 3, 3), np.float32))  # 144 bytes: under MIN_BYTES, not even considered
    assert ws.plan(tiny).weights == [] and ws.plan(tiny).kept == {}


def test_layer_rows_give_storage_compute_and_macs():
    rng = np.random.default_rng(5)
    model = _dq_conv_gemm(rng)
    plan = ws.plan(model)
    rows = ws.layer_rows(model, {"x": (1, 4, 6, 6)}, plan)
    assert [(r["op"], r["macs"], r["storage"], r["compute"]) for r in rows] == [
        ("Conv", 8 * 4 * 4 * 4 * 9, "int8", "float32"), ("Gemm", 128 * 10, "int8", "float32")]
    assert rows[1]["flash_bytes"] == 1280 + 4 + 4 and rows[1]["float_bytes"] == 5120
    kept = ws.layer_rows(model, {"x": (1, 4, 6, 6)}, plan, as_float={plan.weights[1].name})
    assert kept[1]["storage"].startswith("float32") and kept[1]["flash_bytes"] == 5120


# ---------------------------------------------------------------------------------------------- channel-scaled codebooks

def _scaled_rebuild(prefix: str, table: np.ndarray, labels: np.ndarray, scale: np.ndarray, *, scale_first=False,
                    fp16=True) -> tuple[list, dict]:
    """The rebuild `codebook` (scale=channel) writes: Mul(Reshape(Gather(table, index)), Cast(float16 scales))."""
    inits = {f"{prefix}_table": table, f"{prefix}_index": labels.ravel().astype(np.int64),
             f"{prefix}_shape": np.array(labels.shape, np.int64),
             f"{prefix}_scale": scale.astype(np.float16 if fp16 else np.float32)}
    nodes = [helper.make_node("Gather", [f"{prefix}_table", f"{prefix}_index"], [f"{prefix}_g"], axis=0),
             helper.make_node("Reshape", [f"{prefix}_g", f"{prefix}_shape"], [f"{prefix}_shared"])]
    scale_name = f"{prefix}_scale"
    if fp16:
        nodes.append(helper.make_node("Cast", [scale_name], [f"{prefix}_scale_f"], to=TensorProto.FLOAT))
        scale_name = f"{prefix}_scale_f"
    pair = [scale_name, f"{prefix}_shared"] if scale_first else [f"{prefix}_shared", scale_name]
    nodes.append(helper.make_node("Mul", pair, [prefix]))
    return nodes, inits


def _labels(rng, k: int, shape) -> np.ndarray:
    """Labels of `shape` that use every one of the k entries."""
    return rng.permutation(np.arange(int(np.prod(shape))) % k).reshape(shape)


def _scaled_net(rng, bits: int, scale_first=False) -> onnx.ModelProto:
    """x[1,4,6,6] ─Conv(W1 = codebook·scale[8,1,1,1])─ Relu ─ Flatten ─ Gemm(W2 = codebook·scale[10,1], transB=1)
    ─ MatMul(W3 = codebook·scale[48] (float32, along the last axis)) ─ y[1,48]"""
    k = 1 << bits
    t1, t2, t3 = (rng.normal(size=k).astype(np.float32) for _ in range(3))
    s1 = rng.uniform(0.01, 2.0, (8, 1, 1, 1))
    s2 = rng.uniform(0.01, 2.0, (10, 1))
    s3 = rng.uniform(0.01, 2.0, 48).astype(np.float32)
    n1, i1 = _scaled_rebuild("w1", t1, _labels(rng, k, (8, 4, 3, 3)), s1, scale_first=scale_first)
    n2, i2 = _scaled_rebuild("w2", t2, _labels(rng, k, (10, 128)), s2)
    n3, i3 = _scaled_rebuild("w3", t3, _labels(rng, k, (10, 48)), s3, scale_first=not scale_first, fp16=False)
    nodes = n1 + n2 + n3 + [helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3]),
                            helper.make_node("Relu", ["c"], ["r"]),
                            helper.make_node("Flatten", ["r"], ["f"]),
                            helper.make_node("Gemm", ["f", "w2"], ["h"], transB=1),
                            helper.make_node("MatMul", ["h", "w3"], ["y"])]
    return _model(nodes, {**i1, **i2, **i3}, [1, 4, 6, 6], [1, 48])


def _ort_weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The weights as ONNX Runtime computes them from the model's constants."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    outputs = ort.InferenceSession(probe.SerializeToString()).run(names, {"x": np.zeros((1, 4, 6, 6), np.float32)})
    return dict(zip(names, outputs))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])   # 8 bits: the C decoder test (a 256-entry table needs a big weight)
def test_channel_scaled_codebooks_are_stored_as_symbols_codebook_and_scales(bits):
    rng = np.random.default_rng(10 + bits)
    model = _scaled_net(rng, bits, scale_first=bits % 2 == 0)
    plan = ws.plan(model)
    assert [w.source for w in plan.weights] == ["w1", "w2", "w3"] and plan.kept == {}
    conv, gemm, matmul = plan.weights
    k = 1 << bits
    assert conv.storage == f"packed {bits}-bit + codebook[{k}] × scale[8]"
    assert (conv.channels, conv.inner, conv.per) == (8, 36, 1)
    # Gemm transB=1 reads [10, 128]: stored [128, 10], so the scales run along the last axis
    assert gemm.transposed and gemm.shape == (128, 10) and (gemm.channels, gemm.inner) == (10, 1)
    assert (matmul.channels, matmul.inner) == (48, 1)
    for w, count, channels in ((conv, 288, 8), (gemm, 1280, 10), (matmul, 480, 48)):
        assert w.stored_bytes == -(-count * bits // 8) + (bits < 8)
        assert w.table_bytes == 4 * k + 4 * channels
    ort_values = _ort_weights(model, ["w1", "w2", "w3"])
    for w in plan.weights:   # decoded == what ONNX Runtime's Mul computes, bit for bit
        expected = ort_values[w.source].T if w.transposed else ort_values[w.source]
        assert np.array_equal(w.decode().view(np.uint32), np.ascontiguousarray(expected).view(np.uint32))
    # neither Mul, Gather nor the scales remain: TVM folds nothing
    assert {n.op_type for n in plan.model.graph.node} == {"Conv", "Relu", "Flatten", "Gemm", "MatMul"}
    _same_outputs(model, plan, rng.random((1, 4, 6, 6), dtype=np.float32))


def test_a_scale_that_varies_along_two_axes_is_no_channel_scale():
    rng = np.random.default_rng(20)
    nodes, inits = _scaled_rebuild("w", rng.normal(size=4).astype(np.float32), rng.integers(0, 4, (16, 8, 3, 3)),
                                   rng.uniform(0.5, 2.0, (16, 8, 1, 1)))
    nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3]))
    plan = ws.plan(_model(nodes, inits, [1, 8, 5, 5], [1, 16, 3, 3]))
    assert all(w.scale is None for w in plan.weights)
    assert all("× scale" not in (w.storage) for w in plan.weights)


def test_the_c_decoder_computes_what_onnx_runtime_computes(tmp_path):
    """DECODE_C compiled for this machine decodes every form of `_scaled_net` and of the int8 / packed affine net
    to the bytes ONNX Runtime computes."""
    import shutil
    import subprocess

    from squeeze.targets import c_program
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler (cc) to build the decoder with")
    rng = np.random.default_rng(30)
    weights, expected = [], []
    for model in (_scaled_net(rng, 3), _scaled_net(rng, 8), _dq_conv_gemm(rng, q_range=7, zero=100, qtype=np.uint8)):
        plan = ws.plan(model)
        ort_values = _ort_weights(model, [w.source for w in plan.weights])
        for w in plan.weights:
            weights.append(w)
            value = ort_values[w.source]
            expected.append(np.ascontiguousarray(value.T if w.transposed else value).ravel())
    assert any(w.scale is not None for w in weights) and any(w.kind == "affine" for w in weights)
    lines = ["#include <stdint.h>", "#include <stdio.h>"]
    calls = []
    for k, w in enumerate(weights):
        lines += [c_program.c_array(f"{name}_data", arr) for name, arr in ws.c_arrays(w, f"w{k}").items()]
        lines.append(f"static float out{k}[{w.count}];")
        calls.append(f"  {ws.c_decode_call(w, f'w{k}', f'out{k}')}\n"
                     f"  fwrite(out{k}, sizeof(float), {w.count}, stdout);")
    source = "\n".join(lines) + ws.DECODE_C + "int main(void) {\n" + "\n".join(calls) + "\n  return 0;\n}\n"
    (tmp_path / "decode.c").write_text(source)
    subprocess.run([cc, "-O2", "-std=c99", "-o", str(tmp_path / "decode"), str(tmp_path / "decode.c")], check=True)
    got = np.frombuffer(subprocess.run([str(tmp_path / "decode")], check=True, capture_output=True).stdout,
                        np.float32)
    assert np.array_equal(got.view(np.uint32), np.concatenate(expected).view(np.uint32))
