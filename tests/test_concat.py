"""Concats written in place (`targets/schedules/concat.py`): the kernels before a channel concat store into its
output; what may not be written in place is left as it was, and every build matches ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm

TOLERANCE = 1e-4


def _fire(shape=(1, 8, 16, 16), squeeze_out: int = 8, expand: int = 16, reuse: bool = False) -> onnx.ModelProto:
    """A SqueezeNet Fire module: 1×1 squeeze, then 1×1 and 3×3 expands concatenated on channels, then a 1×1 conv.
    `reuse`: the 1×1 expand's output is also added to the result (so it has a second reader)."""
    g = graphs.Builder(7)
    c = shape[1]
    s = g.node("Relu", [g.conv("x", "squeeze", c, squeeze_out, k=1)], "s")
    a = g.node("Relu", [g.conv(s, "expand1", squeeze_out, expand, k=1)], "a")
    b = g.node("Relu", [g.conv(s, "expand3", squeeze_out, expand, k=3, pads=[1, 1, 1, 1])], "b")
    h = g.node("Concat", [a, b], "cat", axis=1)
    y = g.conv(h, "head", 2 * expand, expand, k=1)
    if reuse:
        y = g.node("Add", [y, a], "sum")
    return g.model({"x": list(shape)}, y)


def _build(model: onnx.ModelProto):
    """(the compiled model's largest error against ONNX Runtime on two random samples, relative to the largest
    output; the names of the in-place concat functions the build made)."""
    from tvm import tirx

    from squeeze.targets import schedules
    from squeeze.targets.schedules.concat import FUSED
    tvm = tvm_build.tvm()
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    lowered = schedules.build_pipeline(target)(mod)
    fused = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)
             and f.attrs is not None and FUSED in f.attrs]
    executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target))
    runner = tvm_build.VMRunner(executable, tvm.cpu(), [s.name for s in input_specs(model)])
    data = graphs.random_inputs(model, count=2, seed=5)
    got = np.stack([runner.run(s)[0] for s in data.samples(len(data))])
    ref = runtime.run(model, data)[model.graph.output[0].name]
    err = float(np.abs(got.reshape(ref.shape) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    return err, fused


def test_the_convs_before_a_channel_concat_store_into_its_output():
    err, fused = _build(_fire())
    assert err <= TOLERANCE
    assert len(fused) == 1 and "conv2d" in fused[0]


@pytest.mark.parametrize("model, why", [
    (lambda: _fire(reuse=True), "an input with a second reader"),
    (lambda: _fire(shape=(2, 8, 16, 16)), "batch 2: each input is two runs of the output"),
    (lambda: _fire(shape=(1, 8, 5, 5), expand=3), "runs of 3×5×5 floats: not 64-byte aligned"),
])
def test_a_concat_that_cannot_be_written_in_place_is_left_alone(model, why):
    err, fused = _build(model())
    assert err <= TOLERANCE, why
    assert fused == [], why


def test_concat_axis_reads_topi_concats_only():
    """`concat_axis`: TOPI's channel concat at batch 1 is recognised; a conv (same shapes' sum) is not."""
    from tvm import tirx

    from squeeze.targets import schedules
    from squeeze.targets.schedules.concat import concat_axis
    tvm = tvm_build.tvm()
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    model = _fire()
    fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    axes = {gv.name_hint: concat_axis(f) for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert [name for name, axis in axes.items() if axis is not None] == ["concatenate"]
    assert axes["concatenate"] == 1
