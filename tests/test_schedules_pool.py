"""`schedules/pool.legalize_max_pool2d`: a max pool (ceil mode included) compiles to a window max whose taps read
without a bounds check (the input is padded beforehand, by a plain copy, where a window or a whole tile reads
past the map), or, unpadded and strided, to a max over rows then columns (`_separable_max`), and TVM's outputs
equal ONNX Runtime's."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm


def max_pool(c: int, hw: int, k: int, s: int, pads: list[int], ceil: int, dilation: int = 1) -> onnx.ModelProto:
    g = graphs.Builder(0)
    g.node("MaxPool", ["x"], "y", kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=ceil,
           dilations=[dilation, dilation])
    return g.model({"x": [1, c, hw, hw]}, "y")


CASES = {  # name: model
    "squeezenet_27_to_13": lambda: max_pool(16, 27, 3, 2, [0, 0, 0, 0], 1),  # every window fits
    "squeezenet_111_to_55": lambda: max_pool(8, 111, 3, 2, [0, 0, 0, 0], 1),  # fits
    "ceil_reads_past_the_map": lambda: max_pool(8, 28, 3, 2, [0, 0, 0, 0], 1),  # 14 out: the last window reads past
    "ceil_with_padding": lambda: max_pool(8, 14, 3, 2, [1, 1, 1, 1], 1),  # reads past
    "ceil_dilated": lambda: max_pool(8, 16, 3, 2, [0, 0, 0, 0], 1, dilation=2),  # reads past
    "floor_mode": lambda: max_pool(8, 28, 2, 2, [0, 0, 0, 0], 0),  # fits
}


def _target():
    tvm = tvm_build.tvm()
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


@pytest.mark.parametrize("name", sorted(CASES))
def test_max_pool_matches_onnxruntime_and_pads_only_when_read(name):
    from tvm import tirx

    from squeeze.targets import schedules
    build = CASES[name]
    model = build()
    target = _target()
    shapes = resolve_shapes(input_specs(model), {})
    mod = tvm_build.import_onnx(model, shapes)
    fused = schedules.fused_module(mod, target)
    text = "\n".join(f.script() for _, f in fused.functions_items() if isinstance(f, tirx.PrimFunc))
    if 'T.sblock("depthwise_conv2d_nchw")' in text:
        window = text[text.index('T.sblock("depthwise_conv2d_nchw")'):]
        window = window[:window.index("T.sblock(", 1)] if "T.sblock(" in window[1:] else window
        assert "if_then_else" not in window, window  # the taps: no bounds check, whatever the padding
    else:  # unpadded and strided: rows, then columns, reading the map in place
        assert 'T.sblock("pool_columns")' in text and "if_then_else" not in text, text
    got, ref = _run_against_onnxruntime(model, mod, target, seed=5)
    assert np.array_equal(got, ref), f"{name}: max |Δ| {np.abs(got - ref).max():.2e}"


def _run_against_onnxruntime(model, mod, target, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(TVM's output with squeeze's pipeline, ONNX Runtime's) on two random inputs."""
    from squeeze.targets import schedules
    tvm = tvm_build.tvm()
    executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target, threads=1))
    runner = tvm_build.VMRunner(executable, tvm.cpu(), [s.name for s in input_specs(model)])
    data = graphs.random_inputs(model, count=2, seed=seed)
    ref = runtime.run(model, data)["y"]
    return np.stack([runner.run(s)[0] for s in data.samples(len(data))]).reshape(ref.shape), ref


@pytest.mark.parametrize("c, hw, k, s, pads, ceil, kind", [
    (8, 111, 3, 2, [0, 0, 0, 0], 0, "separable"),  # 55 columns, unpadded, strided: rows, then columns
    (8, 27, 3, 2, [0, 0, 0, 0], 0, "separable"),   # 13 columns: too short for LLVM to vectorize TOPI's nest
    (8, 79, 3, 2, [0, 0, 0, 0], 0, "topi"),        # 39 columns: TOPI's nest reads the map in place
    (8, 40, 2, 1, [0, 0, 0, 0], 0, "topi"),        # stride 1, 39 columns
    (8, 40, 2, 1, [0, 0, 1, 1], 0, "window"),      # padded bottom/right (ppocrv6_tiny_det's): the window max
    (8, 40, 3, 2, [1, 1, 1, 1], 0, "window"),      # padded
    (8, 39, 3, 2, [0, 0, 0, 0], 1, "window"),      # ceil mode: TOPI would pad in a copy of its own
])
def test_a_float_max_pool_is_a_window_max_where_it_pads_separable_where_strided(c, hw, k, s, pads, ceil, kind):
    """`pool._window_max_wins` and `_separable_wins` for float32 (measurements in their docstrings): the window max
    where the pool pads (explicitly or by ceil mode), rows then columns where it is unpadded, strided and under 16
    or at least 48 output columns, TOPI's loop nest (the `Pool` rule) else; all equal ONNX Runtime."""
    from tvm import tirx

    from squeeze.targets import schedules
    model = max_pool(c, hw, k, s, pads, ceil)
    target = _target()
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    text = "\n".join(f.script() for _, f in schedules.fused_module(mod, target).functions_items()
                     if isinstance(f, tirx.PrimFunc))
    found = "window" if 'T.sblock("depthwise_conv2d_nchw")' in text else \
        "separable" if 'T.sblock("pool_columns")' in text else "topi"
    assert found == kind
    got, ref = _run_against_onnxruntime(model, mod, target, seed=7)
    assert np.array_equal(got, ref)
