"""Verification run after every pass: ONNX checker with strict shape inference, and numeric fidelity.

Fidelity compares a model's outputs against a reference model's outputs on the same inputs (ONNX Runtime):
max absolute error, relative L2 error, and top-1 agreement when an output looks like class scores.
"""
from __future__ import annotations

import numpy as np
import onnx

from .errors import PassError
from .model import is_big, without_weights


def check_structure(model: onnx.ModelProto) -> None:
    """Raise PassError if the model fails `onnx.checker` (full check) or strict shape inference."""
    if is_big(model):  # the checker serializes the model: check it without its large weights (as inputs)
        model = without_weights(model, as_inputs=True)[0]
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # checker, inference and protobuf raise several unrelated types
        raise PassError(f"model fails the ONNX checker: {str(exc).strip().splitlines()[0][:300]}") from exc


def looks_like_scores(arr: np.ndarray) -> bool:
    """[N, C] (or [N, C, 1, 1]) with C >= 2: treat as class scores and compare argmax."""
    squeezed = arr.reshape(arr.shape[0], -1) if arr.ndim >= 2 and int(np.prod(arr.shape[2:])) == 1 else None
    return squeezed is not None and squeezed.shape[1] >= 2 and arr.dtype.kind == "f"


def output_loss(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """How far a model's outputs moved: KL divergence of the class distributions for class-score outputs
    (logits, log-probabilities or probabilities), relative squared error otherwise; summed over outputs."""
    total = 0.0
    for name, ref in reference.items():
        new = candidate[name]
        if looks_like_scores(ref):
            p, q = _distribution(ref), _distribution(new)
            total += float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
        else:
            ref64 = ref.astype(np.float64)
            total += float(((new.astype(np.float64) - ref64) ** 2).sum() / max((ref64 ** 2).sum(), 1e-30))
    return total


def _distribution(scores: np.ndarray) -> np.ndarray:
    x = scores.reshape(scores.shape[0], -1).astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """Per-output and worst-case error of `candidate` against `reference` (same output names, same samples)."""
    per_output = {}
    for name, ref in reference.items():
        new = candidate[name]
        if ref.shape != new.shape:
            per_output[name] = {"shape_mismatch": [list(ref.shape), list(new.shape)]}
            continue
        ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: counted below as non-finite, not warned
            diff = np.abs(ref64 - new64)
            finite = np.isfinite(diff)
            scale = float(np.max(np.abs(ref64[np.isfinite(ref64)]), initial=0.0))
            entry = {
                "max_abs": float(diff[finite].max(initial=0.0)),
                "rel_l2": float(np.linalg.norm((ref64 - new64)[finite]) / max(np.linalg.norm(ref64[finite]), 1e-30)),
                "scale": scale,
            }
        entry["max_abs_rel"] = entry["max_abs"] / scale if scale > 0 else entry["max_abs"]
        if not finite.all():
            entry["non_finite"] = int((~finite).sum())
        if looks_like_scores(ref):
            entry["top1_agreement"] = top1_agreement(ref, new)
        per_output[name] = entry
    worst = {}
    for key in ("max_abs", "rel_l2", "max_abs_rel"):
        values = [e[key] for e in per_output.values() if key in e]
        if values:
            worst[key] = max(values)
    agreements = [e["top1_agreement"] for e in per_output.values() if "top1_agreement" in e]
    if agreements:
        worst["top1_agreement"] = min(agreements)
    if any("shape_mismatch" in e for e in per_output.values()):
        worst["shape_mismatch"] = True
    return {**worst, "outputs": per_output}


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.reshape(reference.shape[0], -1)
    new = candidate.reshape(candidate.shape[0], -1)
    return float(np.mean(ref.argmax(1) == new.argmax(1)))


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict | None:
    """Top-1 accuracy of the first class-score output against integer labels; None if no output fits."""
    for name, out in outputs.items():
        if looks_like_scores(out) and len(out) == len(labels):
            pred = out.reshape(out.shape[0], -1).argmax(1)
            correct = pred == labels
            return {"top1": float(correct.mean()), "n": int(len(labels)), "output": name,
                    "correct": correct}
    return None
