"""3- and 4-bit codebooks on the CIFAR corpus models, by variant of the `codebook` pass (issue 19 item 2).

    .venv/bin/python benchmarks/codebook_bits.py                      # → benchmarks/results/codebook_bits.md
    .venv/bin/python benchmarks/codebook_bits.py --models cifar10_resnet4b --variants default --bits 3 --out -

The first 256 images calibrate, images 256..1016 evaluate (n = 761; never used to fit or to choose). Each row
runs the pass through the real pipeline (`run_pipeline`, every pass verified), evaluates top-1 with ONNX Runtime,
and packs the result with `squeeze.pack` (the real container): "packed" is the packed file's size as a ratio of
the original model's packed size. SE = the standard error of the compressed model's top-1 (binomial, n = 761);
drop = original top-1 − compressed top-1 on the same images; p = McNemar's exact test on the paired per-image
correctness.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
from squeeze import pack, runtime, verify  # noqa: E402
from squeeze.data import input_specs, resolve_shapes  # noqa: E402
from squeeze.model import load_model  # noqa: E402
from squeeze.pipeline import run_pipeline  # noqa: E402
from squeeze.registry import get_pass  # noqa: E402
from squeeze.spec import bind  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MODELS = ["cifar10_resnet4b", "sri_resnet_a"]
VARIANTS = {  # name → extra codebook arguments
    "default": "",
    "nearest (before)": "assign=nearest",
    "gptq damp=0.01": "damp=0.01",
}


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import binomtest  # noqa: PLC0415
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def run(name: str, args: str, bits: int, seed: int = 0) -> dict:
    model = load_model(corpus.model_path(name))
    calib, evaluation = corpus.split(corpus.dataset(name, 1017), 256)
    shapes = resolve_shapes(input_specs(model), {}, calib)
    spec = f"codebook(bits={bits}{',' + args if args else ''})"
    start = time.perf_counter()
    out = run_pipeline(model, bind(spec, get_pass), calib, shapes, seed=seed).model
    seconds = time.perf_counter() - start
    ref = verify.accuracy(runtime.run(model, evaluation), evaluation.labels)
    new = verify.accuracy(runtime.run(out, evaluation), evaluation.labels)
    n = len(evaluation)
    top1 = new["top1"]
    return {"model": name, "spec": spec, "bits": bits, "n": n, "top1": 100 * top1,
            "drop": 100 * (ref["top1"] - top1), "se": 100 * np.sqrt(top1 * (1 - top1) / n),
            "p": mcnemar(ref["correct"], new["correct"]),
            "packed": len(pack.pack(model).data) / len(pack.pack(out).data), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS, or raw codebook "
                        "arguments prefixed with 'args:' (e.g. 'args:assign=nearest')")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--seeds", default="0", help="seeds (k-means init, calibration row sampling); the table "
                        "gives seed 0's row and the mean drop over all")
    parser.add_argument("--out", default=str(RESULTS / "codebook_bits.md"), help="'-' prints only")
    opts = parser.parse_args()
    rows = []
    for name in opts.models.split(","):
        for variant in opts.variants.split(";" if ";" in opts.variants else ","):
            args = variant[5:] if variant.startswith("args:") else VARIANTS[variant]
            for bits in (int(b) for b in opts.bits.split(",")):
                runs = []
                for seed in (int(s) for s in opts.seeds.split(",")):
                    row = run(name, args, bits, seed)
                    runs.append(row)
                    print(f"{name:18s} {variant:28s} {bits} seed {seed}  top-1 {row['top1']:.2f} (drop "
                          f"{row['drop']:+.2f} ± {row['se']:.2f}, p={row['p']:.2g}) packed {row['packed']:.2f}x  "
                          f"{row['seconds']:.0f}s", flush=True)
                row = dict(runs[0], variant=variant, mean_drop=float(np.mean([r["drop"] for r in runs])),
                           seeds=len(runs))
                rows.append(row)
    if opts.out == "-":
        return
    command = "python benchmarks/codebook_bits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# Codebook bits (issue 19 item 2)", "", f"Command: `{command.strip()}`", "",
             f"- machine: {corpus.cpu_model()}, {platform.system()} {platform.machine()}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "- calibration: images 0..255; evaluation: images 256..1016 (n = 761). SE: standard error of the "
             "compressed top-1; drop: original − compressed on the same images; p: McNemar exact; packed: "
             "original packed bytes / compressed packed bytes (`squeeze.pack`, codebooks and indices included)", "",
             "| model | variant | spec | bits | top-1 % | drop (pt) | SE (pt) | p | mean drop (seeds) | packed | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | `{r['spec']}` | {r['bits']} | {r['top1']:.2f} | "
                     f"{r['drop']:+.2f} | {r['se']:.2f} | {r['p']:.2g} | {r['mean_drop']:+.2f} ({r['seeds']}) | "
                     f"{r['packed']:.2f}× | {r['seconds']:.0f} |")
    Path(opts.out).write_text("\n".join(lines) + "\n")
    print("wrote", opts.out)


if __name__ == "__main__":
    main()
