"""Pooling over NCHW windows: max/avg pool, and global pooling (ReduceMean/GlobalAveragePool over H, W).

Max pools are legalized as a window max that `conv2d.DepthwiseConv2d` schedules (`legalize_max_pool2d`) where
their rows are too short for LLVM to vectorize TOPI's loop nest, and float pools that pad (`_window_max_wins`).
Other
window pools are a reduction block with four spatial iterators (n, c, y, x) and two reduction iterators that
read one tensor, and only get parallel channels: LLVM vectorizes the plain loop nest itself, and
vectorizing the output columns in TIR is 8-60× slower (stride-2 windows become lane-by-lane loads; measured
on a 3×3/2 max pool over 64×111×111: 83 µs plain, 650 µs with 11-lane vectors, 4.7 ms with 16 lanes and a
tail). A global pool (1×1 output) keeps 8 channels' running sums in flight instead, so the additions of
different channels overlap rather than wait on one long dependency chain (1000×13×13: 91 → 48 µs); a mean of
rows at least `reduce.MEAN_MIN_VECTORS` vectors long is legalized lanes first instead (`reduce.legalize_mean`).
"""
from __future__ import annotations

from tvm import tirx

from .common import PARALLEL_MIN_ELEMENTS, extent, inline_epilogue, mark_parallel, product, root_blocks, \
    schedule_injective, schedule_rest, tile_epilogue, worth_parallel
from .simd import describe, is_cpu

CHANNELS_IN_FLIGHT = 8


#: output columns below which LLVM leaves TOPI's plain byte-pool loop nest scalar (fewer columns than one 16-byte
#: vector): int8 squeezenet's 3×3/2 pool of 256×27×27 uint8 (13 columns) 0.27 ms plain, 0.026 ms as a window max;
#: at 27 and 55 columns the plain nest is vectorized and beats the window max (0.029 vs 0.037, 0.036 vs 0.063 ms)
INTEGER_WINDOW_MAX_COLUMNS = 16


def _window_max_wins(dtype: str, out_columns: int, padded: bool) -> bool:
    """Whether `legalize_max_pool2d` takes a max pool: uint8/int8 (the integer maps of quantized models, pooled
    before their DequantizeLinear) and float32 where the output row is too short for LLVM to vectorize TOPI's
    loop nest; float32 also where the pool pads (explicit pads or ceil mode), which TOPI does in a bounds-checked
    copy of its own. An unpadded float pool reads its input in place in TOPI's nest, where the window max copies
    it (padded, or split into column phases) first. 1 thread, one process, window max → TOPI (ORT), ms, each
    including a copy of the input: 3×3/2 on 64×111×111 0.311 → 0.241 (0.159), on 128×55×55 0.206 → 0.134 (0.082),
    2×2/1 on 32×160×160 0.486 → 0.375 (0.302); kept: 256×27×27 (13 columns) 0.119 vs 0.232, 3×3/2 pad 1 on
    64×112×112 0.351 vs 0.472, the same in ceil mode 0.388 vs 0.431, ppocrv6_tiny_det's 2×2/1 padded [0, 0, 1, 1]
    on 16×160×160 0.197 vs 0.233."""
    if dtype in ("uint8", "int8"):
        return out_columns < INTEGER_WINDOW_MAX_COLUMNS
    return dtype == "float32" and (padded or out_columns < INTEGER_WINDOW_MAX_COLUMNS)


def legalize_max_pool2d(bb, call):
    """relax.nn.max_pool2d (NCHW, static shapes) → a window max tiled like a depthwise conv
    (`conv2d.window_compute`: register tile over rows and columns, strided windows read through column phases,
    the input padded with the lowest value, per channel, as far as the windows and the whole tiles read),
    where `_window_max_wins`, else TVM's legalization.

    The padding is a plain copy in cache and the taps read without a bounds check. TOPI computes ceil mode as
    one more row and column of −∞ padding whether a window reads it or not, copied in a loop of its own with a
    bounds check per element: squeezenet's 3×3/2 pool of 256×27×27 (13×13 out, every window inside the map)
    ran 4.5× slower than ONNX Runtime. (Its strided windows were once loaded lane by lane, 64×111×111 3×3/2 166 µs
    against ORT's 77; measured again with today's `Pool` rule, TOPI's unpadded nest beats the window max there.)
    """
    import tvm  # noqa: PLC0415
    from tvm import te  # noqa: PLC0415

    from .common import default_legalization, static_shape  # noqa: PLC0415
    from .conv2d import window_compute  # noqa: PLC0415
    attrs = call.attrs
    dshape, oshape = static_shape(call.args[0]), static_shape(call)
    dtype = str(call.args[0].ty.dtype)
    target = tvm.target.Target.current(allow_none=True)
    padded = bool(attrs.ceil_mode) or any(int(p) for p in attrs.padding)
    if (dshape is None or oshape is None or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW"
            or not is_cpu(target) or not _window_max_wins(dtype, int(oshape[3]), padded)):
        return default_legalization("relax.nn.max_pool2d")(bb, call)
    (kh, kw), (sh, sw), (dh, dw) = ([int(v) for v in attrs.pool_size], [int(v) for v in attrs.strides],
                                    [int(v) for v in attrs.dilation])
    pt, pl, _, _ = (int(v) for v in attrs.padding)
    (c, h, w), (oh, ow) = dshape[1:], oshape[2:]
    if (oh - 1) * sh - pt >= h or (ow - 1) * sw - pl >= w:  # a window wholly in the padding: TOPI's semantics
        return default_legalization("relax.nn.max_pool2d")(bb, call)
    geometry = dict(strides=(sh, sw), dilation=(dh, dw), pad_before=(pt, pl), in_hw=(h, w))
    lowest = float(te.min_value(dtype).value)
    return bb.call_te(lambda data: window_compute(data, c, oh, ow, (kh, kw), describe(target), geometry,
                                                  lambda tap, o, ry, rx: tap(o), reducer="max", pad_value=lowest),
                      call.args[0], primfunc_name_hint="max_pool2d")


def _pool_block(sch):
    """The single window-reduction block of a pooling function, or None."""
    candidates = []
    for block in root_blocks(sch):
        stmt = sch.get(block)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if kinds.count(tirx.IterVar.CommReduce) == 0:
            continue
        if kinds != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 2:
            return None
        written = stmt.writes[0].source
        inputs = [r for r in stmt.reads if not r.source.same_as(written)]
        if len(inputs) != 1 or len(inputs[0].source.shape) != 4 or len(written.shape) != 4:
            return None
        candidates.append(block)
    return candidates[0] if len(candidates) == 1 else None


class Pool:
    """Schedule rule for max/avg/global pooling in NCHW."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        anchor = _pool_block(sch)
        if anchor is None:
            return None
        lanes = describe(target).lanes(str(sch.get(anchor).writes[0].source.dtype))
        n, c, y, x, ry, rx = sch.get_loops(anchor)
        work = product(extent(sch, lp) for lp in (n, c, y, x, ry, rx))
        width = extent(sch, x)
        if width >= 2:
            outer = sch.fuse(n, c)
            rest = [b for b in root_blocks(sch) if sch.get(b).name_hint != sch.get(anchor).name_hint]
            if worth_parallel(work, PARALLEL_MIN_ELEMENTS):
                mark_parallel(sch, outer)
            for block in rest:
                schedule_injective(sch, block, lanes)
            return sch
        channels = extent(sch, c)
        step = next((f for f in (CHANNELS_IN_FLIGHT, 4, 2) if channels % f == 0), 1)
        co, ci = sch.split(c, [None, step])
        sch.reorder(n, co, y, x, ry, rx, ci)
        outer = sch.fuse(n, co, y, x)
        inner = ci
        rest = inline_epilogue(sch, anchor)
        epilogue = tile_epilogue(sch, anchor)
        sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
        sch.unroll(inner)
        producers = [sch.get(b).name_hint for b in sch.get_producers(anchor)]
        if worth_parallel(work, PARALLEL_MIN_ELEMENTS):
            mark_parallel(sch, outer)
        sch.decompose_reduction(anchor, ry)
        epilogue_name = sch.get(epilogue).name_hint
        schedule_rest(sch, producers, rest, lanes, {epilogue_name})
        return sch
