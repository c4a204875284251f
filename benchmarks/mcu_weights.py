"""Compact weights and int8 compute in MCU firmware (issue 18, items 1-2): flash, RAM and instructions of float /
quant / codebook(bits=4) firmware on the corpus MNIST/CIFAR models, against the float model's firmware.

    .venv/bin/python benchmarks/mcu_weights.py                              # → benchmarks/results/mcu_weights.md
    .venv/bin/python benchmarks/mcu_weights.py --models mnist_ortjava --samples 4

Each model is compressed by the real pipeline (`squeeze.compress`, calibrated on the first 256 corpus samples),
then built by the `mcu` target (board mps2-an386: Cortex-M4, the QEMU board itself, 4 MiB flash / 4 MiB RAM) and
run in QEMU with -icount on evaluation samples; the outputs are compared with ONNX Runtime on the same compressed
model (a QDQ model without ORT's graph optimizations, i.e. its exact QDQ semantics, as the report's check does).
`quant` runs its int8 layers in squeeze's int8 C kernels on the int8 weights in flash (`compute=auto`, the
default); the `quant (compute=float)` row is the same model in TVM's float kernels with its compact weights decoded
per layer into a RAM scratch (what the firmware did before). `codebook` keeps packed indices + codebooks in flash,
decoded per layer. "fits" lists the board presets whose flash and RAM hold the measured firmware.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
import squeeze  # noqa: E402
from squeeze import runtime  # noqa: E402
from squeeze.targets.mcu import BOARDS, Mcu  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MODELS = ["mnist_ortjava", "mnist_burn", "cifar10_resnet4b"]
# (passes, weights=, compute=): `quant` with the default int8 kernels, and with every layer in TVM's float kernels
# (compact weights decoded into RAM: what the firmware did before int8 compute)
CASES = [("", "auto", "auto"), ("quant", "auto", "auto"), ("quant", "auto", "float"),
         ("codebook(bits=4)", "auto", "auto")]


def compressed(name: str, spec: str):
    """(the model after `spec`, evaluation Dataset)."""
    ds = corpus.dataset(name)
    calib, test = corpus.split(ds, 256)
    model = squeeze.compress(corpus.model_path(name), spec, calib=calib, targets=[], runs=1).model
    return model, test


def ort_outputs(model, samples) -> np.ndarray:
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    sess = runtime.session(model, 1, optimize=not qdq)
    return np.stack([sess.run(None, s)[0] for s in samples])


def fits(flash: int, ram: int) -> str:
    names = [n for n, b in BOARDS.items() if not n.startswith("mps2") and flash <= b.flash and ram <= b.ram]
    return ", ".join(names) or "none of the presets"


def firmware(model, feeds: list[dict], weights: str, workdir: Path, compute: str = "auto") -> dict:
    """Build `model` for the mcu target with `weights`, run it in QEMU on `feeds`; its figures and its outputs'
    difference from ONNX Runtime's (also mcu_codebook_flash's measurement)."""
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    target = Mcu(weights=weights, compute=compute, runs=1)
    start = time.perf_counter()
    artifact = target.build(model, shapes, workdir)
    measured = target.measure(artifact, feeds, 1)
    got, want = measured.outputs["0"], ort_outputs(model, feeds)
    e = measured.extra
    return {"flash": e["flash_bytes"], "ram": e["ram_bytes"], "instructions": e["instructions"],
            "flash_parts": e["flash_breakdown"], "ram_parts": e["ram_breakdown"], "layers": e["layers"],
            "why": e["weights"]["why"], "max_abs": float(np.abs(got - want).max()),
            "compute": artifact.info.get("compute", "float"),
            "rel_l2": float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)),
            "top1": float(np.mean(got.reshape(len(feeds), -1).argmax(1) == want.reshape(len(feeds), -1).argmax(1))),
            "seconds": round(time.perf_counter() - start, 1)}


def measure(name: str, spec: str, weights: str, compute: str, samples: int, workdir: Path) -> dict:
    model, test = compressed(name, spec)
    row = firmware(model, test.samples(samples), weights, workdir, compute)
    return {"model": name, "spec": spec or "(float)", "weights": weights, "compute_option": compute, **row,
            "fits": fits(row["flash"], row["ram"])}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | passes | compute | flash | × float | code | float weights | compact weights | tables | "
             "RAM | decode scratch | instructions | × float | max abs diff vs ORT | rel L2 | top-1 agree | "
             "fits (presets) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r for r in rows if r["spec"] == "(float)"}
    for r in rows:
        b = base.get(r["model"])
        f = r["flash_parts"]
        ratio = f"{r['flash'] / b['flash']:.3f}" if b else "—"
        iratio = f"{r['instructions'] / b['instructions']:.3f}" if b and r["instructions"] else "—"
        compute = r["compute"] + (" (compute=float)" if r["compute_option"] == "float" else "")
        lines.append(f"| {r['model']} | `{r['spec']}` | {compute} | {r['flash']:,} | {ratio} | {f['code']:,} | "
                     f"{f['weights_float']:,} | {f['weights_compact']:,} | {f['tables']:,} | {r['ram']:,} | "
                     f"{r['ram_parts']['decode_scratch']:,} | {r['instructions']:,} | {iratio} | "
                     f"{r['max_abs']:.2e} | {r['rel_l2']:.1e} | {r['top1']:.2f} | {r['fits']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "mcu_weights.md"))
    args = ap.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}")
        return 1
    why = Mcu().missing()
    if why:
        print(why)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="squeeze-mcu-weights-") as tmp:
        for name in args.models:
            for spec, weights, compute in CASES:
                try:
                    rows.append(measure(name, spec, weights, compute, args.samples,
                                        Path(tmp) / f"{name}-{len(rows)}"))
                except Exception as exc:  # a model the board cannot hold: say so in the table, keep going
                    print(f"{name} {spec or '(float)'} compute={compute}: {type(exc).__name__}: {exc}")
                    continue
                r = rows[-1]
                print(f"{name} {r['spec']} compute={r['compute']}: flash {r['flash']:,} RAM {r['ram']:,} "
                      f"instructions {r['instructions']:,} max|diff| {r['max_abs']:.2e} ({r['seconds']} s)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    command = "python benchmarks/mcu_weights.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Compact weights and int8 compute in MCU firmware (issue 18, items 1-2)", "",
             f"- command: `{command.strip()}`", f"- commit: {commit}",
             f"- machine: {corpus.cpu_model()} ({platform.machine()}), {platform.system()}; arm-none-eabi-gcc -O2, "
             "qemu-system-arm -M mps2-an386 (Cortex-M4, 4 MiB flash / 4 MiB RAM) with -icount",
             f"- samples: {args.samples} evaluation samples per model (after the 256 calibration samples)", "",
             *table(rows), "",
             "Flash = code + float weights + compact weights + tables (scales, zero points, codebooks) + other "
             "(tensor descriptors, call tables, kernel constants); measured from the ELF's sections and symbols. "
             "RAM = arena (activations + I/O) + decode scratch + workspace pool + other static + measured stack. "
             "Instructions: QEMU -icount, one inference (not cycles). compute: the arithmetic of the Conv/Gemm "
             "layers — `int8`: squeeze's int8 C kernels (SMLAD, CMSIS-NN style; targets/mcu_int8.py) on the int8 "
             "weights in flash; `float`: TVM's float C kernels, compact weights decoded into the RAM scratch before "
             "their layer (`quant` with compute=float is what the firmware did before the int8 kernels).", ""]
    for r in rows:
        if r["compute_option"] == "auto" and r["spec"] != "(float)":
            lines += [f"## {r['model']} `{r['spec']}`: per layer", "", r["why"] + ".", "",
                      "| layer | op | MACs | weight storage | weight flash | as float32 | compute |",
                      "|---|---|---:|---|---:|---:|---|"]
            for x in r["layers"]:
                size = f"{x['flash_bytes']:,}" if x.get("flash_bytes") is not None else "—"
                full = f"{x['float_bytes']:,}" if x.get("float_bytes") is not None else "—"
                lines.append(f"| {x['layer']} | {x['op']} | {x['macs']:,} | {x['storage']} | {size} | {full} | "
                             f"{x['compute']} |")
            lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
