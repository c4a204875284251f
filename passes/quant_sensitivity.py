"""Which activation tensors `quant` can quantize without hurting the model: measured, one tensor at a time.

A tensor's own quantization noise (its SQNR) says little about what the noise does downstream: a few tensors
(before a Softmax, a normalisation, a detection head) turn a small error into a large one. `site_errors` measures,
for every candidate tensor alone, the relative L2 error of the model's outputs on calibration samples when that
tensor is quantized to uint8 and all else stays float — the "one layer at a time" sensitivity of
HAWQ/ZeroQ-style mixed-precision searches, done here with ONNX Runtime on one model: every candidate becomes
x + m[i]·(DQ(Q(x)) − x), with m a graph input, so one session serves all candidates (m one-hot per run).
`outliers` then picks the tensors whose error stands far above the others.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from squeeze import runtime
from squeeze.data import Dataset
from squeeze.model import toposort

MASK = "squeeze_quant_site_mask"
MAX_RUNS = 1024         # model runs spent at most (tensors × samples; samples are cut to fit)
MAX_SAMPLES = 16


def site_errors(model: onnx.ModelProto, ranges: dict[str, tuple[float, int]], data: Dataset,
                threads: int | None = None) -> tuple[dict[str, float], int]:
    """{tensor: output relative L2 error with only that tensor quantized at (scale, uint8 zero point)}, and the
    number of calibration samples it was measured on."""
    names = sorted(ranges)
    probe = _probe_model(model, names, ranges)
    sess = runtime.session(probe, threads)
    # a count fixed by the work, not by the clock, so the result does not depend on the machine's load
    count = int(np.clip(MAX_RUNS // (len(names) + 1), 1, MAX_SAMPLES))
    feeds = data.samples(count)
    mask = np.zeros(len(names), np.float32)
    reference = [sess.run(None, {**f, MASK: mask}) for f in feeds]
    errors = {}
    for i, name in enumerate(names):
        mask[:] = 0
        mask[i] = 1
        outs = [sess.run(None, {**f, MASK: mask}) for f in feeds]
        errors[name] = _relative_error(reference, outs)
    return errors, len(feeds)


def outliers(errors: dict[str, float], factor: float) -> list[str]:
    """The tensors whose error exceeds `factor` × the median error (those that turn quantization noise into much
    more output error than the typical tensor does), worst first."""
    if len(errors) < 3:
        return []
    values = np.array(list(errors.values()))
    floor = max(float(np.median(values)), 1e-12)
    return sorted((k for k, v in errors.items() if v > factor * floor), key=lambda k: -errors[k])


def _relative_error(reference: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    num = den = 0.0
    for ref, out in zip(reference, outs):
        for r, o in zip(ref, out):
            if r.dtype.kind != "f":
                continue
            num += float(np.sum((o.astype(np.float64) - r) ** 2))
            den += float(np.sum(r.astype(np.float64) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _probe_model(model: onnx.ModelProto, names: list[str], ranges: dict[str, tuple[float, int]]) -> onnx.ModelProto:
    """`model` with every tensor in `names` replaced, for its readers, by x + m[i]·(DQ(Q(x)) − x)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    graph.input.append(helper.make_tensor_value_info(MASK, onnx.TensorProto.FLOAT, [len(names)]))
    renamed = {name: f"{name}__probe" for name in names}
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in renamed:
                node.input[j] = renamed[name]
    for i, name in enumerate(names):
        scale, zero_point = ranges[name]
        p = f"{name}__probe"
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{p}_s"),
            onnx.numpy_helper.from_array(np.array(zero_point, np.uint8), f"{p}_z"),
            onnx.numpy_helper.from_array(np.array([i], np.int64), f"{p}_i")])
        graph.node.extend([
            helper.make_node("QuantizeLinear", [name, f"{p}_s", f"{p}_z"], [f"{p}_q"]),
            helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_s", f"{p}_z"], [f"{p}_dq"]),
            helper.make_node("Sub", [f"{p}_dq", name], [f"{p}_d"]),
            helper.make_node("Gather", [MASK, f"{p}_i"], [f"{p}_m"]),
            helper.make_node("Mul", [f"{p}_d", f"{p}_m"], [f"{p}_md"]),
            helper.make_node("Add", [name, f"{p}_md"], [p])])
    toposort(graph)
    return probe
