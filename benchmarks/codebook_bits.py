"""3- and 4-bit codebooks on the CIFAR corpus models, by variant of the `codebook` pass (issue 19 item 2).

    .venv/bin/python benchmarks/codebook_bits.py                      # → benchmarks/results/codebook_bits.md
    .venv/bin/python benchmarks/codebook_bits.py --models cifar10_resnet4b --variants default --bits 3 --out -

The first 256 images calibrate, images 256..1016 evaluate (n = 761; never used to fit or to choose). Each row
runs the pass through the real pipeline (`run_pipeline`, every pass verified), evaluates top-1 with ONNX Runtime,
and packs the result with `squeeze.pack` (the real container): "packed" is the packed file's size as a ratio of
the original model's packed size. SE = the standard error of the compressed model's top-1 (binomial, n = 761);
drop = original top-1 − compressed top-1 on the same images; p = McNemar's exact test on the paired per-image
correctness.

The default is chosen on validation data, never on images 256+: `--validation` fits each variant on the
calibration images without every 4th (192) and measures it on the 64 held out (`Dataset.split_holdout`); its rows
are kept in results/codebook_bits_validation.json (merged by model, variant, bits, seed) and the main run prints
them in the "Variants tried" table. The criterion is the relative L2 error of the logits on those 64 images (top-1
on 64 images has a standard error of about 5 points; the logits error is a far steadier measure of the same
damage), averaged over both models.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
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
VALIDATION = RESULTS / "codebook_bits_validation.json"
MODELS = ["cifar10_resnet4b", "sri_resnet_a"]
VARIANTS = {  # name → extra codebook arguments
    "default": "",
    "scale=layer (before)": "scale=layer",
    "nearest (Deep Compression)": "assign=nearest,scale=layer",
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
    paired = ref["correct"].astype(np.float64) - new["correct"].astype(np.float64)
    return {"model": name, "spec": spec, "bits": bits, "n": n, "top1": 100 * top1,
            "drop": 100 * (ref["top1"] - top1), "se": 100 * np.sqrt(top1 * (1 - top1) / n),
            "se_drop": 100 * float(paired.std(ddof=1) / np.sqrt(n)),
            "p": mcnemar(ref["correct"], new["correct"]),
            "packed": len(pack.pack(model).data) / len(pack.pack(out).data), "seconds": seconds}


def validate(name: str, args: str, bits: int, seed: int = 0) -> dict:
    """The variant fitted on the calibration images without every 4th (192) and measured on those held out (64
    of images 0..255; `Dataset.split_holdout`): what chooses the default. Never touches images 256+."""
    model = load_model(corpus.model_path(name))
    calib, _ = corpus.split(corpus.dataset(name, 1017), 256)
    fit, held = calib.split_holdout(4)
    shapes = resolve_shapes(input_specs(model), {}, fit)
    spec = f"codebook(bits={bits}{',' + args if args else ''})"
    out = run_pipeline(model, bind(spec, get_pass), fit, shapes, seed=seed).model
    ref_out, new_out = runtime.run(model, held), runtime.run(out, held)
    ref, new = verify.accuracy(ref_out, held.labels), verify.accuracy(new_out, held.labels)
    a, b = (np.asarray(next(iter(o.values())), np.float64) for o in (ref_out, new_out))
    return {"model": name, "spec": spec, "bits": bits, "seed": seed, "n": len(held),
            "drop": 100 * (ref["top1"] - new["top1"]),
            "agree": 100 * float(np.mean(a.argmax(1) == b.argmax(1))),
            "rel_l2": float(np.linalg.norm(b - a) / np.linalg.norm(a))}


def _variants(text: str) -> list[str]:
    """`--variants`: names or 'args:...' entries, separated by ';' (or by ',' when no entry is raw arguments)."""
    return text.split(";") if ";" in text or text.startswith("args:") else text.split(",")


def _store_validation(row: dict) -> None:
    rows = json.loads(VALIDATION.read_text()) if VALIDATION.exists() else []
    key = (row["model"], row["args"], row["bits"], row["seed"])
    rows = [r for r in rows if (r["model"], r["args"], r["bits"], r["seed"]) != key] + [row]
    VALIDATION.write_text(json.dumps(sorted(rows, key=lambda r: (r["bits"], r["args"], r["model"], r["seed"])),
                                     indent=1) + "\n")


def _validation_section() -> list[str]:
    """The "Variants tried" table: every stored validation row, per variant the mean logits error over models."""
    if not VALIDATION.exists():
        return []
    rows = json.loads(VALIDATION.read_text())
    models = sorted({r["model"] for r in rows})
    lines = ["", "## Variants tried (validation: fit on images 0..255 without every 4th, measured on the 64 held "
             "out; never images 256+)", "",
             "Command pattern: `python benchmarks/codebook_bits.py --validation --variants 'args:<codebook args>' "
             "--bits 3`. Per model: logits relative L2 error vs the original / top-1 drop (pt) / top-1 agreement "
             "with the original, n = 64. The default is the variant with the lowest mean logits error over the "
             "models (top-1 on 64 images has a standard error of about 5 pt).", "",
             "| bits | variant (codebook args) | " + " | ".join(models) + " | mean logits error |",
             "|---:|---|" + "---:|" * (len(models) + 1)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["bits"], r["args"], r.get("note", "")), {}).setdefault(r["model"], []).append(r)
    for (bits, args, note), per in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        cells, errs = [], []
        for m in models:
            got = per.get(m)
            if not got:
                cells.append("—")
                continue
            err = float(np.mean([r["rel_l2"] for r in got]))
            errs.append(err)
            cells.append(f"{err:.4f} / {np.mean([r['drop'] for r in got]):+.1f} / "
                         f"{np.mean([r['agree'] for r in got]):.1f}%")
        mean = f"{np.mean(errs):.4f}" if len(errs) == len(models) else "—"
        label = f"`{args or '(defaults)'}`" + (f" ({note})" if note else "")
        lines.append(f"| {bits} | {label} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS, or raw codebook "
                        "arguments prefixed with 'args:' (e.g. 'args:assign=nearest')")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--seeds", default="0", help="seeds (k-means init, calibration row sampling); the table "
                        "gives seed 0's row and the mean drop over all")
    parser.add_argument("--out", default=str(RESULTS / "codebook_bits.md"), help="'-' prints only")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--validation", action="store_true", help="only the validation rows (fit on 192 of images "
                        "0..255, measured on the other 64): what the default is chosen by; merged into "
                        "results/codebook_bits_validation.json unless --out -")
    opts = parser.parse_args()
    if opts.validation:
        for name in opts.models.split(","):
            for variant in _variants(opts.variants):
                args = variant[5:] if variant.startswith("args:") else VARIANTS[variant]
                for bits in (int(b) for b in opts.bits.split(",")):
                    for seed in (int(s) for s in opts.seeds.split(",")):
                        r = validate(name, args, bits, seed)
                        print(f"VAL {name:18s} {variant:28s} {bits} seed {seed}  n={r['n']} drop {r['drop']:+.2f} "
                              f"agree {r['agree']:.1f}% logits rel-L2 {r['rel_l2']:.4f}", flush=True)
                        if opts.out != "-":
                            _store_validation(dict(r, args=args))
        return
    cells = [(name, variant, bits, seed) for name in opts.models.split(",") for variant in _variants(opts.variants)
             for bits in (int(b) for b in opts.bits.split(",")) for seed in (int(s) for s in opts.seeds.split(","))]
    with concurrent.futures.ProcessPoolExecutor(opts.jobs) as pool:
        futures = [pool.submit(run, name, variant[5:] if variant.startswith("args:") else VARIANTS[variant], bits,
                               seed) for name, variant, bits, seed in cells]
        done = {}
        for cell, future in zip(cells, futures):
            row = done[cell] = future.result()
            name, variant, bits, seed = cell
            print(f"{name:18s} {variant:28s} {bits} seed {seed}  top-1 {row['top1']:.2f} (drop "
                  f"{row['drop']:+.2f} ± {row['se_drop']:.2f}, p={row['p']:.2g}) packed {row['packed']:.2f}x  "
                  f"{row['seconds']:.0f}s", flush=True)
    rows = []
    for key in dict.fromkeys(c[:3] for c in cells):
        runs = [done[c] for c in cells if c[:3] == key]
        rows.append(dict(runs[0], variant=key[1], mean_drop=float(np.mean([r["drop"] for r in runs])),
                         seeds=len(runs)))
    if opts.out == "-":
        return
    command = "python benchmarks/codebook_bits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# Codebook bits (issue 19 item 2)", "", f"Command: `{command.strip()}`", "",
             f"- machine: {corpus.cpu_model()}, {platform.system()} {platform.machine()}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "- calibration: images 0..255; evaluation: images 256..1016 (n = 761). SE: standard error of the "
             "compressed top-1; drop: original − compressed on the same images; p: McNemar exact; packed: "
             "original packed bytes / compressed packed bytes (`squeeze.pack`, codebooks and indices included)", "",
             "| model | variant | spec | bits | top-1 % | drop (pt) | SE drop (pt) | SE top-1 (pt) | p | "
             "mean drop (seeds) | packed | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | `{r['spec']}` | {r['bits']} | {r['top1']:.2f} | "
                     f"{r['drop']:+.2f} | {r['se_drop']:.2f} | {r['se']:.2f} | {r['p']:.2g} | "
                     f"{r['mean_drop']:+.2f} ({r['seeds']}) | {r['packed']:.2f}× | {r['seconds']:.0f} |")
    lines += ["", "The default is `scale=channel,rounds=4,head_bits=6` (float16 per-channel scales, refitted with "
              "the centroids; four GPTQ assignment/refit rounds; an output layer under 2 % of the weights, here "
              "the 1000-weight classifier Gemm, at 6 index bits, the others at `bits`), chosen on validation "
              "(below). Rows before head_bits: `git show 985e626:benchmarks/results/codebook_bits.md`; before "
              "channel scales: `git show 44c8e91:benchmarks/results/codebook_bits.md`."]
    lines += _validation_section()
    Path(opts.out).write_text("\n".join(lines) + "\n")
    print("wrote", opts.out)


if __name__ == "__main__":
    main()
