"""Transposing epilogues as shuffle networks (targets/schedules/transpose.py): the network is a transpose for every
shape it accepts, a channel tile's epilogue loop is rewritten to it, and loops of any other form are left alone.
(That compiled convolutions still equal ONNX Runtime's is test_schedules.py's and test_schedules_diff.py's.)"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def _compile(func):
    import tvm

    from squeeze.targets import tvm_build
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


@pytest.mark.parametrize("lanes, columns", [(16, 16), (16, 8), (16, 13), (16, 7), (16, 2), (8, 8), (8, 5), (4, 3)])
def test_the_network_transposes_rows_into_columns(lanes, columns):
    import tvm
    from tvm import tirx

    from squeeze.targets.schedules.transpose import transpose_network
    a = tirx.decl_buffer((columns * lanes,), "float32", name="A")
    b = tirx.decl_buffer((lanes * columns,), "float32", name="B")
    rows = [tirx.Var(f"r{i}", f"float32x{lanes}") for i in range(columns)]
    binds = [tirx.Bind(r, tirx.BufferLoad(a, [tirx.Ramp(i * lanes, 1, lanes)])) for i, r in enumerate(rows)]
    out = transpose_network(rows, lanes, columns, rows[0].ty.dtype)
    stores = [tirx.BufferStore(b, col, [tirx.Ramp(j * columns, 1, columns)]) for j, col in enumerate(out)]
    lib = _compile(tirx.PrimFunc([a, b], tirx.SeqStmt(binds + stores)))
    x = np.arange(columns * lanes, dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros(lanes * columns, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy().reshape(lanes, columns), x.reshape(columns, lanes).T)


def test_more_rows_than_lanes_is_refused():
    from tvm import tirx

    from squeeze.targets.schedules.transpose import transpose_network
    rows = [tirx.Var(f"r{i}", "float32x4") for i in range(5)]
    with pytest.raises(ValueError):
        transpose_network(rows, 4, 5, rows[0].ty.dtype)


def _epilogue(body_of):
    """A PrimFunc: a 2×(8 columns × 16 lanes) tile, then `for c in range(32): body_of(c, tile, bias, out)`."""
    from tvm import tirx
    tile = tirx.decl_buffer((256,), "float32", name="tile")
    bias = tirx.decl_buffer((32,), "float32", name="bias")
    out = tirx.decl_buffer((32 * 8,), "float32", name="out")
    c = tirx.Var("c", "int32")
    loop = tirx.For(c, 0, 32, tirx.ForKind.SERIAL, body_of(c, tile, bias, out))
    return tirx.PrimFunc([tile, bias, out], loop)


def _channel_store(c, tile, bias, out):
    """out[c, 0:8] = max(tile[c // 16 · 128 + c % 16 + 16 · i] + bias[c], 0): a channel tile's epilogue."""
    from tvm import tirx
    value = tirx.BufferLoad(tile, [tirx.Ramp(tirx.floordiv(c, 16) * 128 + tirx.floormod(c, 16), 16, 8)])
    value = tirx.Max(value + tirx.Broadcast(tirx.BufferLoad(bias, [c]), 8), tirx.Broadcast(tirx.const(0.0), 8))
    return tirx.BufferStore(out, value, [tirx.Ramp(c * 8, 1, 8)])


def _shuffles(func) -> int:
    from tvm import tirx
    from tvm_ffi import structural_visit
    found = []

    def on_shuffle(node, visitor):
        found.append(node)
        visitor.default_visit(node)
    structural_visit(func.body, [(tirx.Shuffle, on_shuffle)])
    return len(found)


def test_a_channel_tile_epilogue_is_rewritten_and_computes_the_same():
    import tvm

    from squeeze.targets.schedules.transpose import transposed_epilogues
    func = _epilogue(_channel_store)
    rewritten = transposed_epilogues(func)
    assert _shuffles(func) == 0 and _shuffles(rewritten) > 0
    rng = np.random.default_rng(0)
    tile, bias = rng.standard_normal(256).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    results = []
    for f in (func, rewritten):
        out = tvm.runtime.tensor(np.zeros(256, np.float32))
        _compile(f)["main"](tvm.runtime.tensor(tile), tvm.runtime.tensor(bias), out)
        results.append(out.numpy())
    expected = np.maximum(tile.reshape(2, 8, 16).transpose(0, 2, 1).reshape(32, 8) + bias[:, None], 0).ravel()
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[1], expected)


def test_loops_of_other_forms_are_left_alone():
    """Contiguous reads, a body that writes the tile, a body with a loop of its own, an extent that is not a
    whole number of blocks: unchanged."""
    from tvm import tirx

    from squeeze.targets.schedules.transpose import transposed_epilogues

    def contiguous(c, tile, bias, out):
        return tirx.BufferStore(out, tirx.BufferLoad(tile, [tirx.Ramp(c * 8, 1, 8)]), [tirx.Ramp(c * 8, 1, 8)])

    def writes_tile(c, tile, bias, out):
        return tirx.SeqStmt([_channel_store(c, tile, bias, out),
                             tirx.BufferStore(tile, tirx.const(0.0), [c])])

    def inner_loop(c, tile, bias, out):
        k = tirx.Var("k", "int32")
        return tirx.For(k, 0, 1, tirx.ForKind.SERIAL, _channel_store(c + k, tile, bias, out))
    for body_of in (contiguous, writes_tile, inner_loop):
        func = _epilogue(body_of)
        assert _shuffles(transposed_epilogues(func)) == 0, body_of.__name__
    short = _epilogue(_channel_store)
    short = short.with_body(tirx.For(short.body.loop_var, 0, 24, tirx.ForKind.SERIAL, short.body.body))
    assert _shuffles(transposed_epilogues(short)) == 0
