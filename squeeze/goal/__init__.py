"""Compress to a goal: `--goal size=8x` / `bytes=200k` / `macs=0.5` / `latency=1.5x@cpu`, allocated per layer.

    search = goal.search(model, parse_goal("size=8x"), calib, shapes, seed=0, original=model, ...)
    calls = search.calls          # e.g. prune(ratio=0,keep=[...]), codebook(bits=8,layer_bits=[...])

0. **Spec** (`spec.py`: `parse_goal` → `Goal`): the budgets, the passes it may use, how codebook losses are
   predicted.
1. **Tables** (`tables.py`: `measure_tables`, cached on disk by model, calibration data, seed and target): per
   prunable channel group, weight layer and low-rank candidate, the output loss of each strength alone, and the
   costs (packed bytes per parameter at each bit width, MACs, and for a latency goal the measured latency on the
   goal's target). They are measured by running the passes, so the measuring lives beside them
   (`passes/goal_tables.py`, reached through the registry hook "goal-tables"); the core holds the data classes.
2. **Allocation** (`knapsack.py`: `solve` on a `LossModel`): a multiple-choice knapsack solved by Lagrangian
   relaxation over the coupled costs; the plan becomes ordinary pass calls (`plan_calls`).
3. **Measure and correct** (`loop.py`: `search`): the plan is applied by the real passes and measured (packed
   bytes, MACs, latency on the target, accuracy drop on the guard data); misses correct the cost model, too large
   a drop rescales the predicted losses or relaxes the budget. Every measured point is in the report (the Pareto
   curve), with predicted vs measured loss.

Channel counts are rounded to the goal target's preferred multiple (SIMD width) for latency goals; size and MAC
goals keep single-channel resolution.
"""
from .knapsack import (
                     LossModel,
                     Plan,
                     describe_plan,
                     feasible,
                     knob_key,
                     plan_calls,
                     predicted_curve,
                     solve,
)
from .loop import MAX_ROUNDS, RELAX_STEPS, SearchResult, device_identity, search
from .spec import KNOBS, METRICS, NEEDS_CALIB, Constraint, Goal, parse_goal
from .tables import (
                     CODEBOOK_BITS,
                     HOLDOUT_SAMPLES,
                     LOWRANK_LEVELS,
                     PRUNE_LEVELS,
                     Knob,
                     LayerCost,
                     Tables,
                     cache_root,
                     code_version,
                     measure_tables,
                     table_samples,
)

__all__ = ["CODEBOOK_BITS", "HOLDOUT_SAMPLES", "KNOBS", "LOWRANK_LEVELS", "MAX_ROUNDS", "METRICS", "NEEDS_CALIB",
           "PRUNE_LEVELS", "RELAX_STEPS", "Constraint", "Goal", "Knob", "LayerCost", "LossModel", "Plan",
           "SearchResult", "Tables", "cache_root", "code_version", "describe_plan", "device_identity", "feasible",
           "knob_key", "measure_tables", "parse_goal", "plan_calls", "predicted_curve", "search", "solve",
           "table_samples"]
