"""`scalar_args.specialize`: one-value constants a kernel is called with are compiled into a copy of it, one copy
per distinct set of values, and the module computes what it computed."""
from __future__ import annotations

import numpy as np

from helpers import main_calls


def _module():
    """main(x) = f(f(x, 0.37, 3), 0.37, 3) + f(x, 0.5, 3): three calls of one kernel `f(x, scale, zero)` =
    x / scale + zero, the scale and zero point one-value constants."""
    from tvm import relax, te, tirx

    x = te.placeholder((64,), "float32", name="x")
    scale = te.placeholder((), "float32", name="scale")
    zero = te.placeholder((), "int32", name="zero")
    out = te.compute((64,), lambda i: x[i] / scale[()] + tirx.Cast("float32", zero[()]), name="out")
    f = te.create_prim_func([x, scale, zero, out]).without_attr("global_symbol")  # private, as FuseTIR writes
    bb = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType((64,), "float32"))
    with bb.function("main", [data]):
        with bb.dataflow():
            gv = bb.add_func(f, "f")
            ty = data.ty

            def call(arg, s):
                return bb.emit(relax.call_tir(gv, [arg, relax.const(s, "float32"), relax.const(3, "int32")], ty))
            a = call(call(data, 0.37), 0.37)
            b = call(data, 0.5)
            result = bb.emit_output(relax.op.add(a, b))
        bb.emit_func_output(result)
    return bb.get()


def _run(mod, x):
    import tvm
    from tvm import relax
    executable = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_each_set_of_values_gets_its_own_copy_with_the_values_compiled_in():
    from tvm import tirx

    from squeeze.targets.schedules.scalar_args import specialize
    mod = _module()
    out = specialize(mod)
    calls = main_calls(out)
    assert len(calls) == 3 and calls[0] == calls[1] != calls[2], calls  # (0.37, 3) twice, (0.5, 3) once
    prims = {gv.name_hint: f for gv, f in out.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert sorted(prims) == sorted(set(calls)), "the unspecialized kernel is dropped"
    for name, value in ((calls[0], 0.37), (calls[2], 0.5)):
        body = [line for line in prims[name].script().splitlines() if "out[v_i] =" in line]
        assert len(body) == 1 and "scale[()]" not in body[0] and "zero[()]" not in body[0], body
        written = float(body[0].split("T.float32(")[1].split(")")[0])
        assert np.float32(written) == np.float32(value) and '"float32", 3)' in body[0], body
    x = np.random.default_rng(0).normal(size=64).astype(np.float32) * 100
    np.testing.assert_array_equal(_run(out, x), _run(mod, x))


def test_a_module_without_scalar_arguments_is_left_as_it_is():
    from tvm import relax, te

    from squeeze.targets.schedules.scalar_args import specialize
    x = te.placeholder((8,), "float32", name="x")
    f = te.create_prim_func([x, te.compute((8,), lambda i: x[i] * 2.0, name="out")])
    bb = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType((8,), "float32"))
    with bb.function("main", [data]):
        with bb.dataflow():
            gv = bb.add_func(f, "f")
            result = bb.emit_output(relax.call_tir(gv, [data], data.ty))
        bb.emit_func_output(result)
    mod = bb.get()
    assert specialize(mod).same_as(mod)
