"""prune on the three MANIFEST §7 mobile models (issue 16): MACs kept and the task metric, calibrated on the
first half of ocr_synth and evaluated on the second half.

    python benchmarks/ocr_prune.py ppocrv6_tiny_det "cleanup,fold-bn,prune(ratio=0.3)"
    python benchmarks/ocr_prune.py ppocrv6_tiny_rec "cleanup,fold-bn,prune(ratio=0.3,scope=sensitivity)" --rows

Prints one JSON line: MACs before/after (at the evaluation size), the task metric before/after (det: mean IoU
of prob > 0.2 with the word masks; rec: greedy-CTC character accuracy; layout: none), the worst output rel-L2 and
the mean top-1 agreement along the last axis against the unpruned model; then the pass notes (and, with
--rows, each refit layer's held-out loss and each group's channels).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import squeeze  # noqa: E402
from squeeze import metrics  # noqa: E402

from benchmarks import corpus  # noqa: E402


def run(model: onnx.ModelProto, x: np.ndarray, batch: int = 8) -> list[np.ndarray]:
    """All outputs of `model` on `x` (ONNX Runtime, 1 thread; batch 1 where the model fixes it)."""
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1:
        batch = 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def mask_iou(outputs: list[np.ndarray], masks: np.ndarray) -> float:
    """Mean over pages of IoU((probability map > 0.2), word mask)."""
    ious = []
    for prob, mask in zip(outputs[0][:, 0], masks):
        a, b = prob > 0.2, mask > 0
        union = (a | b).sum()
        ious.append((a & b).sum() / union if union else 1.0)
    return float(np.mean(ious))


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_accuracy(outputs: list[np.ndarray], texts: np.ndarray) -> float:
    """Greedy CTC decode (0 = blank, 1..N = dict.txt lines, N+1 = space); mean of 1 − edit distance / length."""
    with open(corpus.ROOT / "ppocrv6_tiny_rec/dict.txt", encoding="utf-8") as f:
        chars = [line.rstrip("\n") for line in f]
    scores = []
    for row, truth in zip(outputs[0].argmax(-1), texts):
        decoded, last = [], -1
        for c in row:
            if c != last and c != 0:
                decoded.append(chars[c - 1] if c - 1 < len(chars) else " ")
            last = c
        truth = str(truth)
        scores.append(max(0.0, 1.0 - _edit_distance("".join(decoded), truth) / max(len(truth), 1)))
    return float(np.mean(scores))


METRICS = {"ppocrv6_tiny_det": ("masks", mask_iou), "ppocrv6_tiny_rec": ("texts", char_accuracy)}


def measure(name: str, passes: str, rows: bool = False, save: str | None = None) -> dict:
    x, truth = corpus.ocr_arrays(name)
    half = len(x) // 2
    key = corpus._input_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, **{key: x[:half]})
        started = time.perf_counter()
        result = squeeze.compress(str(corpus.model_path(name)), passes, calib=calib, targets="")
        seconds = time.perf_counter() - started
    result.raise_for_failure()
    if save:
        onnx.save(result.model, save)
    original = onnx.load(str(corpus.model_path(name)))
    evaluation = x[half:]
    shape = (1,) + evaluation.shape[1:]
    before, after = run(original, evaluation), run(result.model, evaluation)
    macs = [metrics.summary(m, {key: shape})["macs"] for m in (original, result.model)]
    row = {"model": name, "passes": passes, "macs_before": macs[0], "macs_after": macs[1],
           "macs_kept": round(macs[1] / macs[0], 4), "seconds": round(seconds)}
    if name in METRICS:
        field, metric = METRICS[name]
        row["metric_before"] = round(metric(before, truth[field][half:]), 4)
        row["metric_after"] = round(metric(after, truth[field][half:]), 4)
    row["rel_l2_max"] = round(max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
                                  for a, b in zip(after, before)), 4)
    row["top1_agreement"] = round(float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean()
                                                 for a, b in zip(after, before)])), 4)
    print(json.dumps(row))
    for step in result.report.get("passes", []):
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
