"""The measured search: solve on the tables, apply the plan with the real passes, measure it, correct, repeat.

A budget the real model misses is tightened by the miss and re-solved; when the drop exceeds `max_drop`, the
prune and codebook parts are measured alone and their predicted losses rescaled to what was measured before
re-solving; if the goal still costs too much accuracy, the budget is relaxed by bisection towards the original
and the closest point within `max_drop` is kept (`_relax`). Every measured point is in the report (the Pareto
curve), with predicted vs measured loss.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from .. import metrics, pack, runtime, verify
from ..data import Dataset
from ..errors import SpecError, SqueezeError
from ..host import host_model
from ..registry import get_target, hook
from ..spec import Call, bind
from .knapsack import LossModel, Plan, describe_plan, feasible, knob_key, plan_calls, predicted_curve, solve
from .spec import KNOBS, NEEDS_CALIB, Goal
from .tables import LOWRANK_LEVELS, Tables, measure_tables, table_samples

MAX_ROUNDS = 6                          #: measured plans per search (each applies the passes for real)
RELAX_STEPS = (0.96, 0.9, 0.8, 0.65, 0.5, 0.3)  #: how far towards the goal when it costs more than --max-drop


@dataclass
class SearchResult:
    calls: list[Call]
    report: dict[str, Any]


def search(model: onnx.ModelProto, goal: Goal, calib: Dataset, shapes: dict[str, tuple[int, ...]], *,
           original: onnx.ModelProto, seed: int = 0, threads: int | None = None, max_drop: float | None = None,
           guard_data: Dataset | None = None, say: Callable[[str], None] = lambda m: None,
           runner=None, cache: bool = True, metric=None) -> SearchResult:
    """Allocate per-layer strengths for `goal` on `model` (the input after any --passes), measure, correct.

    The drop held within `max_drop` is `metric`'s (a squeeze.task_metrics.Metric; default top-1 with labels,
    else agreement) on `guard_data`: validation data, never the evaluation data (squeeze.api passes --val or the
    held-out part of --calib; `calib` is then the part the passes fit on). Without it, `calib` itself.
    """
    from ..guard import Guard  # noqa: PLC0415

    if calib.source.startswith("synthetic"):
        raise SqueezeError(NEEDS_CALIB)
    started = time.perf_counter()
    latency_fn, multiple, target_name, device = None, 1, None, None
    if goal.latency is not None:
        latency_fn, multiple, target_name, device = _latency_meter(goal.latency.target, shapes, calib, threads,
                                                                   runner)
    tables = measure_tables(model, goal, calib, shapes, seed=seed, threads=threads, say=say, target_latency=latency_fn,
                            latency_key=f"{target_name}-t{threads} {device}" if latency_fn else None,
                            multiple=multiple, cache=cache)
    if not tables.knobs:
        raise SqueezeError(f"--goal {goal.text}: nothing to allocate ({'+'.join(goal.using)} finds no prunable "
                           "channel group or clusterable weight in this model)")
    original_costs = {"bytes": float(pack.size_report(original)["packed"]),
                      "macs": float(metrics.summary(original, shapes)["macs"]),
                      "latency": latency_fn(original) if latency_fn else 0.0}
    budgets: dict[str, float] = {}
    for c in goal.constraints:  # two budgets on one metric (size=8x,bytes=100k): the tighter one holds
        budgets[c.metric] = min(budgets.get(c.metric, math.inf), c.limit(original_costs[c.metric]))
    guard = Guard(original, max_drop if max_drop is not None else float("inf"), guard_data or calib, calib, threads,
                  metric)
    run = _Run(model, calib, shapes, seed, threads, tables, guard, budgets, original_costs, latency_fn, max_drop)
    say(f"goal: allocating for {goal.text} (budgets: {_show_budgets(budgets, original_costs)})")
    chosen = run.rounds(goal, say)
    if chosen is not None and "lowrank" in goal.using:
        chosen = _uniform_implants(run.predictor, budgets, chosen, run.measure, run.measured, run.history)
    status = "met"
    if chosen is None:
        chosen = _relax(run.predictor, budgets, run.measure, run.measured, max_drop, run.history, say,
                        guard.metric.show_drop)
        status = "closest"
    plan, point = chosen if chosen else ({}, None)
    report = run.report(goal, plan, point, status, target_name, multiple)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if point is None:
        report["why"].append("no measured plan stays within --max-drop; nothing is compressed")
        return SearchResult([], report)
    return SearchResult(plan_calls(run.predictor, plan), report)


@dataclass
class _Run:
    """One search's state: the predictor it corrects, and every plan measured so far."""

    model: onnx.ModelProto
    calib: Dataset
    shapes: dict[str, tuple[int, ...]]
    seed: int
    threads: int | None
    tables: Tables
    guard: Any
    budgets: dict[str, float]
    original_costs: dict[str, float]
    latency_fn: Callable[[onnx.ModelProto], float] | None
    max_drop: float | None
    points: list[dict] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)   # a plan's prune / codebook halves measured alone
    measured: dict[tuple, dict] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.holdout = table_samples(self.calib)
        self.reference = runtime.run(self.model, self.holdout, threads=self.threads)
        self.predictor = LossModel(self.tables)

    def measure(self, plan: Plan, label: str, only: str | None = None) -> dict:
        """Apply `plan` (or only its `only` part) with the real passes; its measured loss, costs and drop."""
        from ..pipeline import apply_pass  # noqa: PLC0415
        calls = plan_calls(self.predictor, {k: v for k, v in plan.items() if only is None or k.startswith(only)})
        current = self.model
        for call in calls:
            current, _ = apply_pass(call, call.params, current, self.calib, self.shapes, self.seed, self.threads)
        out = runtime.run(current, self.holdout, threads=self.threads)
        point = {"label": label, "spec": ",".join(str(c) for c in calls),
                 "predicted_loss": round(LossModel(self.tables, self.predictor.scale).loss(
                     {k: v for k, v in plan.items() if only is None or k.startswith(only)}), 6),
                 "measured_loss": round(verify.output_loss(self.reference, out), 6)}
        if only is None:
            point["bytes"] = int(pack.size_report(current)["packed"])
            point["macs"] = int(metrics.summary(current, self.shapes)["macs"])
            if self.latency_fn:
                point["latency_ms"] = round(1e3 * self.latency_fn(current), 4)
            point["drop"] = round(self.guard.drop(current), 4)
            point["ratios"] = _ratios(point, self.original_costs)
            point["meets_goal"] = bool(all(_measured(point, m) <= b * (1 + 1e-9) for m, b in self.budgets.items()))
            point["within_max_drop"] = self.max_drop is None or point["drop"] <= self.max_drop
            self.points.append(point)
        return point

    def rounds(self, goal: Goal, say: Callable[[str], None]) -> tuple[Plan, dict] | None:
        """Solve, measure, correct, up to MAX_ROUNDS times: the plan that meets the goal within max_drop, or None."""
        budgets, history, show = self.budgets, self.history, self.guard.metric.show_drop
        rescaled = False
        for rounds in range(1, MAX_ROUNDS + 1):
            plan, predicted, loss = solve(self.predictor, budgets)
            key = _plan_key(plan)
            if key in self.measured:
                history.append(f"round {rounds}: the corrected tables choose a plan already measured; stopping")
                break
            if not feasible(predicted, budgets):
                history.append(f"round {rounds}: no plan in the tables meets the budgets (strongest predicted: "
                               f"{_show_costs(predicted, self.original_costs)})")
            say(f"goal: round {rounds}: applying the plan (predicted loss {loss:.4g})")
            point = self.measure(plan, f"round {rounds}")
            point["predicted"] = _ratios({"bytes": predicted["bytes"], "macs": predicted["macs"],
                                          "latency_ms": 1e3 * predicted["latency"]}, self.original_costs)
            self.measured[key] = point
            missed = {m: _measured(point, m) / b for m, b in budgets.items()
                      if _measured(point, m) > b * (1 + 1e-9)}
            if missed:
                if not feasible(predicted, budgets):
                    history.append(f"round {rounds}: missed {_show_missed(missed)}; the tables hold no stronger "
                                   "plan")
                    break
                for m in budgets:  # re-solve with the cost the real model showed
                    self.predictor.cost_scale[m] *= _measured(point, m) / max(predicted[m], 1e-30)
                history.append(f"round {rounds}: measured {_show_missed(missed)} over budget; cost model corrected "
                               "by the measurement and re-solved")
                continue
            if point["within_max_drop"]:
                history.append(f"round {rounds}: meets the goal, drop {show(point['drop'])}")
                return plan, point
            if not rescaled and self.max_drop is not None:
                rescaled = True
                if self.rescale(plan, rounds, goal, point):
                    continue
            history.append(f"round {rounds}: the goal costs {show(point['drop'])} > {show(self.max_drop)}; "
                           "relaxing the budget")
            break
        return None

    def rescale(self, plan: Plan, rounds: int, goal: Goal, point: dict) -> bool:
        """Measure each pass's part of `plan` alone and rescale its predicted losses to the measurement; False
        when the plan has a single part (nothing to learn)."""
        show = self.guard.metric.show_drop
        for kind in KNOBS:
            sub = {k: v for k, v in plan.items() if k.startswith(kind) and v}
            if sub and any(not k.startswith(kind) and v for k, v in plan.items()):
                p = self.measure(sub, f"round {rounds}: {kind} part alone", only=kind)
                self.parts.append(p)
                if p["predicted_loss"] > 0:
                    self.predictor.scale[kind] *= max(p["measured_loss"], 1e-9) / p["predicted_loss"]
        if not self.parts:
            return False
        self.history.append(f"round {rounds}: drop {show(point['drop'])} > {show(self.max_drop)}; predicted losses "
                            "rescaled by the parts measured alone (" + ", ".join(
                                f"{kind} ×{self.predictor.scale[kind]:.3g}" for kind in KNOBS if kind in goal.using)
                            + ") and re-solved")
        return True

    def report(self, goal: Goal, plan: Plan, point: dict | None, status: str, target_name: str | None,
               multiple: int) -> dict:
        budgets, original = self.budgets, self.original_costs
        return {
            "goal": goal.text, "using": list(goal.using), "sensitivity": goal.sensitivity, "max_drop": self.max_drop,
            "budgets": {m: _budget_view(m, b, original) for m, b in budgets.items()},
            "latency_target": target_name, "channel_multiple": multiple,
            "status": status if point else "unreachable",
            "why": self.history,
            "plan": describe_plan(self.predictor, plan),
            "spec": point["spec"] if point else "",
            "predicted_loss": point["predicted_loss"] if point else None,
            "measured_loss": point["measured_loss"] if point else None,
            "points": self.points,
            "parts": self.parts,
            "predicted_curve": {m: predicted_curve(self.predictor, m, 2.5 * original[m] / b)
                                for m, b in budgets.items()},
            "tables": {"seconds": self.tables.seconds, "cached": self.tables.cached, "knobs": len(self.tables.knobs),
                       "holdout_samples": len(self.holdout)},
            "loss_scale": self.predictor.scale,
            "drop_basis": "validation: " + self.guard.basis + f" on {self.guard.data.source}",
            "metric": self.guard.metric.spec,
        }


def _uniform_implants(predictor: LossModel, budgets, chosen: tuple[Plan, dict], measure, measured: dict, history):
    """The same rank for every implant (the weakest of LOWRANK_LEVELS whose predicted costs meet the budgets),
    measured next to the allocated plan; the one with the lower measured loss on the held-out calibration samples
    is kept. The tables measure each layer factorized alone, but the pass refits every layer on the output of
    those factorized before it, so losses do not add up and a uniform plan can beat the allocation (issue 21:
    sri_resnet_a, macs=0.65: allocated 4.3 pts lost on unseen images, uniform rank 0.5 2.6)."""
    implants = [k for k in predictor.by_key.values() if k.kind == "lowrank"]
    for level in LOWRANK_LEVELS:
        plan = {knob_key(k): k.choices.index(level) for k in implants if level in k.choices}
        if plan and feasible(predictor.costs(plan), budgets):
            break
    else:
        return chosen
    key = _plan_key(plan)
    if key not in measured:
        measured[key] = measure(plan, f"uniform rank {level:g}")
    point = measured[key]
    if point["meets_goal"] and point["within_max_drop"] and point["measured_loss"] < chosen[1]["measured_loss"]:
        history.append(f"every implant at rank {level:g}: measured loss {point['measured_loss']:.4g} < "
                       f"{chosen[1]['measured_loss']:.4g} of the allocated plan; kept")
        return plan, point
    history.append(f"every implant at rank {level:g}: measured loss {point['measured_loss']:.4g}, not below "
                   f"{chosen[1]['measured_loss']:.4g} of the allocated plan (or over budget)")
    return chosen


def _relax(predictor: LossModel, budgets, measure, measured: dict, max_drop, history, say,
           show: Callable[[float], str] = lambda drop: f"{drop:.2f} pts"):
    """Back off from the goal towards the original (each budget on a log scale) until a plan stays within
    max_drop; the most compressed such plan, or None."""
    base = {m: v / predictor.cost_scale[m] for m, v in predictor.costs({}).items()}
    for way in RELAX_STEPS:
        plan, _, _ = solve(predictor, {m: base[m] * (b / base[m]) ** way for m, b in budgets.items()})
        key = _plan_key(plan)
        if key not in measured:
            say(f"goal: relaxing to {way:.0%} of the way to the goal")
            measured[key] = measure(plan, f"relax {way:.0%}")
        point = measured[key]
        if point["within_max_drop"]:
            within = "" if max_drop is None else f" within --max-drop {max_drop}"
            history.append(f"closest point{within}: {_show_ratios(point['ratios'])} "
                           f"(bytes, MACs smaller; latency faster), drop {show(point['drop'])}")
            return plan, point
    return None


def _plan_key(plan: Plan) -> tuple:
    return tuple(sorted((k, v) for k, v in plan.items() if v))


def _measured(point: dict, metric: str) -> float:
    return point["latency_ms"] / 1e3 if metric == "latency" else point[metric]


def _ratios(point: dict, original: dict) -> dict[str, float]:
    out = {"bytes": round(original["bytes"] / max(point["bytes"], 1), 4),
           "macs": round(original["macs"] / max(point["macs"], 1), 4)}
    if point.get("latency_ms") and original.get("latency"):
        out["latency"] = round(1e3 * original["latency"] / point["latency_ms"], 4)
    return out


def _budget_view(metric: str, budget: float, original: dict) -> dict:
    view = {"limit": round(budget, 6) if metric == "latency" else int(budget),
            "original": round(original[metric], 6) if metric == "latency" else int(original[metric]),
            "ratio": round(original[metric] / budget, 4) if budget else None}
    if metric == "latency":
        view["unit"] = "seconds"
    return view


def _show_budgets(budgets: dict, original: dict) -> str:
    return ", ".join(f"{m} ≤ {original[m] / b:.3g}× smaller" if m != "latency" else f"latency {original[m] / b:.3g}× "
                     "faster" for m, b in budgets.items())


def _show_costs(costs: dict, original: dict) -> str:
    return ", ".join(f"{m} {original[m] / max(costs[m], 1e-12):.3g}×" for m in ("bytes", "macs") if original[m])


def _show_missed(missed: dict) -> str:
    return ", ".join(f"{m} by {100 * (v - 1):.1f} %" for m, v in missed.items())


def _show_ratios(ratios: dict) -> str:
    return ", ".join(f"{m} {v:g}×" for m, v in ratios.items())


def _latency_meter(spec: str, shapes, calib: Dataset, threads, runner):
    """A function model → seconds (p50) on the goal's target, its preferred channel multiple and its spec."""
    calls = bind(spec, get_target)
    if len(calls) != 1:
        raise SpecError(f"--goal latency=…@{spec}: name one target")
    call = calls[0]
    target = call.entry.obj(**call.params)
    target.runner = runner
    missing = target.missing()
    if missing:
        raise SqueezeError(f"--goal latency=…@{call.name}: {missing}")
    hook("compile-threads")(threads)
    samples = calib.samples(1)

    def latency(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="squeeze-goal-") as scratch:  # build files live only to be timed
            measured = target.measure(target.build(model, shapes, Path(scratch)), samples, 30)
        if not measured.latency_ms:
            raise SqueezeError(f"--goal latency=…@{call.name}: this target gives no latency "
                               f"(method {measured.method}); name a target that times the model")
        return measured.latency_ms["p50"] / 1e3

    return latency, int(getattr(target, "channel_multiple", 1) or 1), str(call), device_identity(runner)


def device_identity(runner) -> str:
    """Where latency is measured: the RPC device (`key-KEY` / `rpc-HOST-PORT`), else this host's CPU model."""
    if runner is not None and hasattr(runner, "identity"):
        return f"device={runner.identity()}"
    return f"host={host_model()}"
