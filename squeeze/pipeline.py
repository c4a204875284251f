"""The pass manager: run each pass on its own copy of the graph, then clean up, verify, and record.

After each pass: cleanup + toposort, export, `onnx.checker` (full) with strict shape inference, then fidelity
against the previous model on the calibration inputs (ONNX Runtime). A pass that raises or produces an invalid
model stops the pipeline; the last good model is kept and returned with the failure recorded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from . import metrics, runtime, verify
from .context import Context
from .data import Dataset
from .errors import PassError, SqueezeError
from .model import serialized_bytes, to_graph, to_model
from .spec import Call


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    steps: list[dict] = field(default_factory=list)
    failure: str | None = None
    exception: BaseException | None = None


def model_stats(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Size and compute figures recorded for the original, each pass and the final model."""
    s = metrics.summary(model, shapes)
    return {"param_count": s["params"], "bytes": {"onnx": serialized_bytes(model)}, "macs": s["macs"],
            "nodes": s["nodes"], "ops": s["ops"], "macs_not_counted": s["macs_not_counted"],
            "macs_per_node": s["macs_per_node"]}


def evaluate(model: onnx.ModelProto, data: Dataset | None, threads: int | None = None) -> dict | None:
    """Top-1 accuracy on labelled data (None without labels)."""
    if data is None or data.labels is None:
        return None
    acc = verify.accuracy(runtime.run(model, data, threads=threads), data.labels)
    return None if acc is None else {k: v for k, v in acc.items() if k != "correct"}


def run_pipeline(model: onnx.ModelProto, calls: list[Call], calib: Dataset, shapes: dict[str, tuple[int, ...]],
                 seed: int = 0, eval_data: Dataset | None = None, threads: int | None = None,
                 progress: Callable[[str], None] = lambda msg: None) -> PipelineResult:
    """Apply `calls` in order; each step is verified against the model before it."""
    current = model
    previous_out = runtime.run(current, calib, threads=threads)
    original_out = previous_out
    result = PipelineResult(current)
    for index, call in enumerate(calls, 1):
        progress(f"pass {index}/{len(calls)}: {call}")
        ctx = Context(calib=calib, seed=seed, model=current, input_shapes=shapes, threads=threads)
        step: dict[str, Any] = {"name": call.name, "params": call.params, "spec": str(call)}
        start = time.perf_counter()
        try:
            graph = to_graph(current)
            call.entry.obj(graph, ctx, **call.params)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            candidate = to_model(graph, like=current)
            verify.check_structure(candidate)
            out = runtime.run(candidate, calib, threads=threads)
        except SqueezeError as exc:
            return _fail(result, step, ctx, start, f"pass {call.name!r} failed: {exc}")
        except Exception as exc:  # a bug in a pass must not lose the user's work
            exc.add_note(f"in pass {call.name!r}")
            return _fail(result, step, ctx, start, f"pass {call.name!r} failed with {type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0] if str(exc) else ''}", exc)
        step["seconds"] = round(time.perf_counter() - start, 4)
        step.update(model_stats(candidate, shapes))
        step["fidelity"] = verify.fidelity(previous_out, out)
        step["fidelity_vs_original"] = verify.fidelity(original_out, out)
        accuracy = evaluate(candidate, eval_data, threads)
        if accuracy is not None:
            step["accuracy"] = accuracy
        step["notes"] = ctx.notes
        if ctx.details:
            step["details"] = ctx.details
        result.steps.append(step)
        result.model = current = candidate
        previous_out = out
    return result


def _fail(result: PipelineResult, step: dict, ctx: Context, start: float, message: str,
          exc: BaseException | None = None) -> PipelineResult:
    step["seconds"] = round(time.perf_counter() - start, 4)
    step["failed"] = message
    step["notes"] = ctx.notes
    result.steps.append(step)
    result.failure = message
    result.exception = exc
    return result
