"""int8 compute in mcu firmware (targets/mcu_int8.py + targets/c/int8_kernels.c): quantized Conv/Gemm/MatMul
layers run squeeze's C kernels (SMLAD on Cortex-M4/M7), bit-exact with ONNX Runtime's int8 execution of the same
QDQ model, with their int8 weights in flash and fewer instructions than the float firmware."""
from __future__ import annotations

import subprocess

import numpy as np
import onnxruntime as ort
import pytest

import graphs
from squeeze.targets import mcu_int8
from squeeze.targets.mcu import Mcu

pytestmark = pytest.mark.tvm


def _firmware(model, tmp_path, count=3, **params):
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]
    target = Mcu(**params)
    artifact = target.build(model, {"x": shape}, tmp_path)
    measured = target.measure(artifact, samples, runs=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # QLinear* kernels
    return artifact, measured, np.stack([sess.run(None, s)[0] for s in samples])


CASES = {
    "conv3x3_pad1": dict(op="Conv", c=5, k=7, hw=(9, 11)),
    "conv3x3_stride2_odd_width": dict(op="Conv", c=4, k=8, hw=(13, 11), stride=2),
    "conv3x3_dilation2": dict(op="Conv", c=6, k=6, hw=(12, 12), dilation=2, pad=2),
    "conv_asymmetric_pads": dict(op="Conv", c=3, k=5, hw=(10, 9), pads=[0, 1, 2, 0]),
    "conv1x1": dict(op="Conv", c=16, k=9, ksize=1, pad=0, hw=(6, 7)),
    "conv5x5_one_channel": dict(op="Conv", c=1, k=10, ksize=5, pad=0, hw=(14, 14)),
    "conv_no_bias": dict(op="Conv", c=8, k=4, bias=False),
    "gemm_transB": dict(op="Gemm", c=40, k=11, trans_b=True),
    "gemm": dict(op="Gemm", c=33, k=24),
    "matmul_rows": dict(op="MatMul", c=36, k=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_int8_layers_match_onnx_runtime_bit_for_bit(mcu_tools, tmp_path, case):
    """Every case runs in the C kernel (odd channel counts, odd widths: the 2×2 blocks' tails; strides, dilation,
    asymmetric pads: the im2col; KP not a multiple of 4), and its uint8 output equals ONNX Runtime's."""
    model = graphs.qdq_model(**CASES[case])
    artifact, measured, expected = _firmware(model, tmp_path)
    assert measured.outputs["0"].shape == expected.shape
    assert np.array_equal(measured.outputs["0"], expected), np.abs(measured.outputs["0"] - expected).max()
    assert artifact.info["compute"] == "int8" and artifact.info["int8_layers"] == 1
    assert f"__tvm_ffi_{mcu_int8.KERNEL}" in (artifact.handle["folder"] / "model.c").read_text()
    row = measured.extra["layers"][0]
    assert (row["compute"], row["storage"]) == ("int8", "int8")


def test_cortex_m7_board_is_bit_exact_too(mcu_tools, tmp_path):
    """The same kernels built for Cortex-M7 (FPv5, run on mps2-an500)."""
    model = graphs.qdq_model(op="Conv", c=5, k=7, hw=(9, 11), stride=2)
    artifact, measured, expected = _firmware(model, tmp_path, board="mps2-an500")
    assert artifact.info["compute"] == "int8" and np.array_equal(measured.outputs["0"], expected)


def test_requantization_rounds_ties_to_even(mcu_tools, tmp_path):
    """x (integers 0..15, scale 1) · w = 1 → requantized at scale 2: every odd accumulator is a tie (0.5, 1.5, …);
    ONNX Runtime rounds ties to even, and so must the kernel (random data almost never hits a tie)."""
    from onnx import TensorProto, helper, numpy_helper
    arrays = {"one": np.array(1.0, np.float32), "two": np.array(2.0, np.float32), "z": np.array(0, np.uint8),
              "w": np.ones((1, 1, 1, 1), np.int8), "ws": np.ones(1, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "one", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], kernel_shape=[1, 1]),
             helper.make_node("QuantizeLinear", ["y", "two", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "two", "z"], ["out"])]
    graph = helper.make_graph(nodes, "ties", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    target = Mcu()
    artifact = target.build(model, {"x": x.shape}, tmp_path)
    got = target.measure(artifact, [{"x": x}], runs=1).outputs["0"][0]
    assert artifact.info["int8_layers"] == 1
    assert np.array_equal(got.ravel(), 2 * np.round(np.arange(16) / 2))   # numpy rounds half to even
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(got, want)


def test_a_float_output_layer_is_int8_up_to_the_float_rescale(mcu_tools, tmp_path):
    """No QuantizeLinear after the conv: the kernel writes float32(acc)·sx·sw (as the CPU path does); ONNX Runtime
    adds the float bias separately, so the outputs agree to float rounding, not bit for bit."""
    model = graphs.qdq_model(op="Conv", c=6, k=8, quant_out=False)
    artifact, measured, expected = _firmware(model, tmp_path)
    assert artifact.info["int8_layers"] == 1
    np.testing.assert_allclose(measured.outputs["0"], expected, rtol=1e-5, atol=1e-4)


def test_compute_float_keeps_tvm_float_kernels(mcu_tools, tmp_path):
    model = graphs.qdq_model(op="Conv", c=5, k=7, hw=(9, 11))
    artifact, measured, expected = _firmware(model, tmp_path, compute="float")
    assert artifact.info["compute"] == "float" and mcu_int8.SOURCE not in [f.name for f in artifact.files]
    assert np.array_equal(measured.outputs["0"], expected)
    assert measured.extra["layers"][0]["compute"] == "float32"


def test_the_kernels_use_smlad_on_cortex_m4(mcu_tools, tmp_path):
    artifact, _, _ = _firmware(graphs.qdq_model(op="Conv", c=8, k=8), tmp_path, count=1)
    obj = artifact.handle["folder"] / "int8_kernels.o"
    asm = subprocess.run(["arm-none-eabi-objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "smlad" in asm and "sxtb16" in asm


def _kernel_args(model):
    """The C kernel's constant arguments (packed weight, bias, multiplier, params) of `model`'s one int8 layer."""
    from tvm import relax

    from squeeze.targets import tvm_build
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    mod, consumed = mcu_int8.rewrite(tvm_build.import_onnx(model, {"x": shape}))
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) and getattr(
        e.op, "name", "") == "relax.call_dps_packed" else None)
    assert len(calls) == 1 and len(consumed) == 1
    return [a.value.numpy() for a in calls[0].args[1].fields[1:]], tuple(int(d) for d in calls[0].ty.shape)


def test_the_plain_c_path_without_dsp_is_exact_on_the_host(tmp_path):
    """int8_kernels.c compiled for this machine (no __ARM_FEATURE_DSP: the plain C loops a core without the DSP
    extension runs) on the arguments squeeze packs: the uint8 output equals ONNX Runtime's."""
    import ctypes
    import shutil

    from squeeze.targets import c_program
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler")
    lib = tmp_path / "kernels.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-DSQUEEZE_IM2COL_BYTES=65536",
                    *[f"-I{d}" for d in c_program.include_dirs()], "-o", str(lib),
                    str(c_program.C_SOURCES / mcu_int8.SOURCE)], check=True)
    kernel = getattr(ctypes.CDLL(str(lib)), f"__tvm_ffi_{mcu_int8.KERNEL}")
    for case in ("conv3x3_stride2_odd_width", "conv_asymmetric_pads", "gemm_transB"):
        model = graphs.qdq_model(**CASES[case])
        (w, bias, multiplier, params), out_shape = _kernel_args(model)
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        xq = np.clip(np.rint(x / graphs.QDQ_XS) + int(graphs.QDQ_XZ), 0, 255).astype(np.uint8)
        out = np.zeros(out_shape, np.uint8)
        arrays = [np.ascontiguousarray(a) for a in (xq, w, bias, multiplier, params, out)]
        # TVMFFIAny {int32 type_index; uint32 padding; void* v_ptr} → a DLTensor whose first field is the data pointer
        holders = [ctypes.c_void_p(a.ctypes.data) for a in arrays]
        args = (ctypes.c_uint64 * 12)()
        for i, h in enumerate(holders):
            args[2 * i + 1] = ctypes.addressof(h)
        assert kernel(None, args, 6, None) == 0
        got = (arrays[-1].astype(np.float32) - float(graphs.QDQ_YZ)) * graphs.QDQ_YS
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = sess.run(None, {"x": x})[0]
        assert np.array_equal(got.reshape(want.shape), want), case


def test_packed_weight_pairs_what_sxtb16_widens_with_the_column_in_order():
    """Emulate the DSP inner loop on the packed bytes: SXTB16 takes bytes 0 and 2 of a word, after a rotation by 8
    bytes 1 and 3; paired with consecutive int16 column values they give the plain dot product."""
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, size=(3, 5, 3, 3)).astype(np.int8)   # K = 45, padded to 48
    packed = mcu_int8.packed_weight(w)
    assert packed.shape == (3, 48) and not packed[:, 45:].any()
    col = rng.integers(-255, 256, size=48).astype(np.int64)
    col[45:] = 0
    for o in range(3):
        acc = 0
        for k in range(0, 48, 4):
            b = packed[o, k:k + 4].astype(np.int64)
            acc += b[0] * col[k] + b[2] * col[k + 1]      # SXTB16(word) · (c0, c1)
            acc += b[1] * col[k + 2] + b[3] * col[k + 3]  # SXTB16(word ror 8) · (c2, c3)
        assert acc == int(w[o].astype(np.int64).ravel() @ col[:45])


def test_mnist_ortjava_quant_firmware_is_int8_smaller_and_cheaper(mcu_tools, corpus, tmp_path):
    """The corpus model, quantized by the real pass: every layer int8, top-1 as ONNX Runtime's, flash ≤ 0.4× and
    instructions ≤ 0.6× the float model's firmware (issue 18's bars; instruction counts are deterministic)."""
    import onnx

    import squeeze
    calib, test = corpus.split(corpus.dataset("mnist_ortjava"), 64)
    original = onnx.load(corpus.model_path("mnist_ortjava"))
    model = squeeze.compress(original, "quant", calib=calib, targets=[], runs=1).model
    samples = test.samples(4)
    shape = {k: tuple(v.shape) for k, v in samples[0].items()}
    measured = {}
    for label, m in (("float", original), ("quant", model)):
        target = Mcu()
        artifact = target.build(m, shape, tmp_path / label)
        measured[label] = (artifact, target.measure(artifact, samples, runs=1))
    artifact, quant = measured["quant"]
    assert artifact.info["compute"] == "int8" and artifact.info["int8_layers"] == 4
    base = measured["float"][1].extra
    assert quant.extra["flash_bytes"] <= 0.4 * base["flash_bytes"]
    assert quant.extra["instructions"] <= 0.6 * base["instructions"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = np.stack([sess.run(None, s)[0] for s in samples])
    assert np.array_equal(quant.outputs["0"].argmax(-1), want.argmax(-1))
