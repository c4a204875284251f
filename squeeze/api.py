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
from .data import HOLDOUT_EVERY, Dataset, input_specs, load_npz, parse_shape_overrides, resolve_shapes, synthesize
from .errors import DataError, ModelLoadError, PassError, SqueezeError
from .model import file_bytes, load_model, save_model, serialized_bytes, sha256
from .outdir import OutputDir
from .pipeline import model_stats, run_pipeline
from .registry import get_pass, get_target, hook
from .spec import Call, bind
from .task_metrics import Metric, MetricError, Scorer, check_data, mcnemar, resolve_metric
from .timing import contention_note, time_calls

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
             val: str | os.PathLike | Dataset | None = None, targets: str | Iterable[str] = "cpu", seed: int = 0,
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
    `fn(outputs, data) -> number or per-sample array` (higher is better). Default: top1 with labels, else agreement
    (chosen per dataset: the validation data may have no labels where the evaluation data has them).

    Data has three roles. `calib` fits (calibration ranges, refits, tables), `val` chooses (the `max_drop` guard, the
    `goal` search and its measured plans), `eval` only reports. Without `val`, when something chooses, every 4th
    `calib` sample is held out to validate and the passes fit on the other three quarters (squeeze.data.HOLDOUT_EVERY),
    so no choice is measured on samples a pass fitted on; without `calib` either, validation runs on synthetic inputs
    drawn with seed + 1. `eval` is never used to choose.

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
        runner = hook("device-runner")(rpc, tracker, key)
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
    val_data = _dataset(val, specs, overrides, "--val")
    eval_data = _dataset(eval, specs, overrides)
    shapes = resolve_shapes(specs, overrides, calib_data or val_data or eval_data)
    if calib_data is None:
        calib_data = synthesize(specs, shapes, SYNTHETIC_SAMPLES, seed)
    for data in (calib_data, val_data, eval_data):
        if data is not None:
            _check_fits(data, specs, shapes)
    if task_metric is not None:
        check_data(task_metric, eval_data or calib_data)
    choosing = max_drop is not None or goal_spec is not None
    roles = data_roles(calib_data, val_data, choosing, specs, shapes, seed) if choosing else None
    if roles is not None and task_metric is not None:
        _check_validation_metric(task_metric, roles.val)
    if goal_spec is not None and calib_data.source.startswith("synthetic"):
        from .goal import NEEDS_CALIB  # noqa: PLC0415
        raise SqueezeError(NEEDS_CALIB)  # before the output folder exists: a user error writes nothing
    if max_drop is not None and max_drop < 0:
        raise SqueezeError("--max-drop must be a non-negative number of points")
    job = dict(original=original, source_path=source_path, source_hash=source_hash, specs=specs, shapes=shapes,
               calib_data=calib_data, eval_data=eval_data, roles=roles, unused_val=None if choosing else val_data,
               pass_calls=pass_calls, target_calls=target_calls,
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
             metric=None, roles: "Roles | None" = None, unused_val: Dataset | None = None) -> Result:
    """Everything after the inputs are validated; files go to `stage` (committed by the caller)."""
    say("measuring the original model")
    original_stats = model_stats(original, shapes)
    original_stats["bytes"]["file"] = file_bytes(source_path) if source_path else serialized_bytes(original)
    original_accuracy = _top1(original, eval_data, threads)
    reference = eval_data or calib_data
    scorer = Scorer(metric, original, reference, threads)  # the task metric of the reported numbers
    # What chooses (guard, goal) scores the validation data, with its own default metric when none is given.
    val_scorer = Scorer(metric, original, roles.val, threads) if roles is not None else None
    fit_data = roles.fit if roles is not None else calib_data

    say("canonicalizing the model (lossless front end)")
    canonical_model, front_end = canonical.canonicalize(original, calib_data, threads)
    goal_report, guard_drop = None, max_drop
    if goal is not None:
        from . import goal as goal_mod  # noqa: PLC0415
        start = canonical_model
        if pass_calls:  # the goal allocates on what --passes made of the model
            pre = run_pipeline(canonical_model, pass_calls, fit_data, shapes, seed=seed, threads=threads,
                               progress=say)
            start = pre.model
        try:
            assert roles is not None and val_scorer is not None
            found = goal_mod.search(start, goal, fit_data, shapes, original=original, seed=seed,
                                    threads=threads, max_drop=max_drop, guard_data=roles.val, say=say, runner=runner,
                                    metric=val_scorer.metric)
        except SqueezeError:
            raise
        except Exception as exc:  # a bug in the search: one line for the user, the traceback with --debug
            raise SqueezeError(f"--goal search failed with {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        goal_report = found.report
        pass_calls = list(pass_calls) + found.calls
        guard_drop = None  # the search kept the drop within max_drop; a guard now would undo the allocation
    result = run_pipeline(canonical_model, pass_calls, fit_data, shapes, seed=seed, eval_data=eval_data,
                          val_data=roles.val if roles is not None else None, threads=threads, progress=say,
                          max_drop=guard_drop, metric=val_scorer.metric if val_scorer is not None else scorer.metric)
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
    final_accuracy = _top1(final, eval_data, threads) if pass_calls else original_accuracy

    report: dict[str, Any] = {
        "squeeze_version": __version__,
        "model": {"path": str(source_path) if source_path else None, "sha256": source_hash,
                  "inputs": {s.name: list(shapes[s.name]) for s in specs}},
        "seed": seed,
        "data": _data_block(calib_data, eval_data, roles, unused_val),
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
    report["metric"] = {**scorer.block(final_score), "drop_basis": "evaluation" if eval_data else "calibration"}
    if val_scorer is not None and roles is not None:
        val_score = val_scorer.score(final) if pass_calls else val_scorer.original
        report["validation"] = {**val_scorer.block(val_score), "drop_basis": "validation", "role": roles.how,
                                "notes": roles.notes + _fallback(val_scorer, scorer)}
    if original_accuracy is not None:
        report["accuracy"] = accuracy_block(original_accuracy, final_accuracy)
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


def _dataset(value, specs, overrides, flag: str | None = None) -> Dataset | None:
    if value is None or isinstance(value, Dataset):
        return value
    if flag is not None and not Path(value).is_file():  # --val: say which flag named the missing file
        raise DataError(f"{flag} {value}: no such file")
    return load_npz(value, specs, overrides or None)


@dataclass
class Roles:
    """Who fits and who chooses: `fit` is what the passes calibrate on, `val` what the guard and goal score."""

    fit: Dataset
    val: Dataset
    how: str
    notes: list[str] = field(default_factory=list)


def data_roles(calib: Dataset, val: Dataset | None, choosing: bool, specs, shapes, seed: int) -> Roles:
    """The fitting and validation data of a run that chooses something (--max-drop, --goal).

    `--val` given: it validates and the passes fit on all of `calib`. Else, with real calibration data, every 4th
    calibration sample (squeeze.data.HOLDOUT_EVERY) validates and the passes fit on the rest only: a choice measured
    on samples a pass fitted on would flatter it. With synthetic calibration inputs, validation gets its own
    synthetic draw (seed + 1), disjoint from what the passes fit on; it can only measure output fidelity.
    """
    assert choosing
    if val is not None:
        return Roles(calib, val, "--val")
    if not calib.source.startswith("synthetic"):
        fit, held = calib.split_holdout(HOLDOUT_EVERY)
        return Roles(fit, held, f"held out from --calib (every {HOLDOUT_EVERY}th sample; the passes fit on the rest)")
    drawn = synthesize(specs, shapes, SYNTHETIC_SAMPLES, seed + 1)
    return Roles(calib, drawn, "synthetic (no --calib or --val; a separate draw from the calibration inputs)",
                 ["validation on random inputs measures output fidelity only: give --val or --calib"])


def _check_validation_metric(metric: Metric, val: Dataset) -> None:
    """An explicit labelled --metric needs its ground truth in the validation data: one line, not a silent swap."""
    if metric.needs is not None and getattr(val, metric.needs, None) is None:
        raise MetricError(f"--metric {metric.spec} chooses on the validation data ({val.source}), which has no "
                          f"'{metric.needs}' array: give --val FILE.npz with '{metric.needs}', or add "
                          f"'{metric.needs}' to --calib (every {HOLDOUT_EVERY}th sample validates)")


def _fallback(val_scorer: Scorer, scorer: Scorer) -> list[str]:
    """A note when the default metric differs between validation (no labels) and evaluation."""
    if not val_scorer.default or val_scorer.metric.name == scorer.metric.name:
        return []
    return [f"the validation data has no {scorer.metric.needs or 'ground truth'}: --max-drop/--goal held "
            f"{val_scorer.metric.label} with the original (label-free), while {scorer.metric.label} is reported on "
            f"the evaluation data; add '{scorer.metric.needs}' to --calib or give --val to choose on "
            f"{scorer.metric.label}"]


def _data_block(calib: Dataset, eval_data: Dataset | None, roles: Roles | None, unused_val: Dataset | None) -> dict:
    """report.json's `data`: each role's source and n (calib fits, val chooses, eval reports)."""
    block = {"calib": calib.source, "calib_samples": len(calib), "calib_synthetic": calib.source.startswith("synthetic"),
             "calib_fit_samples": len(roles.fit) if roles is not None else len(calib),
             "val": roles.val.source if roles is not None else None,
             "val_samples": len(roles.val) if roles is not None else 0,
             "val_role": roles.how if roles is not None else (
                 "given but unused: nothing chooses without --max-drop or --goal" if unused_val is not None
                 else "none: nothing chooses without --max-drop or --goal"),
             "eval": eval_data.source if eval_data else None, "eval_samples": len(eval_data) if eval_data else 0}
    if unused_val is not None:
        block["val"], block["val_samples"] = unused_val.source, len(unused_val)
    return block


def _top1(model: onnx.ModelProto, data: Dataset | None, threads) -> dict | None:
    """Top-1 on labelled data with the per-sample `correct` array (paired tests need it); None without labels."""
    if data is None or data.labels is None:
        return None
    return verify.accuracy(runtime.run(model, data, threads=threads), data.labels)


def accuracy_block(original: dict, final: dict) -> dict:
    """report.json's `accuracy`: top-1 of the original and the final model with n and standard errors, the drop
    with its paired standard error, and McNemar's test of the two on the same samples."""
    a, b = original["correct"].astype(np.float64), final["correct"].astype(np.float64)
    n = len(a)
    se = (lambda x: float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else None)

    def one(acc: dict, x: np.ndarray) -> dict:
        return {"top1": acc["top1"], "n": n, "stderr": se(x), "output": acc.get("output")}
    drop_se = se(a - b)
    return {"original": one(original, a), "final": one(final, b),
            "drop_pts": round(100 * (original["top1"] - final["top1"]), 4),
            "drop_stderr_pts": None if drop_se is None else round(100 * drop_se, 4), "test": mcnemar(a, b)}


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
        run = runtime.session(model, threads).run  # one session at a time: released before the next is made
        result[key] = time_calls(lambda run=run: run(None, feed), runs=runs)
        del run
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
        hook("compile-threads")(threads)
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
        busy = contention_note(measured.latency_ms or {}, threads or runtime.cpu_count(), "TVM") \
            if measured.method == "native" else None
        if busy:  # other work on this machine while timing: shown next to the row's latency
            row["contention"] = busy
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
