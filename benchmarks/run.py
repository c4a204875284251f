"""Write BENCHMARKS.md: corpus models × compression pipelines, every number measured in one run.

    python benchmarks/run.py                       # all models and pipelines → BENCHMARKS.md
    python benchmarks/run.py --models mnist_burn --pipelines "cleanup" --out /tmp/b.md

For each model the first 256 labelled samples calibrate and the rest evaluate (calibration samples are never
evaluated on). SqueezeNet has no labels here: its row gives top-1 agreement with the original instead.
Latency: TVM (cpu target) on the compressed and on the original model, and ONNX Runtime on the original, all
in this process, one after another, batch 1; ratios are within one run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

import squeeze  # noqa: E402
from squeeze.registry import all_passes  # noqa: E402
from squeeze.spec import parse  # noqa: E402

MODELS = ["mnist_burn", "mnist_ortjava", "cifar10_resnet4b", "sri_resnet_a", "squeezenet", "marabou_cifar10_large"]
PIPELINES = ["cleanup", "prune(ratio=0.3)", "slim", "quant", "codebook(bits=4)", "codebook(unit=kernel)",
             "blockperm(blocks=4)", "prune(ratio=0.3),codebook(bits=4)"]
EVAL_LIMIT = {"mnist_burn": None, "mnist_ortjava": None}  # None: all remaining samples


def _data(name: str, tmp: Path, eval_count: int | None):
    if name.startswith("squeezenet"):
        import numpy as np  # noqa: PLC0415

        from squeeze.data import Dataset  # noqa: PLC0415
        x = corpus.squeezenet_images(64)
        input_name = corpus._input_name(name)
        # images 0-2: the reference input and two photos; 3-34 calibrate; the rest evaluate with 0-2
        calib = Dataset({input_name: x[3:35]}, None, "squeezenet: 32 random images")
        evald = Dataset({input_name: np.concatenate([x[:3], x[35:]])}, None, "squeezenet: reference + photos + random")
    else:
        ds = corpus.dataset(name)
        calib, evald = corpus.split(ds, 256)
        if eval_count:
            evald = evald.subset(0, eval_count)
    return corpus.save_npz(calib, tmp / f"{name}_calib.npz"), corpus.save_npz(evald, tmp / f"{name}_eval.npz")


def _applicable(pipeline: str, model: str) -> str | None:
    passes = all_passes()
    for name, _ in parse(pipeline):
        if name not in passes:
            return f"pass `{name}` not available yet"
    if "slim" in pipeline:
        import onnx  # noqa: PLC0415
        m = onnx.load(str(corpus.model_path(model)), load_external_data=False)
        if not any(n.op_type == "BatchNormalization" for n in m.graph.node):
            return "no BatchNormalization in the model"
    return None


def _row(model: str, pipeline: str, result, seconds: float) -> dict:
    r = result.report
    o, f = r["original"], r["final"]
    row = {"model": model, "pipeline": pipeline}
    row["file ratio"] = o["bytes"]["file"] / f["bytes"]["file"]
    packed_o, packed_f = o["bytes"].get("packed"), f["bytes"].get("packed")
    row["packed ratio"] = (packed_o / packed_f) if packed_o and packed_f else None
    row["MAC ratio"] = o["macs"] / f["macs"] if f["macs"] else None
    acc = r.get("accuracy")
    if acc:
        row["top-1 orig"] = 100 * acc["original"]["top1"]
        row["top-1"] = 100 * acc["final"]["top1"]
        row["drop (pts)"] = acc["drop_pts"]
    elif r.get("fidelity"):
        row["top-1 agreement"] = 100 * r["fidelity"].get("top1_agreement", float("nan"))
    cpu = next((t for t in r["targets"] if t["name"] == "cpu"), {})
    if cpu.get("latency_ms"):
        row["TVM ms"] = cpu["latency_ms"]["p50"]
        row["TVM orig ms"] = (cpu.get("original_latency_ms") or cpu["latency_ms"])["p50"]
        row["ORT orig ms"] = cpu["baseline"]["latency_ms"]["p50"]
        row["TVM speed-up"] = row["TVM orig ms"] / row["TVM ms"]
        row["TVM vs ORT"] = row["ORT orig ms"] / row["TVM ms"]
        row["TVM=ORT check"] = "ok" if (cpu.get("numeric_check") or {}).get("ok") else "MISMATCH"
    elif cpu.get("error"):
        row["TVM ms"] = "error: " + cpu["error"][:60]
    row["squeeze s"] = seconds
    if result.failure:
        row["note"] = result.failure[:80]
    return row


COLUMNS = ["model", "pipeline", "file ratio", "packed ratio", "MAC ratio", "top-1 orig", "top-1", "drop (pts)",
           "top-1 agreement", "TVM ms", "TVM orig ms", "ORT orig ms", "TVM speed-up", "TVM vs ORT", "TVM=ORT check",
           "squeeze s", "note"]


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def _machine() -> str:
    cpu = corpus.cpu_model()
    from squeeze.runtime import cpu_count  # noqa: PLC0415
    try:
        from squeeze.targets.tvm_build import host_cpu  # noqa: PLC0415
        llvm = host_cpu()
    except Exception:  # TVM missing: say so
        llvm = "?"
    return f"{cpu} (LLVM: {llvm}), {cpu_count()} cores, {platform.system()} {platform.machine()}"


def _versions() -> str:
    from importlib.metadata import version  # noqa: PLC0415
    names = ["squeeze", "onnx", "onnxruntime", "apache-tvm", "numpy", "scikit-learn"]
    return ", ".join(f"{n} {version(n)}" for n in names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--pipelines", nargs="*", default=PIPELINES)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    p.add_argument("--runs", type=int, default=50, help="timed runs per latency (default 50)")
    p.add_argument("--threads", type=int, default=1, help="threads for ONNX Runtime and TVM (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many samples per model")
    args = p.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.models:
            calib, evald = _data(model, tmp, args.eval_limit)
            for pipeline in args.pipelines:
                skip = _applicable(pipeline, model)
                if skip:
                    rows.append({"model": model, "pipeline": pipeline, "note": skip})
                    continue
                print(f"{model}: {pipeline}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                try:
                    result = squeeze.compress(corpus.model_path(model), pipeline, calib=calib, eval=evald,
                                              targets="cpu", seed=args.seed, threads=args.threads, runs=args.runs)
                except squeeze.SqueezeError as exc:
                    rows.append({"model": model, "pipeline": pipeline, "note": f"error: {exc}"[:120]})
                    continue
                rows.append(_row(model, pipeline, result, time.perf_counter() - t0))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    lines = ["# squeeze benchmarks", "",
             f"Produced by `{command}` at commit `{commit}` on {_dt.date.today().isoformat()}, "
             f"{_fmt(time.perf_counter() - started)} s in all.", "",
             f"- Machine: {_machine()}; {args.threads} thread(s) for ONNX Runtime and TVM.",
             f"- Versions: {_versions()}; Python {platform.python_version()}; seed {args.seed}.",
             "- Data: corpus in `../shared/corpus` (MANIFEST preprocessing). First 256 labelled samples calibrate, "
             "the rest evaluate (MNIST: 9,744 images; CIFAR-10: 761). SqueezeNet: top-1 agreement with the original "
             "on the reference input, two photos and random images (no labels exist here).",
             "- Ratios are original ÷ compressed (higher is better). `file` = bytes of the ONNX file, `packed` = "
             "bytes of the packed deployable weights (where the pass reports them). Latency: p50 of ≥ "
             f"{args.runs} batch-1 runs after warm-up, timed from Python; TVM = the `cpu` target (native).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
