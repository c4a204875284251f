"""The accuracy guard (`--max-drop X`): back a pass off instead of failing when it costs too much accuracy.

After a pass, the drop from the *original* model is measured on the guard data (top-1 points when it has labels,
else 100 × (1 − top-1 agreement) for class scores, else 100 × relative L2 error). Over the limit, the guard:

1. measures each changed layer's sensitivity on the calibration data (the pass applied to that layer alone),
   then leaves the most sensitive layers untouched, one more at a time, until the drop is within the limit
   (passes that declare a `skip` parameter and list their layers in `ctx.details["layers"]`);
2. otherwise weakens the pass's strength parameter step by step (halve a ratio, add a bit);
3. otherwise reverts the pass.

Every attempt is recorded, so the report says what was backed off and why.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx

from . import runtime, verify
from .context import Context
from .data import Dataset
from .errors import SqueezeError
from .spec import Call

Attempt = Callable[[dict[str, Any]], tuple[onnx.ModelProto, Context]]


class Guard:
    def __init__(self, original: onnx.ModelProto, max_drop: float, data: Dataset, calib: Dataset,
                 threads: int | None = None):
        self.max_drop = max_drop
        self.data = data
        self.calib = calib
        self.threads = threads
        self.reference = runtime.run(original, data, threads=threads)
        self.calib_reference = runtime.run(original, calib, threads=threads)
        self.basis = "top-1 points on labelled data" if data.labels is not None else "disagreement with the original"

    def drop(self, model: onnx.ModelProto) -> float:
        """Drop (in points) of `model` against the original on the guard data."""
        return self._drop(runtime.run(model, self.data, threads=self.threads), self.reference, self.data.labels)

    def calib_drop(self, model: onnx.ModelProto) -> float:
        return self._drop(runtime.run(model, self.calib, threads=self.threads), self.calib_reference, None)

    @staticmethod
    def _drop(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
        if labels is not None:
            new, ref = verify.accuracy(outputs, labels), verify.accuracy(reference, labels)
            if new is not None and ref is not None:
                return 100.0 * (ref["top1"] - new["top1"])
        fid = verify.fidelity(reference, outputs)
        if "top1_agreement" in fid:
            return 100.0 * (1.0 - fid["top1_agreement"])
        return 100.0 * fid.get("rel_l2", 0.0)

    def run(self, call: Call, attempt: Attempt, progress: Callable[[str], None]
            ) -> tuple[onnx.ModelProto, Context, dict]:
        """Apply the pass under the guard; return (model, context, record of what was backed off)."""
        log: list[dict] = []
        params = dict(call.params)
        model, ctx = attempt(params)
        drop = self.drop(model)
        log.append({"params": _shown(params), "drop": round(drop, 4)})
        record = {"max_drop": self.max_drop, "basis": self.basis, "attempts": log, "action": "none",
                  "drop": round(drop, 4)}
        if drop <= self.max_drop:
            return model, ctx, record
        backoff = call.entry.backoff
        if backoff is None:
            return self._revert(call, ctx, record, "the pass has no strength to lower")
        layers = list(ctx.details.get("layers") or []) if backoff.skip else []
        if len(layers) > 1:
            progress(f"{call.name}: drop {drop:.2f} > {self.max_drop}; measuring per-layer sensitivity")
            sensitivity = self._sensitivity(attempt, params, backoff.skip, layers)
            record["sensitivity"] = {k: round(v, 4) for k, v in sensitivity.items()}
            order = sorted(layers, key=lambda name: -sensitivity[name])
            for count in range(1, len(order)):
                trial = {**params, backoff.skip: sorted(set(params.get(backoff.skip) or []) | set(order[:count]))}
                progress(f"{call.name}: leaving the {count} most sensitive layer(s) untouched")
                found = self._try(attempt, trial, log)
                if found:
                    record.update(action="skipped sensitive layers", skipped=order[:count], params=_shown(trial),
                                  drop=log[-1]["drop"])
                    found[1].note(f"accuracy guard: left {', '.join(order[:count])} untouched "
                                  f"(drop {drop:.2f} → {log[-1]['drop']:.2f} ≤ {self.max_drop} pts)")
                    return found[0], found[1], record
        value = params[backoff.param]
        while (value := backoff.weaken(value)) is not None:
            trial = {**params, backoff.param: value}
            progress(f"{call.name}: weakening {backoff.param} to {value:g}")
            found = self._try(attempt, trial, log)
            if found:
                record.update(action=f"weakened {backoff.param}", params=_shown(trial), drop=log[-1]["drop"])
                found[1].note(f"accuracy guard: {backoff.param} lowered from {params[backoff.param]:g} to {value:g} "
                              f"(drop {drop:.2f} → {log[-1]['drop']:.2f} ≤ {self.max_drop} pts)")
                return found[0], found[1], record
        return self._revert(call, ctx, record, f"no weaker setting kept the drop within {self.max_drop} pts")

    def _try(self, attempt: Attempt, params: dict[str, Any], log: list[dict]):
        try:
            model, ctx = attempt(params)
        except SqueezeError as exc:
            log.append({"params": _shown(params), "error": str(exc)})
            return None
        drop = self.drop(model)
        log.append({"params": _shown(params), "drop": round(drop, 4)})
        return (model, ctx) if drop <= self.max_drop else None

    def _sensitivity(self, attempt: Attempt, params: dict[str, Any], skip: str, layers: list[str]) -> dict[str, float]:
        """Drop on calibration data with the pass applied to one layer alone, for every layer."""
        result = {}
        for layer in layers:
            only = {**params, skip: sorted(set(params.get(skip) or []) | (set(layers) - {layer}))}
            try:
                model, _ = attempt(only)
                result[layer] = self.calib_drop(model)
            except SqueezeError:
                result[layer] = float("inf")
        return result

    def _revert(self, call: Call, ctx: Context, record: dict, why: str) -> tuple[onnx.ModelProto, Context, dict]:
        previous = ctx.model
        assert previous is not None
        reverted = Context(calib=ctx.calib, seed=ctx.seed, model=previous, input_shapes=ctx.input_shapes,
                           threads=ctx.threads)
        reverted.note(f"accuracy guard: reverted {call.name} ({why}; first attempt dropped {record['drop']:.2f} pts)")
        record.update(action="reverted", reason=why, drop=round(self.drop(previous), 4))
        return previous, reverted, record


def _shown(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items()}
