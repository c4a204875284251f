"""Default CPU schedules for what squeeze produces: a small rule library in the style of TVM's dlight.

TVM 0.27's CPU pipeline legalizes operators to plain loop nests and schedules almost none of them (its CPU
dlight rules cover GEMV and row reductions), which runs 20-70× slower than ONNX Runtime. These rules give every
function a schedule without tuning, in milliseconds:

| module | legalization | rule |
|---|---|---|
| `conv2d` | NCHW conv2d with packed weights (plain, grouped), depthwise; ConvTranspose as a packed conv over its stride phases | register-tiled direct conv (channel vectors, reduced in L1-sized chunks of input channels when the weights outgrow L1; or column vectors for ≤ 16 input channels and for pointwise convs), fused vectorized epilogue |
| `conv_transpose` | (a graph rewrite) ConvTranspose with kernel = stride and fewer outputs than a vector's lanes → 1×1 conv to K·sh·sw channels + pixel shuffle, the elementwise ops after it moved before the shuffle | the conv's rules with the moved ops as epilogue; the shuffle: `injective`'s interleaved store |
| `conv_pair` | a conv feeding a conv with nothing between (what `lowrank` writes) → one function: the first conv's tile kept channel-blocked | both convs as `conv2d`'s channel tile, the intermediate never transposed |
| `dense` | MatMul/Gemm with a constant right operand, packed in panels | register tile + split reduction at batch 1 |
| `reduce` | softmax over the innermost axis as lane-wide partial reductions and `fast_exp` | vector accumulators (`LaneReduce`); sums/maxes over trailing contiguous axes via rfactor (`RowReduce`) |
| `pool` | max pools that pad (or ceil mode) or have < 16 output columns as a window max on the depthwise tile (`conv2d.window_compute`, input padded by a plain copy); others TOPI | window maxes: `DepthwiseConv2d`; other window pools: parallel channels (LLVM vectorizes); global pools: 8 channels in flight |
| `transpose` | (a TIR pass after lowering) a channel tile's epilogue loop reading the tile transposed, one strided load per channel | the tile rows loaded whole and transposed by a network of two-input shuffles |
| `injective` | (TOPI); float32 Erf, Sigmoid, Exp with `fast_erf`/`fast_exp` (vectorizable); division by a constant as a reciprocal and two FMAs, correctly rounded | elementwise chains, concat, padding (left to LLVM: TVM's vectorized if_then_else is 8× slower); gathers that interleave (x // c, x mod c: a pixel shuffle) as an unrolled phase loop LLVM vectorizes; fallback for the rest |

A concat along channels at batch 1 whose inputs each come from a kernel of their own costs no copy:
`concat.elide_concats` (run on the scheduled module) has those kernels store into its output, one function
holding them in order (squeezenet at 1 / 2 threads 0.978× / 0.928×, every Fire module's concat).

A tile loop whose last tile runs past the output keeps its own loop (outside the parallel one), and
`common.peel_partial_tiles` annotates the kernel so that `common.mark_partial_tiles`, run on the scheduled module
by the build pipeline and by the tuning builder, marks its predicates `likely`; TVM's LoopPartition
(`COMPILE_CONFIG`) then peels that tile with narrower vector stores.
An epilogue is computed tile by tile only when it reads the kernel's result element for element
(`common.tile_epilogue`); anything else (a Pad fused after a conv, a broadcast into a larger tensor) runs after
the tile loop. `tests/test_schedules_diff.py` checks each rule against TVM's default pipeline and ONNX Runtime.

Softmax-like reductions go to `Fallback` (dlight's CPU `Reduction` rule is quadratic on a [1, 1000] softmax).
`pipeline.build_pipeline(target, database, threads)` is the Relax pipeline that applies them (and a MetaSchedule
database first, when tuning has one). The conv and dense rules also offer `variants` (other register tiles,
parallel on/off), which `targets/tuning.py` measures before MetaSchedule's own search.

What the rules plan with (`simd.Cpu`): vector width from the CPU's features, how many accumulators a register
tile may hold (16 on x86, where larger tiles spill; a 1×1 conv's up to registers − kv − 2, `tiles.pointwise_tiles`,
charged for spilling around its epilogue past registers − kv − 5),
and the widest vector the FMA units take at full rate per lane (Zen 4: 256 of 512 bits, so a channel count like 24
uses 3 × 8 lanes rather than 2 × 16 with zeros). Loops go parallel above 512 K multiply-adds (copies,
elementwise loops, pools and row reductions above 16 K elements), and never when the build is for one thread
(`--threads 1` on the host).
"""
from __future__ import annotations

from .common import PARTITION_CONFIG
from .pipeline import build_pipeline, fuse_passes, fused_module, legalize_map, rules

#: PassContext config a build with these schedules lowers under (`tvm_build.compile_module` applies it)
COMPILE_CONFIG = dict(PARTITION_CONFIG)

__all__ = ["COMPILE_CONFIG", "build_pipeline", "fuse_passes", "fused_module", "legalize_map", "rules"]
