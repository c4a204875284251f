"""`int8_epilogue.round_trips`: a quantized value read back as a number skips its conversions through bytes, and
computes the same numbers."""
from __future__ import annotations

import numpy as np
import pytest


def _quantize(tirx, value, zero: int, dtype: str):
    low, high = (0, 255) if dtype == "uint8" else (-128, 127)
    rounded = tirx.call_llvm_pure_intrin("float32", "llvm.roundeven", value * tirx.const(2.5, "float32"))
    shifted = rounded + tirx.Cast("float32", tirx.const(zero, dtype))
    return tirx.Cast(dtype, tirx.max(tirx.min(shifted, tirx.const(float(high), "float32")),
                                     tirx.const(float(low), "float32")))


def _build(func):
    import tvm
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")


@pytest.mark.parametrize("dtype,zero", [("uint8", 7), ("uint8", 200), ("int8", -3)])
def test_a_dequantized_quantize_skips_the_bytes_and_keeps_the_numbers(dtype, zero):
    """dequantize(quantize(x)) and a table index int32(quantize(x)), inlined, lose their casts through the 8-bit
    type and give the same values for inputs across the whole range, the clamps and the rounding ties."""
    import tvm
    from tvm import te, tirx

    from squeeze.targets.schedules.int8_epilogue import round_trips
    n = 1024
    x = te.placeholder((n,), "float32", name="x")
    deq = te.compute((n,), lambda i: tirx.Cast("float32", tirx.Cast("int32", _quantize(tirx, x[i], zero, dtype))
                                                           - zero) * tirx.const(0.37, "float32"), name="deq")
    index = te.compute((n,), lambda i: tirx.Cast("int32", _quantize(tirx, x[i], zero, dtype)), name="index")
    func = te.create_prim_func([x, deq, index])
    rewritten = round_trips(func)
    assert f'T.Cast("{dtype}"' in func.script() and f'T.Cast("{dtype}"' not in rewritten.script()
    values = np.concatenate([np.linspace(-120, 120, n - 8), [0.2, 0.6, -0.2, 1e6, -1e6, 51.0, -51.2, 0.0]])
    values = values.astype(np.float32)
    outs = []
    for f in (func, rewritten):
        lib = _build(f)
        got = [tvm.runtime.tensor(np.zeros(n, np.float32)), tvm.runtime.tensor(np.zeros(n, np.int32))]
        lib["main"](tvm.runtime.tensor(values), *got)
        outs.append([g.numpy() for g in got])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_an_unclamped_cast_keeps_its_wraparound():
    """A float cast to uint8 without the quantize's clamp (it wraps or saturates as the target does) is left as
    it is: only clamped whole numbers skip the bytes."""
    from tvm import te, tirx

    from squeeze.targets.schedules.int8_epilogue import round_trips
    x = te.placeholder((16,), "float32", name="x")
    out = te.compute((16,), lambda i: tirx.Cast("int32", tirx.Cast("uint8", x[i] + tirx.const(1.0, "float32"))),
                     name="out")
    func = te.create_prim_func([x, out])
    assert round_trips(func).script() == func.script()
    not_whole = te.compute((16,), lambda i: tirx.Cast("int32", tirx.Cast("uint8", tirx.max(tirx.min(
        x[i], tirx.const(255.0, "float32")), tirx.const(0.0, "float32")))), name="not_whole")
    func = te.create_prim_func([x, not_whole])
    assert round_trips(func).script() == func.script()


@pytest.mark.parametrize("dtype,zero,back", [("uint8", 121, 121), ("int8", -3, -3), ("uint8", 121, 120)])
def test_the_zero_point_moves_into_the_clamp_bounds(dtype, zero, back):
    """clamp(round(x·2.5) + z) − z, the dequantize of a quantize at the same zero point, becomes clamp(round(x·2.5),
    lo − z, hi − z): no add or subtract of z left, the same values across the range, the clamps and the ties. At
    another zero point (z′ ≠ z) the subtraction stays."""
    import tvm
    from tvm import te, tirx

    from squeeze.targets.schedules.int8_epilogue import round_trips
    n = 1024
    x = te.placeholder((n,), "float32", name="x")
    deq = te.compute((n,), lambda i: tirx.Cast("float32", tirx.Cast("int32", _quantize(tirx, x[i], zero, dtype))
                                                           - back) * tirx.const(0.37, "float32"), name="deq")
    func = te.create_prim_func([x, deq])
    rewritten = round_trips(func).script()
    shifted = f"T.float32({float((255 if dtype == 'uint8' else 127) - zero)})" in rewritten
    assert shifted == (zero == back) and ("- " in rewritten or "+ 3" in rewritten) == (zero != back), rewritten
    values = np.concatenate([np.linspace(-120, 120, n - 8), [0.2, 0.6, -0.2, 1e6, -1e6, 51.0, -51.2, 0.0]])
    outs = []
    for f in (func, round_trips(func)):
        got = tvm.runtime.tensor(np.zeros(n, np.float32))
        _build(f)["main"](tvm.runtime.tensor(values.astype(np.float32)), got)
        outs.append(got.numpy())
    np.testing.assert_array_equal(*outs)
