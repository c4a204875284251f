"""MCU flash of `codebook(bits=4)` with its default per-channel scales (scale=channel) against scale=layer and the
float model (issue 19/18 regression: the channel-scaled rebuild had no compact form and fell back to float weights).

    .venv/bin/python benchmarks/mcu_codebook_flash.py        # → benchmarks/results/mcu_codebook_flash.md

Each model is compressed by the real pipeline (`squeeze.compress`; cifar10_resnet4b calibrated on the first 256
corpus images, digits_cnn on models/digits_calib.npz), built by the `mcu` target (board mps2-an386, Cortex-M4) and
run in QEMU with -icount on a few evaluation samples (CIFAR images 256+, models/digits_test.npz), the firmware's
outputs compared with ONNX Runtime on the same compressed model. `weights=float` on the scale=channel model is the
firmware the MCU target built for it before the channel-scaled form existed (every weight float in flash).
"""
from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
from benchmarks.mcu_weights import firmware  # noqa: E402
import squeeze  # noqa: E402
from squeeze.data import Dataset  # noqa: E402
from squeeze.targets.mcu import Mcu  # noqa: E402  (Mcu().missing())

RESULTS = REPO / "benchmarks" / "results"
MODELS = ["digits_cnn", "cifar10_resnet4b"]
CASES = [("", "auto"), ("codebook(bits=4)", "auto"), ("codebook(bits=4)", "float"),
         ("codebook(bits=4,scale=layer)", "auto")]


def data(name: str) -> tuple[Path, Dataset, Dataset]:
    """(model path, calibration data, evaluation data)."""
    if name == "digits_cnn":
        def load(path):
            arrays = dict(np.load(path))
            labels = arrays.pop("labels", None)
            return Dataset(arrays, labels, str(path), {})
        return (REPO / "models" / "digits_cnn.onnx", load(REPO / "models" / "digits_calib.npz"),
                load(REPO / "models" / "digits_test.npz"))
    calib, test = corpus.split(corpus.dataset(name), 256)
    return corpus.model_path(name), calib, test


def measure(name: str, spec: str, weights: str, samples: int, workdir: Path, cache: dict) -> dict:
    path, calib, test = data(name)
    if (name, spec) not in cache:
        cache[name, spec] = squeeze.compress(path, spec, calib=calib, targets=[], runs=1).model if spec else \
            onnx.load(path)
    row = firmware(cache[name, spec], test.samples(samples), weights, workdir)
    return {"model": name, "spec": spec or "(float)", "weights": weights, **row, "parts": row["flash_parts"],
            "storage": "; ".join(sorted({x["storage"] for x in row["layers"]}))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "mcu_codebook_flash.md"))
    args = ap.parse_args(argv)
    why = Mcu().missing()
    if why:
        print(why)
        return 1
    rows, cache = [], {}
    with tempfile.TemporaryDirectory(prefix="squeeze-mcu-codebook-") as tmp:
        for name in args.models:
            for spec, weights in CASES:
                rows.append(measure(name, spec, weights, args.samples, Path(tmp) / f"{name}-{len(rows)}", cache))
                r = rows[-1]
                print(f"{name} {r['spec']} weights={weights}: flash {r['flash']:,} RAM {r['ram']:,} "
                      f"max|diff| {r['max_abs']:.2e} ({r['seconds']} s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()
    command = "python benchmarks/mcu_codebook_flash.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# MCU flash of codebook(bits=4): per-channel scales vs scale=layer vs float", "",
             f"- command: `{command.strip()}`", f"- commit: {commit}",
             (f"- machine: {corpus.cpu_model()} ({platform.machine()}); arm-none-eabi-gcc -O2, qemu-system-arm "
              "-M mps2-an386 (Cortex-M4) with -icount"),
             f"- samples: {args.samples} evaluation samples per firmware (outputs vs ONNX Runtime)", "",
             ("| model | passes | weights | flash | × float | float weights | compact weights | tables | RAM | "
              "instructions | max abs diff vs ORT | weight storage |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r["flash"] for r in rows if r["spec"] == "(float)"}
    for r in rows:
        p = r["parts"]
        lines.append(f"| {r['model']} | `{r['spec']}` | {r['weights']} | {r['flash']:,} | "
                     f"{r['flash'] / base[r['model']]:.3f} | {p['weights_float']:,} | {p['weights_compact']:,} | "
                     f"{p['tables']:,} | {r['ram']:,} | {r['instructions']:,} | {r['max_abs']:.2e} | "
                     f"{r['storage']} |")
    lines += ["", ("Flash = code + float weights + compact weights + tables (codebooks, channel scales) + other, "
                   "from the ELF. `codebook(bits=4)` weights=float is what the firmware held before the "
                   "channel-scaled form was recognised (the regression). Instructions: QEMU -icount, one inference."),
              ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
