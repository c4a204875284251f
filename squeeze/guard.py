"""The accuracy guard (`--max-drop X`): back a pass off instead of failing when it costs too much accuracy.

After a pass, the drop from the *original* model is measured on the validation data with the task metric
(squeeze.task_metrics, `--metric`: points for accuracies, absolute for IoU and correlations; by default top-1
points when the data has labels, else 100 × (1 − top-1 agreement) for class scores, else 100 × relative L2
error). The validation data is `--val`, or a held-out part of `--calib` the passes did not fit on (squeeze.api);
never the evaluation data, whose numbers are only reported. Per-layer sensitivity is ranked on the validation
inputs by output fidelity (agreement, else relative L2), which needs no ground truth. Over the limit, the guard:

1. measures each changed layer's sensitivity on the validation inputs (the pass applied to that layer alone),
   then leaves the most sensitive layers untouched, one more at a time, until the drop is within the limit
   (passes that declare a `skip` parameter and list their layers in `ctx.details["layers"]`);
2. otherwise weakens the pass's strength parameter step by step (halve a ratio, add a bit);
3. otherwise reverts the pass.

Every attempt is recorded, so the report says what was backed off and why.
"""
from __future__ import annotations

from typing import Any, Callable

import onnx

from .context import Context
from .data import Dataset
from .errors import SqueezeError
from .spec import Call
from .task_metrics import Metric, Scorer

Attempt = Callable[[dict[str, Any]], tuple[onnx.ModelProto, Context]]

#: A setting is kept when its validation drop plus this many (paired) standard errors is within --max-drop: the
#: validation set is small (64 images when a quarter of 256 calibration images validates: one image = 1.6 pts), and
#: a point estimate that just fits would be kept as often by luck as by merit. 0 keeps the point estimate's rule.
MARGIN_SE = 1.0


class Guard:
    def __init__(self, original: onnx.ModelProto, max_drop: float, data: Dataset, sensitivity: Dataset,
                 threads: int | None = None, metric: Metric | None = None, margin_se: float | None = None):
        """`data` scores the drop held within `max_drop`; `sensitivity`'s inputs rank layers (no labels needed)."""
        self.max_drop = max_drop
        self.data = data
        self.calib = sensitivity
        self.threads = threads
        self.scorer = Scorer(metric, original, data, threads)
        self.metric = self.scorer.metric
        self.calib_scorer = Scorer(None, original, Dataset(sensitivity.arrays, None, sensitivity.source,
                                                           sensitivity.stacked), threads)
        self.basis = self.metric.basis
        self.margin_se = MARGIN_SE if margin_se is None else margin_se

    def drop(self, model: onnx.ModelProto) -> float:
        """Drop of `model` against the original on the guard data, in the metric's units (points for accuracies)."""
        return self.scorer.drop(self.scorer.score(model))

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(drop, its paired standard error) of `model` on the guard data (standard error 0 where unknown)."""
        score = self.scorer.score(model)
        se = self.metric.drop_stderr(self.scorer.original, score)
        return self.scorer.drop(score), float(se or 0.0)

    def holds(self, drop: float, se: float) -> bool:
        """Whether a setting is kept: drop + margin_se · se ≤ max_drop."""
        return drop + self.margin_se * se <= self.max_drop

    def calib_drop(self, model: onnx.ModelProto) -> float:
        """Drop in output fidelity on the sensitivity inputs (ranks layers; no ground truth needed)."""
        return self.calib_scorer.drop(self.calib_scorer.score(model))

    def run(self, call: Call, attempt: Attempt, progress: Callable[[str], None]
            ) -> tuple[onnx.ModelProto, Context, dict]:
        """Apply the pass under the guard; return (model, context, record of what was backed off)."""
        log: list[dict] = []
        params = dict(call.params)
        model, ctx = attempt(params)
        drop, se = self.measure(model)
        log.append({"params": _shown(params), "drop": round(drop, 4), "stderr": round(se, 4)})
        record = {"max_drop": self.max_drop, "basis": self.basis, "metric": self.metric.spec,
                  "drop_basis": "validation", "data": self.data.source, "n": len(self.data),
                  "rule": f"drop + {self.margin_se:g} × its standard error ≤ max_drop", "attempts": log,
                  "action": "none", "drop": round(drop, 4), "stderr": round(se, 4)}
        if self.holds(drop, se):
            return model, ctx, record
        backoff = call.entry.backoff
        if backoff is None:
            return self._revert(call, ctx, record, "the pass has no strength to lower")
        layers = list(ctx.details.get("layers") or []) if backoff.skip else []
        if len(layers) > 1:
            progress(f"{call.name}: drop {self._show(drop)} > {self.max_drop}; measuring per-layer sensitivity")
            sensitivity = self._sensitivity(attempt, params, backoff.skip, layers)
            record["sensitivity"] = {k: round(v, 4) for k, v in sensitivity.items()}
            order = sorted(layers, key=lambda name: -sensitivity[name])
            best = self._fewest_skipped(call.name, attempt, params, backoff.skip, order, log, progress)
            if best:
                count, trial, found, kept_drop = best
                record.update(action="skipped sensitive layers", skipped=order[:count], params=_shown(trial),
                              drop=kept_drop, stderr=next(e.get("stderr") for e in reversed(log)
                                                          if e["params"] == _shown(trial)))
                found[1].note(f"accuracy guard: left {', '.join(order[:count])} untouched "
                              f"({self._change(drop, kept_drop)})")
                return found[0], found[1], record
        value = params[backoff.param]
        while (value := backoff.weaken(value)) is not None:
            trial = {**params, backoff.param: value}
            progress(f"{call.name}: weakening {backoff.param} to {value:g}")
            found = self._try(attempt, trial, log)
            if found:
                record.update(action=f"weakened {backoff.param}", params=_shown(trial), drop=log[-1]["drop"],
                              stderr=log[-1]["stderr"])
                found[1].note(f"accuracy guard: {backoff.param} lowered from {params[backoff.param]:g} to {value:g} "
                              f"({self._change(drop, log[-1]['drop'])})")
                return found[0], found[1], record
        return self._revert(call, ctx, record, f"no weaker setting kept the drop within {self._show(self.max_drop)}")

    def _fewest_skipped(self, name: str, attempt: Attempt, params: dict[str, Any], skip: str, order: list[str],
                        log: list[dict], progress: Callable[[str], None]):
        """(count, params, (model, ctx), drop) leaving the fewest of the most sensitive layers untouched that keeps
        the drop within the limit, or None (at most all layers but one are left out).

        Counts 1, 2, 4, ... are tried, then bisection between the last count that failed and the first that held:
        the drop falls as more layers are left out, so this finds the count that trying each count in turn would,
        in about 2·log2(layers) attempts instead of up to one per layer (each attempt runs the pass on the model).
        """
        def trial(count: int):
            params_ = {**params, skip: sorted(set(params.get(skip) or []) | set(order[:count]))}
            progress(f"{name}: leaving the {count} most sensitive layer(s) untouched")
            found = self._try(attempt, params_, log)
            return (count, params_, found, log[-1].get("drop")) if found else None

        most = len(order) - 1
        low, count, best = 0, 1, None
        while best is None and count <= most:
            best = trial(count)
            if best is None:
                low, count = count, (min(2 * count, most) if count < most else most + 1)
        if best is None:
            return None
        high = best[0]
        while high - low > 1:
            mid = (low + high) // 2
            found = trial(mid)
            if found:
                best, high = found, mid
            else:
                low = mid
        return best

    def _try(self, attempt: Attempt, params: dict[str, Any], log: list[dict]):
        try:
            model, ctx = attempt(params)
        except SqueezeError as exc:
            log.append({"params": _shown(params), "error": str(exc)})
            return None
        drop, se = self.measure(model)
        log.append({"params": _shown(params), "drop": round(drop, 4), "stderr": round(se, 4)})
        return (model, ctx) if self.holds(drop, se) else None

    def _sensitivity(self, attempt: Attempt, params: dict[str, Any], skip: str, layers: list[str]) -> dict[str, float]:
        """Fidelity drop on the sensitivity inputs with the pass applied to one layer alone, for every layer."""
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
        reverted.note(f"accuracy guard: reverted {call.name} ({why}; first attempt dropped "
                      f"{self._show(record['drop'])})")
        drop, se = self.measure(previous)
        record.update(action="reverted", reason=why, drop=round(drop, 4), stderr=round(se, 4))
        return previous, reverted, record


    def _show(self, drop: float) -> str:
        return f"{self.metric.show_drop(drop)} of {self.metric.label}"

    def _change(self, before: float, after: float) -> str:
        return (f"{self.metric.label} drop {self.metric.show_drop(before)} → {self.metric.show_drop(after)} ≤ "
                f"{self.metric.show_drop(self.max_drop)}")


def _shown(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items()}
