"""squeeze `quant` / `codebook` on the real mobile models (MANIFEST §7) and squeezenet, next to ONNX Runtime's own
`quantize_static` (issue 16, item 4): file and packed size ratios, the task metric on the evaluation half, and
ORT latency at 1 thread (float vs squeeze quant vs quantize_static, interleaved rounds, same calibration data).

    python benchmarks/quant_ort.py ppocrv6_tiny_rec --specs "quant" "codebook(bits=4)" --static

The calibration / evaluation halves come from `corpus.ocr_npz` (first half / second half of ocr_synth).
Task metrics: det = mean IoU of (prob map > 0.2) with the page masks; rec = greedy CTC character accuracy;
others = relative L2 of the outputs against the float model (no labels).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import corpus  # noqa: E402
from squeeze import task_metrics  # noqa: E402

DATA = Path(tempfile.gettempdir()) / "ocr"


def load_split(name: str, calib_count: int | None = None) -> tuple[dict, dict, dict]:
    """(calibration feed arrays, evaluation feed arrays, evaluation truth) for a model."""
    if name == "squeezenet":
        x = corpus.squeezenet_images(16)
        return {"data_0": x[:8]}, {"data_0": x[8:]}, {}
    calib_path, eval_path = DATA / f"{name}_calib.npz", DATA / f"{name}_eval.npz"
    if not calib_path.exists():
        corpus.ocr_npz(name, DATA)
    key = corpus._input_name(name)
    with np.load(calib_path) as c, np.load(eval_path) as e:
        calib = {key: c[key][:calib_count]}
        ev = {key: e[key]}
        truth = {k: e[k] for k in e.files if k != key}
    return calib, ev, truth


def model_path(name: str) -> Path:
    if name == "squeezenet":
        return corpus.ROOT / "squeezenet_fp16_winml/model_fp32_derived.onnx"
    return corpus.model_path(name)


def run(model: onnx.ModelProto | str, feed: dict, batch: int = 8, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort  # noqa: PLC0415
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    (key, x), = feed.items()
    static = isinstance(sess.get_inputs()[0].shape[0], int)
    step = 1 if static else batch
    outs = [sess.run(None, {key: x[i:i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def ctc_scores(logits: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-line character accuracy and line length (the weights of squeeze's pooled `ctc` metric)."""
    chars = task_metrics.load_dictionary(corpus.ROOT / "ppocrv6_tiny_rec/dict.txt")
    table = chars + [" "]
    truths = [str(t) for t in texts]
    scores = [task_metrics.char_accuracy("".join(table[i - 1] for i in task_metrics.ctc_greedy_decode(row)
                                                 if i - 1 < len(table)), truth)
              for row, truth in zip(logits.argmax(-1), truths)]
    return np.array(scores), np.array([max(len(t), 1) for t in truths], np.float64)


def per_sample(name: str, outs: list[np.ndarray], truth: dict, ref: list[np.ndarray]
               ) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(metric name, per-sample values, weights) of the model's task metric: char accuracy (rec), mask IoU
    (det), else the top-1 agreement of the per-anchor class with the float model (layout: class-score outputs)."""
    if "texts" in truth:
        return ("char_acc", *ctc_scores(outs[0], truth["texts"]))
    if "masks" in truth:
        return "mask_iou", task_metrics.mask_iou(outs[0].reshape(truth["masks"].shape) > 0.2, truth["masks"]), None
    agree = []
    for o, r in zip(outs, ref):
        if r.ndim == 3 and r.shape[-1] <= 16:  # [1, anchors, classes]
            agree.append((o.argmax(-1) == r.argmax(-1)).reshape(len(r), -1).mean(1))
    return "class_agree", np.mean(agree, axis=0) if agree else np.zeros(len(outs[0])), None


def paired(a: np.ndarray, b: np.ndarray, w: np.ndarray | None) -> dict:
    """Mean of a − b (weighted as the metric is) with its paired standard error and n."""
    s = task_metrics.mean_score(a - b, w)
    return {"diff": round(s.value, 4), "se": round(s.stderr, 4) if s.stderr else None, "n": s.n}


def ctc_accuracy(logits: np.ndarray, texts: np.ndarray) -> float:
    """squeeze's `ctc` metric: greedy decoding, 1 − Σ edit distance / Σ truth length over the set."""
    scores, weights = ctc_scores(logits, texts)
    return float(np.average(scores, weights=weights))


def mask_iou(prob: np.ndarray, masks: np.ndarray) -> float:
    """squeeze's `mask-iou:0.2` metric: mean over pages of IoU(probability > 0.2, word mask)."""
    return float(np.mean(task_metrics.mask_iou(prob.reshape(masks.shape) > 0.2, masks)))


def metric(name: str, outs: list[np.ndarray], truth: dict, ref: list[np.ndarray]) -> dict:
    rel = float(np.mean([np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30) for o, r in zip(outs, ref)]))
    out = {"rel_l2": round(rel, 4)}
    if "texts" in truth:
        out["char_acc"] = round(ctc_accuracy(outs[0], truth["texts"]), 4)
    if "masks" in truth:
        out["mask_iou"] = round(mask_iou(outs[0], truth["masks"]), 4)
    if name == "squeezenet":
        out["top1_agree"] = round(float((outs[0].reshape(len(outs[0]), -1).argmax(1)
                                         == ref[0].reshape(len(ref[0]), -1).argmax(1)).mean()), 4)
    return out


def squeeze_model(path: Path, spec: str, calib: dict) -> tuple[onnx.ModelProto, dict]:
    import squeeze  # noqa: PLC0415
    from squeeze.data import Dataset  # noqa: PLC0415
    result = squeeze.compress(str(path), spec, calib=Dataset(calib, None, "npz", {}), targets="")
    result.raise_for_failure()
    step = result.report["passes"][-1]
    return result.model, {"notes": step.get("notes", []), "packed": result.report["final"]["bytes"].get("packed")}


def static_model(path: Path, calib: dict, folder: Path, preprocess: bool = False) -> Path:
    """ONNX Runtime's quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa

    class Reader(CalibrationDataReader):
        def __init__(self):
            (key, x), = calib.items()
            self.items = iter([{key: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    model = onnx.load(str(path))
    if model.opset_import[0].version < 13:  # per-channel DequantizeLinear needs axis (opset 13)
        model = onnx.version_converter.convert_version(model, 13)
    source = folder / "static_input.onnx"
    onnx.save(model, str(source))
    out = folder / ("static_pre.onnx" if preprocess else "static.onnx")
    # ORT's quantizer writes temporary files (*.data, sym_shape_infer_temp.onnx) into the working directory
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415
            try:
                quant_pre_process(str(source), str(source))
            except Exception:  # noqa: BLE001 (symbolic shape inference gives up on some dynamic graphs)
                quant_pre_process(str(source), str(source), skip_symbolic_shape=True)
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _session(data: bytes, profile: str | None = None):
    """An ONNX Runtime CPU session at 1 thread (profiling to files prefixed `profile` when given)."""
    import onnxruntime as ort  # noqa: PLC0415
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def latency(models: dict[str, bytes], feed: dict, rounds: int, runs: int) -> dict:
    """Median ms per model at 1 thread; rounds interleave the models so machine load hits all alike."""
    sessions = {}
    for key, data in models.items():
        sessions[key] = _session(data)
        sessions[key].run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in models}
    per_round: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, sess in sessions.items():
            got = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feed)
                got.append(time.perf_counter() - t)
            times[key] += got
            per_round[key].append(float(np.median(got)))
    out = {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}
    if "quantize_static" in per_round:  # ratio to quantize_static per round, median over rounds
        base = np.array(per_round["quantize_static"])
        out["ratio_to_static"] = {k: round(float(np.median(np.array(v) / base)), 3) for k, v in per_round.items()}
    return out


def op_profile(models: dict[str, bytes], feed: dict, runs: int, top: int = 12) -> dict:
    """ms per run by op type (ORT's node profile after its graph optimisations, 1 thread; the first run, which warms
    the session up, is counted too): where the time goes."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, data in models.items():
            sess = _session(data, profile=str(Path(tmp) / "profile"))
            for _ in range(runs):
                sess.run(None, feed)
            by_op: dict[str, float] = {}
            for event in json.loads(Path(sess.end_profiling()).read_text()):
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    op = event["args"]["op_name"]
                    by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1e3 / runs
            out[key] = {op: round(ms, 2) for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--specs", nargs="*", default=["quant"])
    ap.add_argument("--static", action="store_true", help="also ORT quantize_static")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: the whole half)")
    ap.add_argument("--save", default=None, help="folder for the models")
    ap.add_argument("--no-pre", action="store_true", help="skip quantize_static after quant_pre_process")
    ap.add_argument("--profile", action="store_true", help="also ORT's time by op type for every timed model")
    args = ap.parse_args()
    path = model_path(args.model)
    calib, ev, truth = load_split(args.model, args.calib)
    if args.save:
        folder = Path(args.save)
        folder.mkdir(parents=True, exist_ok=True)
    else:  # nothing to keep: the models go with the process
        folder = Path(tempfile.mkdtemp(prefix="squeeze-quant-ort-"))
        atexit.register(shutil.rmtree, folder, True)
    ref = run(str(path), ev)
    rows = {"float": {**metric(args.model, ref, truth, ref), "file": path.stat().st_size}}
    samples = {"float": per_sample(args.model, ref, truth, ref)}
    blobs = {"float": path.read_bytes()}
    print("float", json.dumps(rows["float"]), flush=True)
    for spec in args.specs:
        t = time.perf_counter()
        model, info = squeeze_model(path, spec, calib)
        out = folder / (spec.replace(",", "_").replace("(", "").replace(")", "").replace("=", "") + ".onnx")
        onnx.save(model, str(out))
        outs = run(str(out), ev)
        samples[spec] = per_sample(args.model, outs, truth, ref)
        rows[spec] = {**metric(args.model, outs, truth, ref), "file": out.stat().st_size,
                      "file_ratio": round(path.stat().st_size / out.stat().st_size, 2),
                      "packed": info["packed"], "seconds": round(time.perf_counter() - t, 1)}
        if info["packed"]:
            rows[spec]["packed_ratio"] = round(path.stat().st_size / info["packed"], 2)
        blobs[spec] = out.read_bytes()
        print(spec, json.dumps(rows[spec]), flush=True)
    for preprocess in ([False, True] if args.static else [])[:1 if args.no_pre else 2]:
        key = "quantize_static" + ("+pre" if preprocess else "")
        out = static_model(path, calib, folder, preprocess)
        outs = run(str(out), ev)
        samples[key] = per_sample(args.model, outs, truth, ref)
        rows[key] = {**metric(args.model, outs, truth, ref), "file": out.stat().st_size,
                     "file_ratio": round(path.stat().st_size / out.stat().st_size, 2)}
        blobs[key] = out.read_bytes()
    (key, x), = ev.items()
    timed = {k: v for k, v in blobs.items() if "codebook" not in k}
    ms = latency(timed, {key: x[:1]}, args.rounds, args.runs)
    if args.profile:
        print(json.dumps({"ort_ms_by_op_1t": op_profile(timed, {key: x[:1]}, args.runs)}, indent=1), flush=True)
    ratios = ms.pop("ratio_to_static", {})
    for k, v in ms.items():
        rows[k]["ort_ms_1t"] = v
        if k in ratios:
            rows[k]["ort_ratio_to_static"] = ratios[k]
    name, base, w = samples["float"]
    for k, (_, values, _) in samples.items():
        rows[k][name] = round(task_metrics.mean_score(values, w).value, 4)
        rows[k][name + "_se"] = round(task_metrics.mean_score(values, w).stderr or 0.0, 4)
        rows[k]["n"] = len(values)
        if k != "float":
            rows[k]["vs_float"] = paired(values, base, w)
            if "quantize_static" in samples and k != "quantize_static":
                rows[k]["vs_static"] = paired(values, samples["quantize_static"][1], w)
    print(json.dumps({"model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
