"""Hessian-trace sensitivity (HAWQ-V2 style): a cheap proxy for the measured per-layer codebook loss.

HAWQ-V2 (Dong et al., NeurIPS 2020) ranks layers by the average Hessian trace Tr(H)/n of the loss with respect to
their weights and predicts the loss of quantizing a layer as Ω = ½ · Tr(H)/n · ‖Q(W) − W‖². Here the loss is the
one the goal tables measure (`squeeze.verify.output_loss`: KL divergence of the class scores, else relative
squared error, against the unmodified model's outputs on the same samples), and the trace comes from ONNX
Runtime alone, without gradients:

- At the unmodified weights that loss is 0 and minimal, so its gradient is 0 and, for a small step,
  L(W + εv) ≈ ½ ε² vᵀHv. Averaging +ε and −ε cancels any odd term that is left (float noise in the reference):
  vᵀHv ≈ (L(W + εv) + L(W − εv)) / ε².
- Hutchinson: for Rademacher v (±1 entries), E[vᵀHv] = Tr(H); `probes` draws are averaged, divided by n.
- ε is relative to the weight's RMS (`eps`, default 1e-3 · rms). On the first probe the step is doubled as a
  check: in the quadratic regime L(±2ε) = 4 · L(±ε); the ratio found is reported per layer
  (`TraceEstimate.quadratic_ratio`), and if it is off by more than `QUADRATIC_TOL` the step is shrunk (×¼, up to
  `MAX_SHRINK` times) and the probe redone.
- Each layer's weight becomes an overridable graph input of one ONNX Runtime session (the initializer is kept as
  its default and also listed as an input), so the probes only feed a perturbed array: no session is rebuilt per
  probe. The reference outputs come from that same session with the weight unperturbed, so L(W) is exactly 0.

    traces = trace_per_param(model, ["/fc1/Gemm"], holdout, probes=8)         # {layer: Tr(H)/n}
    omega = predicted_loss(traces["/fc1/Gemm"], w, w_clustered)              # ½·Tr(H)/n·‖ΔW‖²
    proxy = codebook_proxy(model, holdout, CODEBOOK_BITS, seed=0, threads=2)  # {layer: [0.0, Ω at each bits]}

`codebook_proxy` has the layout of `goal.measure_tables`' codebook knobs (`Knob("codebook", name,
[0, *bits], loss)`): pass it the held-out calibration samples `goal.table_samples(calib)` to predict the same numbers.
It predicts the *uncompensated* codebook (plain k-means, `compensate=False`); the pass's least-squares refit and
bias correction lower the real loss by a layer-dependent factor that the proxy does not model.

Per channel (`channel_traces`, HAP's sensitivity for pruning — Yu et al. 2022, "Hessian-Aware Pruning and
Optimal Neural Implant"): Tr(H_cc), the trace of the Hessian block of one output channel's weights (summed over
every weight that writes that channel, e.g. both sides of a residual Add), by the same probes with v nonzero on
that channel only — 2·probes runs per channel, so callers bound the samples and probes (prune: 64 and ≤ 2).

On digits_cnn (tests/test_hessian.py, 64 held-out samples, 6 layers × bits 2,3,4,5,6,8) the Spearman rank
correlation of Ω with the measured loss is 0.96 (compensate=False) and 0.98 (compensate=True); the median
ratio Ω / measured is 1.0 (uncompensated), 90% of the pairs within 3.5×. Limits: Ω is second order, so at 2 bits
it can under-predict by 10× or more (fc1 at 2 bits: 1e-5 predicted, 3e-4 measured); it assumes H isotropic
within a layer (only the trace is used). Cost: 2·probes + 3 runs of `data` per layer plus one session per layer,
against one run per bit width for the uncompensated measurement — the proxy pays off against the compensated
measurement (the goal tables: a calibration pass and a least-squares refit per layer and bit width), or when
many bit widths or candidate quantizers share one trace. A weight shared by several layers is perturbed for
all of them (its trace is that of the shared tensor).
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from squeeze import runtime, verify
from squeeze.data import Dataset, input_specs
from squeeze.errors import PassError
from squeeze.model import to_graph

DEFAULT_EPS = 1e-3      #: finite-difference step, relative to the weight's RMS
QUADRATIC_TOL = 0.25    #: L(2ε) / L(ε) must be within 4·(1 ± this) to count as quadratic
MAX_SHRINK = 2          #: times ε is divided by 4 when the check fails


@dataclass
class TraceEstimate:
    """One layer's estimate. `samples`: vᵀHv/n per probe; `quadratic_ratio`: L(±2ε)/L(±ε) on the first probe
    (4 in the quadratic regime; nan when the loss did not move)."""

    layer: str
    weight: str
    params: int
    eps: float
    samples: list[float] = field(default_factory=list)
    quadratic_ratio: float = float("nan")
    shrinks: int = 0
    seconds: float = 0.0

    @property
    def trace_per_param(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of the mean over the probes."""
        n = len(self.samples)
        return float(np.std(self.samples, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")

    @property
    def quadratic(self) -> bool:
        return bool(abs(self.quadratic_ratio / 4.0 - 1.0) <= QUADRATIC_TOL)


# ---------------------------------------------------------------------------------------------- layers


def clusterable_layers(model: onnx.ModelProto):
    """The weight layers `goal.measure_tables` makes codebook knobs for (float constant, ≥ 2 finite values)."""
    from .weights import find_layers  # noqa: PLC0415
    return [l for l in find_layers(to_graph(model)) if l.values is not None and l.values.size >= 2
            and np.isfinite(l.values).all()]


def _resolve(model: onnx.ModelProto, layers) -> list:
    everything = clusterable_layers(model)
    if layers is None:
        return everything
    by_name = {l.name: l for l in everything}
    chosen = []
    for item in layers:
        name = item if isinstance(item, str) else item.name
        if name not in by_name:
            raise PassError(f"hessian: {name!r} is not a weight layer with a float constant weight; layers: "
                            + ", ".join(by_name))
        chosen.append(by_name[name])
    return chosen


# ---------------------------------------------------------------------------------------------- sessions


class _Probe:
    """One ONNX Runtime session of `model` with the initializer(s) `weights` overridable, and the loss of any value
    of them against the outputs at their original values, on `data`."""

    def __init__(self, model: onnx.ModelProto, weights: str | Sequence[str], data: Dataset, threads: int | None):
        self._loss = verify.output_loss
        names = [weights] if isinstance(weights, str) else list(dict.fromkeys(weights))
        inits = {t.name: t for t in model.graph.initializer if t.name in names}
        missing = [n for n in names if n not in inits]
        if missing:
            raise PassError(f"hessian: weight {missing[0]!r} is not an initializer of the main graph")
        self.originals = {n: numpy_helper.to_array(inits[n]) for n in names}
        self.original = self.originals[names[0]]
        self.weight = names[0]
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        if exposed.ir_version < 4:
            # IR 3 lists every initializer among the inputs, and ONNX Runtime folds them as constants (feeding one
            # fails: "Invalid input name"). Under IR 4 an initializer listed as an input is an overridable default:
            # keep only the probed ones listed, the others become plain constants again.
            exposed.ir_version = 4
            initializers = {t.name for t in exposed.graph.initializer}
            kept = [i for i in exposed.graph.input if i.name in names or i.name not in initializers]
            del exposed.graph.input[:]
            exposed.graph.input.extend(kept)
        inputs = {i.name for i in exposed.graph.input}
        for n in names:
            if n not in inputs:
                exposed.graph.input.append(onnx.helper.make_tensor_value_info(n, inits[n].data_type,
                                                                              list(inits[n].dims)))
        self.session = runtime.session(exposed, threads)
        specs = input_specs(model)
        self.stacked = all(data.stacked.get(s.name, True) for s in specs)
        self.feeds = list(data.batches(specs))
        self.names = [o.name for o in self.session.get_outputs()]
        self.runs = 0
        self.reference = self.outputs(self.originals)

    def outputs(self, values: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs with the weight (an array) or weights (a dict by name; others keep their value)."""
        if not isinstance(values, dict):
            values = {self.weight: values}
        sess, extra = self.session, {}
        if isinstance(sess, runtime.WeightFedSession):  # its own weights would override ours in its run()
            sess, extra = sess.session, sess.weights
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        fed = {n: np.ascontiguousarray(values.get(n, w), dtype=w.dtype) for n, w in self.originals.items()}
        self.runs += 1
        for feed in self.feeds:
            try:
                result = sess.run(self.names, {**extra, **feed, **fed})
            except Exception as exc:
                raise PassError(f"ONNX Runtime failed to run the model: {str(exc).splitlines()[0][:300]}") from exc
            for name, value in zip(self.names, result):
                chunks[name].append(value if self.stacked else value[None])
        return {n: np.concatenate(c, axis=0) for n, c in chunks.items()}

    def loss(self, values: np.ndarray | dict[str, np.ndarray]) -> float:
        return self._loss(self.reference, self.outputs(values))


def _curvature(loss_at: Callable[[float], float], est, check: bool) -> tuple[float, float]:
    """(vᵀHv, step) along one direction v by central differences: `loss_at(t)` is the loss at W + t·v, the step
    `est.eps`. With `check`, the step is first tested (L(±2ε) = 4·L(±ε) in the quadratic regime; the ratio goes to
    `est.quadratic_ratio`) and divided by 4 (`est.shrinks`, up to MAX_SHRINK times) while it fails."""
    while True:
        step = est.eps
        pair = loss_at(step) + loss_at(-step)
        if not check:
            break
        double = loss_at(2 * step) + loss_at(-2 * step)
        est.quadratic_ratio = double / pair if pair > 0 else float("nan")
        if abs(est.quadratic_ratio / 4.0 - 1.0) <= QUADRATIC_TOL or pair <= 0 or est.shrinks >= MAX_SHRINK:
            break
        est.eps /= 4.0
        est.shrinks += 1
    return pair / step ** 2, step


# ---------------------------------------------------------------------------------------------- traces


def estimate(model: onnx.ModelProto, layers: Iterable | None, data: Dataset, *, probes: int = 8, seed: int = 0,
             threads: int | None = None, eps: float = DEFAULT_EPS) -> dict[str, TraceEstimate]:
    """Per layer (names or `Layer`s; None: every clusterable layer), the Hutchinson estimate of Tr(H)/n of the
    output loss on `data` w.r.t. the layer's weight, by central finite differences (module docstring)."""
    if probes < 1:
        raise ValueError("probes must be at least 1")
    out: dict[str, TraceEstimate] = {}
    for layer in _resolve(model, layers):
        start = time.perf_counter()
        probe = _Probe(model, layer.weight.name, data, threads)
        w = probe.original.astype(np.float64)
        n = w.size
        rms = float(np.sqrt(np.mean(w ** 2))) or 1.0
        est = TraceEstimate(layer.name, layer.weight.name, int(n), eps * rms)
        rng = np.random.default_rng([seed, zlib.crc32(layer.weight.name.encode())])
        for i in range(probes):
            v = rng.integers(0, 2, size=w.shape) * 2.0 - 1.0
            curvature, _ = _curvature(lambda t, probe=probe, w=w, v=v: probe.loss(w + t * v), est, check=i == 0)
            est.samples.append(curvature / n)
        est.seconds = round(time.perf_counter() - start, 3)
        out[layer.name] = est
    return out


def trace_per_param(model: onnx.ModelProto, layers: Iterable | None, data: Dataset, *, probes: int = 8,
                    seed: int = 0, threads: int | None = None, eps: float = DEFAULT_EPS) -> dict[str, float]:
    """{layer name: Tr(H)/n} — see `estimate` for the details (ε, the quadratic check, stderr)."""
    return {name: e.trace_per_param for name, e in estimate(model, layers, data, probes=probes, seed=seed,
                                                             threads=threads, eps=eps).items()}


def predicted_loss(trace_per_param: float, w: np.ndarray, w_quantized: np.ndarray) -> float:
    """HAWQ-V2's Ω = ½ · Tr(H)/n · ‖Q(W) − W‖²."""
    diff = np.asarray(w_quantized, np.float64) - np.asarray(w, np.float64)
    return 0.5 * float(trace_per_param) * float(np.sum(diff * diff))


# ---------------------------------------------------------------------------------------------- channels


@dataclass(frozen=True)
class ChannelSlice:
    """Where channels of a block live in one weight: channel c (start ≤ c < start + length) is index
    offset + c − start along `axis` of the initializer `weight` (a Conv's output filters: axis 0)."""

    weight: str
    axis: int
    start: int
    offset: int
    length: int


@dataclass
class ChannelTraces:
    """One block's per-channel estimate. `samples[p, c]`: v_cᵀ H_cc v_c of probe p (v_c Rademacher on channel c's
    weights in every slice, nothing else perturbed), whose mean is Tr(H_cc); `params[c]`: n_c, the weights of
    channel c; `quadratic_ratio` and `shrinks` as in `TraceEstimate` (checked on the block's first channel)."""

    block: str
    params: np.ndarray
    eps: float
    samples: np.ndarray
    quadratic_ratio: float = float("nan")
    shrinks: int = 0
    runs: int = 0
    seconds: float = 0.0

    @property
    def trace(self) -> np.ndarray:
        """Tr(H_cc) per channel."""
        return self.samples.mean(axis=0) if len(self.samples) else np.zeros(len(self.params))

    @property
    def trace_per_param(self) -> np.ndarray:
        """Tr(H_cc) / n_c per channel."""
        return self.trace / np.maximum(self.params, 1)


def channel_traces(model: onnx.ModelProto, blocks: dict[str, Sequence[ChannelSlice]], sizes: dict[str, int],
                   data: Dataset, *, probes: int = 2, seed: int = 0, threads: int | None = None,
                   eps: float = DEFAULT_EPS) -> dict[str, ChannelTraces]:
    """Per block (e.g. a prune channel group: every weight that writes its channels) and per channel c of its
    `sizes[block]` channels, the Hutchinson estimate of Tr(H_cc): the trace of the diagonal block of the output
    loss's Hessian that belongs to channel c's weights in all the block's slices (the sum of their traces), by the
    same central differences as `estimate`, with v nonzero on channel c only. One session per block with all its
    weights overridable; cost: 2·probes runs of `data` per channel, plus the step check on the first channel.
    The step is `eps` times the RMS of the block's weights, the same for all its channels."""
    if probes < 1:
        raise ValueError("probes must be at least 1")
    out: dict[str, ChannelTraces] = {}
    for name, slices in blocks.items():
        start = time.perf_counter()
        probe = _Probe(model, [s.weight for s in slices], data, threads)
        base = {w: a.astype(np.float64) for w, a in probe.originals.items()}
        size = sizes[name]
        params = np.zeros(size, np.int64)
        norms = np.zeros(size)
        for s in slices:
            w = base[s.weight]
            params[s.start:s.start + s.length] += w.size // w.shape[s.axis]
            rows = np.moveaxis(np.take(w, np.arange(s.offset, s.offset + s.length), axis=s.axis), s.axis, 0)
            norms[s.start:s.start + s.length] += (rows.reshape(s.length, -1) ** 2).sum(axis=1)
        rms = float(np.sqrt(norms.sum() / max(int(params.sum()), 1))) or 1.0
        est = ChannelTraces(name, params, eps * rms, np.zeros((probes, size)))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        first = int(np.argmax(norms))  # the step is checked on the largest channel (a dead one would not move)
        checked = False
        for c in [first] + [c for c in range(size) if c != first]:
            parts = [(s, s.offset + c - s.start) for s in slices if s.start <= c < s.start + s.length]
            if not parts:
                continue
            for i in range(probes):
                directions = []
                for s, index in parts:
                    shape = list(base[s.weight].shape)
                    shape[s.axis] = 1
                    directions.append((s, index, rng.integers(0, 2, size=shape) * 2.0 - 1.0))

                def loss_at(t: float, probe=probe, base=base, directions=directions) -> float:
                    values = {w: a.copy() for w, a in base.items()}
                    for s, index, v in directions:
                        where = [slice(None)] * v.ndim
                        where[s.axis] = slice(index, index + 1)
                        values[s.weight][tuple(where)] += t * v
                    return probe.loss(values)
                est.samples[i, c], _ = _curvature(loss_at, est, check=not checked)
                checked = True
        est.runs = probe.runs
        est.seconds = round(time.perf_counter() - start, 3)
        out[name] = est
    return out


# ---------------------------------------------------------------------------------------------- codebook


def clustered(w: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """`w` as the codebook pass clusters it at `bits` index bits without compensation (unit=weight)."""
    from .codebook import cluster  # noqa: PLC0415
    centroids, labels, _ = cluster(w.reshape(-1, 1).astype(np.float64), 1 << int(bits), seed)
    return centroids.astype(w.dtype)[labels].reshape(w.shape)


def codebook_proxy(model: onnx.ModelProto, data: Dataset, bits_list: Sequence[int], *, seed: int = 0,
                   threads: int | None = None, probes: int = 8, eps: float = DEFAULT_EPS,
                   traces: dict[str, float] | None = None) -> dict[str, list[float]]:
    """{layer: [0.0, Ω at bits_list[0], Ω at bits_list[1], ...]} for every clusterable layer: the predicted
    output loss of clustering that layer alone (plain k-means as `codebook` does with compensate=False, seed
    `seed`), in the layout of `goal.measure_tables`' codebook knobs (choices [0, *bits_list]). `data`: the
    samples the loss is predicted on (goal: `table_samples(calib)`); `traces`: precomputed Tr(H)/n per layer."""
    layers = clusterable_layers(model)
    if traces is None:
        traces = trace_per_param(model, layers, data, probes=probes, seed=seed, threads=threads, eps=eps)
    out: dict[str, list[float]] = {}
    for layer in layers:
        w = layer.values
        out[layer.name] = [0.0] + [predicted_loss(traces[layer.name], w, clustered(w, bits, seed))
                                   for bits in bits_list]
    return out
