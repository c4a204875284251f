"""ConvTranspose with kernel = stride as a 1×1 conv + pixel shuffle (`targets/schedules/conv_transpose.py`) and the
interleaved store of the shuffle (`injective.interleave_factor`): the rewrite applies where it should, moves the
elementwise ops after it into the conv's epilogue, and the compiled model computes what ONNX Runtime does."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm

TOLERANCE = 1e-5


def upsample(c_in: int, c_out: int, k: tuple[int, int], hw: tuple[int, int], tail: str = "relu",
             pads: int = 0) -> onnx.ModelProto:
    """x[1,Ci,H,W] ─ ConvTranspose k = stride (bias) ─ [BatchNorm] ─ Relu | Sigmoid | quantize-dequantize ─ y"""
    g = graphs.Builder(c_in * 7 + c_out)
    w = g.weight("up.weight", c_in, c_out, *k)
    h = g.node("ConvTranspose", ["x", w, g.weight("up.bias", c_out, scale=0.1)], "up", kernel_shape=list(k),
               strides=list(k), pads=[pads] * 4)
    if tail == "bn_sigmoid":
        h = g.node("Sigmoid", [g.bn(h, "bn", c_out)], "sig")
    elif tail == "qdq":
        scale, zero = g.tensor("s", np.float32(0.05)), g.tensor("z", np.uint8(128))
        h = g.node("DequantizeLinear", [g.node("QuantizeLinear", [h, scale, zero], "q"), scale, zero], "dq")
    else:
        h = g.node("Relu", [h], "relu")
    return g.model({"x": [1, c_in, *hw]}, h)


def _target():
    tvm = tvm_build.tvm()
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


def _fused(model: onnx.ModelProto):
    from squeeze.targets import schedules
    return schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), _target())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from squeeze.targets import schedules
    tvm = tvm_build.tvm()
    target = _target()
    exe = tvm_build.compile_module(tvm_build.import_onnx(model, {"x": x.shape}), target,
                                   schedules.build_pipeline(target, threads=1))
    return tvm_build.VMRunner(exe, tvm.cpu(), ["x"]).run({"x": x})[0]


def _lanes() -> int:
    from squeeze.targets.schedules.simd import describe
    return describe(_target()).lanes("float32")


CASES = {
    "db_head_k1_sigmoid": (16, 1, (2, 2), (20, 24), "bn_sigmoid"),
    "k3_odd_map": (8, 3, (2, 2), (9, 13), "relu"),
    "k5_3x3_stride3": (6, 5, (3, 3), (7, 5), "relu"),
    "k2_2x1": (4, 2, (2, 1), (6, 10), "relu"),
    "k4_quantized_output": (12, 4, (2, 2), (10, 16), "qdq"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_onnxruntime(name):
    c_in, c_out, k, hw, tail = CASES[name]
    model = upsample(c_in, c_out, k, hw, tail)
    x = np.random.default_rng(5).standard_normal((1, c_in, *hw)).astype(np.float32)
    ref = runtime.session(model, 1).run(None, {"x": x})[0]
    got = _run(model, x)
    assert got.shape == ref.shape
    if tail == "qdq":  # one quantization step where the float sums round across a boundary
        assert np.abs(got - ref).max() <= 0.05 + 1e-6 and (got == ref).mean() > 0.99
    else:
        assert np.abs(got - ref).max() <= TOLERANCE * max(1.0, float(np.abs(ref).max()))


def _relax_ops(mod) -> list[str]:
    from tvm import relax
    ops = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: ops.append(e.op.name) if isinstance(e, relax.Call)
                                            and hasattr(e.op, "name") else None)
    return ops


def test_the_upsampling_becomes_a_pointwise_conv_with_its_epilogue_and_a_shuffle():
    """The bias add, the BatchNorm's multiply-add and the sigmoid move before the shuffle, so they fuse into the
    1×1 conv's function; the shuffle function only moves data and is scheduled as an interleaved store."""
    from tvm import tirx

    from squeeze.targets.schedules import injective, rules
    fused = _fused(upsample(16, 1, (2, 2), (20, 24), "bn_sigmoid"))
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert "conv2d_transpose" not in " ".join(names), names
    conv = [n for n in names if n.startswith("fused_conv2d")]
    assert len(conv) == 1 and "sigmoid" in conv[0] and "add" in conv[0], names
    shuffle = [n for n in names if "transpose" in n]
    assert len(shuffle) == 1 and "sigmoid" not in shuffle[0] and "add" not in shuffle[0], names
    func = fused[shuffle[0]]
    target = _target()
    with target:
        sch = next(s for s in (r.apply(func, target, False) for r in rules()) if s is not None)
    block = [b for b in injective.root_blocks(sch)][0]
    loops = sch.get_loops(block)
    assert [injective.extent(sch, lp) for lp in loops][-1] in (2, 4)  # the unrolled phase loop
    assert "T.unroll(" in sch.mod.script() and "T.vectorized(" not in sch.mod.script()


def test_wide_or_padded_conv_transposes_keep_the_phase_form():
    """K ≥ the vector's lanes (the phase form fills its channel vectors) or a padded / overlapping kernel: left
    as conv2d_transpose, legalized by `conv2d.legalize_conv2d_transpose`."""
    from squeeze.targets.schedules import conv_transpose
    with _target():
        for model in (upsample(8, _lanes(), (2, 2), (6, 6)), upsample(8, 3, (2, 2), (6, 6), pads=1),
                      upsample(8, 3, (2, 2), (6, 6))):
            func = conv_transpose.as_pointwise(tvm_build.import_onnx(model, {"x": (1, 8, 6, 6)})["main"])
            ops = _relax_ops(tvm_build.tvm().IRModule({"main": func}))
            expected = _pads(model) == 0 and _k(model) < _lanes()
            assert ("relax.permute_dims" in ops) == expected and ("relax.nn.conv2d_transpose" in ops) != expected


def _pads(model) -> int:
    return max(next((list(a.ints) for a in model.graph.node[0].attribute if a.name == "pads"), [0]))


def _k(model) -> int:
    return next(i for i in model.graph.initializer if i.name == "up.weight").dims[1]


def test_pointwise_weight_places_tap_p_q_of_output_o_at_channel_o_p_q():
    from squeeze.targets.schedules.conv_transpose import pointwise_weight
    w = np.random.default_rng(0).standard_normal((3, 2, 2, 3)).astype(np.float32)  # [C, K, kh, kw]
    p = pointwise_weight(w)
    assert p.shape == (2 * 2 * 3, 3, 1, 1)
    for o, r, s, c in np.ndindex(2, 2, 3, 3):
        assert p[(o * 2 + r) * 3 + s, c, 0, 0] == w[c, o, r, s]


def test_interleave_factor_finds_phase_reads_only():
    from tvm import s_tir, te

    from squeeze.targets.schedules import injective

    def factor(compute) -> int | None:
        a = te.placeholder((4, 2, 8), name="A")
        func = te.create_prim_func([a, te.compute((4, 16), lambda i, x: compute(a, i, x), name="out")])
        sch = s_tir.Schedule(func)
        return injective.interleave_factor(sch, sch.get_sblock("out"))
    assert factor(lambda a, i, x: a[i, x % 2, x // 2]) == 2  # a pixel shuffle's row
    assert factor(lambda a, i, x: a[i, 0, x // 2]) == 2  # nearest 2× upsampling as a gather
    assert factor(lambda a, i, x: a[i, x // 8, x % 8]) is None  # 8 phases: beyond MAX_INTERLEAVE
    assert factor(lambda a, i, x: a[i, 0, x % 8] + a[i, 1, x % 8]) is None  # a plain (wrapped) copy


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_interleave_factor_reads_topi_nearest_resize(dtype):
    """TOPI's nearest-neighbour resize indexes its input with truncated division (`Div`, not `FloorDiv`) of the
    output coordinate: a 2× upsampling is still a 2-phase store, and scheduled it computes the same bytes (a
    gather otherwise: ppocrv6_tiny_det int8's 64×40×40 → 80×80 uint8 upsampling 0.226 → 0.015 ms, 1 thread)."""
    import tvm
    from tvm import s_tir, te, topi

    from squeeze.targets.schedules import injective
    a = te.placeholder((1, 4, 5, 6), name="A", dtype=dtype)
    up = topi.image.resize2d(a, [0.0] * 4, (10, 12), method="nearest_neighbor",
                             coordinate_transformation_mode="asymmetric", rounding_method="")
    func = te.create_prim_func([a, up])
    sch = s_tir.Schedule(func)
    assert injective.interleave_factor(sch, sch.get_sblock("resize")) == 2
    target = tvm.target.Target("llvm")
    with target:
        scheduled = injective.Injective().apply(func, target, False)
    lib = tvm.compile(scheduled.mod, target=target)
    x = np.random.default_rng(0).integers(0, 255, (1, 4, 5, 6)).astype(dtype)
    out = tvm.runtime.tensor(np.zeros((1, 4, 10, 12), dtype))
    lib(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x.repeat(2, axis=2).repeat(2, axis=3))


def test_det_head_upsampling_matches_the_phase_form_bit_for_bit():
    """On a DB head (two 2×2/2 ConvTranspose, a bias add and ReLU between, a sigmoid out) the rewritten model
    gives exactly what the phase form gives: the same products, summed in the same order."""
    from squeeze.targets.schedules import conv_transpose
    g = graphs.Builder(11)
    h = g.node("ConvTranspose", ["x", g.weight("u1.w", 8, 4, 2, 2), g.weight("u1.b", 4, scale=0.1)], "u1",
               kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Relu", [h], "r")
    h = g.node("ConvTranspose", [h, g.weight("u2.w", 4, 1, 2, 2), g.weight("u2.b", 1, scale=0.1)], "u2",
               kernel_shape=[2, 2], strides=[2, 2])
    model = g.model({"x": [1, 8, 10, 12]}, g.node("Sigmoid", [h], "y"))
    x = np.random.default_rng(2).standard_normal((1, 8, 10, 12)).astype(np.float32)
    new = _run(model, x)
    original = conv_transpose.shuffle_pass
    try:
        import tvm
        conv_transpose.shuffle_pass = lambda: tvm.transform.module_pass(lambda m, _c: m, opt_level=0, name="off")
        old = _run(model, x)
    finally:
        conv_transpose.shuffle_pass = original
    assert new.shape == (1, 1, 40, 48) and np.array_equal(new, old)


@pytest.mark.parametrize("c_out,axis_scale", [(16, True), (1, True), (24, False)])
def test_an_int8_conv_transpose_computes_in_int8(c_out, axis_scale):
    """A quantized ConvTranspose (dequantized uint8 input, int8 weight, quantized output) becomes an int8 1×1 conv
    (`int8.py`'s kernel, any number of outputs) and a shuffle of the uint8 result; the output is ONNX Runtime's
    without its graph optimizations, which computes the layer as the QDQ graph says in float (optimized, it lands
    one quantization step away on 5-16 % of these values: its float ConvTranspose rounds differently)."""
    graphs.skip_unless_exact_int8()
    from tvm import tirx

    from squeeze.targets.schedules import int8
    target = _target()
    if int8.dot_intrinsic(target) is None:
        pytest.skip("this CPU has no int8 dot-product instruction TVM can use")
    model = graphs.qdq_upsample(16, c_out, (2, 2), (10, 24), axis_scale)
    x = np.random.default_rng(5).standard_normal((1, 16, 10, 24)).astype(np.float32)
    mod = tvm_build.import_onnx(model, {"x": x.shape})
    assert int8.compute_summary(mod, target)["int8_layers"] == 1
    fused = _fused(model)
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("conv2d_int8" in n for n in names) and "conv2d_transpose" not in " ".join(names), names
    from tvm import relax

    from squeeze.targets.schedules import conv_transpose
    with target:
        moved = conv_transpose.shuffle_pass()(mod)
    shuffled = []
    relax.analysis.post_order_visit(moved["main"], lambda e: shuffled.append(str(e.args[0].ty.dtype)) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.permute_dims" else None)
    assert shuffled == ["uint8"]  # the shuffle moves the quantized bytes, dequantized after it
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    got = _run(model, x)
    # integer sums are exact, the reference's float sums round: a value on a rounding boundary may differ by a step
    assert (got == ref).mean() >= 0.999 and np.abs(got - ref).max() <= 0.07 + 1e-6


def test_without_int8_dot_products_a_quantized_conv_transpose_keeps_the_k_rule():
    """On a CPU without an int8 dot product (x86-64 baseline) the int8 rewrite leaves the layer float, so a
    quantized ConvTranspose with K ≥ lanes keeps the phase form, as a float one does."""
    import tvm

    from squeeze.targets.schedules import conv_transpose, int8
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert int8.dot_intrinsic(target) is None
    model = graphs.qdq_upsample(16, 16, (2, 2), (6, 8))
    with target:
        func = conv_transpose.as_pointwise(tvm_build.import_onnx(model, {"x": (1, 16, 6, 8)})["main"])
    ops = _relax_ops(tvm.IRModule({"main": func}))
    assert "relax.nn.conv2d_transpose" in ops and "relax.permute_dims" not in ops
