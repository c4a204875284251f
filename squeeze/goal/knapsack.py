"""The allocation: a multiple-choice knapsack over the tables' knobs (`solve`), the loss and cost predictor it
solves on (`LossModel`), and the chosen plan as ordinary pass calls (`plan_calls`) and report rows
(`describe_plan`).

`solve` uses Lagrangian relaxation: for a multiplier λ, coordinate descent picks each knob's choice to minimise
Σ predicted loss + λ Σ cost/budget (costs are coupled: a layer's bytes depend on its bits and on the channels kept
on both of its sides, so each move is priced on the whole model); λ is bisected to the smallest value whose plan
meets every budget, then greedy weakening/strengthening and pairwise exchanges improve the plan between two hull
points.
"""
from __future__ import annotations

import numpy as np

from ..errors import PassError
from ..registry import get_pass
from ..spec import Call, bind
from .spec import KNOBS, METRICS
from .tables import Knob, Tables

Plan = dict[str, int]   # knob key ("prune:NAME" / "codebook:NAME") → choice index


def knob_key(knob: Knob) -> str:
    return f"{knob.kind}:{knob.name}"


class LossModel:
    """Predicted loss and costs of a plan, from the tables."""

    def __init__(self, tables: Tables, scale: dict[str, float] | None = None,
                 cost_scale: dict[str, float] | None = None):
        self.t = tables
        self.scale = dict(scale or {kind: 1.0 for kind in KNOBS})          # measured / predicted loss
        self.cost_scale = dict(cost_scale or {m: 1.0 for m in METRICS})   # measured / predicted cost
        self.by_key = {knob_key(k): k for k in tables.knobs}
        self.groups = {k.name: k for k in tables.knobs if k.kind == "prune"}

    def loss(self, plan: Plan) -> float:
        return sum(self.scale[k.kind] * k.loss[plan.get(key, 0)] for key, k in self.by_key.items())

    def kept(self, plan: Plan) -> dict[str, int]:
        """Channels removed per group."""
        return {name: k.size - k.choices[plan.get(f"prune:{name}", 0)] for name, k in self.groups.items()}

    def costs(self, plan: Plan) -> dict[str, float]:
        removed = self.kept(plan)
        total_bytes, total_macs = self.t.other["bytes"], self.t.other["macs"]
        for c in self.t.layers:
            fin = max(0.0, 1.0 - sum(removed.get(g, 0) * s for g, s in c.ins.items()))
            fout = max(0.0, 1.0 - sum(removed.get(g, 0) * s for g, s in c.outs.items()))
            knob = self.by_key.get(f"codebook:{c.name}")
            bits = knob.choices[plan.get(f"codebook:{c.name}", 0)] if knob else 0
            bpp = c.bits.get(bits, c.float_bits) if bits else c.float_bits
            implant = self.by_key.get(f"lowrank:{c.name}")
            i = plan.get(f"lowrank:{c.name}", 0) if implant else 0
            # an implant on a pruned layer: its measured fractions, scaled by the channels pruning leaves
            fixed = c.fixed.get(bits, 0.0) if bits else 0.0  # per factor when implanted
            total_bytes += c.params * fin * fout * bpp / 8 * (implant.params_kept[i] if i else 1.0) \
                + fixed * (2 if i else 1)
            total_macs += c.macs * fin * fout * (implant.macs_kept[i] if i else 1.0)
        saved = sum(k.latency_saved[plan.get(key, 0)] for key, k in self.by_key.items() if k.latency_saved)
        latency = max(self.t.base["latency"] - saved, 1e-3 * self.t.base["latency"])
        raw = {"bytes": total_bytes, "macs": total_macs, "latency": latency}
        return {m: v * self.cost_scale[m] for m, v in raw.items()}


def feasible(costs: dict[str, float], budgets: dict[str, float]) -> bool:
    return all(costs[m] <= b * (1 + 1e-9) for m, b in budgets.items())


def solve(model: LossModel, budgets: dict[str, float], sweeps: int = 12, exchange: bool = True
          ) -> tuple[Plan, dict[str, float], float]:
    """The plan of least predicted loss that meets `budgets` (or the cheapest one found): Lagrangian relaxation
    with coordinate descent over the coupled costs, λ bisected on a log scale."""
    keys = list(model.by_key)

    def objective(plan: Plan, lam: float) -> float:
        c = model.costs(plan)
        return model.loss(plan) + lam * sum(c[m] / b for m, b in budgets.items())

    def descend(lam: float, start: Plan) -> Plan:
        plan = dict(start)
        for _ in range(sweeps):
            changed = False
            for key in keys:
                best, best_value = plan.get(key, 0), None
                for i in range(len(model.by_key[key].choices)):
                    value = objective({**plan, key: i}, lam)
                    if best_value is None or value < best_value - 1e-15:
                        best, best_value = i, value
                if best != plan.get(key, 0):
                    plan[key] = best
                    changed = True
            if not changed:
                break
        return plan

    strongest = {k: len(model.by_key[k].choices) - 1 for k in keys}
    lo, hi = -12.0, 6.0   # log10 λ
    best_plan = descend(10 ** hi, strongest)
    if not feasible(model.costs(best_plan), budgets):
        best_plan = _strengthen(model, best_plan, budgets)
        return best_plan, model.costs(best_plan), model.loss(best_plan)
    below: Plan | None = None
    for _ in range(30):
        mid = (lo + hi) / 2
        plans = [descend(10 ** mid, {}), descend(10 ** mid, best_plan)]
        ok = [p for p in plans if feasible(model.costs(p), budgets)]
        if ok:
            hi = mid
            candidate = min(ok, key=model.loss)
            if model.loss(candidate) <= model.loss(best_plan):
                best_plan = candidate
        else:
            lo = mid
            below = min(plans, key=lambda p: _violation(model.costs(p), budgets))
        if hi - lo < 0.02:
            break
    # λ only reaches the plans on the convex hull of (cost, loss); between two hull plans a greedy pass does
    # better: weaken the feasible plan while it stays feasible, and strengthen the infeasible one until it fits.
    candidates = [_weaken(model, best_plan, budgets)]
    if below is not None:
        candidates.append(_weaken(model, _strengthen(model, below, budgets), budgets))
    ok = [p for p in candidates if feasible(model.costs(p), budgets)]
    best_plan = min(ok or [best_plan], key=model.loss)
    if exchange:
        best_plan = _exchange(model, best_plan, budgets)
    return best_plan, model.costs(best_plan), model.loss(best_plan)


def _exchange(model: LossModel, plan: Plan, budgets: dict[str, float], rounds: int = 4) -> Plan:
    """Pairwise exchange: weaken one knob and strengthen another when the pair stays within budget and lowers
    the predicted loss (what single-knob moves cannot reach between two hull plans)."""
    keys = list(model.by_key)
    for _ in range(rounds):
        base_loss, best, best_loss = model.loss(plan), None, None
        for a in keys:
            for i in range(plan.get(a, 0)):                       # a: one step or more weaker
                weaker = {**plan, a: i}
                gain = base_loss - model.loss(weaker)
                if gain <= 1e-15:
                    continue
                for b in keys:
                    if b == a:
                        continue
                    for j in range(plan.get(b, 0) + 1, len(model.by_key[b].choices)):  # b: stronger
                        trial = {**weaker, b: j}
                        loss = model.loss(trial)
                        if loss < base_loss - 1e-15 and (best_loss is None or loss < best_loss) \
                                and feasible(model.costs(trial), budgets):
                            best, best_loss = trial, loss
        if best is None:
            return plan
        plan = _weaken(model, best, budgets)
    return plan


def _violation(costs: dict[str, float], budgets: dict[str, float]) -> float:
    return sum(max(0.0, costs[m] / b - 1.0) for m, b in budgets.items())


def _strengthen(model: LossModel, plan: Plan, budgets: dict[str, float]) -> Plan:
    """Greedy: the move that removes the most budget violation per unit of added loss, until feasible."""
    plan = dict(plan)
    while True:
        violation = _violation(model.costs(plan), budgets)
        if violation <= 1e-12:
            return plan
        best, best_rate = None, None
        base_loss = model.loss(plan)
        for key, knob in model.by_key.items():
            for i in range(plan.get(key, 0) + 1, len(knob.choices)):
                trial = {**plan, key: i}
                gain = violation - _violation(model.costs(trial), budgets)
                if gain <= 1e-15:
                    continue
                rate = max(model.loss(trial) - base_loss, 0.0) / gain
                if best_rate is None or rate < best_rate:
                    best, best_rate = trial, rate
        if best is None:
            return plan
        plan = best


def _weaken(model: LossModel, plan: Plan, budgets: dict[str, float]) -> Plan:
    """Greedy: while some knob can step back towards less compression and stay within budget, take the step
    that lowers the predicted loss most."""
    plan = dict(plan)
    while True:
        base_loss = model.loss(plan)
        best, best_loss = None, base_loss
        for key in model.by_key:
            for i in range(plan.get(key, 0)):
                trial = {**plan, key: i}
                loss = model.loss(trial)
                if loss < best_loss - 1e-15 and feasible(model.costs(trial), budgets):
                    best, best_loss = trial, loss
        if best is None:
            return plan
        plan = best


def predicted_curve(model: LossModel, metric: str, up_to: float, points: int = 20) -> list[dict]:
    """The predicted frontier: least predicted loss at ratios from 1 to `up_to` (or the strongest plan)."""
    base = model.costs({})[metric]
    floor = model.costs({k: len(model.by_key[k].choices) - 1 for k in model.by_key})[metric]
    out = []
    for r in np.geomspace(1.0, max(min(base / max(floor, 1e-12), up_to), 1.0), points)[1:]:
        plan, costs, loss = solve(model, {metric: base / r}, sweeps=6, exchange=False)
        if feasible(costs, {metric: base / r}):
            out.append({"ratio": round(float(base / costs[metric]), 4), "loss": round(float(loss), 6)})
    return out


# ------------------------------------------------------------------------------------------------ the plan


def plan_calls(model: LossModel, plan: Plan) -> list[Call]:
    """The plan as ordinary pass calls (what the report shows and a user can rerun with --passes)."""
    calls = []
    keep = [f"{name}={k.choices[plan.get(f'prune:{name}', 0)]}" for name, k in model.groups.items()
            if plan.get(f"prune:{name}", 0)]
    if keep:
        calls.append(f"prune(ratio=0,keep={_list(keep)})")
    implants = {k.name: k.choices[plan.get(key, 0)] for key, k in model.by_key.items() if k.kind == "lowrank"}
    ranks = [f"{n}={r:g}" for n, r in implants.items() if r]
    if ranks:
        others = [n for n, r in implants.items() if not r]
        calls.append(f"lowrank(layer_rank={_list(ranks)}" + (f",skip={_list(others)})" if others else ")"))
    bits = {k.name: int(k.choices[plan.get(key, 0)]) for key, k in model.by_key.items() if k.kind == "codebook"}
    for n, r in implants.items():  # an implant's first factor is clustered like the layer (its second factor)
        if r and n in bits:
            bits[f"{n}_lowrank"] = bits[n]
    clustered = {n: b for n, b in bits.items() if b}
    if clustered:
        common = max(set(clustered.values()), key=lambda b: (list(clustered.values()).count(b), b))
        spec = f"codebook(bits={common},head_bits=0"  # the plan sets every layer's width
        per = [f"{n}={b}" for n, b in clustered.items() if b != common]
        floats = [n for n, b in bits.items() if not b]
        if per:
            spec += f",layer_bits={_list(per)}"
        if floats:
            spec += f",skip={_list(floats)}"
        calls.append(spec + ")")
    return [c for spec in calls for c in bind(spec, get_pass)]


def _list(items: list[str]) -> str:
    for item in items:
        if "'" in item or "\\" in item:
            raise PassError(f"--goal cannot name {item!r} in a pass spec (a quote or backslash in a node name)")
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def describe_plan(model: LossModel, plan: Plan) -> list[dict]:
    rows = []
    for key, k in model.by_key.items():
        i = plan.get(key, 0)
        row = {"kind": k.kind, "name": k.name, "predicted_loss": round(float(k.loss[i]), 6)}
        if k.kind == "prune":
            row.update(channels_before=k.size, channels_after=k.choices[i])
        elif k.kind == "lowrank":
            row.update(rank=k.choices[i] or "full", macs_kept=round(float(k.macs_kept[i]), 4))
        else:
            row["bits"] = k.choices[i] or "float"
        rows.append(row)
    return rows
