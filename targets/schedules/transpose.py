"""Transposing epilogues as shuffle networks (a TIR pass run after TVM's lowering).

A channel tile (`conv2d.Conv2dPacked`, `dense`) accumulates vectors of output *channels*; the output is NCHW, so
its epilogue, vectorized along the columns (`common.vectorize_columns`), reads the tile transposed: per output
channel j one strided load `tile[base + j + S·i]`, i < L (S = lanes of a channel block, L = columns of the tile).
LLVM compiles a strided vector load to one scalar load and one insert per lane (`vmovss` / `vinsertps`): two
instructions per output, on the shuffle port the AVX-512 FMAs share on Intel cores (16→64 3×3 on 55×55: 0.38 ms,
ONNX Runtime 0.32, whose NCHWc kernels store channel vectors as they are).

`transposed_epilogues` rewrites each loop over the channels whose body reads the tile that way: per block of S
channels it loads the L tile rows as whole vectors and transposes them with log2(L') stages of two-input shuffles
(L' = L rounded up to a power of two; `transpose_network`), about 0.3 instructions per output, then runs the
body once per channel with the transposed vector in place of the strided load. Exact: the same elements, moved.
"""
from __future__ import annotations


def transpose_network(rows: list, lanes: int, columns: int, dtype) -> list:
    """`rows`: `columns` ≤ `lanes` TIR vectors of `lanes` elements (row i: elements (i, 0..lanes−1)); the
    `lanes` column vectors of `columns` elements (column j: elements (0..columns−1, j)), as TIR expressions of
    two-input shuffles (`lanes` a power of two).

    After the stage with groups of g rows, vector (group, c) holds columns c·w … (c+1)·w − 1 (w = lanes / g) of
    the group's g rows, column-major; a stage merges two groups, each new vector taking half of a chunk's columns
    from both: (elements i, j) move from (row i, lane j) to (vector j / (lanes / L'), lane (j mod ..)·L' + i).
    """
    from tvm import tirx  # noqa: PLC0415
    padded = 1 << max(0, (columns - 1).bit_length())
    if lanes & (lanes - 1) or padded > lanes:
        raise ValueError(f"cannot transpose {columns} rows of {lanes} lanes")
    zero = tirx.Broadcast(tirx.const(0, str(dtype.with_lanes(1))), lanes)
    vectors = list(rows) + [zero] * (padded - columns)
    group = 1
    while group < padded:
        width = lanes // group  # columns per chunk before this stage
        merged = []
        for h in range(padded // (2 * group)):
            for chunk in range(2 * group):
                a = vectors[(2 * h) * group + chunk // 2]
                b = vectors[(2 * h + 1) * group + chunk // 2]
                first = (chunk % 2) * (width // 2)
                indices = []
                for col in range(width // 2):
                    for r in range(2 * group):
                        at = (first + col) * group + (r % group)
                        indices.append(at if r < group else lanes + at)
                merged.append(tirx.Shuffle([a, b], [tirx.IntImm("int32", v) for v in indices]))
        vectors, group = merged, 2 * group
    per_vector = lanes // padded  # columns per final vector
    return [tirx.Shuffle([vectors[j // per_vector]],
                         [tirx.IntImm("int32", (j % per_vector) * padded + i) for i in range(columns)])
            for j in range(lanes)]


def _strided_loads(body):
    """The vector loads in `body` at a constant-stride ramp (stride > 1), as (load, ramp), all of one buffer; None
    when there are none, when any other load of that buffer is of another form, or when the body writes it."""
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_visit  # noqa: PLC0415
    loads, stores = [], []

    def on_load(load, visitor):
        if len(load.indices) == 1:
            loads.append(load)
        visitor.default_visit(load)

    def on_store(store, visitor):
        stores.append(store.buffer)
        visitor.default_visit(store)
    structural_visit(body, [(tvm.ir.TensorLoad, on_load), (tirx.BufferStore, on_store)])
    strided = [ld for ld in loads if isinstance(ld.indices[0], tirx.Ramp)
               and isinstance(ld.indices[0].stride, tirx.IntImm) and int(ld.indices[0].stride) > 1]
    if not strided:
        return None
    tile = strided[0].source
    if any(not ld.source.same_as(tile) for ld in strided):
        return None
    # the body must not write the tile (a buffer declared over the same storage: the same name, numbered)
    if any(_storage_name(b) == _storage_name(tile) for b in stores):
        return None
    if any(_storage_name(ld.source) == _storage_name(tile) and not any(ld.same_as(s) for s in strided)
           for ld in loads):
        return None
    return [(ld, ld.indices[0]) for ld in strided]


def _storage_name(buffer) -> str:
    """A buffer's name without the `_N` suffix lowering gives the buffers it declares over the same storage."""
    import re  # noqa: PLC0415
    return re.sub(r"_\d+$", "", str(buffer.name))


def _defines_variables(body) -> bool:
    """Whether `body` has a loop or a binding of its own."""
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_visit  # noqa: PLC0415
    found = []

    def on_definition(node, _visitor):
        found.append(node)
    structural_visit(body, [(tirx.For, on_definition), (tirx.Bind, on_definition), (tvm.ir.prim.Let, on_definition)])
    return bool(found)


def _substitute(node, var, value):
    """`node` with `var` replaced by `value`."""
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415
    return structural_mutate(node, [(tirx.Var, lambda v, _m: value if v.same_as(var) else v)])


def _rewrite_loop(loop):
    """`loop` (a serial loop over channels whose body reads a tile transposed) as a loop over blocks of S channels
    with the transposing shuffles, or None when its body is not of that form."""
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm.sym.analyzer import Analyzer  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415
    if loop.kind != tirx.ForKind.SERIAL or not isinstance(loop.extent, tirx.IntImm) or not _is_zero(loop.min):
        return None
    found = _strided_loads(loop.body)
    if found is None or _defines_variables(loop.body):  # copies of a body must not define a variable twice
        return None
    ramps = {(int(r.stride), int(r.lanes)) for _, r in found}
    if len(ramps) != 1:
        return None
    (lanes, columns), = ramps
    extent = int(loop.extent)
    if lanes & (lanes - 1) or columns < 2 or extent % lanes or (1 << (columns - 1).bit_length()) > lanes:
        return None
    analyzer = Analyzer()
    var = loop.loop_var
    block = tirx.Var(f"{var.name}_block", var.ty)
    channel = [block * lanes + j for j in range(lanes)]
    first = found[0][1]
    bases = [analyzer.simplify(_substitute(first.base, var, channel[j])) for j in range(lanes)]
    for j in range(lanes):  # channel j of the block reads rows base + j + lanes·i: one ramp per channel
        step = analyzer.simplify(bases[j] - bases[0])
        if not (isinstance(step, tirx.IntImm) and int(step) == j):
            return None
    for _, ramp in found[1:]:  # every load of the tile: the same ramp
        if not analyzer.can_prove_equal(ramp.base, first.base):
            return None
    buffer, dtype = found[0][0].source, found[0][0].ty.dtype
    vector_type = str(dtype.with_lanes(lanes))
    binds, rows = [], []
    for i in range(columns):
        row = tirx.Var(f"tile_row{i}", vector_type)
        binds.append(tirx.Bind(row, tirx.BufferLoad(buffer, [tirx.Ramp(bases[0] + i * lanes, 1, lanes)])))
        rows.append(row)
    outs = []
    for j, expr in enumerate(transpose_network(rows, lanes, columns, dtype)):
        out = tirx.Var(f"tile_col{j}", str(dtype.with_lanes(columns)))
        binds.append(tirx.Bind(out, expr))
        outs.append(out)
    def replacer(column):  # (a callback's third parameter would receive structural_mutate's in-place mode)
        def replace(load, mutator):
            load = mutator.default_mutate(load)
            return column if load.source.same_as(buffer) else load
        return replace
    bodies = [_substitute(structural_mutate(loop.body, [(tvm.ir.TensorLoad, replacer(outs[j]))]), var, channel[j])
              for j in range(lanes)]
    return tirx.For(block, loop.min, tirx.IntImm(loop.extent.ty, extent // lanes), loop.kind,
                    tirx.SeqStmt(binds + bodies))


def _is_zero(value) -> bool:
    from tvm import tirx  # noqa: PLC0415
    return isinstance(value, tirx.IntImm) and int(value) == 0


def transposed_epilogues(func):
    """`func` (lowered, vectorized TIR) with each transposing read of a tile done by a shuffle network (module
    docstring)."""
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415

    def rewrite(loop, mutator):
        loop = mutator.default_mutate(loop)
        return _rewrite_loop(loop) or loop
    return func.with_body(structural_mutate(func.body, [(tirx.For, rewrite)]))


def transpose_pass():
    """`transposed_epilogues` as a TIR module pass, for CPU functions (after TVM's lowering pipeline)."""
    import tvm  # noqa: PLC0415

    from .simd import is_cpu  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeTransposedEpilogues")
    def _pass(mod, _ctx):
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and is_cpu(func.attrs.get("target") if func.attrs else None):
                out[gv] = transposed_epilogues(func)
        return out
    return _pass
