"""An int8 layer's zero-point padding is computed inside the conv that reads it (`fuse_padding.py`): no separate
pass over the map, the same bytes."""
from __future__ import annotations

import numpy as np
import pytest

import graphs
from helpers import main_calls

CASES = {
    "conv3x3": dict(c=8, k=16, hw=(10, 37)),
    "conv3x3_columns_stride2": dict(c=8, k=20, hw=(9, 70), stride=2),
    "depthwise3x3": dict(c=24, k=24, groups=24, hw=(10, 37)),
    "depthwise5x5_stride2": dict(c=16, k=16, groups=16, ksize=5, pad=2, stride=2, hw=(13, 21)),
}


def _after_an_int8_layer(model):
    """`model` (a `qdq_model`) reading the requantized output of an int8 1×1 conv, as in a network (a padding
    after the input's QuantizeLinear fuses into that one)."""
    import onnx
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    hw = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
    first = graphs.qdq_model("Conv", c=5, k=channels, hw=tuple(hw), ksize=1, pad=0, seed=4)
    first, model = (onnx.shape_inference.infer_shapes(m, strict_mode=True) for m in (first, model))
    return onnx.compose.merge_models(first, model, io_map=[("out", "x")], prefix2="second_")


def _target():
    return graphs.host_target()


@pytest.mark.parametrize("case", list(CASES))
def test_the_padding_is_computed_in_the_conv(case):
    """A padded int8 conv or depthwise conv: `main` calls no padding function of its own (the padding is in the
    conv's function, read from the unpadded map), and the output is ONNX Runtime's bit for bit."""
    import onnxruntime as ort
    import tvm

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import build_pipeline, int8, pipeline
    target = _target()
    if int8.dot_intrinsic(target) is None:
        pytest.skip("this CPU has no int8 dot-product instruction TVM can use")
    model = _after_an_int8_layer(graphs.qdq_model("Conv", **CASES[case]))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    assert shape[1] == 5
    mod = tvm_build.import_onnx(model, {"x": x.shape})
    fused = pipeline.fused_module(mod, target)
    calls = main_calls(fused)
    assert not any(name.startswith("pad") for name in calls), calls
    assert any("conv2d_int8" in name for name in calls), calls
    executable = tvm_build.compile_module(mod, target, build_pipeline(target, threads=1))
    got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # the QDQ graph as written: optimized, ONNX Runtime merges the two quantizations between the layers (dequantize
    # at one scale, quantize at another) into its QLinearConv and lands a step away on ~30 % of these values
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_is_padding_reads_one_guarded_block():
    """`_is_padding`: a TOPI pad is one; a copy and an elementwise op are not."""
    from tvm import te, topi

    from squeeze.targets.schedules.fuse_padding import _is_padding
    a = te.placeholder((1, 4, 5, 6), "uint8", name="a")
    pad = topi.nn.pad(a, [0, 0, 1, 1], [0, 0, 1, 1], pad_value=7)
    assert _is_padding(te.create_prim_func([a, pad]))
    assert not _is_padding(te.create_prim_func([a, te.compute(a.shape, lambda *i: a(*i) + 1, name="b")]))
    assert not _is_padding(te.create_prim_func([a, te.compute(a.shape, lambda *i: a(*i), name="c")]))
