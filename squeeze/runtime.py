"""Running models with ONNX Runtime: sessions, batched inference over a Dataset, intermediate activations."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .data import Dataset, input_specs
from .errors import PassError
from .model import is_big, without_weights


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True,
            weights: dict[str, onnx.TensorProto] | None = None):
    """A CPU InferenceSession for an in-memory model; `threads` None means ONNX Runtime's default.

    A model over the protobuf limit is handed over without its large weights, which become graph inputs fed from
    this process's memory on every run (`WeightFedSession`); `weights` are those of a model already stripped
    that way (`without_weights(model, as_inputs=True)`).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: ORT also logs the errors it raises (we report them), and IR 3 warnings
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if weights is None and is_big(model):
        model, weights = without_weights(model, as_inputs=True)
    try:
        arrays = {name: numpy_helper.to_array(t) for name, t in (weights or {}).items()}
    except ValueError as exc:  # the bytes do not fill the declared shape
        raise PassError(f"ONNX Runtime cannot load the model: a weight does not match its shape ({exc})") from None
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
        raise PassError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from exc
    return WeightFedSession(sess, arrays) if arrays else sess


class WeightFedSession:
    """An InferenceSession whose large weights are graph inputs, added to every feed.

    ONNX Runtime reads input buffers in place, while initializers handed to it are copied: feeding the weights
    keeps one copy of them per session instead of two.
    """

    def __init__(self, sess: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self.session = sess
        self.weights = weights

    def run(self, output_names, input_feed, run_options=None):
        return self.session.run(output_names, {**input_feed, **self.weights}, run_options)

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def __getattr__(self, name):
        return getattr(self.session, name)


def run(model: onnx.ModelProto, data: Dataset, outputs: list[str] | None = None,
        threads: int | None = None, sess: ort.InferenceSession | None = None) -> dict[str, np.ndarray]:
    """Run every sample of `data` through `model`; return each requested output concatenated over samples."""
    specs = input_specs(model)
    sess = sess or session(model, threads)
    names = outputs or [o.name for o in sess.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    stacked = all(data.stacked.get(s.name, True) for s in specs)
    for feed in data.batches(specs):
        for name, value in zip(names, _run_feed(sess, names, feed)):
            chunks[name].append(value if stacked else value[None])
    return {n: np.concatenate(c, axis=0) for n, c in chunks.items()}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also exposes the named intermediate tensors as graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    return exposed


def activations(model: onnx.ModelProto, data: Dataset, names: list[str],
                threads: int | None = None) -> dict[str, np.ndarray]:
    """Values of intermediate tensors `names` on every sample of `data` (graph optimisations off, so names exist)."""
    return run(model, data, names, sess=_exposed(model, names, threads))


def _exposed(model: onnx.ModelProto, names: list[str], threads: int | None):
    """A session of `model` with graph optimisations off (so the tensor names exist) that outputs `names`."""
    weights, skeleton = None, model
    if is_big(model):  # expose the outputs on the weightless skeleton, not on a copy of every weight
        skeleton, weights = without_weights(model, as_inputs=True)
    return session(with_outputs(skeleton, names), threads, optimize=False, weights=weights)


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Partial:
    """Intermediate tensors of a model that is being edited, on fixed data, recomputing only what is unknown.

    `values` runs the smallest part of the model that yields the tensors asked for from the inputs and from the
    values it computed before (a segment of the graph, graph optimisations off as in `activations`), so asking
    for the tensors after each edit costs the edited segment, not the whole model. `forget` drops the values an
    edit changed. Values are kept per feed, the oldest dropped beyond `budget` bytes (they are recomputed when
    asked for again). A model with control-flow subgraphs or over the protobuf limit runs whole each time."""

    def __init__(self, data: Dataset, specs, threads: int | None = None, budget: int = 1 << 30):
        self.feeds = list(data.batches(specs))
        self.stacked = all(data.stacked.get(s.name, True) for s in specs)
        self.threads, self.budget = threads, budget
        self.known: dict[str, list[np.ndarray]] = {}  # tensor → value per feed, oldest first

    def values(self, model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
        missing = [n for n in names if n not in self.known]
        if missing:
            self._compute(model, missing)
        return {n: np.concatenate([v if self.stacked else v[None] for v in self.known[n]], axis=0) for n in names}

    def forget(self, names) -> None:
        for name in names:
            self.known.pop(name, None)

    def _compute(self, model: onnx.ModelProto, names: list[str]) -> None:
        fed = [n for n in names if n in self.feeds[0]] if self.feeds else []
        for name in fed:
            self.known[name] = [feed[name] for feed in self.feeds]
        names = [n for n in names if n not in fed]
        if not names:
            return
        known = {n: values[0].dtype for n, values in self.known.items()}
        segment = None if is_big(model) else _segment(model, names, known)
        if segment is None:
            sess = _exposed(model, names, self.threads)
            per_feed = [_run_feed(sess, names, feed) for feed in self.feeds]
        else:
            sess = session(segment, self.threads, optimize=False)
            inputs = [i.name for i in segment.graph.input]
            per_feed = [_run_feed(sess, names, {k: feed[k] if k in feed else self.known[k][b] for k in inputs})
                        for b, feed in enumerate(self.feeds)]
        for j, name in enumerate(names):
            self.known[name] = [values[j] for values in per_feed]
        self._evict(keep=set(names))

    def _evict(self, keep: set[str]) -> None:
        total = sum(v.nbytes for values in self.known.values() for v in values)
        for name in list(self.known):
            if total <= self.budget:
                break
            if name not in keep:
                total -= sum(v.nbytes for v in self.known.pop(name))


def _run_feed(sess, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`sess.run` on one feed; ONNX Runtime's failure as a PassError in one line."""
    try:
        return sess.run(names, feed)
    except Exception as exc:
        raise PassError(f"ONNX Runtime failed to run the model: {str(exc).splitlines()[0][:300]}") from exc


def _segment(model: onnx.ModelProto, names: list[str], known: dict[str, np.dtype]) -> onnx.ModelProto | None:
    """The part of `model` that computes `names` from its inputs and the `known` tensors (inputs of the segment,
    typed by their element type), or None when that part holds a node with a subgraph (which may read tensors of
    the outer graph by name)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input if i.name not in constants}
    kept: set[int] = set()
    boundary: list[onnx.ValueInfoProto] = []
    stack, seen = list(names), set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in known and name not in names:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(known[name]))
            boundary.append(onnx.helper.make_tensor_value_info(name, elem, None))
        elif name in graph_inputs:
            boundary.append(graph_inputs[name])
        elif name in producer:
            node = producer[name]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return None
            if id(node) not in kept:
                kept.add(id(node))
                stack.extend(node.input)
    segment = onnx.ModelProto(ir_version=model.ir_version, producer_name="squeeze-segment")
    segment.opset_import.extend(model.opset_import)
    segment.functions.extend(model.functions)
    out = segment.graph
    out.name = graph.name
    out.node.extend(node for node in graph.node if id(node) in kept)  # graph order is topological
    used = {i for node in out.node for i in node.input}
    out.initializer.extend(t for t in graph.initializer if t.name in used)
    out.input.extend(sorted(boundary, key=lambda v: v.name))
    out.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return segment
