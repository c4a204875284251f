"""Running models with ONNX Runtime: sessions, batched inference over a Dataset, intermediate activations."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset, input_specs
from .errors import PassError


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory model; `threads` None means ONNX Runtime's default."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # initializers-as-inputs warnings of IR 3 models are noise here
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
        raise PassError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from exc


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
    exposed = with_outputs(model, names)
    return run(exposed, data, names, sess=session(exposed, threads, optimize=False))


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
