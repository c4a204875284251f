"""Exact shortcuts in int8 epilogues after TVM's lowering: a quantized value read back as a number.

A QDQ chain between int8 layers (an SE block's multiply → quantize → dequantize → add → quantize, a residual add
after a conv) inlines into one epilogue as

    q = uint8(clamp(round_half_even(x / s) + z, 0, 255))        (quantize)
    d = float32(int32(q) − z′) · s′                               (dequantize)

and LLVM computes d as written: float → int32 → bytes → int32 → float, four conversions per vector, because it
cannot tell that the clamped value is already a whole number inside the byte range. It is: a rounded value plus an
integer zero point, clamped to integer bounds. `round_trips` rewrites, for such a value M (float, integral by
construction, bounds within the 8-bit type),

    int32(uint8(M)) → int32(M),   float32(uint8(M)) → M,   float32(int32(M) − c) → M − float32(c)  (constant c)

and a zero point added before the clamp and taken off after it moves into the bounds:

    clamp(R + z, lo, hi) − z → clamp(R, lo − z, hi − z)          (R a whole number, z, lo, hi integer constants)

— the same numbers (integers below 2^24 are exact in float32; an R beyond that clamps to the same bound either
way), so the same bytes out. The uint8 value is still computed where it is stored. The last rule needs the zero
point as a constant, which `scalar_args` makes it: two ops less per requantize → dequantize step (an int8 layer's
output read back by a residual add or an activation). (A NaN activation, which the float → uint8 conversion
leaves undefined, now stays NaN in the dequantized value.)
"""
from __future__ import annotations

from functools import cache

#: the LLVM intrinsics whose result is a whole number
_ROUNDING = ("llvm.roundeven", "llvm.nearbyint", "llvm.rint", "llvm.floor", "llvm.ceil", "llvm.trunc")
#: the 8-bit types a quantize casts to, and their ranges
_BYTES = {"uint8": (0, 255), "int8": (-128, 127)}
#: integers that float32 holds exactly
_EXACT = 1 << 24


def round_trips(func):
    """`func` (lowered TIR) with the conversions of whole numbers through an 8-bit type removed (module
    docstring)."""
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415
    rounding = _rounding_ids()

    def const(e):
        e = e.value if isinstance(e, tirx.Broadcast) else e
        return e.value if isinstance(e, (tirx.FloatImm, tirx.IntImm)) else None

    def integral(e) -> bool:
        if isinstance(e, tvm.ir.expr.Call):
            return str(e.op.name) in ("tirx.call_llvm_pure_intrin", "tirx.call_llvm_intrin") \
                and isinstance(e.args[0], tirx.IntImm) and int(e.args[0].value) in rounding
        if isinstance(e, tirx.Cast):
            return str(e.value.ty.dtype).startswith(("int", "uint"))
        if isinstance(e, tirx.Broadcast):
            return integral(e.value)
        if isinstance(e, (tirx.Add, tirx.Sub, tirx.Min, tirx.Max)):
            return integral(e.a) and integral(e.b)
        value = const(e)
        return isinstance(value, float) and value.is_integer()

    def clamped(e, low: float, high: float) -> bool:
        """e = max(min(A, h), l) or min(max(A, l), h), A integral, low ≤ l ≤ h ≤ high."""
        if isinstance(e, tirx.Max) and isinstance(e.a, tirx.Min):
            lo, hi, inner = const(e.b), const(e.a.b), e.a.a
        elif isinstance(e, tirx.Min) and isinstance(e.a, tirx.Max):
            lo, hi, inner = const(e.a.b), const(e.b), e.a.a
        else:
            return False
        return lo is not None and hi is not None and low <= lo <= hi <= high and integral(inner)

    def scalar(dtype) -> str:
        return str(dtype.with_lanes(1))

    def through_bytes(cast, mutator):
        cast = mutator.default_mutate(cast)
        inner = cast.value
        if not (isinstance(inner, tirx.Cast) and scalar(inner.ty.dtype) in _BYTES
                and scalar(inner.value.ty.dtype) == "float32"
                and clamped(inner.value, *_BYTES[scalar(inner.ty.dtype)])):
            return cast
        to = scalar(cast.ty.dtype)
        if to == "float32":
            return inner.value
        if to in ("int16", "int32", "int64"):
            return tirx.Cast(cast.ty.dtype, inner.value)
        return cast

    def minus_constant(cast, mutator):
        cast = mutator.default_mutate(cast)
        diff = cast.value
        if not (scalar(cast.ty.dtype) == "float32" and isinstance(diff, (tirx.Sub, tirx.Add))
                and isinstance(diff.a, tirx.Cast) and scalar(diff.a.value.ty.dtype) == "float32"
                and clamped(diff.a.value, -_EXACT, _EXACT)):
            return cast
        c = const(diff.b)
        if not isinstance(c, int) or abs(c) >= _EXACT:
            return cast  # (a negative zero point's subtraction reads as an Add)
        return type(diff)(diff.a.value, tirx.Cast(cast.ty.dtype, diff.b))

    def number(e):
        """The value of a float32 constant, or of an integer constant converted to float32, else None."""
        if isinstance(e, tirx.Cast) and scalar(e.ty.dtype) == "float32" and isinstance(const(e.value), int):
            return float(const(e.value))
        value = const(e)
        return float(value) if isinstance(value, float) and scalar(e.ty.dtype) == "float32" else None

    def shifted_clamp(sub, mutator):  # clamp − z, or clamp + (−z)
        sub = mutator.default_mutate(sub)
        c, clamp = number(sub.b), sub.a
        c = -c if c is not None and isinstance(sub, tirx.Add) else c
        if c is None or not isinstance(clamp, (tirx.Max, tirx.Min)) or not isinstance(clamp.a, (tirx.Max, tirx.Min)) \
                or type(clamp) is type(clamp.a) or not isinstance(clamp.a.a, tirx.Add):
            return sub
        outer, inner, shift = number(clamp.b), number(clamp.a.b), clamp.a.a
        if number(shift.b) != c or not integral(shift.a) or outer is None or inner is None \
                or not all(v.is_integer() and abs(v) < _EXACT for v in (c, outer, inner)):
            return sub

        def imm(value: float):
            lanes = int(sub.ty.dtype.lanes)
            value = tirx.FloatImm("float32", value)
            return value if lanes == 1 else tirx.Broadcast(value, lanes)
        return type(clamp)(type(clamp.a)(shift.a, imm(inner - c)), imm(outer - c))

    body = structural_mutate(func.body, [(tirx.Cast, through_bytes)])
    body = structural_mutate(body, [(tirx.Cast, minus_constant)])
    return func.with_body(structural_mutate(body, [(tirx.Sub, shifted_clamp), (tirx.Add, shifted_clamp)]))


@cache
def _rounding_ids() -> frozenset:
    """The ids `call_llvm_pure_intrin` writes for `_ROUNDING` (as its first argument)."""
    from tvm import tirx  # noqa: PLC0415
    return frozenset(int(tirx.call_llvm_pure_intrin("float32", name, tirx.FloatImm("float32", 0.5)).args[0].value)
                     for name in _ROUNDING)


def round_trips_pass():
    """`round_trips` as a TIR module pass (run after TVM's lowering, when the epilogues are inlined)."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeRoundTrips")
    def _pass(mod, _ctx):
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                out[gv] = round_trips(func)
        return out
    return _pass
