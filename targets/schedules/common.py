"""Helpers the rules share: finding the block a legalization marked, inlining epilogues, simple loop nests.

A squeeze legalization (conv2d, matmul) marks its main block with the annotation `KERNEL` (the kernel's name)
and the tile it planned, so the rule that schedules it does not have to guess from the loop structure.
Everything else (bias adds, residual adds, activations, crops) is an injective epilogue that FuseOps put in the
same function; the rules inline it into one block and compute it tile by tile, while the tile is still in
registers/L1.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable

from tvm import s_tir, tirx

KERNEL = "squeeze.kernel"
TILE = "squeeze.tile"  # [k vectors, rows, cols] of the register tile, chosen by the legalization

#: Loops with less work than this (multiply-adds, or elements for injective loops) run on one thread. A
#: parallel launch of TVM's thread pool costs a few µs, far more when the other core is busy. At 2 threads on
#: this project's 2-core machines (whole model, default schedules, 9 interleaved rounds) 512 K beat 2 M:
#: mnist_burn 0.071 → 0.062 ms, sri_resnet_a 0.077 → 0.070, cifar10_resnet4b 0.066 → 0.058-0.067 (min-median).
PARALLEL_MIN_WORK = 1 << 19
#: The same for loops that copy or transform elements (padding, column phases, concat, elementwise chains): an
#: element costs several multiply-adds' time. Squeezenet at 2 threads (7 interleaved rounds, one process):
#: 512 K → 64 K elements 4.40 → 4.25 ms (its convs' 55×55 padding copies and the stem's phase split had run on
#: one thread: 64→16 1×1 on 55×55 0.098 → 0.068 ms). Pools and row reductions count their window elements
#: against it too (they had counted them as multiply-adds), and 64 K → 16 K elements: squeezenet at 2 threads
#: 1.42 → 1.37× ONNX Runtime (its 3×3 convs' padding copies, 13×13 max pool and global mean had run on one
#: thread), ppocrv6_tiny_det 0.84 → 0.82, _rec 0.90 → 0.89, cifar10_resnet4b 0.99 → 0.99, sri_resnet_a 0.96 →
#: 0.93, mnist_burn 0.63 → 0.59 (7 interleaved rounds, one process).
PARALLEL_MIN_ELEMENTS = 1 << 14

#: The thread count the code being scheduled will run with, when the build knows it (`planned_threads`).
_THREADS: ContextVar[int | None] = ContextVar("squeeze_schedule_threads", default=None)


@contextmanager
def planned_threads(threads: int | None):
    """Schedule for `threads` threads (None: unknown, e.g. a remote device). With 1 nothing is made parallel:
    even a one-thread parallel launch costs time (mnist_burn at 1 thread: 0.071 ms without, 0.075 ms with
    parallel loops above 512 K multiply-adds)."""
    token = _THREADS.set(threads)
    try:
        yield
    finally:
        _THREADS.reset(token)


def mark_parallel(sch: s_tir.Schedule, loop) -> None:
    """Mark `loop` parallel unless it runs once (then TVM's thread pool would be woken for one iteration: a
    1×160×1×40 conv of ppocrv6_tiny_rec had a parallel loop of extent 1)."""
    if (extent(sch, loop) or 2) > 1:
        sch.parallel(loop)


def worth_parallel(work: int, threshold: int = PARALLEL_MIN_WORK) -> bool:
    """Whether a loop nest doing `work` multiply-adds (or elements) should be spread over the thread pool."""
    return _THREADS.get() != 1 and work >= threshold


def root_blocks(sch: s_tir.Schedule) -> list:
    from tvm.s_tir.dlight.analysis import get_root_block  # noqa: PLC0415
    return list(sch.get_child_blocks(get_root_block(sch)))


def kernel_schedule(func, target, name: str):
    """(a Schedule of `func`, its block marked `name`) when `target` is a CPU and `func` has that one kernel, else
    None: how each rule for a squeeze legalization starts."""
    from .simd import is_cpu  # noqa: PLC0415
    if not is_cpu(target):
        return None
    sch = s_tir.Schedule(func)
    anchor = find_kernel(sch, name)
    return None if anchor is None else (sch, anchor)


def find_kernel(sch: s_tir.Schedule, name: str):
    """The block whose `KERNEL` annotation is `name`, or None (several: None too, the rule does not apply)."""
    found = [b for b in root_blocks(sch) if str(sch.get(b).annotations.get(KERNEL, "")) == name]
    return found[0] if len(found) == 1 else None


def tile_of(sch: s_tir.Schedule, block) -> list[int]:
    return [int(v) for v in sch.get(block).annotations[TILE]]


def is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def inline_epilogue(sch: s_tir.Schedule, anchor, keep: Iterable[str] = ()) -> list:
    """Inline every injective block after `anchor` that can be inlined; return the blocks that remain.

    The producers of `anchor` (padding) stay materialised: inlined padding would put a bounds check in the
    innermost loop. Blocks named in `keep` stay too (a function with two kernels: the other one's padding).
    """
    keep = {sch.get(b).name_hint for b in sch.get_producers(anchor)} | {sch.get(anchor).name_hint} | set(keep)
    progress = True
    while progress:
        progress = False
        for block in root_blocks(sch):
            if sch.get(block).name_hint in keep or not is_spatial(sch, block):
                continue
            try:
                sch.compute_inline(block)
                progress = True
                break
            except s_tir.ScheduleError:
                continue
    return [b for b in root_blocks(sch) if sch.get(b).name_hint not in keep]


#: storage scope of a register tile's buffer. TVM 0.27 puts a CPU allocation under 1 KB on the stack only in
#: "global" scope; a "local" one is a `TVMBackendAllocWorkspace` call, per tile inside a parallel loop (6272
#: calls a run for squeezenet's stem), whose returned pointer also keeps LLVM from promoting the tile to registers.
TILE_SCOPE = "global"


def tile_epilogue(sch: s_tir.Schedule, anchor):
    """The block that writes `anchor`'s result out tile by tile: its one consumer when that reads it element
    for element, else a copy-out (`cache_write`) with the consumers left as loops of their own.

    `reverse_compute_at` only computes the consumer iterations that read the tile. A consumer over a larger
    domain than the tile grid (a Pad fused after the conv, e.g. from `auto_pad=SAME_UPPER` on the next conv or
    pool; a broadcast into a bigger tensor) would leave the rest of its output unwritten: garbage in the output
    (ppocrv6_tiny_det: rel-L2 0.09-3.4 against ONNX Runtime). A second consumer would read the tile's buffer
    after it became local. Call after `inline_epilogue` and before `reverse_compute_at`; the anchor's buffer
    becomes local in the first case.
    """
    consumers = list(sch.get_consumers(anchor))
    if len(consumers) == 1 and reads_elementwise(sch, consumers[0], sch.get(anchor).writes[0].source):
        sch.set_scope(anchor, 0, TILE_SCOPE)
        return consumers[0]
    return sch.cache_write(anchor, 0, TILE_SCOPE)


def reads_elementwise(sch: s_tir.Schedule, block, buffer) -> bool:
    """Whether spatial `block` reads `buffer` only at its own iterators, in order, over at most its shape.

    Then every element the block writes comes from one element of `buffer`, and a tile of `buffer` determines
    exactly the block iterations that read it (a crop of padded rows/columns included).
    """
    stmt = sch.get(block)
    if not is_spatial(sch, block) or len(stmt.iter_vars) != len(buffer.shape):
        return False
    regions = [r for r in stmt.reads if r.source.same_as(buffer)]
    if len(regions) != 1:
        return False
    for iv, rng, dim in zip(stmt.iter_vars, regions[0].region, buffer.shape):
        dom_min, dom_ext, size = iv.dom.min, iv.dom.extent, dim
        if not all(isinstance(v, tirx.IntImm) for v in (dom_min, dom_ext, size)) or int(dom_min) != 0:
            return False
        if int(dom_ext) > int(size) or not rng.min.same_as(iv.var) or not _is_one(rng.extent):
            return False
    return True


def _is_one(value) -> bool:
    return isinstance(value, tirx.IntImm) and int(value) == 1


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def schedule_injective(sch: s_tir.Schedule, block, lanes: int, allow_parallel: bool = True,
                       phases: int | None = None) -> None:
    """Parallel outer loops and a vectorized innermost loop for a block at the root of the function.

    Only the innermost loop of the block is vectorized (its accesses are usually contiguous); fusing all loops
    first would turn every index into div/mod of the lane and make LLVM gather. `phases`: the innermost loop reads
    as x // phases and x mod phases (`injective.interleave_factor`, a pixel shuffle): split into (x // phases,
    x mod phases), the phase loop unrolled and the rest left to LLVM's loop vectorizer, which turns the phases'
    stores of one step into whole-vector loads, shuffles and stores (an interleaved access group); vectorized by
    TVM, the lanes would read different rows at x // phases, a gather. A pixel shuffle to 16×160×160 float32 at 1
    thread: 0.171 → 0.043 ms.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    inner_ext = extents[-1]
    width = next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and inner_ext % w == 0), None)
    if phases:
        _, phase = sch.split(inner, [None, phases])
        sch.unroll(phase)
    elif guarded(sch, block):
        pass  # padding: LLVM's own code for the plain loop is 8× faster than TVM's vectorized if_then_else
    elif 2 <= inner_ext <= lanes:
        sch.vectorize(inner)
    elif width is not None:
        _, vec = sch.split(inner, [None, width])
        sch.vectorize(vec)
    if allow_parallel and len(loops) > 1 and worth_parallel(total, PARALLEL_MIN_ELEMENTS):
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        mark_parallel(sch, outer)


def schedule_rest(sch: s_tir.Schedule, producers: list[str], rest, lanes: int, done=()) -> None:
    """The elementwise schedule for what a kernel's function holds besides the kernel: its `producers` (by name:
    block handles go stale as the kernel is rewritten) and the blocks of `rest` not named in `done` (an epilogue
    already placed in the kernel's tiles)."""
    for name in producers:
        schedule_injective(sch, sch.get_sblock(name), lanes)
    for block in rest:
        if sch.get(block).name_hint not in done:
            schedule_injective(sch, block, lanes)


def guarded(sch: s_tir.Schedule, block) -> bool:
    """Whether `block` computes an `if_then_else` (a padding: load inside, zero outside).

    TVM vectorizes such a loop lane by lane with a branch per lane; left plain, LLVM compiles it to a fast
    copy: zero-padding 64×80×80 by 2 on each side (ppocrv6_tiny_det's 5×5 depthwise input) took 307 µs
    vectorized over 4 lanes, 331 µs over 16, 39 µs as a plain loop (1 thread)."""
    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and _has_if_then_else(body.value)


def _has_if_then_else(expr) -> bool:
    return any(hasattr(node, "op") and hasattr(node, "args") and str(getattr(node.op, "name", "")).endswith(
        "if_then_else") for node in subexpressions(expr, indices=False))


def subexpressions(node, indices: bool = True):
    """`node` (a BufferStore or an expression) and every expression under it, depth first: operands, call
    arguments, the parts of casts and selects, and (`indices`) the indices of buffer loads and stores."""
    todo = [node]
    while todo:
        node = todo.pop()
        yield node
        for field in ("value", "a", "b", "condition", "true_value", "false_value"):
            child = getattr(node, field, None)
            if child is not None and hasattr(child, "same_as"):
                todo.append(child)
        todo.extend(getattr(node, "args", None) or ())
        if indices:
            todo.extend(getattr(node, "indices", None) or ())


def product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def vectorize_columns(sch, epilogue) -> None:
    """Vectorize the tile's epilogue along its output columns (the innermost, contiguous loop).

    Left scalar, the epilogue of a channel-vector tile (bias, residual add, ReLU and the transposing store to
    NCHW, 256 elements per 16×2×8 tile) cost 8-55 % of the kernel: sri_resnet_a at 1 thread, 32→32 3×3 on
    8×8 11.6 → 10.7 µs, 16→32 1×1 2.18 → 0.97 µs, the 3→16 stem 4.5 → 2.9 µs. Vectorized over columns the
    stores are contiguous; over channels (a strided scatter store) it was as fast or slower on all ten of that
    model's convolutions.
    """
    inner = sch.get_loops(epilogue)[-1]
    if (extent(sch, inner) or 1) > 1:
        sch.vectorize(inner)


#: PassContext config under which `peel_partial_tiles` takes effect: LoopPartition splits a constant-extent loop
#: where a `likely` condition changes value (by default only loops of symbolic extent are split).
PARTITION_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}


#: block annotation: the function's partial tiles are to be peeled (`peel_partial_tiles`)
PEEL = "squeeze.peel"


def peel_partial_tiles(sch: s_tir.Schedule, block) -> None:
    """Have lowering peel the last, partial tile of the loops of `block`'s function.

    A tile loop whose last tile runs past the output (80 columns of tiles over a 76-column row) stores its
    epilogue under a predicate `x_o · wt + x_i < 76`; TVM cannot vectorize a predicated store, so the whole epilogue
    went scalar, element by element with a branch each (32×80×76 3×3 depthwise: 2.7× ONNX Runtime where the
    80-column one runs at 0.7×; squeezenet's 3→64 stem on 111×111 columns in 16-wide tiles: 0.58 ms, on 112×112
    0.45). Marked `likely`, the predicate lets TVM's LoopPartition (with `PARTITION_CONFIG`) split the tile loop
    into the whole tiles, with no predicate, and the last one, whose vector store is narrower (12 lanes). The tile
    loop must be its own loop for this (not fused with the rows or channels: a fused index reaches the tile
    through a modulo that LoopPartition cannot solve). The annotation `pragma_loop_partition_hint` would do the
    same per loop, but TVM 0.27's NarrowDataType drops loop annotations before LoopPartition runs, so the mark
    rides on the condition instead: this annotates `block` with `PEEL`, and `mark_partial_tiles` (run on the
    scheduled module by the build pipeline and the tuning builder) marks the predicates. A schedule's trace
    records the annotation, so a tuning record replays the peeling too (a schedule rewritten in place would
    replay without it).
    """
    sch.annotate(block, PEEL, 1)


def mark_partial_tiles(mod):
    """`mod` with every block predicate of each function that has a `PEEL` block marked `likely`, conjunct by
    conjunct (a row bound over a fused loop must not stop the column loop's split)."""
    from tvm_ffi import structural_mutate  # noqa: PLC0415

    def mark(realize, mutator):
        realize = mutator.default_mutate(realize)
        if _is_one(realize.predicate) or _is_likely(realize.predicate):
            return realize
        return s_tir.SBlockRealize(realize.iter_values, _likely_conjuncts(realize.predicate), realize.block)
    marked = {gvar: func.with_body(structural_mutate(func.body, [(s_tir.SBlockRealize, mark)]))
              for gvar, func in mod.functions.items() if isinstance(func, tirx.PrimFunc) and _has_peel_block(func)}
    if marked:
        mod = mod.clone()
        for gvar, func in marked.items():
            mod.update_func(gvar, func)
    return mod


def _likely_conjuncts(cond):
    if isinstance(cond, tirx.And):
        return tirx.And(_likely_conjuncts(cond.a), _likely_conjuncts(cond.b))
    return cond if _is_likely(cond) else tirx.likely(cond)


def _has_peel_block(func) -> bool:
    from tvm_ffi import structural_walk  # noqa: PLC0415
    found = []
    structural_walk(func.body, [(s_tir.SBlock, lambda block: found.append(PEEL in block.annotations))])
    return any(found)


def _is_likely(expr) -> bool:
    return getattr(getattr(expr, "op", None), "name", None) == "prim.likely"


VARIANT = "squeeze.variant"  #: block annotation naming the tile/parallel choice of a tuning variant


def static_shape(expr) -> list[int] | None:
    """A Relax expression's shape as ints, or None when it is not static."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return [int(v) for v in shape.values]
    except TypeError:
        return None


def dtype_or(value, default: str) -> str:
    """An op's `out_dtype` attribute, or `default` where it is unset (None, "" or void)."""
    text = "" if value is None else str(value)
    return default if text in ("", "void", "None") else text


def default_legalization(op_name: str):
    """TVM's own legalization of `op_name` (what a rule falls back to for shapes it does not handle)."""
    import tvm  # noqa: PLC0415
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def tile_variants(rule, func, target, options, limit: int) -> list:
    """Up to `limit` schedules of `func` by `rule`, one per (tile, parallel) option that applies, each marked with
    VARIANT = its parameters (tuning replays them as seeds)."""
    out = []
    for tile, parallel in options:
        if len(out) >= limit:
            break
        try:
            sch = rule.schedule(func, target, tile, parallel)
        except Exception:  # noqa: BLE001 - a tile the loop nest cannot take: skip it
            continue
        if sch is not None:
            sch.annotate(root_blocks(sch)[0], VARIANT, f"{tile}/{parallel}")
            out.append(sch)
    return out


def divide_exactly(x, s):
    """x / s, correctly rounded as IEEE division, from a reciprocal and two FMAs (Markstein): y = x·(1/s),
    e = x − y·s (exact with an FMA), y + e·(1/s). With 1/s loop-invariant (a scalar or per-channel scale) this is
    a multiply and two FMAs per element where a vector divide issues once every 5-10 cycles: ppocrv6_tiny_det's
    int8 SE blocks requantize 64×80×80 maps three times (0.31 ms, most of it in `vdivps`). Exact for quotients
    in the normal range, which quantization's are (its result is rounded and clamped to 8 bits). (A float graph's
    Div by a constant gained nothing this way: 64×80×80 / √2 0.109 ms either way, the pass is memory-bound.)"""
    import tvm  # noqa: PLC0415
    from .simd import is_cpu  # noqa: PLC0415
    dtype = str(x.ty.dtype) if hasattr(x, "ty") else str(x.dtype)  # an expression or a te.Tensor slice
    if not is_cpu(tvm.target.Target.current(allow_none=True)):
        return x / s
    # x and y are bound once (Let): written out, every quantize repeated its operand three times, and a chain of
    # quantize → dequantize → … inlined into one epilogue grew as 3ⁿ (minutes of TIR passes, gigabytes)
    xv, yv = tirx.Var("x", dtype), tirx.Var("y", dtype)
    r = tirx.const(1.0, dtype) / s
    # e = fma(y, −s, x): the product y·(−s) is (−y)·s exactly, and −s (a constant or a per-channel scale) folds
    # or hoists, where (0 − y) was one more op per element (0 − y is not −y for y = +0, so LLVM kept it; an
    # e of −0 for +0 changes nothing after the rounding): ppocrv6_tiny_det int8 4.76 → 4.65 ms with `scalar_args`
    e = tirx.call_llvm_pure_intrin(dtype, "llvm.fma", yv, tirx.const(0.0, dtype) - s, xv)
    return tirx.Let(xv, x, tirx.Let(yv, xv * r, tirx.call_llvm_pure_intrin(dtype, "llvm.fma", e, r, yv)))


def is_call_tir(value) -> bool:
    """`value` is a Relax `call_tir` (a call of a PrimFunc of the module)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir"


def var_uses(func) -> dict:
    """Relax var → how many calls, tuples and function results read it."""
    from tvm import relax  # noqa: PLC0415
    counts: dict = {}

    def visit(expr):
        args = expr.args if isinstance(expr, relax.Call) else expr.fields if isinstance(expr, relax.Tuple) else \
            [expr.body] if isinstance(expr, relax.SeqExpr) else []
        for arg in args:
            if isinstance(arg, relax.Var):
                counts[arg] = counts.get(arg, 0) + 1
    relax.analysis.post_order_visit(func, visit)
    return counts
