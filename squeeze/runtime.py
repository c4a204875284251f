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
        try:
            result = sess.run(names, feed)
        except Exception as exc:
            raise PassError(f"ONNX Runtime failed to run the model: {str(exc).splitlines()[0][:300]}") from exc
        for name, value in zip(names, result):
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
    weights, skeleton = None, model
    if is_big(model):  # expose the outputs on the weightless skeleton, not on a copy of every weight
        skeleton, weights = without_weights(model, as_inputs=True)
    exposed = with_outputs(skeleton, names)
    return run(model, data, names, sess=session(exposed, threads, optimize=False, weights=weights))


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
