"""The Python API, used by the CLI too (one code path):

    result = squeeze.compress("model.onnx", passes="cleanup,fold-bn", eval="test.npz", targets="cpu")
    result.model          # the compressed onnx.ModelProto
    result.report         # the report dict (report.json's content)
    result.save("out/")   # model.onnx, report.json, report.md
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from . import __version__, canonical, report as report_mod, runtime, verify
from .data import Dataset, input_specs, load_npz, parse_shape_overrides, resolve_shapes, synthesize
from .errors import ModelLoadError, OutputError, PassError, SqueezeError, TargetError
from .model import file_bytes, load_model, save_model, serialized_bytes, sha256
from .outdir import OutputDir
from .pipeline import evaluate, model_stats, run_pipeline
from .registry import get_pass, get_target
from .spec import Call, bind
from .task_metrics import Metric, Scorer, check_data, resolve_metric
from .timing import time_calls

SYNTHETIC_SAMPLES = 32
CHECK_SAMPLES = 8


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict
    failure: str | None = None
    exception: BaseException | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write model.onnx, report.json and report.md into `out_dir` (atomically, each file)."""
        with OutputDir(Path(out_dir), force=force) as out:
            assert out.staging is not None
            save_model(self.model, out.staging / "model.onnx")
            self.report["final"]["bytes"]["file"] = file_bytes(out.staging / "model.onnx")
            report_mod.write(self.report, out.staging)
            self.files = out.commit()
        return Path(out_dir)

    def raise_for_failure(self) -> None:
        if self.failure:
            raise PassError(self.failure)


def compress(model: str | os.PathLike | onnx.ModelProto, passes: str | Iterable[str] = "", *,
             calib: str | os.PathLike | Dataset | None = None, eval: str | os.PathLike | Dataset | None = None,
             targets: str | Iterable[str] = "cpu", seed: int = 0,
             input_shapes: dict[str, tuple[int, ...]] | list[str] | None = None, threads: int | None = None,
             runs: int = 50, out_dir: str | os.PathLike | None = None, force: bool = False,
             max_drop: float | None = None, progress: Callable[[str], None] | None = None,
             rpc: str | None = None, tracker: str | None = None, key: str | None = None,
             tune: int | None = None, tune_cache: str | None = None, batch: int | None = None,
             goal: str | None = None,
             metric: "str | Metric | Callable | None" = None) -> Result:
    """Run the pass pipeline on `model`, verify every step, compile and measure the result on `targets`.

    With `goal` ("size=8x", "bytes=200k", "macs=0.5", "latency=1.5x@cpu"; see squeeze.goal), `passes` run first,
    then per-layer prune/codebook strengths are allocated to meet the goal within `max_drop` and appended.

    `batch` (cpu): also measure inferences/s on all cores at batch 1 and at this batch (the row's `throughput`).

    `metric` is the task metric of the report, `max_drop` and `goal` (squeeze.task_metrics): a name such as "top1",
    "ctc:dict.txt", "mask-iou:0.2", "agreement", "rel-l2", "attribution", a Metric, or a callable
    `fn(outputs, data) -> number or per-sample array` (higher is better). Default: top1 with labels, else agreement.

    With `out_dir`, the compressed model is saved as soon as the passes finish (the last good model if a
    pass fails), then the report. Bad input raises a SqueezeError subclass with a one-line message.
    """
    started = time.perf_counter()
    say = progress or (lambda msg: None)
    pass_calls = bind(_join(passes), get_pass)
    target_calls = bind(_join(targets), get_target)
    task_metric = resolve_metric(metric, None if isinstance(model, onnx.ModelProto) else Path(model))
    goal_spec = None
    if goal:
        from .goal import parse_goal  # noqa: PLC0415
        goal_spec = parse_goal(goal)
        latency = goal_spec.latency
        if latency is not None and not any(str(c) == latency.target or c.name == latency.target for c in target_calls):
            target_calls += bind(latency.target, get_target)  # the report shows the speed-up the goal asked for
    _target_defaults(target_calls, tune=tune, tune_cache=tune_cache, batch=batch)
    runner = None
    if rpc or tracker or key:  # a device over TVM RPC for the targets that can use one (targets/remote.py)
        from squeeze.targets.remote import Runner  # noqa: PLC0415
        runner = Runner.from_args(rpc, tracker, key)
    if goal_spec is not None and goal_spec.latency is not None:
        _check_real_timing(goal_spec.latency.target, target_calls, runner)

    source_path: Path | None = None
    if isinstance(model, onnx.ModelProto):
        if any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.external_data_helper._get_all_tensors(model)):
            # Its locations were never checked, and they would be read relative to the working directory.
            raise ModelLoadError("the model refers to external data; pass its path instead (squeeze checks where "
                                 "external data may be read from), or load the data first")
        original = model
    else:
        source_path = Path(model)
        say(f"loading {source_path}")
        original = load_model(source_path)
    source_hash = sha256(source_path) if source_path else None
    specs = input_specs(original)
    overrides = parse_shape_overrides(input_shapes) if isinstance(input_shapes, list) else dict(input_shapes or {})
    calib_data = _dataset(calib, specs, overrides)
    eval_data = _dataset(eval, specs, overrides)
    shapes = resolve_shapes(specs, overrides, calib_data or eval_data)
    if calib_data is None:
        calib_data = synthesize(specs, shapes, SYNTHETIC_SAMPLES, seed)
    for data in (calib_data, eval_data):
        if data is not None:
            _check_fits(data, specs, shapes)
    if task_metric is not None:
        check_data(task_metric, eval_data or calib_data)
    if goal_spec is not None and calib_data.source.startswith("synthetic"):
        from .goal import NEEDS_CALIB  # noqa: PLC0415
        raise SqueezeError(NEEDS_CALIB)  # before the output folder exists: a user error writes nothing
    if max_drop is not None and max_drop < 0:
        raise SqueezeError("--max-drop must be a non-negative number of points")
    job = dict(original=original, source_path=source_path, source_hash=source_hash, specs=specs, shapes=shapes,
               calib_data=calib_data, eval_data=eval_data, pass_calls=pass_calls, target_calls=target_calls,
               seed=seed, threads=threads, runs=runs, max_drop=max_drop, say=say, started=started, runner=runner,
               goal=goal_spec, metric=task_metric)
    if out_dir is None:
        return _run_job(None, **job)
    # Only now that the inputs are known to be good: a failed run must not leave an empty output folder behind.
    with OutputDir(Path(out_dir), force=force) as out:
        result = _run_job(out.staging, **job)
        result.files = out.commit()
    return result


def _run_job(stage: Path | None, *, original, source_path, source_hash, specs, shapes, calib_data, eval_data,
             pass_calls, target_calls, seed, threads, runs, max_drop, say, started, runner=None, goal=None,
             metric=None) -> Result:
    """Everything after the inputs are validated; files go to `stage` (committed by the caller)."""
    say("measuring the original model")
    original_stats = model_stats(original, shapes)
    original_stats["bytes"]["file"] = file_bytes(source_path) if source_path else serialized_bytes(original)
    original_accuracy = evaluate(original, eval_data, threads)
    reference = eval_data or calib_data
    scorer = Scorer(metric, original, reference, threads)  # the task metric: report, guard and goal

    say("canonicalizing the model (lossless front end)")
    canonical_model, front_end = canonical.canonicalize(original, calib_data, threads)
    goal_report, guard_drop = None, max_drop
    if goal is not None:
        from . import goal as goal_mod  # noqa: PLC0415
        start = canonical_model
        if pass_calls:  # the goal allocates on what --passes made of the model
            pre = run_pipeline(canonical_model, pass_calls, calib_data, shapes, seed=seed, threads=threads,
                               progress=say)
            start = pre.model
        try:
            found = goal_mod.search(start, goal, calib_data, shapes, original=original, seed=seed,
                                    threads=threads, max_drop=max_drop, guard_data=eval_data, say=say, runner=runner,
                                    metric=scorer.metric)
        except SqueezeError:
            raise
        except Exception as exc:  # a bug in the search: one line for the user, the traceback with --debug
            raise SqueezeError(f"--goal search failed with {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        goal_report = found.report
        pass_calls = list(pass_calls) + found.calls
        guard_drop = None  # the search kept the drop within max_drop; a guard now would undo the allocation
    result = run_pipeline(canonical_model, pass_calls, calib_data, shapes, seed=seed, eval_data=eval_data,
                          threads=threads, progress=say, max_drop=guard_drop, metric=scorer.metric)
    # With no passes the report measures the model as it is; otherwise passes start from the canonical form.
    final = result.model if pass_calls else original
    final_stats = model_stats(final, shapes)
    if stage is not None:
        save_model(final, stage / "model.onnx")
        final_stats["bytes"]["file"] = file_bytes(stage / "model.onnx")
    else:
        final_stats["bytes"]["file"] = serialized_bytes(final)

    say("comparing the final model with the original")
    final_outputs = runtime.run(final, reference, threads=threads) if pass_calls else scorer.reference.outputs
    final_fidelity = verify.fidelity(scorer.reference.outputs, final_outputs) if pass_calls else None
    final_score = scorer.score(final, final_outputs) if pass_calls else scorer.original
    final_accuracy = evaluate(final, eval_data, threads) if pass_calls else original_accuracy

    report: dict[str, Any] = {
        "squeeze_version": __version__,
        "model": {"path": str(source_path) if source_path else None, "sha256": source_hash,
                  "inputs": {s.name: list(shapes[s.name]) for s in specs}},
        "seed": seed,
        "data": {"calib": calib_data.source, "calib_samples": len(calib_data), "calib_synthetic":
                 calib_data.source.startswith("synthetic"),
                 "eval": eval_data.source if eval_data else None, "eval_samples": len(eval_data) if eval_data else 0},
        "front_end": front_end,
        "pass_spec": ",".join(str(c) for c in pass_calls),
        "max_drop": max_drop,
        "original": original_stats,
        "final": final_stats,
        "passes": result.steps,
        "fidelity": final_fidelity,
        "failure": result.failure,
        "environment": _environment(threads),
    }
    if goal_report is not None:
        report["goal"] = goal_report
    report["metric"] = scorer.block(final_score)
    if original_accuracy is not None:
        report["accuracy"] = {"original": original_accuracy, "final": final_accuracy,
                              "drop_pts": round(100 * (original_accuracy["top1"] - final_accuracy["top1"]), 4)}
    samples = reference.samples(CHECK_SAMPLES)
    report["onnxruntime"] = _ort_latency(original, final, samples[0], threads, runs, bool(pass_calls))
    with tempfile.TemporaryDirectory(prefix="squeeze-targets-") as scratch:  # never the working directory
        workdir = stage if stage is not None else Path(scratch)
        report["targets"] = [_run_target(call, original, final, shapes, samples, workdir, runs,
                                         report["onnxruntime"], bool(pass_calls), threads, say, runner)
                             for call in target_calls]
    report["seconds"] = round(time.perf_counter() - started, 3)
    if stage is not None:
        report_mod.write(report, stage)
    return Result(final, report, result.failure, result.exception)



def _check_real_timing(name: str, calls: list[Call], runner) -> None:
    """A latency goal needs real time on its target (native or a device over RPC), never an emulator's or an
    instruction count: refuse it before anything is written."""
    call = next(c for c in calls if str(c) == name or c.name == name)
    target = call.entry.obj(**call.params)
    target.runner = runner
    method = target.timing_method()
    if method not in ("native", "rpc"):
        what = {"emulated": "an emulator's time", "opencl-cpu": "PoCL on this CPU's time",
                "instruction-count": "an instruction count", None: "no time at all (compile-only here)"}[method]
        raise SqueezeError(f"--goal latency=…@{name}: the {call.name} target would measure {what}, not real latency; "
                           f"give a device with --rpc HOST:PORT or --tracker HOST:PORT --key KEY, or use a size/macs goal")


def _target_defaults(calls: list[Call], **values) -> None:
    """--tune/--tune-cache/--batch: a default for every target that has that parameter, unless its spec sets it."""
    for call in calls:
        names = {p.name for p in call.entry.params}
        for key, value in values.items():
            if value is not None and key in names and key not in call.given:
                call.params[key] = value


def _join(spec: str | Iterable[str]) -> str:
    return spec if isinstance(spec, str) else ",".join(spec)


def _dataset(value, specs, overrides) -> Dataset | None:
    if value is None or isinstance(value, Dataset):
        return value
    return load_npz(value, specs, overrides or None)


def _check_fits(data: Dataset, specs, shapes) -> None:
    from .errors import DataError  # noqa: PLC0415
    for spec in specs:
        sample = data.sample_shape(spec)
        if tuple(sample) != tuple(shapes[spec.name]):
            raise DataError(f"{data.source}: samples of {spec.name!r} have shape {list(sample)}, but the model "
                            f"is measured with {list(shapes[spec.name])}")


def _ort_latency(original, final, feed, threads, runs, compressed) -> dict:
    result = {}
    for key, model in (("original", original), ("final", final)) if compressed else (("original", original),):
        sess = runtime.session(model, threads)
        result[key] = time_calls(lambda: sess.run(None, feed), runs=runs)
        del sess
    if not compressed:
        result["final"] = result["original"]
    return result


def _run_target(call: Call, original, final, shapes, samples, out, runs, ort_latency, compressed, threads,
                say, runner=None) -> dict:
    row: dict[str, Any] = {"name": call.name, "spec": str(call)}
    try:
        target = call.entry.obj(**call.params)
        target.runner = runner
        missing = target.missing()
        if missing:
            row["error"] = missing
            return row
        from squeeze.targets import tvm_build  # noqa: PLC0415
        tvm_build.set_threads(threads)
        workdir = out
        say(f"{call.name}: compiling the compressed model with TVM")
        artifact = target.build(final, shapes, workdir)
        say(f"{call.name}: measuring")
        measured = target.measure(artifact, samples, runs)
        row["method"] = measured.method
        if report_mod.no_speedup_reason(measured.method):  # emulated / opencl-cpu / instruction-count
            row["no_speedup"] = report_mod.no_speedup_reason(measured.method)
        row["latency_ms"] = measured.latency_ms
        row["build_seconds"] = artifact.build_seconds
        row["notes"] = measured.notes
        row.update(measured.extra)
        row.update({k: v for k, v in artifact.info.items()})
        if measured.outputs is not None:
            row["numeric_check"] = _numeric_check(final, samples, measured.outputs, threads)
        if target.host_native and measured.method == "native":
            row["baseline"] = {"engine": "onnxruntime", "model": "original", "latency_ms": ort_latency["original"]}
            if measured.latency_ms:
                row["speedup"] = round(ort_latency["original"]["p50"] / measured.latency_ms["p50"], 4)
        if compressed and (measured.latency_ms or measured.method == "instruction-count"):
            say(f"{call.name}: compiling and measuring the original model for comparison")
            original_measured = target.measure(target.build(original, shapes, workdir), samples[:1], runs)
            if measured.latency_ms and original_measured.latency_ms:
                row["original_latency_ms"] = original_measured.latency_ms
                if report_mod.real_time(row):  # an emulator's time gives no speed-up
                    row["speedup_vs_original_tvm"] = round(original_measured.latency_ms["p50"]
                                                           / measured.latency_ms["p50"], 4)
            for k in ("flash_bytes", "ram_bytes", "instructions"):  # MCU rows compare memory and counts
                if original_measured.extra.get(k) is not None:
                    row[f"original_{k}"] = original_measured.extra[k]
    except SqueezeError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a target bug must not lose the model and the rest of the report
        row["error"] = f"internal error in target {call.name!r}: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def _numeric_check(model, samples, outputs: dict[str, np.ndarray], threads) -> dict:
    """Compare a target's outputs with ONNX Runtime's on the same model and samples."""
    # ONNX Runtime's optimizer rewrites QDQ graphs (integer kernels, its own bias quantization, other summation
    # orders) and moves values by a quantization step; a QDQ model is compared with its exact semantics instead.
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    sess = runtime.session(model, threads, optimize=not qdq)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, s) for s in samples]
    # Samples × the model's own output shape; merge the two leading axes ([8,1,10] → [8,10]) so that fidelity
    # sees class scores and checks top-1 agreement.
    ref = {n: _merge_samples(np.stack([r[i] for r in runs])) for i, n in enumerate(names)}
    got = {n: _merge_samples(outputs[str(i)]) for i, n in enumerate(names) if str(i) in outputs}
    if len(got) != len(ref) or any(got[n].shape != ref[n].shape for n in names):
        return {"ok": False, "error": f"output shapes differ: TVM {[list(v.shape) for v in got.values()]} "
                                      f"vs ONNX Runtime {[list(v.shape) for v in ref.values()]}"}
    fid = verify.fidelity(ref, got)
    fid.pop("outputs", None)
    fid["samples"] = len(samples)
    if qdq:
        # Float summation orders differ between engines; a value on a rounding boundary then lands one
        # quantization step away and the step propagates through the layers after it. ONNX Runtime's own
        # optimized kernels differ from its reference ones the same way: allow 3× that (at least 1 % rel. L2).
        fast = runtime.session(model, threads)
        own = verify.fidelity(ref, {n: _merge_samples(np.stack([fast.run([n], s)[0] for s in samples]))
                                    for n in names}).get("rel_l2", 0.0)
        fid["reference"] = "onnxruntime with graph optimizations off (exact QDQ semantics)"
        fid["onnxruntime_optimized_rel_l2"] = own
        fid["tolerance"] = "rel_l2 <= max(1e-2, 3 × onnxruntime_optimized_rel_l2) (one-step rounding flips)"
        close = fid.get("rel_l2", 0) <= max(1e-2, 3 * own)
    else:
        fid["tolerance"] = "max_abs_rel <= 1e-3"
        close = fid.get("max_abs_rel", 0) <= 1e-3
        if not close and fid.get("rel_l2", 1.0) <= 1e-4:
            # Deep float models drift by summation order and approximated transcendentals alone (TVM's own default
            # pipeline gives ppocrv6_tiny_det max abs rel 1.6e-3 at rel-L2 6e-5): with a tight rel-L2, one element
            # may be off by up to 5e-3 of the output scale, or 10× what ONNX Runtime's own optimized and
            # unoptimized graphs differ by. A miscompile is orders of magnitude above both.
            slow = runtime.session(model, threads, optimize=False)
            own = verify.fidelity(ref, {n: _merge_samples(np.stack([slow.run([n], s)[0] for s in samples]))
                                        for n in names}).get("max_abs_rel", 0.0)
            fid["onnxruntime_unoptimized_max_abs_rel"] = own
            fid["tolerance"] = ("max_abs_rel <= 1e-3, or rel_l2 <= 1e-4 and max_abs_rel <= max(5e-3, "
                                "10 × onnxruntime_unoptimized_max_abs_rel) (float summation order)")
            close = fid.get("max_abs_rel", 0) <= max(5e-3, 10 * own)
    fid["ok"] = bool(close and fid.get("top1_agreement", 1.0) == 1.0)
    return fid


def _merge_samples(arr: np.ndarray) -> np.ndarray:
    return arr.reshape((-1,) + arr.shape[2:]) if arr.ndim >= 2 else arr


def _environment(threads) -> dict:
    import onnxruntime  # noqa: PLC0415
    env = {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "numpy": np.__version__, "machine": platform.machine(), "threads": threads or runtime.cpu_count()}
    try:
        from importlib.metadata import version  # noqa: PLC0415
        env["tvm"] = version("apache-tvm")
    except Exception:  # not installed: the report says so
        env["tvm"] = None
    return env
