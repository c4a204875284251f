"""Concatenations written in place: the kernels that produce a concat's inputs store straight into its output.

A concat along an axis whose leading dimensions are all 1 (NCHW channels at batch 1: SqueezeNet's Fire modules,
FPN and CSP heads) holds each input as one contiguous run of its output. Where each input is the only output of
its own kernel and the concat is its only reader, `elide_concats` replaces those kernels and the concat by one
TIR function that runs the kernels one after the other, each storing through its own output buffer declared over
its run of the concat's output (`DeclBuffer(out, data=&C[0, offset, 0, 0])`): the concat's copy disappears, and
with it a round trip of every input through memory (ONNX Runtime's channel-blocked concats are free the same way).

It runs on the scheduled module (`pipeline.build_pipeline`, after the default schedules and `scalar_args`), so
each kernel keeps the schedule it was given, tuned or default.
"""
from __future__ import annotations

from .common import is_call_tir, product, var_uses
from .simd import dtype_bits

#: function attribute of the functions `elide_concats` builds: the kernels they hold, in order
FUSED = "squeeze.concat_of"


def elide_concats(mod):
    """`mod` with every concat that `_parts` accepts written in place (see the module docstring)."""
    from tvm import relax  # noqa: PLC0415
    builder = relax.BlockBuilder(mod)
    rewritten = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            new = _rewrite_function(mod, builder, func)
            if new is not None:
                rewritten[gvar] = new
    if not rewritten:
        return mod
    out = builder.get()
    for gvar, func in rewritten.items():
        out[gvar] = func
    entries = [g.name_hint for g, f in out.functions.items() if isinstance(f, relax.Function)]
    return relax.transform.DeadCodeElimination(entries)(relax.transform.Normalize()(out))


def _rewrite_function(mod, builder, func):
    from tvm import relax  # noqa: PLC0415
    uses = var_uses(func)
    blocks, changed = [], False
    for block in func.body.blocks:
        bindings = list(block.bindings)
        producers = {b.var: b for b in bindings if isinstance(b, relax.VarBinding) and _tir_call(mod, b.value)}
        drop, replace = set(), {}
        for binding in bindings:
            axis, parts = _parts(mod, binding, producers, uses) or (None, None)
            if parts is None or drop & {id(p) for p in parts}:
                continue
            replace[id(binding)] = _fused_binding(mod, builder, binding, axis, parts)
            drop |= {id(p) for p in parts}
        if replace:
            changed = True
            bindings = [replace.get(id(b), b) for b in bindings if id(b) not in drop]
        blocks.append(type(block)(bindings))
    if not changed:
        return None
    return relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs)


def _tir_call(mod, value) -> bool:
    """`value` calls a PrimFunc of `mod` with a tuple of arguments and no symbolic-shape arguments."""
    from tvm import ir, relax, tirx  # noqa: PLC0415
    return is_call_tir(value) and len(value.args) == 2 and isinstance(value.args[1], relax.Tuple) \
        and isinstance(value.args[0], ir.GlobalVar) and isinstance(mod[value.args[0]], tirx.PrimFunc) \
        and len(mod[value.args[0]].params) == len(value.args[1].fields) + 1


def _parts(mod, binding, producers: dict, uses: dict) -> tuple[int, list] | None:
    """(the concat axis, the bindings of the concat's inputs in order) when `binding` is a concat this can write in
    place, else None."""
    from tvm import relax  # noqa: PLC0415
    if not isinstance(binding, relax.VarBinding) or not _tir_call(mod, binding.value):
        return None
    inputs = list(binding.value.args[1].fields)
    concat = mod[binding.value.args[0]]
    axis = concat_axis(concat) if len(inputs) >= 2 else None
    if axis is None:
        return None
    parts = [producers.get(v) for v in inputs]
    # each input: a var bound to its own kernel's call, read by the concat only (once: not twice in its inputs)
    if any(p is None or uses.get(v, 0) != 1 for p, v in zip(parts, inputs)):
        return None
    kernels = [p.value.args[0] for p in parts]
    if len({k.name_hint for k in kernels}) != len(kernels):  # one PrimFunc twice: its variables would clash
        return None
    if any(FUSED in (mod[k].attrs or {}) for k in kernels):
        return None
    return (axis, parts) if _aligned_runs(concat, axis) else None


#: bytes each input's run of the concat's output must start at a multiple of: the kernels' vector stores may
#: assume their output buffer as aligned as an allocation
RUN_ALIGNMENT = 64


def _aligned_runs(func, axis: int) -> bool:
    *ins, out = func.params
    inner = product(int(d) for d in out.shape[axis + 1:]) * dtype_bits(str(out.dtype)) // 8
    run_bytes = [int(p.shape[axis]) * inner for p in ins]
    return all(sum(run_bytes[:i]) % RUN_ALIGNMENT == 0 for i in range(len(ins)))


def concat_axis(func) -> int | None:
    """The axis of a PrimFunc that only concatenates its inputs (TOPI's concat: one block storing a chain of
    if_then_else over loads of the inputs at the output's indices, shifted on one axis) when every dimension
    before that axis is 1 (each input one contiguous run of the output); else None."""
    from tvm import s_tir, tirx  # noqa: PLC0415
    from tvm.sym.analyzer import Analyzer  # noqa: PLC0415
    from tvm_ffi import structural_walk  # noqa: PLC0415
    *ins, out = func.params
    try:
        shapes = [[int(d) for d in p.shape] for p in func.params]
    except (TypeError, AttributeError):
        return None
    if any(len(s) != len(shapes[-1]) for s in shapes) or len({str(p.dtype) for p in func.params}) != 1:
        return None
    axes = [a for a in range(len(shapes[-1])) if any(s[a] != shapes[-1][a] for s in shapes[:-1])]
    if len(axes) != 1 or sum(s[axes[0]] for s in shapes[:-1]) != shapes[-1][axes[0]] \
            or any(d != 1 for d in shapes[-1][:axes[0]]):
        return None
    axis = axes[0]
    blocks = []
    structural_walk(func.body, [(s_tir.SBlock, lambda b: blocks.append(b) if b.name_hint != "root" else None)])
    if len(blocks) != 1 or not isinstance(blocks[0].body, tirx.BufferStore) or not blocks[0].body.buffer.same_as(out):
        return None
    store, loads = blocks[0].body, []
    if not _leaf_loads(store.value, loads):
        return None
    starts = [sum(s[axis] for s in shapes[:i]) for i in range(len(ins))]
    analyzer, seen = Analyzer(), set()
    for load in loads:
        which = [i for i, p in enumerate(ins) if load.source.same_as(p)]
        if len(which) != 1 or len(load.indices) != len(store.indices):
            return None
        seen.add(which[0])
        for a, (got, at) in enumerate(zip(load.indices, store.indices)):
            if not analyzer.can_prove_equal(got, at - starts[which[0]] if a == axis else at):
                return None
    return axis if seen == set(range(len(ins))) else None


def _leaf_loads(expr, loads: list) -> bool:
    """Collect the loads at the leaves of an if_then_else / select chain; False where a leaf is anything else."""
    from tvm import ir, tirx  # noqa: PLC0415
    if isinstance(expr, ir.TensorLoad):
        loads.append(expr)
        return True
    if isinstance(expr, tirx.Select):
        return _leaf_loads(expr.true_value, loads) and _leaf_loads(expr.false_value, loads)
    if isinstance(expr, ir.Call) and str(getattr(expr.op, "name", "")).endswith("if_then_else"):
        return _leaf_loads(expr.args[1], loads) and _leaf_loads(expr.args[2], loads)
    return False


def _fused_binding(mod, builder, concat, axis: int, parts: list):
    """The binding that replaces `concat` and its producers: one call of a new PrimFunc holding the producers'
    kernels in order, each one's output buffer declared over its run of the concat's output."""
    from tvm import relax, s_tir, tirx  # noqa: PLC0415
    call = concat.value
    given = mod[call.args[0]].params[-1]
    out = tirx.decl_buffer([tirx.IntImm("int64", int(d)) for d in given.shape], str(given.dtype), "concat_out")
    params, stmts, args, names, start = [], [], [], [], 0
    for part in parts:
        gvar = part.value.args[0]
        func = mod[gvar]
        *ins, result = func.params
        index = [tirx.IntImm("int64", 0)] * len(out.shape)
        index[axis] = tirx.IntImm("int64", start)
        start += int(result.shape[axis])
        stmts += [tirx.DeclBuffer(result, data=tirx.address_of(tirx.BufferLoad(out, index))), func.body]
        params += ins
        args += list(part.value.args[1].fields)
        names.append(gvar.name_hint)
    root = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", tirx.SeqStmt(stmts)))
    fused = tirx.PrimFunc([*params, out], root).with_attrs(
        {"tirx.is_scheduled": True, "tirx.noalias": True, FUSED: ",".join(names)})
    gvar = builder.add_func(fused, "concat_" + "_".join(names))
    return relax.VarBinding(concat.var, relax.Call(call.op, [gvar, relax.Tuple(args)], call.attrs, call.ty_args,
                                                   ret_ty=call.ty))
