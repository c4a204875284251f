"""One-value constants compiled into the kernels that read them.

FuseTIR passes every constant a fused function reads as a buffer parameter, one-value ones included: the scales
and zero points of an int8 layer's quantize and dequantize steps, a HardSwish's 1/6 where it was not folded.
Inside the kernel such a value is a load LLVM cannot see through: a quantize's exact division
(`common.divide_exactly`) computes 1/scale at run time, and each value is broadcast to a vector register. An
epilogue of several quantize steps over five column vectors holds more broadcasts than there are registers: LLVM
spilled them and rebuilt each from its pieces (five instructions) in every iteration. ppocrv6_tiny_det's int8 SE
block at 80×80 (gate × map, requantize, two residual adds) ran 261 instructions per 80 elements, 208 with the
values compiled in; the model 4.86 → 4.76 ms (1 thread, 9 interleaved rounds, the same bytes out).

`specialize` (a Relax pass on the scheduled module) gives each call of a function with one-value constant
arguments a copy of the function, one per distinct set of values, with the loads of those parameters replaced by
the values (an immediate of the parameter's type: exact). The parameters stay, unread (the calling convention is
unchanged), and copies are made after scheduling, so the schedules and the tuning records (keyed by the functions
FuseTIR wrote) are the same as without it. Functions no call reads any more are dropped.
"""
from __future__ import annotations

import numpy as np

from .common import is_call_tir

#: the element types whose one-value constants are compiled in
DTYPES = ("float32", "int8", "uint8", "int32")


def scalar_value(arg) -> float | int | None:
    """The value of a one-value Relax constant of a `DTYPES` type (a float or an int), else None."""
    import tvm  # noqa: PLC0415
    if not isinstance(arg, tvm.ir.GenericConst) or str(arg.value.dtype) not in DTYPES \
            or any(int(d) != 1 for d in arg.value.shape):
        return None  # (a weight is not copied out to find that out)
    array = arg.value.numpy()
    value = array.reshape(()).item()
    return float(value) if array.dtype == np.float32 else int(value)


def specialize(mod):
    """`mod` (a scheduled Relax module) with every `call_tir` that passes one-value constants calling a copy of its
    PrimFunc with those values compiled in (`with_scalars`)."""
    import tvm  # noqa: PLC0415
    from tvm import relax, tirx  # noqa: PLC0415
    builder = relax.BlockBuilder(mod)
    copies: dict = {}  # (function name, its (parameter index, value) pairs) → GlobalVar of the copy

    def rewrite(value):
        if not (is_call_tir(value) and isinstance(value.args[1], relax.Tuple)
                and isinstance(value.args[0], tvm.ir.GlobalVar) and isinstance(mod[value.args[0]], tirx.PrimFunc)):
            return value
        pairs = tuple((i, v) for i, v in ((i, scalar_value(a)) for i, a in enumerate(value.args[1].fields))
                      if v is not None)
        if not pairs:
            return value
        key = (value.args[0].name_hint, pairs)
        if key not in copies:
            copies[key] = builder.add_func(with_scalars(mod[value.args[0]], dict(pairs)), value.args[0].name_hint)
        return relax.Call(value.op, [copies[key], *value.args[1:]], value.attrs, value.ty_args, ret_ty=value.ty)

    rewritten = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            blocks = [type(block)([relax.VarBinding(b.var, rewrite(b.value)) if isinstance(b, relax.VarBinding)
                                   else b for b in block.bindings]) for block in func.body.blocks]
            rewritten[gvar] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                                             func.is_pure, func.attrs)
    if not copies:
        return mod
    out = builder.get()
    for gvar, func in rewritten.items():
        out[gvar] = func
    entries = [gvar.name_hint for gvar in rewritten]
    return relax.transform.DeadCodeElimination(entries)(relax.transform.Normalize()(out))


def with_scalars(func, values: dict):
    """`func` (a PrimFunc) with every load of parameter i replaced by `values[i]` (a float: a float32 immediate;
    an int: an immediate of the parameter's type), broadcast where the load is a vector."""
    from tvm import ir, tirx  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415
    imms = [(func.params[i], tirx.FloatImm("float32", v) if isinstance(v, float)
             else tirx.IntImm(str(func.params[i].dtype), v)) for i, v in values.items()]

    def replace(load, mutator):
        load = mutator.default_mutate(load)
        imm = next((imm for param, imm in imms if load.source.same_as(param)), None)
        if imm is None:
            return load
        lanes = int(load.ty.dtype.lanes)
        return imm if lanes == 1 else tirx.Broadcast(imm, lanes)

    return func.with_body(structural_mutate(func.body, [(ir.TensorLoad, replace)]))
