"""prune on the three MANIFEST §7 mobile models (issue 16): MACs kept and the task metric, calibrated on the
first half of ocr_synth and evaluated on the second half.

    python benchmarks/ocr_prune.py ppocrv6_tiny_det "cleanup,fold-bn,prune(ratio=0.3)"
    python benchmarks/ocr_prune.py ppocrv6_tiny_rec "cleanup,fold-bn,prune(ratio=0.3,scope=sensitivity)" --rows

Prints one JSON line: MACs before/after, the task metric before/after with its drop and standard error (squeeze's
`--metric`, as benchmarks/real_models.py: det mask-iou:0.2, rec ctc character accuracy, layout agreement with the
original), the outputs' rel-L2 against the original; then the pass notes (and, with --rows, each refit layer's
held-out loss and each group's channels).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

import squeeze  # noqa: E402


def measure(name: str, passes: str, rows: bool = False, save: str | None = None) -> dict:
    """One pipeline on one §7 model through `squeeze.compress`, scored with squeeze's own task metric."""
    from real_models import metric_for  # noqa: PLC0415  (the metric each §7 model is judged by)
    with tempfile.TemporaryDirectory() as tmp:
        calib, evald = corpus.ocr_npz(name, tmp)
        started = time.perf_counter()
        result = squeeze.compress(str(corpus.model_path(name)), passes, calib=calib, eval=evald, targets="",
                                  metric=metric_for(name))
        seconds = time.perf_counter() - started
    result.raise_for_failure()
    if save:
        onnx.save(result.model, save)
    r = result.report
    row = {"model": name, "passes": passes, "macs_before": r["original"]["macs"], "macs_after": r["final"]["macs"],
           "macs_kept": round(r["final"]["macs"] / r["original"]["macs"], 4), "seconds": round(seconds)}
    m = r.get("metric") or {}
    row.update(metric=m.get("spec"), metric_before=m.get("original"), metric_after=m.get("final"),
               drop=m.get("drop"), drop_stderr=(m.get("stderr") or {}).get("drop"), n=m.get("n"))
    row["rel_l2_max"] = (r.get("fidelity") or {}).get("rel_l2")
    print(json.dumps(row))
    for step in r.get("passes", []):
        for note in step.get("notes", []):
            print("  note:", note[:300])
        if rows:
            for fit in step.get("details", {}).get("compensation", []):
                print(f"  refit {fit['node']}: {fit['method']}, held-out loss {fit['loss_before']:.4f} → "
                      f"{fit['loss_after']:.4f}")
            for g in step.get("details", {}).get("groups", []):
                print(f"  group {g['name']}: {g['channels_before']} → {g['channels_after']} channels")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=corpus.OCR_MODELS)
    parser.add_argument("passes")
    parser.add_argument("--rows", action="store_true", help="print each refit layer and each group")
    parser.add_argument("--save", help="write the compressed model here")
    args = parser.parse_args()
    measure(args.model, args.passes, args.rows, args.save)


if __name__ == "__main__":
    main()
