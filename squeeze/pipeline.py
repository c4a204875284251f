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

from . import metrics, pack, runtime, verify
from .context import Context
from .data import Dataset
from .errors import PassError, SqueezeError
from .model import drop_default_attributes, serialized_bytes, subgraph_nodes, to_graph, to_model
from .spec import Call


PACK_REPORT_LIMIT = 64 * 2**20


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    steps: list[dict] = field(default_factory=list)
    failure: str | None = None
    exception: BaseException | None = None


def model_stats(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Size and compute figures recorded for the original, each pass and the final model."""
    s = metrics.summary(model, shapes)
    size = serialized_bytes(model)
    # Packing is an estimate for the report; over PACK_REPORT_LIMIT it would cost minutes and gigabytes per step.
    packed = pack.size_report(model) if size <= PACK_REPORT_LIMIT else {"packed": None}
    return {"param_count": s["params"], "bytes": {"onnx": size, **packed},
            "macs": s["macs"],
            "nodes": s["nodes"], "ops": s["ops"], "macs_not_counted": s["macs_not_counted"],
            "macs_per_node": s["macs_per_node"]}


def evaluate(model: onnx.ModelProto, data: Dataset | None, threads: int | None = None) -> dict | None:
    """Top-1 accuracy on labelled data with n and its standard error (None without labels)."""
    if data is None or data.labels is None:
        return None
    acc = verify.accuracy(runtime.run(model, data, threads=threads), data.labels)
    if acc is None:
        return None
    correct = acc.pop("correct").astype(np.float64)
    acc["stderr"] = float(correct.std(ddof=1) / np.sqrt(len(correct))) if len(correct) > 1 else None
    return acc


def apply_pass(call: Call, params: dict[str, Any], current: onnx.ModelProto, calib: Dataset,
               shapes: dict[str, tuple[int, ...]], seed: int, threads: int | None) -> tuple[onnx.ModelProto, Context]:
    """Run one pass with `params` on a fresh copy of `current`; return the verified model and the pass context.

    Raises SqueezeError (or whatever a buggy pass raises) when the pass fails or its output does not verify.
    """
    ctx = Context(calib=calib, seed=seed, model=current, input_shapes=shapes, threads=threads)
    graph = to_graph(current)
    try:
        call.entry.obj(graph, ctx, **params)
    except BaseException as exc:
        exc.squeeze_context = ctx  # type: ignore[attr-defined]  (notes survive a failure)
        raise
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    candidate = to_model(graph, like=current)
    drop_default_attributes(candidate)
    verify.check_structure(candidate)
    before = {n.name: list(n.attribute) for n in subgraph_nodes(current)}
    kept = [f"{n.op_type} {n.name!r}" for n in subgraph_nodes(candidate) if before.get(n.name) == list(n.attribute)]
    if kept:
        ctx.note(f"left {len(kept)} control-flow node(s) and their subgraphs as they were (passes do not rewrite "
                 f"subgraphs): {', '.join(kept[:10])}{' ...' if len(kept) > 10 else ''}")
    return candidate, ctx


def run_pipeline(model: onnx.ModelProto, calls: list[Call], calib: Dataset, shapes: dict[str, tuple[int, ...]],
                 seed: int = 0, eval_data: Dataset | None = None, threads: int | None = None,
                 progress: Callable[[str], None] = lambda msg: None, max_drop: float | None = None,
                 metric=None, val_data: Dataset | None = None) -> PipelineResult:
    """Apply `calls` in order; each step is verified against the model before it.

    With `max_drop`, the accuracy guard (squeeze.guard) backs a pass off until the drop from the original model
    (in `metric`'s units, a squeeze.task_metrics.Metric; by default top-1 points with labels, else disagreement)
    on `val_data` is at most `max_drop`, down to reverting the pass. `val_data` should be samples the passes do not
    fit on (squeeze.api holds out part of the calibration data); without it the guard scores `calib` itself.
    `eval_data` is only reported (each step's top-1), never used to choose.
    """
    current = model
    previous_out = runtime.run(current, calib, threads=threads)
    original_out = previous_out
    result = PipelineResult(current)
    guard = None
    if max_drop is not None:
        from .guard import Guard  # noqa: PLC0415
        val = val_data if val_data is not None else calib
        guard = Guard(model, max_drop, val, val, threads, metric)
    for index, call in enumerate(calls, 1):
        progress(f"pass {index}/{len(calls)}: {call}")
        step: dict[str, Any] = {"name": call.name, "params": call.params, "spec": str(call)}
        start = time.perf_counter()

        def attempt(params: dict[str, Any]) -> tuple[onnx.ModelProto, Context]:
            return apply_pass(call, params, current, calib, shapes, seed, threads)

        try:
            if guard is None:
                candidate, ctx = attempt(call.params)
            else:
                candidate, ctx, backoff = guard.run(call, attempt, progress)
                step["guard"] = backoff
                if backoff.get("params") is not None:
                    step["params"] = backoff["params"]
            out = runtime.run(candidate, calib, threads=threads)
        except SqueezeError as exc:
            return _fail(result, step, exc, start,
                         f"pass {call.name!r} failed: {_one_line(exc)}{_already_broken(exc, current)}")
        except Exception as exc:  # a bug in a pass must not lose the user's work
            exc.add_note(f"in pass {call.name!r}")
            return _fail(result, step, exc, start, f"pass {call.name!r} failed with {type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0] if str(exc) else ''}")
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


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _already_broken(exc: SqueezeError, model: onnx.ModelProto) -> str:
    """A hint when the model the pass started from fails the same structural check (the pass is not to blame)."""
    if not str(exc).startswith("model fails the ONNX checker"):
        return ""
    try:
        verify.check_structure(model)
    except PassError as before:
        if str(before) == str(exc):
            return " (the input model already fails this check: repair or re-export it)"
    return ""


def _fail(result: PipelineResult, step: dict, exc: BaseException, start: float, message: str) -> PipelineResult:
    step["seconds"] = round(time.perf_counter() - start, 4)
    step["failed"] = message
    ctx = getattr(exc, "squeeze_context", None)
    step["notes"] = ctx.notes if ctx is not None else []
    result.steps.append(step)
    result.failure = message
    result.exception = exc
    return result
