"""`schedules/conv_pair.py`: a conv feeding a conv with nothing between (what `lowrank` writes) compiles to one
`conv2d_pair` function scheduled by `Conv2dPair`, and TVM's outputs equal ONNX Runtime's; pairs the rewrite
must not take (an intermediate read twice, few input channels) stay two functions and stay correct."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm

TOLERANCE = 1e-4  # max |TVM − ORT| / max |ORT|: float32 summation order only


def pair(c: int, r: int, n: int, hw: int, k1: tuple[int, int], k2: tuple[int, int], pads1: list[int],
         pads2: list[int], strides1=(1, 1), strides2=(1, 1), dilations1=(1, 1), residual: bool = False,
         seed: int = 0) -> onnx.ModelProto:
    """x[1,c,hw,hw] ─ Conv c→r k1 (no bias) ─ Conv r→n k2 (+bias) ─ [Add x] ─ Relu ─ y"""
    g = graphs.Builder(seed)
    mid = g.node("Conv", ["x", g.weight("w1", r, c, *k1)], "c1", kernel_shape=list(k1), pads=pads1,
                 strides=list(strides1), dilations=list(dilations1))
    y = g.node("Conv", [mid, g.weight("w2", n, r, *k2), g.weight("b2", n, scale=0.1)], "c2", kernel_shape=list(k2),
               pads=pads2, strides=list(strides2))
    if residual:
        y = g.node("Add", [y, "x"], "add")
    g.node("Relu", [y], "y")
    return g.model({"x": [1, c, hw, hw]}, "y")


FUSED = {
    # lowrank's spatial form: 3×1 C→r then 1×3 r→N, an odd rank, with the block's residual add
    "spatial_residual": lambda: pair(32, 26, 32, 8, (3, 1), (1, 3), [1, 0, 1, 0], [0, 1, 0, 1], residual=True),
    # the channel form: 3×3 C→r then 1×1 r→N, odd rank and outputs, odd map
    "channel_odd": lambda: pair(24, 13, 20, 7, (3, 3), (1, 1), [1, 1, 1, 1], [0, 0, 0, 0]),
    # strided factors (a downsampling layer: stride 2 rows in the first, columns in the second)
    "spatial_strided": lambda: pair(32, 17, 32, 8, (3, 1), (1, 3), [1, 0, 1, 0], [0, 1, 0, 1], strides1=(2, 1),
                                    strides2=(1, 2)),
    # more rank than outputs on a 4×4 map; asymmetric border on the second conv; a dilated first conv
    "wide_rank_small_map": lambda: pair(32, 40, 32, 4, (3, 1), (1, 3), [1, 0, 1, 0], [0, 1, 0, 1]),
    "asymmetric_border": lambda: pair(20, 11, 24, 9, (3, 3), (1, 3), [2, 2, 2, 2], [0, 2, 1, 0],
                                      dilations1=(2, 2), strides2=(1, 2)),
}


def intermediate_read_twice() -> onnx.ModelProto:
    """x ─ Conv 24→12 (no bias) ─┬─ Conv 12→24 ─ Add ─ y      (the intermediate feeds two convs: no pair)
                                └─ Conv 12→24 ─┘"""
    g = graphs.Builder(7)
    mid = g.node("Conv", ["x", g.weight("w1", 12, 24, 3, 3)], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    a = g.conv(mid, "c2", 12, 24, k=1)
    b = g.conv(mid, "c3", 12, 24, k=1)
    g.node("Add", [a, b], "y")
    return g.model({"x": [1, 24, 8, 8]}, "y")


def few_inputs() -> onnx.ModelProto:
    """x[1,3,32,32] ─ Conv 3→5 3×1 ─ Conv 5→16 1×3 ─ y    (both convs take the column-vector tile: no pair)"""
    return pair(3, 5, 16, 32, (3, 1), (1, 3), [1, 0, 1, 0], [0, 1, 0, 1])


def _target():
    tvm = tvm_build.tvm()
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


def _rules_applied(model: onnx.ModelProto) -> dict[str, str]:
    """Fused function name → the class name of the first rule that schedules it."""
    from tvm import tirx

    from squeeze.targets import schedules
    target = _target()
    fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    with target:
        return {gvar.name_hint: next((type(r).__name__ for r in schedules.rules()
                                      if r.apply(func, target, False) is not None), "")
                for gvar, func in fused.functions_items() if isinstance(func, tirx.PrimFunc)}


def _error_vs_onnxruntime(model: onnx.ModelProto) -> float:
    from squeeze.targets import schedules
    tvm = tvm_build.tvm()
    target = _target()
    data = graphs.random_inputs(model, count=2, seed=3)
    executable = tvm_build.compile_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})),
                                          target, schedules.build_pipeline(target, threads=1))
    runner = tvm_build.VMRunner(executable, tvm.cpu(), [s.name for s in input_specs(model)])
    got = np.stack([runner.run(s)[0] for s in data.samples(len(data))])
    ref = runtime.run(model, data)[model.graph.output[0].name]
    got = got.reshape(ref.shape)
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


@pytest.mark.parametrize("name", sorted(FUSED))
def test_pair_is_one_function_and_matches_onnxruntime(name):
    model = FUSED[name]()
    applied = _rules_applied(model)
    convs = {n: r for n, r in applied.items() if "conv2d" in n}
    assert list(convs.values()) == ["Conv2dPair"], f"{name}: {applied}"
    assert "conv2d_pair" in next(iter(convs)), applied
    assert all(applied.values()), f"unscheduled: {applied}"
    err = _error_vs_onnxruntime(model)
    assert err <= TOLERANCE, f"{name}: max rel error {err:.2e}"


@pytest.mark.parametrize("build", [intermediate_read_twice, few_inputs])
def test_pairs_not_taken_stay_separate_and_correct(build):
    model = build()
    applied = _rules_applied(model)
    assert not any("pair" in n or r == "Conv2dPair" for n, r in applied.items()), applied
    assert sum("conv2d" in n for n in applied) >= 2, applied
    err = _error_vs_onnxruntime(model)
    assert err <= TOLERANCE, f"max rel error {err:.2e}"


def test_lowrank_output_compiles_to_pairs():
    """What the `lowrank` pass writes (both conv forms, bias on the second factor) takes the pair rule."""
    g = graphs.Builder(11)
    h = g.node("Relu", [g.conv("x", "conv1", 32, 32, pads=[1, 1, 1, 1])], "relu1")
    g.node("Relu", [g.conv(h, "conv2", 32, 32, pads=[1, 1, 1, 1])], "y")
    model = g.model({"x": [1, 32, 8, 8]}, "y")
    for form, rank in (("spatial", 0.25), ("channel", 0.75)):  # r = 24 (fewer and it takes the column tile)
        factored, _ = graphs.apply(model, f"lowrank(rank={rank},form={form},min_share=0)")
        assert graphs.op_counts(factored)["Conv"] == 4, form
        applied = _rules_applied(factored)
        # (both pairs have the same shapes: one function, called twice)
        assert {r for n, r in applied.items() if "conv2d" in n} == {"Conv2dPair"}, applied
        err = _error_vs_onnxruntime(factored)
        assert err <= TOLERANCE, f"{form}: max rel error {err:.2e}"


def test_lowrank_multiple_rounds_ranks_and_one_changes_nothing():
    """`lowrank(multiple=M)` (M: a target's channel block) gives ranks that are multiples of M, so the first
    factor's outputs fill whole vectors; multiple=1 writes the same model as without it."""
    g = graphs.Builder(13)
    h = g.node("Relu", [g.conv("x", "conv1", 24, 40, pads=[1, 1, 1, 1])], "relu1")
    g.node("Relu", [g.conv(h, "conv2", 40, 40, pads=[1, 1, 1, 1])], "y")
    model = g.model({"x": [1, 24, 8, 8]}, "y")
    plain, _ = graphs.apply(model, "lowrank(rank=0.3,min_share=0)")
    one, _ = graphs.apply(model, "lowrank(rank=0.3,min_share=0,multiple=1)")
    assert plain.SerializeToString() == one.SerializeToString()
    eight, steps = graphs.apply(model, "lowrank(rank=0.3,min_share=0,multiple=8)")
    ranks = [e["rank"] for e in steps[0]["details"]["per_layer"]]
    plain_ranks = [e["rank"] for e in graphs.apply(model, "lowrank(rank=0.3,min_share=0)")[1][0]["details"]["per_layer"]]
    assert ranks and all(r % 8 == 0 for r in ranks), ranks
    assert any(r % 8 for r in plain_ranks), plain_ranks  # the rounding had something to do
    err = _error_vs_onnxruntime(eight)
    assert err <= TOLERANCE, f"max rel error {err:.2e}"
