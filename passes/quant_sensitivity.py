"""Which activation tensors `quant` can quantize without hurting the model: measured, one tensor at a time.

A tensor's own quantization noise (its SQNR) says little about what the noise does downstream: a few tensors
(before a Softmax, a normalisation, a detection head) turn a small error into a large one. `site_errors` measures,
for every candidate tensor alone, the relative L2 error of the model's outputs on calibration samples when that
tensor is quantized to uint8 and all else stays float — the "one layer at a time" sensitivity of
HAWQ/ZeroQ-style mixed-precision searches, done here with ONNX Runtime on one model: every candidate becomes
x + m[i]·(DQ(Q(x)) − x), with m a graph input, so one session serves all candidates (m one-hot per run).
`outliers` then picks the tensors whose error stands far above the others, and `validated_float` keeps float only
those of them that, on held-out calibration samples (not the ones measured above), make the whole quantized model's
error smaller by a real margin: every tensor kept float breaks ONNX Runtime's int8 fusion of the layers around it,
so one is given up only where that is measured to pay.
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
HELD_OUT = 16           # calibration samples (the last ones) that validate the kept-float choice
MIN_GAIN = 0.1          # a tensor stays float only if that lowers the held-out error by this fraction


class Probe:
    """One ONNX Runtime session of the model in which any subset of `ranges`' tensors is quantized (a mask input)."""

    def __init__(self, model: onnx.ModelProto, ranges: dict[str, tuple[float, int]], threads: int | None = None):
        self.names = sorted(ranges)
        self.sess = runtime.session(_probe_model(model, self.names, ranges), threads)

    def outputs(self, feeds: list[dict], quantized: set[str]) -> list[list[np.ndarray]]:
        mask = np.array([name in quantized for name in self.names], np.float32)
        return [self.sess.run(None, {**f, MASK: mask}) for f in feeds]


def site_errors(model: onnx.ModelProto, ranges: dict[str, tuple[float, int]], data: Dataset,
                threads: int | None = None, probe: Probe | None = None) -> tuple[dict[str, float], int]:
    """{tensor: output relative L2 error with only that tensor quantized at (scale, uint8 zero point)}, and the
    number of calibration samples it was measured on (the first ones)."""
    probe = probe or Probe(model, ranges, threads)
    # a count fixed by the work, not by the clock, so the result does not depend on the machine's load
    count = int(np.clip(MAX_RUNS // (len(probe.names) + 1), 1, MAX_SAMPLES))
    feeds = data.samples(count)
    reference = probe.outputs(feeds, set())
    errors = {name: _relative_error(reference, probe.outputs(feeds, {name})) for name in probe.names}
    return errors, len(feeds)


def validated_float(probe: Probe, candidates: list[str], data: Dataset, min_gain: float = MIN_GAIN
                    ) -> tuple[list[str], list[float]]:
    """Greedy, worst candidate first: keep a tensor float when the error of the model with everything else
    quantized, on the last HELD_OUT calibration samples, drops by at least `min_gain` of its current value.
    Returns the tensors kept float and the held-out error after each accepted step (the first: all quantized)."""
    n = len(data)
    held = data.subset(max(0, n - HELD_OUT)) if n > 1 else data
    feeds = held.samples(len(held))
    reference = probe.outputs(feeds, set())
    quantized = set(probe.names)
    trace = [_relative_error(reference, probe.outputs(feeds, quantized))]
    kept = []
    for name in candidates:
        error = _relative_error(reference, probe.outputs(feeds, quantized - {name}))
        if error < (1 - min_gain) * trace[-1]:
            quantized.discard(name)
            kept.append(name)
            trace.append(error)
    return kept, trace


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
