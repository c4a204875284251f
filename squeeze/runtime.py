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
            weights: dict[str, onnx.TensorProto] | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory model; `threads` None means ONNX Runtime's default.

    A model over the protobuf limit is handed over without its large weights, which ONNX Runtime then reads from
    this process's memory (external initializers); `weights` are those of a model already stripped that way.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # initializers-as-inputs warnings of IR 3 models are noise here
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if weights is None and is_big(model):
        model, weights = without_weights(model)
    arrays = []
    if weights:
        opts.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
        arrays = [numpy_helper.to_array(t) for t in weights.values()]
        opts.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
        raise PassError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from exc
    sess.squeeze_weights = arrays  # ONNX Runtime reads them in place: they live as long as the session
    return sess


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
    weights = None
    if is_big(model):  # expose the outputs on the weightless skeleton, not on a copy of every weight
        model, weights = without_weights(model)
    exposed = with_outputs(model, names)
    return run(exposed, data, names, sess=session(exposed, threads, optimize=False, weights=weights))


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
