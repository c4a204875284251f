"""Softmax over the last axis, and means over trailing axes (`legalize_mean`: GlobalAveragePool, ReduceMean):
reductions kept in vector registers, exp as a vectorizable polynomial.

TOPI's softmax is four loop nests (row max, exp, row sum, divide) whose two reductions run one scalar at a time
(a loop-carried dependency per element) and whose exp is a call of libm's `expf` per element, which LLVM cannot
vectorize. On ppocrv6_tiny_rec's CTC head ([40, 6906] at 1 thread) that was 1.14 ms, ONNX Runtime's Softmax
0.12 ms.

`legalize_softmax` (float32, softmax over the innermost axis of a static shape at least two vectors long):

    part[.., l] = max_{o} x[.., o·W + l]     (W = c·L: c vectors of L SIMD lanes; o over the row's whole W)
    m[..]       = max(max_l part[.., l], max_t x[.., ⌊K/W⌋·W + t])        (the tail, when K % W ≠ 0)
    e[.., k]    = fast_exp(x[.., k] − m[..])   (TOPI's fast_exp: range reduction and a degree-5 polynomial)
    s[..]       = the same two-step sum of e
    y[.., k]    = e[.., k] · (1 / s[..])

`LaneReduce` schedules it row by row (`_rows_in_cache`): every block is computed inside the last block's row
loop, so the passes over a row (max, exp, sum, normalise) read it from L1, not the whole tensor from L2 each;
each `part` block accumulates W lanes at once (its lane loop innermost and vectorized, the init hoisted out of
the row), `e` stays materialised per row (two consumers), the exp and normalise passes run in whole vectors with
the partial last one peeled (left to LLVM, fast_exp's loop stayed scalar), rows go parallel when the function is
large enough. (Where the blocks do not share their row axes, each is scheduled over the whole tensor.)

c = `CHAINS` vectors per step: one vector accumulator is one dependency chain (a max or add every 4 cycles where
the core could issue two per cycle), c of them run side by side. The normalisation multiplies by the row's
reciprocal: a vector divide is issued at most every 5-16 cycles (Intel AVX-512: vdivps zmm), a multiply twice a
cycle. Rec's CTC head [40, 6906], 1 thread, Intel Xeon (AVX-512), median of 3 × 200 calls: whole-tensor passes
0.216 ms → chains and reciprocal 0.208 → row by row 0.184 → exp vectorized 0.146 (ORT 0.104-0.110).
"""
from __future__ import annotations

from tvm import tirx

from .common import KERNEL, PARALLEL_MIN_ELEMENTS, extent, mark_parallel, peel_partial_tiles, product, root_blocks, \
    schedule_injective, worth_parallel
from .simd import describe, is_cpu

LANE_REDUCE = "lane_reduce"
#: vector accumulators per row reduction (independent dependency chains; see the module docstring)
CHAINS = 4
#: a per-row value computed once (the reciprocal of a softmax's sum): never inlined into its per-element consumer
PER_ROW = "per_row"


def legalize_softmax(bb, call):
    """relax.nn.softmax over the innermost axis (float32, static shape) → lane-parallel TE; else TOPI's."""
    import tvm  # noqa: PLC0415
    from .common import default_legalization, static_shape  # noqa: PLC0415
    x = call.args[0]
    target = tvm.target.Target.current(allow_none=True)
    shape = static_shape(x)
    if not is_cpu(target) or shape is None or str(x.ty.dtype) != "float32":
        return default_legalization("relax.nn.softmax")(bb, call)
    axis = int(call.attrs.axis)
    lanes = describe(target).lanes("float32")
    if axis % len(shape) != len(shape) - 1 or shape[-1] < 2 * lanes:
        return default_legalization("relax.nn.softmax")(bb, call)
    chains = next(c for c in (CHAINS, 2, 1) if shape[-1] >= 2 * c * lanes)
    return bb.call_te(lambda t: _softmax_compute(t, chains * lanes), x, primfunc_name_hint="softmax")


#: vectors of reduced elements below which a mean keeps TVM's legalization (scheduled by `pool.Pool`, several
#: rows' scalar sums in flight): a short row's lanes summed one by one, and its tail, cost more than the vectors
#: save. GlobalAveragePool alone, 1 thread, 7 interleaved rounds, Zen 4 (16 lanes), TVM's → lanes first, µs:
#: 1000×13×13 40.5 → 18.9, 64×80×80 22.0 → 20.7, 96×20×20 3.0 → 2.5, 160×3×80 3.3 → 2.7; 256×10×10 (6 vectors and
#: 4 elements) 3.6 → 5.9, 480×1×40 3.2 → 5.3
MEAN_MIN_VECTORS = 8


def legalize_mean(bb, call):
    """relax.mean (float32, static shape) over trailing axes — GlobalAveragePool, ReduceMean over H, W or the last
    axis — → the sum of each row of those elements lanes first (`_row_reduce`: the flattened rows read in whole
    vectors, CHAINS-wide where long enough), times 1 / their count; else TVM's legalization.

    TVM's reduces one element at a time; the `Pool` rule kept 8 channels' sums in flight, scalar: squeezenet's
    GlobalAveragePool over 1000×13×13 ran 0.040-0.053 ms (ONNX Runtime 0.028-0.031)."""
    import tvm  # noqa: PLC0415
    from tvm import te  # noqa: PLC0415

    from .common import default_legalization, static_shape  # noqa: PLC0415
    x = call.args[0]
    target = tvm.target.Target.current(allow_none=True)
    shape = static_shape(x)
    if not is_cpu(target) or shape is None or str(x.ty.dtype) != "float32" or not call.attrs.axis:
        return default_legalization("relax.mean")(bb, call)
    axes = sorted(int(a) % len(shape) for a in call.attrs.axis)
    if axes != list(range(axes[0], len(shape))):  # not the trailing axes
        return default_legalization("relax.mean")(bb, call)
    lanes = describe(target).lanes("float32")
    lead, trailing = shape[:axes[0]], shape[axes[0]:]
    count = product(trailing)
    if not lead or count < MEAN_MIN_VECTORS * lanes:
        return default_legalization("relax.mean")(bb, call)
    # the fewest elements past the whole steps (summed one by one), then the most chains
    chains = min((c for c in (CHAINS, 2, 1) if count >= 2 * c * lanes), key=lambda c: (count % (c * lanes), -c))
    keep = bool(call.attrs.keepdims)

    def compute(t):
        def element(*i):  # t read as rows of `count` elements
            flat, index = i[-1], []
            for extent_ in reversed(trailing):
                index.append(flat % extent_)
                flat = flat // extent_
            return t[(*i[:-1], *reversed(index))]
        rows = te.compute((*lead, count), element, name="mean_rows")
        total = _row_reduce(rows, chains * lanes, te.sum, "mean_sum")
        scale = 1.0 / count
        out_shape = (*lead, *[1] * len(trailing)) if keep else tuple(lead)
        return te.compute(out_shape, lambda *i: total[i[:len(lead)]] * scale, name="mean")
    return bb.call_te(compute, x, primfunc_name_hint="mean")


def _row_reduce(x, lanes: int, combine, name: str):
    """combine-reduction of `x` over its innermost axis, lanes first (see the module docstring)."""
    from tvm import te  # noqa: PLC0415
    *lead, k = (int(v) for v in x.shape)
    whole = k // lanes
    ro = te.reduce_axis((0, whole), f"{name}_o")
    part = te.compute((*lead, lanes), lambda *i: combine(x[(*i[:-1], ro * lanes + i[-1])], axis=ro),
                      name=f"{name}_part", attrs={KERNEL: LANE_REDUCE})
    rl = te.reduce_axis((0, lanes), f"{name}_l")
    row = te.compute(tuple(lead), lambda *i: combine(part[(*i, rl)], axis=rl), name=f"{name}_lanes")
    if k == whole * lanes:
        return row
    rt = te.reduce_axis((0, k - whole * lanes), f"{name}_t")
    tail = te.compute(tuple(lead), lambda *i: combine(x[(*i, whole * lanes + rt)], axis=rt), name=f"{name}_tail")
    both = te.max if combine is te.max else (lambda a, b: a + b)
    return te.compute(tuple(lead), lambda *i: both(row[i], tail[i]), name=name)


def _softmax_compute(x, lanes: int):
    """Softmax of `x` over its innermost axis, its reductions `lanes` wide (c vectors: see the module docstring)."""
    from tvm import te, topi  # noqa: PLC0415
    m = _row_reduce(x, lanes, te.max, "softmax_max")
    shifted = te.compute(x.shape, lambda *i: x[i] - m[i[:-1]], name="softmax_shift")
    e = topi.fast_exp(shifted)
    s = _row_reduce(e, lanes, te.sum, "softmax_sum")
    r = te.compute(s.shape, lambda *i: 1.0 / s[i], name="softmax_reciprocal", attrs={KERNEL: PER_ROW})
    return te.compute(x.shape, lambda *i: e[i] * r[i[:-1]], name="softmax_norm")


class LaneReduce:
    """Schedule rule for functions with `LANE_REDUCE` blocks (see the module docstring)."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        if not any(str(sch.get(b).annotations.get(KERNEL, "")) == LANE_REDUCE for b in root_blocks(sch)):
            return None
        lanes = describe(target).lanes("float32")
        _inline_single_use(sch)
        if _rows_in_cache(sch, lanes):
            return sch
        for block in root_blocks(sch):
            stmt = sch.get(block)
            if str(stmt.annotations.get(KERNEL, "")) == LANE_REDUCE:
                lead, red = _lanes_innermost(sch, block)
                work = product(extent(sch, lp) or 1 for lp in sch.get_loops(block))
                if lead and worth_parallel(work, PARALLEL_MIN_ELEMENTS):
                    mark_parallel(sch, sch.fuse(*lead) if len(lead) > 1 else lead[0])
                sch.decompose_reduction(block, red)  # the init's lane loop stays vectorized
            elif all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                schedule_injective(sch, block, lanes)
        return sch


def _lanes_innermost(sch, block) -> tuple[list, object]:
    """A `LANE_REDUCE` block's lane loop innermost and vectorized (before its init is split off: then it is still
    a reduction block); (its leading loops, its reduction loop)."""
    *lead, lane, red = sch.get_loops(block)
    sch.reorder(red, lane)
    sch.vectorize(lane)
    return lead, red


def _rows_in_cache(sch, lanes: int) -> bool:
    """Compute every block of the function row by row, inside the last block's row loop, so that all passes over
    a row (max, exp, sum, normalise) read it from L1 rather than the whole tensor from L2 or memory each time;
    rows parallel when large enough. False (nothing done) when the blocks do not share their leading axes."""
    from tvm import s_tir  # noqa: PLC0415
    blocks = root_blocks(sch)
    last = blocks[-1]
    *lead, _ = sch.get_loops(last)
    if not lead:
        return False
    row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    try:
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
    except s_tir.ScheduleError:
        return False
    elements = product(extent(sch, lp) or 1 for lp in sch.get_loops(last))
    if worth_parallel(elements, PARALLEL_MIN_ELEMENTS):  # an element costs an exp and four passes; parallel
        mark_parallel(sch, row)  # before the reductions are decomposed (it needs whole reduction blocks)
    for block in sch.get_child_blocks(row):
        stmt = sch.get(block)
        loops = sch.get_loops(block)
        if str(stmt.annotations.get(KERNEL, "")) == LANE_REDUCE:
            _, red = _lanes_innermost(sch, block)
            sch.decompose_reduction(block, red)
        elif all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
            # the elementwise passes over the row (exp, normalise): whole vectors, the last partial one peeled
            # (LLVM leaves fast_exp's loop scalar)
            size = extent(sch, loops[-1]) or 0
            if size > lanes:
                _, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
                if size % lanes:
                    peel_partial_tiles(sch, block)
    return True


def _inline_single_use(sch) -> None:
    """Inline spatial blocks read by exactly one block (a buffer read twice, like `e`, stays)."""
    from tvm import s_tir  # noqa: PLC0415
    progress = True
    while progress:
        progress = False
        for block in root_blocks(sch):
            stmt = sch.get(block)
            if (str(stmt.annotations.get(KERNEL, "")) or
                    not all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars)
                    or len(sch.get_consumers(block)) != 1):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
            progress = True
            break


class RowReduce:
    """Schedule rule for a sum/max over the innermost axes of one tensor (GlobalAveragePool, ReduceMean over
    H·W or the last axis): the reduced elements, contiguous, are accumulated `width` lanes at a time
    (`rfactor`), then the lanes summed; the rest of the function (the divide of a mean) runs after.

    TOPI's loop nest adds one element at a time, one dependency chain per output (a squeeze-and-excitation
    mean over 64×80×80 in ppocrv6_tiny_det: ~200 µs, ONNX Runtime's ReduceMean ~40 µs). Needs the reduced
    size to be a multiple of a vector of at least 4 lanes and at least 4 vectors; otherwise `Pool` or
    `Fallback` take it.
    """

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        reductions = [b for b in blocks if not all(iv.iter_type == tirx.IterVar.DataPar
                                                  for iv in sch.get(b).iter_vars)]
        if len(reductions) != 1:
            return None
        block = reductions[0]
        plan = _row_reduce_plan(sch, block, describe(target).lanes(_dtype(sch, block)))
        if plan is None:
            return None
        n_spatial, width = plan
        loops = sch.get_loops(block)
        spatial, red = loops[:n_spatial], loops[n_spatial:]
        work = product(extent(sch, lp) or 1 for lp in loops)
        fused = sch.fuse(*red) if len(red) > 1 else red[0]
        _, inner = sch.split(fused, [None, width])
        rf = sch.rfactor(inner, factor_axis=len(sch.get(block).writes[0].region))
        *_, ro, ri = sch.get_loops(rf)
        sch.vectorize(ri)
        if spatial and worth_parallel(work, PARALLEL_MIN_ELEMENTS):
            mark_parallel(sch, sch.fuse(*sch.get_loops(rf)[:n_spatial]))
        sch.decompose_reduction(rf, ro)
        for other in root_blocks(sch):
            stmt = sch.get(other)
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars) and stmt.name_hint != \
                    sch.get(rf).name_hint and not stmt.name_hint.endswith("_init"):
                schedule_injective(sch, other, describe(target).lanes(_dtype(sch, other)))
        return sch


def _dtype(sch, block) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


def _row_reduce_plan(sch, block, lanes: int) -> tuple[int, int] | None:
    """(number of spatial loops, vector width) when `block` reduces the trailing axes of its one input, whole
    and in order (so the reduced elements are contiguous), else None."""
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    n_spatial = kinds.count(tirx.IterVar.DataPar)
    if kinds != [tirx.IterVar.DataPar] * n_spatial + [tirx.IterVar.CommReduce] * (len(kinds) - n_spatial):
        return None
    if len(sch.get_loops(block)) != len(kinds):
        return None
    written = stmt.writes[0].source
    inputs = [r for r in stmt.reads if not r.source.same_as(written)]
    if len(inputs) != 1 or str(inputs[0].source.dtype) != "float32":
        return None
    red_vars = [iv for iv in stmt.iter_vars[n_spatial:]]
    region, shape = inputs[0].region, inputs[0].source.shape
    if len(region) < len(red_vars):
        return None
    size = 1
    for iv, rng, dim in zip(red_vars, region[len(region) - len(red_vars):], shape[len(shape) - len(red_vars):]):
        if not rng.min.same_as(iv.var) or not isinstance(dim, tirx.IntImm) or \
                not isinstance(iv.dom.extent, tirx.IntImm) or int(iv.dom.extent) != int(dim):
            return None
        size *= int(dim)
    width = next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and size % w == 0 and size >= 4 * w), None)
    return None if width is None else (n_spatial, width)
