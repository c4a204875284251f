"""Pooling over NCHW windows: max/avg pool, and global pooling (ReduceMean/GlobalAveragePool over H, W).

Unpadded strided float max pools with short or wide rows are a max over each window's rows, then over its
columns (`_separable_max`, scheduled by `Pool`). Other max pools are legalized as a window max that
`conv2d.DepthwiseConv2d` schedules (`legalize_max_pool2d`) where their rows are too short for LLVM to vectorize
TOPI's loop nest, and float pools that pad (`_window_max_wins`). Other window pools are a reduction block with
four spatial iterators (n, c, y, x) and two reduction iterators that
read one tensor, and only get parallel channels: LLVM vectorizes the plain loop nest itself, and
vectorizing the output columns in TIR is 8-60× slower (stride-2 windows become lane-by-lane loads; measured
on a 3×3/2 max pool over 64×111×111: 83 µs plain, 650 µs with 11-lane vectors, 4.7 ms with 16 lanes and a
tail). A global pool (1×1 output) keeps 8 channels' running sums in flight instead, so the additions of
different channels overlap rather than wait on one long dependency chain (1000×13×13: 91 → 48 µs); a mean of
rows at least `reduce.MEAN_MIN_VECTORS` vectors long is legalized lanes first instead (`reduce.legalize_mean`).
"""
from __future__ import annotations

from tvm import tirx

from .common import KERNEL, PARALLEL_MIN_ELEMENTS, extent, inline_epilogue, mark_parallel, product, root_blocks, \
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


#: block annotation (`common.KERNEL`) of a separable max pool's column pass (`_separable_max`)
SEPARABLE = "separable_max"


#: output columns from which an unpadded strided float max pool is separable again (`_separable_wins`)
SEPARABLE_MIN_WIDE_COLUMNS = 48


def _separable_wins(dtype: str, strides: tuple[int, int], dilation: tuple[int, int], padded: bool,
                    out_columns: int) -> bool:
    """Whether a max pool is computed in two passes (`_separable_max`): float32, unpadded, undilated, strided along
    the width, with rows short enough for the window max (which copies the input into column phases first) or at
    least `SEPARABLE_MIN_WIDE_COLUMNS` wide; between, LLVM vectorizes TOPI's nest as well or better. The pool
    alone, 1 thread, Zen 4, one process, 7 interleaved rounds, 3×3/2 unless noted, output columns: current →
    separable, µs: 13 (256×27×27) 45.7 → 31.7, 15 (64×31×31) 13.6 → 12.2; 17 (64×35×35) 8.9 → 13.6, 18 (96×38×38)
    15.4 → 22.9, 23 (64×47×47) 18.7 → 22.1, 27 (128×55×55) 51.8 → 53.8, 37-39 (64×75×75, 64×79×79) +3 %; 55
    (64×111×111) 86.3 → 78.7, 79 (32×160×160) 108 → 72, 2×2/2: 56 (64×112×112) 45.9 → 44.1, 28 (128×56×56) 25.6
    → 23.6 (ONNX Runtime, NCHW in and out: 16-250 µs)."""
    return dtype == "float32" and not padded and dilation == (1, 1) and strides[1] >= 2 and \
        (out_columns < INTEGER_WINDOW_MAX_COLUMNS or out_columns >= SEPARABLE_MIN_WIDE_COLUMNS)


def _separable_max(data, kernel_hw, strides, out_hw):
    """A max pool as a max over each window's rows (`pool_rows`: whole input rows, contiguous), then over its
    columns along the stride (`pool_columns`, annotated `SEPARABLE`): r + s compares an output, not r·s, and the
    strided pass reads a row the first pass left in L1."""
    from tvm import te  # noqa: PLC0415
    (r, s), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
    n, c = data.shape[:2]
    width = (ow - 1) * sw + s
    ry = te.reduce_axis((0, r), "ry")
    rows = te.compute((n, c, oh, width), lambda b, ch, y, x: te.max(data[b, ch, y * sh + ry, x], axis=ry),
                      name="pool_rows")
    rx = te.reduce_axis((0, s), "rx")
    return te.compute((n, c, oh, ow), lambda b, ch, y, x: te.max(rows[b, ch, y, x * sw + rx], axis=rx),
                      name="pool_columns", attrs={KERNEL: SEPARABLE})


def legalize_max_pool2d(bb, call):
    """relax.nn.max_pool2d (NCHW, static shapes) → a max over rows, then columns, where `_separable_wins`
    (`_separable_max`); else a window max tiled like a depthwise conv (`conv2d.window_compute`: register tile over
    rows and columns, strided windows read through column phases, the input padded with the lowest value, per
    channel, as far as the windows and the whole tiles read), where `_window_max_wins`; else TVM's legalization.

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
    if dshape is None or oshape is None or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW" \
            or not is_cpu(target):
        return default_legalization("relax.nn.max_pool2d")(bb, call)
    (kh, kw), (sh, sw), (dh, dw) = ([int(v) for v in attrs.pool_size], [int(v) for v in attrs.strides],
                                    [int(v) for v in attrs.dilation])
    if _separable_wins(dtype, (sh, sw), (dh, dw), padded, int(oshape[3])):
        return bb.call_te(lambda data: _separable_max(data, (kh, kw), (sh, sw), (int(oshape[2]), int(oshape[3]))),
                          call.args[0], primfunc_name_hint="max_pool2d")
    if not _window_max_wins(dtype, int(oshape[3]), padded):
        return default_legalization("relax.nn.max_pool2d")(bb, call)
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
        if _schedule_separable(sch, target):
            return sch
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


def _schedule_separable(sch, target) -> bool:
    """A separable max pool (`_separable_max`): its row pass computed per output row, inside the column pass's
    (batch, channel, row) loop, both inner loops left to LLVM's loop vectorizer (the row pass contiguous, the
    column pass an interleaved access group: whole-vector loads and shuffles); other blocks (an elementwise op fused
    before or after) on their own. False (nothing done) where the function has no `SEPARABLE` block."""
    columns = [b for b in root_blocks(sch) if str(sch.get(b).annotations.get(KERNEL, "")) == SEPARABLE]
    if len(columns) != 1:
        return False
    anchor = columns[0]
    rows = [b for b in sch.get_producers(anchor) if sch.get(b).name_hint.startswith("pool_rows")]
    n, c, y, *_ = sch.get_loops(anchor)
    work = product(extent(sch, lp) for lp in sch.get_loops(anchor))
    outer = sch.fuse(n, c, y)
    for block in rows:
        sch.compute_at(block, outer, preserve_unit_loops=True)
    if worth_parallel(work, PARALLEL_MIN_ELEMENTS):
        mark_parallel(sch, outer)
    lanes = describe(target).lanes(str(sch.get(anchor).writes[0].source.dtype))
    placed = {sch.get(b).name_hint for b in (anchor, *rows)}
    for block in root_blocks(sch):
        if sch.get(block).name_hint not in placed:
            schedule_injective(sch, block, lanes)
    return True
