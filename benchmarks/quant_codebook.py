"""Quantization and weight sharing on the corpus (issue 5): sizes (ONNX, packed, bits/param), accuracy, TVM.

    /work/venv/bin/python benchmarks/quant_codebook.py                  # everything → benchmarks/results/
    /work/venv/bin/python benchmarks/quant_codebook.py --cases mnist --no-tvm --no-roundtrip

Every row runs the real pipeline (`squeeze.compress`): each pass verified, sizes from the saved bytes, the packed
figure from the real container (`squeeze.pack`), and with TVM the compressed model compiled for this CPU and
compared with ONNX Runtime on the same model. Labelled models calibrate on the first 256 samples and evaluate on
the rest (calibration samples are never evaluated on); the accuracy drop comes with McNemar's exact p-value on
the per-image correctness of the original and the compressed model. SqueezeNet has no labels: it calibrates on
cat_224x224.png, 7 flips/crops of it and 8 uniform random images, and reports top-1 (and top-5 overlap)
agreement with the original on the reference input set (onnxruntime's test input, kitten_224.png,
fish_tench.png) and on 64 other random images.
The last table packs every corpus model after `codebook` and checks that unpacking restores it bit for bit.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
import squeeze  # noqa: E402
from squeeze import pack, runtime, verify  # noqa: E402
from squeeze.data import Dataset  # noqa: E402
from squeeze.model import load_model  # noqa: E402
from squeeze.registry import all_passes  # noqa: E402
from squeeze.spec import parse  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CASES = [
    ("mnist_burn", "codebook(bits=4)"),
    ("mnist_burn", "prune(ratio=0.3),codebook(bits=4)"),
    ("mnist_burn", "codebook(bits=3)"),
    ("mnist_burn", "codebook(bits=2)"),
    ("mnist_burn", "codebook(bits=3),quant"),
    ("mnist_burn", "fold-bn,codebook(bits=4)"),
    ("mnist_burn", "quant"),
    ("cifar10_resnet4b", "quant"),
    ("cifar10_resnet4b", "quant(method=minmax)"),
    ("cifar10_resnet4b", "quant(method=percentile)"),
    ("cifar10_resnet4b", "quant(bits=4)"),
    ("cifar10_resnet4b", "quant(bits=4,rounding=adaround)"),
    ("cifar10_resnet4b", "codebook(bits=4)"),
    ("cifar10_resnet4b", "codebook(unit=kernel,kernels=64)"),
    ("squeezenet", "codebook(unit=kernel)"),
    ("squeezenet", "codebook(unit=kernel,kernels=256,bits=6)"),
    ("squeezenet", "codebook(bits=6)"),
    ("squeezenet", "quant"),
]
ROUNDTRIP = ["mnist_burn", "mnist_ortjava", "mnist8_zoo", "cifar10_resnet2b", "cifar10_resnet4b", "sri_resnet_a",
             "oval21_cifar_base", "oval21_cifar_wide", "oval21_cifar_deep", "marabou_cifar10_small",
             "marabou_cifar10_medium", "marabou_cifar10_large", "cifar10_winml_tutorial", "squeezenet", "ultraface"]


# ---------------------------------------------------------------------------------------------- data

def read_png(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a non-interlaced 8-bit RGB/RGBA PNG (the corpus images; no imaging library)."""
    data = path.read_bytes()
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: unsupported PNG (depth {depth}, color {color}, interlace {interlace})")
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros(stride, np.int32)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + up) & 255
        else:
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                left = cur[x - bpp] if x >= bpp else 0
                corner = up[x - bpp] if x >= bpp else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up[x]) // 2
                else:  # Paeth
                    p = left + up[x] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else corner)
                cur[x] = (line[x] + pred) & 255
            out[y] = cur
    return out.reshape(height, width, bpp)[..., :3].astype(np.uint8)


def caffe(rgb: np.ndarray) -> np.ndarray:
    """SqueezeNet's preprocessing (MANIFEST): BGR, 0..255 minus (104, 117, 123), NCHW."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
    return bgr.transpose(2, 0, 1)


def squeezenet_sets(name: str) -> tuple[Dataset, Dataset, Dataset]:
    """(calibration: the cat photo, 7 flips/crops of it and 8 random images, reference set, 64 other random
    images)."""
    images = corpus.ROOT / "datasets" / "images"
    cat = read_png(images / "cat_224x224.png")
    padded = np.pad(cat, ((16, 16), (16, 16), (0, 0)), mode="reflect")
    views = [cat, cat[:, ::-1]] + [padded[dy:dy + 224, dx:dx + 224] for dy, dx in
                                   ((0, 0), (32, 32), (0, 32), (32, 0), (16, 0), (0, 16))]
    calib_noise = np.random.default_rng(2).uniform(-120, 140, (8, 3, 224, 224)).astype(np.float32)
    calib = np.concatenate([np.stack([caffe(v) for v in views]), calib_noise])
    reference = corpus.squeezenet_images(1)[:1]  # onnxruntime's test input
    photos = np.stack([caffe(read_png(images / f)) for f in ("kitten_224.png", "fish_tench.png")])
    noise = np.random.default_rng(1).uniform(-120, 140, (64, 3, 224, 224)).astype(np.float32)
    key = corpus._input_name(name)
    return (Dataset({key: calib}, None, "cat_224x224.png + 7 flips/crops + 8 random images (seed 2)", {}),
            Dataset({key: np.concatenate([reference, photos])}, None, "reference input + kitten + fish", {}),
            Dataset({key: noise}, None, "64 uniform random images", {}))


# ---------------------------------------------------------------------------------------------- measuring

def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired correctness vectors."""
    from scipy.stats import binomtest  # noqa: PLC0415
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def agreement(original, compressed, data: Dataset) -> tuple[float, float]:
    """(top-1 agreement, mean top-5 overlap) of two models' class scores on `data`."""
    a = next(iter(runtime.run(original, data).values())).reshape(len(data), -1)
    b = next(iter(runtime.run(compressed, data).values())).reshape(len(data), -1)
    top5 = np.mean([len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b)])
    return float(np.mean(a.argmax(1) == b.argmax(1))), float(top5)


def run_case(name: str, spec: str, targets: str, runs: int, threads: int) -> dict:
    path = corpus.model_path(name)
    if name == "squeezenet":
        calib, reference, random_ = squeezenet_sets(name)
        evaluation = None
    else:
        calib, evaluation = corpus.split(corpus.dataset(name), 256)
    start = time.perf_counter()
    result = squeeze.compress(path, spec, calib=calib, eval=evaluation, targets=targets, runs=runs, threads=threads)
    rep = result.report
    row = {"model": name, "spec": spec, "seconds": time.perf_counter() - start, "failure": result.failure,
           "original": rep["original"]["bytes"], "final": rep["final"]["bytes"], "passes": rep["passes"]}
    if evaluation is not None:
        original = load_model(path)
        ref_ok = verify.accuracy(runtime.run(original, evaluation), evaluation.labels)
        new_ok = verify.accuracy(runtime.run(result.model, evaluation), evaluation.labels)
        row.update(top1=new_ok["top1"], original_top1=ref_ok["top1"], n=len(evaluation),
                   drop=100 * (ref_ok["top1"] - new_ok["top1"]), p=mcnemar(ref_ok["correct"], new_ok["correct"]))
    else:
        original = load_model(path)
        row["agreement"] = {"reference": agreement(original, result.model, reference),
                            "random": agreement(original, result.model, random_)}
    for t in rep.get("targets", []):
        check = t.get("numeric_check") or {}
        row["tvm"] = {"error": t.get("error"), "ok": check.get("ok"), "max_abs_rel": check.get("max_abs_rel"),
                      "rel_l2": check.get("rel_l2"), "latency": (t.get("latency_ms") or {}).get("p50"),
                      "original_latency": (t.get("original_latency_ms") or {}).get("p50")}
    return row


def roundtrip(name: str, unit: str) -> dict:
    """Codebook a corpus model (8 calibration samples), pack it, unpack it, compare the bytes."""
    from squeeze.data import input_specs, resolve_shapes  # noqa: PLC0415
    from squeeze.pipeline import run_pipeline  # noqa: PLC0415
    from squeeze.registry import get_pass  # noqa: PLC0415
    from squeeze.spec import bind  # noqa: PLC0415
    model = load_model(corpus.model_path(name))
    if name == "squeezenet":
        data = squeezenet_sets(name)[0]
    elif name == "ultraface":
        from squeeze.data import synthesize  # noqa: PLC0415
        specs = input_specs(model)
        data = synthesize(specs, resolve_shapes(specs, {}), 4, 0)
    else:
        data = corpus.dataset(name, 8)
    shapes = resolve_shapes(input_specs(model), {}, data)
    start = time.perf_counter()
    result = run_pipeline(model, bind(f"codebook(unit={unit})", get_pass), data, shapes)
    out = result.model
    packed = pack.pack(out, verify=False)
    exact = pack.unpack(packed.data).SerializeToString(deterministic=True) == out.SerializeToString(deterministic=True)
    return {"model": name, "unit": unit, "failure": result.failure, "exact": exact, "onnx": out.ByteSize(),
            "original_onnx": model.ByteSize(), "packed": len(packed.data),
            "bits": pack.size_report(out, packed)["bits_per_param"]["overall"],
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- report

def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def machine() -> list[str]:
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import sklearn  # noqa: PLC0415
    cpu = corpus.cpu_model()
    try:
        from importlib.metadata import version  # noqa: PLC0415
        tvm = version("apache-tvm")
    except Exception:  # not installed
        tvm = "not installed"
    return [f"- machine: {cpu}, {runtime.cpu_count()} usable core(s), {platform.system()} {platform.machine()}",
            f"- python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, TVM {tvm}, scikit-learn {sklearn.__version__}"]


def markdown(rows: list[dict], trips: list[dict], command: str, seconds: float) -> str:
    lines = ["# Quantization and weight sharing (issue 5)", "", f"Command: `{command}`", ""] + machine() + [
        f"- total run time {seconds:.0f} s", "",
        "Sizes: **ONNX** = the runnable model file; **packed** = the `squeeze pack` container (graph skeleton + "
        "weights; a real file); **weights** = its weight records (bit-packed / Huffman coded, decoder tables "
        "included); ratios against the original model's same figure. **bits/param** = packed weight bits per "
        "parameter over all weight tensors. Accuracy: labelled models evaluate on the samples after the first 256 "
        "(which calibrate); p = McNemar exact test of original vs compressed per-image correctness. TVM: compiled "
        "for this CPU (`cpu` target); check = TVM vs ONNX Runtime on the same model (QDQ models: against ORT with "
        "graph optimizations off, rel. L2 ≤ max(1e-2, 3 × ORT's own optimized-vs-unoptimized difference)); "
        "latency p50 batch 1, compressed / original on TVM.", "",
        "| model | passes | ONNX | packed | weights | bits/param | top-1 (drop, p) | TVM check | TVM ms (orig) | s |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        if r.get("failure"):
            lines.append(f"| {r['model']} | `{r['spec']}` | **failed:** {r['failure']} | | | | | | | |")
            continue
        o, f = r["original"], r["final"]
        if "top1" in r:
            acc = f"{100 * r['top1']:.2f} % ({r['drop']:+.2f} pt, p={r['p']:.2g}; n={r['n']})"
        else:
            (ref, ref5), (rnd, rnd5) = r["agreement"]["reference"], r["agreement"]["random"]
            acc = (f"agree {100 * ref:.0f} % ref set (top-5 {100 * ref5:.0f} %), "
                   f"{100 * rnd:.0f} % random (top-5 {100 * rnd5:.0f} %)")
        tvm = r.get("tvm")
        if tvm is None:
            check, lat = "not run", "—"
        elif tvm["error"]:
            check, lat = f"**error** {tvm['error'][:80]}", "—"
        else:
            check = f"{'ok' if tvm['ok'] else 'MISMATCH'} (max rel {tvm['max_abs_rel']:.1e})"
            both = tvm["latency"] and tvm["original_latency"]
            lat = f"{tvm['latency']:.2f} ({tvm['original_latency']:.2f})" if both else "—"
        lines.append(f"| {r['model']} | `{r['spec']}` | {_kb(f['onnx'])} ({_ratio(o['onnx'], f['onnx'])}) | "
                     f"{_kb(f['packed'])} ({_ratio(o['packed'], f['packed'])}) | "
                     f"{_kb(f['packed_weights'])} ({_ratio(o['packed_weights'], f['packed_weights'])}) | "
                     f"{f['bits_per_param']['overall']:.2f} | {acc} | {check} | {lat} | {r['seconds']:.0f} |")
    lines.append("")
    for r in rows:  # per-layer bits/param for the kernel codebooks (the paper reports 1.05–1.62 for conv layers)
        if "unit=kernel" in r["spec"] and not r.get("failure"):
            details = {e["layer"]: e for p in r["passes"] for e in p.get("details", {}).get("per_layer", [])}
            lines += [f"### {r['model']} `{r['spec']}`: bits per parameter by layer", "",
                      "| layer | unit | params | centroids | bits/param | weight rel. err | output rel. err |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for layer, bits in r["final"]["bits_per_param"]["layers"].items():
                e = details.get(layer, {})
                lines.append(f"| {layer} | {e.get('unit', '—')} | {e.get('params', '—')} | "
                             f"{e.get('centroids', '—')} | "
                             f"{bits:.3f} | {e.get('weight_rel_err', float('nan')):.3f} | "
                             f"{e.get('output_rel_err', float('nan')):.3f} |")
            lines.append("")
    if any("quant" in r["spec"] for r in rows):
        lines += ["What the targets do with QDQ: TVM 0.27 folds the weights' DequantizeLinear into float constants "
                  "and lowers QuantizeLinear/DequantizeLinear of activations to float round/clip arithmetic, then "
                  "runs float kernels: the `quant` rows are **int8 storage, float compute** (the pass records "
                  "`details.compute`), smaller files with int8 accuracy, no int8 speed-up (see the TVM ms column).",
                  ""]
    if trips:
        lines += ["## Pack/unpack round trip after `codebook` on every corpus model", "",
                  "| model | unit | bit-exact | ONNX before → after | packed | bits/param | s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for t in trips:
            if t["failure"]:
                lines.append(f"| {t['model']} | {t['unit']} | **failed:** {t['failure']} | | | | |")
                continue
            lines.append(f"| {t['model']} | {t['unit']} | {'yes' if t['exact'] else '**NO**'} | "
                         f"{_kb(t['original_onnx'])} → {_kb(t['onnx'])} | {_kb(t['packed'])} | {t['bits']:.2f} | "
                         f"{t['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="only cases whose model or spec contains one of these "
                        "comma-separated words")
    parser.add_argument("--no-tvm", action="store_true", help="skip compiling with TVM")
    parser.add_argument("--no-roundtrip", action="store_true", help="skip the pack/unpack table")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per latency (default 10)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "quant_codebook.md"))
    args = parser.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    if "prune" not in all_passes():
        try:  # until passes/__init__.py imports it
            import squeeze.passes.prune  # noqa: F401,PLC0415
        except ImportError:
            pass
    started = time.perf_counter()
    words = [w for w in args.cases.split(",") if w]
    rows = []
    for name, spec in CASES:
        if words and not any(w in name or w in spec for w in words):
            continue
        if any(pass_name not in all_passes() for pass_name, _ in parse(spec)):
            rows.append({"model": name, "spec": spec, "failure": "a pass in the spec is not registered"})
            continue
        print(f"{name}: {spec}", file=sys.stderr, flush=True)
        rows.append(run_case(name, spec, "" if args.no_tvm else "cpu", args.runs, args.threads))
    trips = []
    if not args.no_roundtrip:
        for name in ROUNDTRIP:
            for unit in ("weight", "kernel"):
                print(f"round trip: {name} {unit}", file=sys.stderr, flush=True)
                trips.append(roundtrip(name, unit))
    args_text = " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    command = f"/work/venv/bin/python benchmarks/quant_codebook.py {args_text}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, trips, command.strip(), time.perf_counter() - started) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
