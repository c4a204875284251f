"""`--goal` (squeeze/goal.py, issue 10): the goal syntax, the allocation solver against brute force on hand-made
tables, the coupled cost model, plan → pass calls applied to the shipped model, the end-to-end search on
digits_cnn with its table cache and determinism, and the errors a user sees (CLI, recipe, pass parameters).

The end-to-end search (the expensive part: ~30 s of sensitivity tables) runs once per module (`goal_runs`) with
the table cache in a temporary folder; tests that reuse those tables point $SQUEEZE_CACHE at it explicitly.
Every other test gets a private empty cache (`_private_cache`), so nothing here reads or writes ~/.cache.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import squeeze
from squeeze import goal as goal_mod
from squeeze import metrics, pack
from squeeze.data import input_specs, load_npz, resolve_shapes
from squeeze.errors import SpecError, SqueezeError
from squeeze.goal import (Constraint, Knob, LayerCost, LossModel, Tables, describe_plan, feasible, parse_goal,
                          plan_calls, solve)
from squeeze.pipeline import run_pipeline
from squeeze.recipe import RecipeError, arguments, load
from squeeze.registry import get_pass
from squeeze.spec import bind

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
TEST = REPO / "models" / "digits_test.npz"

# digits_cnn's prunable channel groups and weight layers, as the goal tables name them
STEM_GROUP = "/stem/stem.0/Conv+/block/conv2/Conv"
CONV1 = "/block/conv1/Conv"
CONV2 = "/block/conv2/Conv"
DOWN = "/down/down.0/Conv"
FC1 = "/fc1/Gemm"
FC2 = "/fc2/Gemm"
STEM = "/stem/stem.0/Conv"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    model = onnx.load(MODEL)
    specs = input_specs(model)
    calib = load_npz(CALIB, specs)
    return SimpleNamespace(model=model, specs=specs, calib=calib, eval=load_npz(TEST, specs),
                           shapes=resolve_shapes(specs, {}, calib))


@pytest.fixture(scope="module")
def goal_runs(tmp_path_factory):
    """Two identical `compress(goal="size=6x")` runs on digits_cnn sharing one fresh table cache."""
    cache = tmp_path_factory.mktemp("goal-cache")
    out = tmp_path_factory.mktemp("goal-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUEEZE_CACHE", str(cache))
        runs = [squeeze.compress(MODEL, calib=CALIB, eval=TEST, goal="size=6x", max_drop=2.0, targets=[], runs=3,
                                 out_dir=out / f"run{i}") for i in (1, 2)]
    return SimpleNamespace(first=runs[0], second=runs[1], cache=cache, out=out)


@pytest.fixture(scope="module")
def digits_tables(goal_runs, digits):
    """The sensitivity and cost tables the end-to-end run measured (read back through the cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUEEZE_CACHE", str(goal_runs.cache))
        said = []
        fit, _ = digits.calib.split_holdout()  # compress fits (and the goal measures) on --calib minus validation
        tables = goal_mod.measure_tables(digits.model, parse_goal("size=6x"), fit, digits.shapes, seed=0,
                                         threads=None, say=said.append)
    assert tables.cached, said  # same model, data, seed and passes: the key compress used
    return tables


# ------------------------------------------------------------------------------------------------ 1. parse_goal

def test_parse_size_ratio_defaults_to_prune_and_codebook():
    g = parse_goal("size=8x")
    assert g.constraints == (Constraint("bytes", ratio=8.0, text="size=8x"),)
    assert g.using == ("prune", "codebook") and g.latency is None and g.text == "size=8x"
    assert g.constraints[0].limit(800.0) == 100.0
    assert parse_goal("SIZE = 8X").constraints[0].ratio == 8.0  # keys and the x are case-insensitive


@pytest.mark.parametrize("text,limit", [("bytes=200k", 200_000), ("bytes=1.5MiB", 1.5 * 2**20),
                                        ("bytes=250000", 250_000), ("bytes=2kib", 2048), ("bytes=1.5M", 1.5e6)])
def test_parse_absolute_bytes(text, limit):
    (c,) = parse_goal(text).constraints
    assert c.metric == "bytes" and c.absolute == pytest.approx(limit) and c.ratio is None
    assert c.limit(123.0) == pytest.approx(limit)  # an absolute budget ignores the original size


@pytest.mark.parametrize("text", ["macs=0.5", "macs=2x"])
def test_parse_macs_fraction_or_ratio(text):
    g = parse_goal(text)
    assert g.constraints == (Constraint("macs", ratio=2.0, text=text),)
    assert g.using == ("prune",)  # codebook does not change MACs
    assert g.constraints[0].limit(1000.0) == pytest.approx(500.0)


def test_parse_latency_at_a_target():
    g = parse_goal("latency=1.5x@cpu")
    assert g.constraints == (Constraint("latency", ratio=1.5, target="cpu", text="latency=1.5x@cpu"),)
    assert g.latency is g.constraints[0] and g.using == ("prune",)
    # a comma inside the target's parentheses does not split the goal
    g = parse_goal("latency=2x@cpu(mcpu='host',tune=0), size=3x")
    assert [c.metric for c in g.constraints] == ["latency", "bytes"]
    assert g.latency.target == "cpu(mcpu='host',tune=0)"


@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_hessian_sensitivity_predicts_the_codebook_tables(digits):
    """`sensitivity=hessian`: the codebook losses come from the Hessian-trace proxy (squeeze.passes.hessian), not from
    clustering each layer at each width; the allocation then still meets the goal, measured."""
    assert parse_goal("size=8x").sensitivity == "measured"
    assert parse_goal("size=8x,sensitivity=hessian").sensitivity == "hessian"
    result = squeeze.compress(MODEL, calib=CALIB, eval=TEST, goal="size=6x,using=codebook,sensitivity=hessian",
                              max_drop=2.0, targets=[], runs=3)
    goal = result.report["goal"]
    assert goal["sensitivity"] == "hessian" and goal["status"] in ("met", "closest")
    assert goal["points"] and all(p["predicted_loss"] >= 0 for p in goal["points"])
    if goal["status"] == "met":
        o, f = result.report["original"]["bytes"]["packed"], result.report["final"]["bytes"]["packed"]
        assert o / f >= 6.0 and result.report["validation"]["drop"] <= 2.0


def test_parse_combinations_and_using():
    g = parse_goal("size=8x, macs=0.5")
    assert [(c.metric, c.ratio) for c in g.constraints] == [("bytes", 8.0), ("macs", 2.0)]
    assert g.using == ("prune", "codebook") and g.text == "size=8x,macs=0.5"
    assert parse_goal("size=8x,using=prune+codebook").using == ("prune", "codebook")
    assert parse_goal("size=8x,using=codebook").using == ("codebook",)
    assert parse_goal("using=prune,macs=2x").using == ("prune",)
    g = parse_goal("latency=2x@cpu,size=4x")
    assert g.latency.ratio == 2.0 and g.using == ("prune", "codebook")


BAD_GOALS = {
    "empty": ("", "--goal is empty"),
    "blank": ("  , ", "--goal is empty"),
    "ratio below 1": ("size=0.5x", "a ratio must be greater than 1"),
    "ratio of 1": ("size=1x", "a ratio must be greater than 1"),
    "not a number": ("size=bigx", "is not a number"),
    "not finite": ("size=infx", "not a finite number"),
    "macs fraction above 1": ("macs=1.2", "0 < F < 1"),
    "macs fraction 0": ("macs=0", "0 < F < 1"),
    "no value": ("size=", "expected key=value"),
    "no equals": ("nonsense", "expected key=value"),
    "zero bytes": ("bytes=0", "bytes must be a positive size"),
    "bytes unit": ("bytes=12parsecs", "bytes must be a positive size"),
    "latency without target": ("latency=2x", "say where latency is measured"),
    "latency empty target": ("latency=2x@", "say where latency is measured"),
    "unknown target": ("latency=2x@nosuchtarget", "unknown target 'nosuchtarget'"),
    "unknown key": ("colour=red", "unknown key 'colour'"),
    "using quant": ("size=8x,using=quant", "using= takes prune, lowrank and/or codebook"),
    "sensitivity kind": ("size=8x,sensitivity=guess", "sensitivity= is measured or hessian"),
    "no budget": ("using=prune", "names no budget"),
    "two latencies": ("latency=2x@cpu,latency=3x@cpu", "one latency budget at a time"),
    "codebook for macs": ("macs=0.5,using=codebook", "needs using=prune"),
}


@pytest.mark.parametrize("case", list(BAD_GOALS))
def test_bad_goals_are_one_line_spec_errors(case):
    text, fragment = BAD_GOALS[case]
    with pytest.raises(SpecError) as err:
        parse_goal(text)
    message = str(err.value)
    assert fragment in message and "\n" not in message and message.strip() == message


def test_compress_rejects_a_bad_goal_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpecError, match="a ratio must be greater than 1"):
        squeeze.compress(tmp_path / "absent.onnx", goal="size=0.5x", targets=[], out_dir=out)
    # the latency target's parameters are checked too (parse_goal only looks at its name)
    with pytest.raises(SpecError, match="nosuch"):
        squeeze.compress(tmp_path / "absent.onnx", goal="latency=2x@cpu(nosuch=1)", targets=[], out_dir=out)
    assert not out.exists()


# ------------------------------------------------------------------------------------- 2. solve on hand-made tables

NO_BASE = {"bytes": 0.0, "macs": 0.0, "latency": 0.0}


def _tables(knobs, layers, other_bytes=0.0, other_macs=0.0, latency=0.0) -> Tables:
    return Tables(knobs, layers, {**NO_BASE, "latency": latency}, {"bytes": other_bytes, "macs": other_macs})


def _random_instance(seed: int) -> tuple[LossModel, dict[str, float]]:
    """3-4 knobs with 3-5 choices each: a chain of layers, 0-2 channel groups between them (coupled costs),
    codebook knobs on some layers, losses increasing with strength; a bytes budget, sometimes a MACs one."""
    rng = np.random.default_rng(seed)
    n_knobs = int(rng.integers(3, 5))
    n_groups = int(rng.integers(0, 3))
    n_layers = max(n_groups + 1, n_knobs - n_groups)
    sizes = [int(rng.choice([6, 8, 16])) for _ in range(n_groups)]
    layers = []
    for i in range(n_layers):
        ins = {f"g{i - 1}": 1.0 / sizes[i - 1]} if 0 < i <= n_groups else {}
        outs = {f"g{i}": 1.0 / sizes[i]} if i < n_groups else {}
        params = int(rng.integers(100, 5000))
        layers.append(LayerCost(f"L{i}", params, params * int(rng.integers(1, 50)), 32.0,
                                {8: 8.2, 6: 6.3, 4: 4.3, 2: 2.5}, ins, outs))
    knobs = []
    for gi, size in enumerate(sizes):
        n = int(rng.integers(3, 6))
        kept = sorted(rng.choice(np.arange(1, size), n - 1, replace=False).tolist() + [size], reverse=True)
        loss = np.concatenate([[0.0], np.sort(rng.exponential(0.1, n - 1))])
        knobs.append(Knob("prune", f"g{gi}", [int(k) for k in kept], [float(v) for v in loss], size=size))
    for i in rng.permutation(n_layers)[: n_knobs - n_groups]:
        n = int(rng.integers(3, 6))
        loss = np.concatenate([[0.0], np.sort(rng.exponential(0.05, n - 1))])
        knobs.append(Knob("codebook", f"L{i}", [0, 8, 6, 4, 2][:n], [float(v) for v in loss]))
    model = LossModel(_tables(knobs, layers, other_bytes=float(rng.integers(0, 500))))
    full, floor = model.costs({}), model.costs(_strongest(model))
    budgets = {"bytes": full["bytes"] * rng.uniform(floor["bytes"] / full["bytes"], 1.0)}
    if rng.random() < 0.3 and floor["macs"] < full["macs"]:
        budgets["macs"] = full["macs"] * rng.uniform(floor["macs"] / full["macs"], 1.0)
    return model, budgets


def _strongest(model: LossModel) -> dict[str, int]:
    return {key: len(k.choices) - 1 for key, k in model.by_key.items()}


def _all_plans(model: LossModel):
    keys = list(model.by_key)
    for combo in itertools.product(*(range(len(model.by_key[k].choices)) for k in keys)):
        yield dict(zip(keys, combo))


def _brute_force(model: LossModel, budgets: dict[str, float]) -> float | None:
    """The least predicted loss of any plan within the budgets (None: no plan is)."""
    losses = [model.loss(p) for p in _all_plans(model) if feasible(model.costs(p), budgets)]
    return min(losses) if losses else None


def test_solve_is_feasible_and_nearly_always_optimal_on_small_random_instances():
    instances, optimal, gaps = 200, 0, []
    for seed in range(instances):
        model, budgets = _random_instance(seed)
        plan, costs, loss = solve(model, budgets)
        best = _brute_force(model, budgets)
        assert best is not None  # budgets are drawn between the strongest plan and the original
        assert feasible(costs, budgets), (seed, costs, budgets)
        assert costs == model.costs(plan) and loss == pytest.approx(model.loss(plan))
        assert loss >= best - 1e-12
        if loss <= best + 1e-9:
            optimal += 1
        else:
            gaps.append((seed, round(loss / best, 3)))
    # 192/200 before the strengthen-from-below fix and the pairwise exchange step (misses 1.01-1.48x the
    # optimum); 200/200 since. The bound leaves room for instances the heuristic may still miss.
    print(f"solve optimal on {optimal}/{instances} random instances; misses (seed, loss/optimum): {gaps}")
    assert optimal >= 0.95 * instances, gaps


def _three_layers() -> LossModel:
    """Three float layers (100, 100, 500 params; 2800 bytes), each clusterable at 8 or 4 bits."""
    layers = [LayerCost(f"L{i}", p, 0, 32.0, {8: 8.0, 4: 4.0}) for i, p in enumerate([100, 100, 500])]
    losses = [[0.0, 6.0, 10.0], [0.0, 2.0, 4.0], [0.0, 6.0, 9.0]]
    return LossModel(_tables([Knob("codebook", f"L{i}", [0, 8, 4], l) for i, l in enumerate(losses)], layers))


def test_solve_strengthens_from_the_empty_plan():
    # Saving 100 of 2800 bytes: L1 at 8 bits saves 300 bytes for a loss of 2. L2 at 8 bits has the best loss per
    # byte (6 for 1500 bytes), so every Lagrangian plan is {} or {L2: 8 bits}; the greedy repair that starts from
    # the infeasible {} would find L1, but it is skipped because {} is falsy.
    model = _three_layers()
    plan, costs, loss = solve(model, {"bytes": 2700.0})
    assert _brute_force(model, {"bytes": 2700.0}) == 2.0
    assert costs["bytes"] == 2500.0 and loss == 2.0 and {k: v for k, v in plan.items() if v} == {"codebook:L1": 1}


def test_solve_generous_budget_changes_nothing():
    model = _three_layers()
    plan, costs, loss = solve(model, {"bytes": 2800.0})
    assert loss == 0.0 and not any(plan.values()) and costs["bytes"] == 2800.0


def test_solve_simple_budget_takes_the_insensitive_layer():
    model = _three_layers()
    # 1500 bytes must go: L2 at 8 bits (loss 6) is the only single move; L0+L1 at 4 bits save only 700.
    plan, costs, loss = solve(model, {"bytes": 1300.0})
    assert feasible(costs, {"bytes": 1300.0}) and loss == _brute_force(model, {"bytes": 1300.0}) == 6.0


@pytest.mark.parametrize("seed", range(8))
def test_infeasible_budget_returns_the_cheapest_plan_flagged_infeasible(seed):
    model, _ = _random_instance(seed)
    floor = model.costs(_strongest(model))
    budgets = {"bytes": 0.5 * floor["bytes"]}
    plan, costs, loss = solve(model, budgets)
    assert not feasible(costs, budgets)  # the caller sees the plan misses the budget
    assert costs["bytes"] == pytest.approx(min(model.costs(p)["bytes"] for p in _all_plans(model)))
    assert costs == model.costs(plan) and loss == pytest.approx(model.loss(plan))


def test_budget_no_knob_can_move_is_infeasible():
    model = _three_layers()  # codebook knobs only: MACs cannot shrink
    model.t.layers[0].macs = 1000
    plan, costs, _ = solve(model, {"macs": 500.0})
    assert not feasible(costs, {"macs": 500.0}) and costs["macs"] == 1000.0


# --------------------------------------------------------------------------------------- 3. LossModel.costs coupling

def _coupled() -> LossModel:
    """A[800 params] -(group g, 8 channels)-> B[1600 params] -(group h, 4 channels)-> C[400 params]; D apart."""
    layers = [LayerCost("A", 800, 8000, 32.0, {4: 4.5}, {}, {"g": 1 / 8}),
              LayerCost("B", 1600, 4000, 32.0, {4: 4.5}, {"g": 1 / 8}, {"h": 1 / 4}),
              LayerCost("C", 400, 400, 32.0, {4: 4.5}, {"h": 1 / 4}, {}),
              LayerCost("D", 100, 100, 32.0, {4: 4.5})]
    knobs = [Knob("prune", "g", [8, 6, 2], [0.0, 0.1, 0.5], size=8, latency_saved=[0.0, 0.002, 0.004]),
             Knob("prune", "h", [4, 2], [0.0, 0.3], size=4),
             Knob("codebook", "B", [0, 4], [0.0, 0.01])]
    return LossModel(_tables(knobs, layers, other_bytes=50.0, other_macs=10.0, latency=0.01))


def test_pruning_a_group_shrinks_its_producer_and_its_consumer():
    model = _coupled()
    base = model.costs({})
    assert base["bytes"] == 50 + (800 + 1600 + 400 + 100) * 4 and base["macs"] == 10 + 8000 + 4000 + 400 + 100
    # g keeps 6 of 8: A loses a quarter of its outputs, B a quarter of its inputs; C and D are untouched
    cut = model.costs({"prune:g": 1})
    assert cut["bytes"] == pytest.approx(50 + 800 * 0.75 * 4 + 1600 * 0.75 * 4 + 400 * 4 + 100 * 4)
    assert cut["macs"] == pytest.approx(10 + 8000 * 0.75 + 4000 * 0.75 + 400 + 100)
    # B sits between g and h: both cuts multiply (inputs 2/8 left, outputs 2/4 left)
    both = model.costs({"prune:g": 2, "prune:h": 1})
    assert both["macs"] == pytest.approx(10 + 8000 * 0.25 + 4000 * 0.25 * 0.5 + 400 * 0.5 + 100)
    # bits and channels compose on the same layer: B's remaining params at its 4-bit packed width
    mixed = model.costs({"prune:g": 1, "codebook:B": 1})
    assert mixed["bytes"] == pytest.approx(cut["bytes"] - 1600 * 0.75 * 4 + 1600 * 0.75 * 4.5 / 8)
    assert mixed["macs"] == cut["macs"]  # codebook does not change MACs
    assert model.loss({"prune:g": 1, "codebook:B": 1}) == pytest.approx(0.11)


def test_latency_and_the_measured_corrections():
    model = _coupled()
    assert model.costs({})["latency"] == 0.01 and model.costs({"prune:g": 2})["latency"] == pytest.approx(0.006)
    model.cost_scale["bytes"] = 1.1
    model.scale["prune"] = 2.0
    assert model.costs({})["bytes"] == pytest.approx(1.1 * (50 + 2900 * 4))
    assert model.loss({"prune:g": 1, "codebook:B": 1}) == pytest.approx(0.21)


@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_real_tables_couple_the_layers_a_group_touches(digits_tables):
    layers = {l.name: l for l in digits_tables.layers}
    assert set(layers) == {STEM, CONV1, CONV2, DOWN, FC1, FC2}
    assert layers[CONV1].outs == {CONV1: 1 / 16} and layers[CONV2].ins == {CONV1: 1 / 16}
    assert layers[STEM].outs == {STEM_GROUP: 1 / 16} and layers[CONV2].outs == {STEM_GROUP: 1 / 16}
    assert layers[CONV1].ins == {STEM_GROUP: 1 / 16} and layers[DOWN].ins == {STEM_GROUP: 1 / 16}
    assert layers[FC1].ins == {DOWN: 1 / 32} and layers[FC2].ins == {FC1: 1 / 64} and layers[FC2].outs == {}
    model = LossModel(digits_tables)
    base = model.costs({})
    conv1 = next(k for k in digits_tables.knobs if k.kind == "prune" and k.name == CONV1)
    plan = {f"prune:{CONV1}": conv1.choices.index(8)}   # conv1 keeps 8 of 16 channels
    cut = model.costs(plan)
    saved = 0.5 * (layers[CONV1].macs + layers[CONV2].macs)
    assert base["macs"] - cut["macs"] == pytest.approx(saved)
    assert base["bytes"] - cut["bytes"] == pytest.approx(
        0.5 * (layers[CONV1].params * layers[CONV1].float_bits + layers[CONV2].params * layers[CONV2].float_bits) / 8)


# ------------------------------------------------------------------------------------ 4. plan → pass calls → model

def _choice(tables: Tables, kind: str, name: str, value: int) -> tuple[str, int]:
    knob = next(k for k in tables.knobs if k.kind == kind and k.name == name)
    return f"{kind}:{name}", knob.choices.index(value)


@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_plan_calls_round_trip_and_do_what_the_plan_says(digits_tables, digits):
    t = digits_tables
    plan = dict([_choice(t, "prune", CONV1, 8), _choice(t, "prune", FC1, 48), _choice(t, "prune", DOWN, 32),
                 _choice(t, "codebook", STEM, 0), _choice(t, "codebook", CONV1, 4), _choice(t, "codebook", CONV2, 4),
                 _choice(t, "codebook", DOWN, 4), _choice(t, "codebook", FC1, 3), _choice(t, "codebook", FC2, 6)])
    model = LossModel(t)
    calls = plan_calls(model, plan)
    assert [c.name for c in calls] == ["prune", "codebook"]
    prune, codebook = calls
    assert prune.params["ratio"] == 0 and sorted(prune.params["keep"]) == sorted([f"{CONV1}=8", f"{FC1}=48"])
    assert codebook.params["bits"] == 4 and codebook.params["skip"] == [STEM]
    assert sorted(codebook.params["layer_bits"]) == sorted([f"{FC1}=3", f"{FC2}=6"])
    spec = ",".join(str(c) for c in calls)
    again = bind(spec, get_pass)  # what the report shows parses back to the same calls
    assert [(c.name, c.params) for c in again] == [(c.name, c.params) for c in calls]

    result = run_pipeline(digits.model, again, digits.calib.subset(0, 64), digits.shapes)
    assert result.failure is None
    step_prune, step_codebook = result.steps
    after = {g["name"]: (g["channels_before"], g["channels_after"]) for g in step_prune["details"]["groups"]}
    assert after == {STEM_GROUP: (16, 16), CONV1: (16, 8), DOWN: (32, 32), FC1: (64, 48)}
    bits = {row["layer"]: row["index_bits"] for row in step_codebook["details"]["per_layer"]}
    assert bits == {CONV1: 4, CONV2: 4, DOWN: 4, FC1: 3, FC2: 6}
    assert list(step_codebook["details"]["skipped"]) == [STEM]

    # the cost model predicts what the passes produce: MACs exactly, packed bytes within a few percent
    shapes = digits.shapes
    assert model.costs(plan)["macs"] == pytest.approx(metrics.summary(result.model, shapes)["macs"])
    predicted, measured = model.costs(plan)["bytes"], pack.size_report(result.model)["packed"]
    assert abs(predicted / measured - 1) < 0.03, (predicted, measured)

    rows = {(r["kind"], r["name"]): r for r in describe_plan(model, plan)}
    assert rows[("prune", CONV1)]["channels_after"] == 8 and rows[("codebook", STEM)]["bits"] == "float"
    assert rows[("codebook", FC1)]["bits"] == 3


def test_plan_calls_of_nothing_and_of_float_layers_only():
    model = _coupled()
    assert plan_calls(model, {}) == []
    assert plan_calls(model, {"codebook:B": 0, "prune:g": 0}) == []


# --------------------------------------------------------------------------------- 5. end to end through compress

@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_goal_end_to_end_meets_the_size_within_max_drop(goal_runs):
    report = goal_runs.first.report
    g = report["goal"]
    assert report["failure"] is None and g["goal"] == "size=6x" and g["max_drop"] == 2.0
    assert g["budgets"]["bytes"]["ratio"] == pytest.approx(6.0)
    assert g["budgets"]["bytes"]["original"] == report["original"]["bytes"]["packed"]
    assert g["status"] in ("met", "closest"), g["why"]
    assert g["why"] and g["plan"] and g["points"]
    assert {row["kind"] for row in g["plan"]} == {"prune", "codebook"}
    assert report["pass_spec"] == g["spec"]  # no --passes: the run is exactly the allocated calls
    for point in g["points"]:
        assert point["ratios"]["bytes"] == pytest.approx(report["original"]["bytes"]["packed"] / point["bytes"],
                                                         rel=1e-3)
        assert point["measured_loss"] >= 0 and "drop" in point and "predicted_loss" in point
    ratio = report["original"]["bytes"]["packed"] / report["final"]["bytes"]["packed"]
    chosen = next(p for p in g["points"] if p["spec"] == g["spec"])
    assert chosen["bytes"] == report["final"]["bytes"]["packed"]  # the search measured what the user gets
    assert chosen["drop"] == pytest.approx(report["validation"]["drop"], abs=1e-3)  # chosen on validation data
    if g["status"] == "met":
        assert ratio >= 6.0 and chosen["meets_goal"] and chosen["within_max_drop"]
    else:
        assert any("closest" in line for line in g["why"]), g["why"]
        assert 1.0 < ratio < 6.0
    assert report["validation"]["drop"] <= 2.0  # held on validation data
    assert g["tables"]["cached"] is False and g["tables"]["knobs"] == 10
    assert g["predicted_curve"]["bytes"], "the predicted frontier is in the report"
    assert "size=6x" in (goal_runs.out / "run1" / "report.md").read_text()


@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_goal_second_run_reads_the_cache_and_is_byte_identical(goal_runs):
    first, second = goal_runs.first.report["goal"], goal_runs.second.report["goal"]
    assert first["tables"]["cached"] is False and second["tables"]["cached"] is True
    parts = sorted(p.name.rsplit("-", 1)[1] for p in (goal_runs.cache / "goal").glob("*.json"))
    assert parts == ["codebook.json", "prune.json"]  # one file per table part, written once
    assert second["spec"] == first["spec"] and second["status"] == first["status"]
    assert second["plan"] == first["plan"]
    one, two = (goal_runs.out / f"run{i}" / "model.onnx" for i in (1, 2))
    assert one.read_bytes() == two.read_bytes()


@pytest.mark.slow  # the end-to-end goal runs and their tables: ~10 min of the default run
def test_two_budgets_on_one_metric_both_hold(goal_runs, digits, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE", str(goal_runs.cache))  # the tables are the ones already measured
    fit, held = digits.calib.split_holdout()  # as compress splits --calib: the cached tables are the fit part's
    found = goal_mod.search(digits.model, parse_goal("size=6x,bytes=10M"), fit, digits.shapes,
                            original=digits.model, max_drop=2.0, guard_data=held)
    assert found.report["tables"]["cached"]
    assert found.report["budgets"]["bytes"]["ratio"] >= 6.0  # the tighter of the two


def test_goal_macs_end_to_end_prunes_with_keep_counts():
    result = squeeze.compress(MODEL, calib=CALIB, eval=TEST, goal="macs=0.6", max_drop=2.0, targets=[], runs=3)
    report = result.report
    g = report["goal"]
    assert result.failure is None and g["using"] == ["prune"] and g["status"] in ("met", "closest"), g["why"]
    assert g["tables"]["cached"] is False  # a prune-only goal measures only the prune part
    assert report["validation"]["drop"] <= 2.0  # held on validation data
    chosen = next(p for p in g["points"] if p["spec"] == g["spec"])
    assert chosen["macs"] == report["final"]["macs"]
    assert chosen["drop"] == pytest.approx(report["validation"]["drop"], abs=1e-3)  # guard data = validation
    if g["status"] == "met":
        assert report["original"]["macs"] / report["final"]["macs"] >= 1 / 0.6 - 1e-9
    (step,) = report["passes"]
    assert step["name"] == "prune" and step["params"]["ratio"] == 0 and step["params"]["keep"]
    after = {row["name"]: row["channels_after"] for row in step["details"]["groups"]}
    planned = {row["name"]: row["channels_after"] for row in g["plan"]}
    assert after == planned  # the pass kept exactly the channels the plan says, group by group


@pytest.mark.slow
@pytest.mark.tvm
def test_goal_latency_on_cpu_rounds_channels_to_the_target_multiple():
    result = squeeze.compress(MODEL, calib=CALIB, eval=TEST, goal="latency=1.2x@cpu", max_drop=2.0, targets=[],
                              runs=20, threads=1)
    report = result.report
    g = report["goal"]
    assert result.failure is None and g["status"] in ("met", "closest"), g["why"]
    assert g["latency_target"] == "cpu" and g["budgets"]["latency"]["unit"] == "seconds"
    assert [t["name"] for t in report["targets"]] == ["cpu"]  # the goal's target is measured in the report
    multiple = g["channel_multiple"]
    assert multiple > 1
    for row in g["plan"]:
        assert row["channels_after"] == row["channels_before"] or row["channels_after"] % multiple == 0, row
    assert all("latency" in p["ratios"] for p in g["points"])
    assert report["validation"]["drop"] <= 2.0  # held on validation data


# --------------------------------------------------------------------------------------- 6. CLI and recipe

def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1", "SQUEEZE_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "squeeze", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(run: subprocess.CompletedProcess, fragment: str) -> str:
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("squeeze: error: ") and fragment in lines[0], run.stderr
    return lines[0]


@pytest.mark.parametrize("bad,fragment", [("nonsense", "--goal 'nonsense': expected key=value"),
                                          ("size=0.5x", "a ratio must be greater than 1"),
                                          ("latency=2x", "say where latency is measured"),
                                          ("size=8x,using=quant", "using= takes prune, lowrank and/or codebook")])
def test_cli_bad_goal_is_one_line_exit_2(tmp_path, digits_copy, bad, fragment):
    _one_line_error(_cli(digits_copy, "--goal", bad, "--target", "none", cwd=tmp_path), fragment)
    assert not (tmp_path / "digits_cnn.squeeze").exists()


def test_cli_goal_without_calib_is_one_line_error(tmp_path, digits_copy):
    run = _cli(digits_copy, "--goal", "size=6x", "--target", "none", cwd=tmp_path)
    _one_line_error(run, "--goal needs --calib")


@pytest.mark.parametrize("target,fragment", [("arm", "an emulator's time"), ("mcu", "an instruction count"),
                                              ("mobile-gpu", "PoCL on this CPU's time")])
def test_cli_latency_goal_without_real_timing_is_refused(tmp_path, digits_copy, target, fragment):
    """Issue 19: a latency goal must not optimise an emulator's time (or a count) as if it were the device's."""
    run = _cli(digits_copy, "--goal", f"latency=1.5x@{target}", "--calib", str(CALIB), "--target", "none",
               cwd=tmp_path)
    line = _one_line_error(run, fragment)
    assert "--rpc" in line and "not real latency" in line
    assert not (tmp_path / "digits_cnn.squeeze").exists()


def test_cli_goal_without_calib_writes_nothing(tmp_path, digits_copy):
    _cli(digits_copy, "--goal", "size=6x", "--target", "none", cwd=tmp_path)
    assert not (tmp_path / "digits_cnn.squeeze").exists()  # as for every other user error (test_cli.py)


def test_recipe_goal_as_string_or_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {MODEL}\ncalib: {CALIB}\ngoal: size=6x\nmax_drop: 2.0\n")
    assert load(path)["goal"] == "size=6x"
    assert arguments(path)["goal"] == "size=6x" and arguments(path)["max_drop"] == 2.0
    path.write_text(f"model: {MODEL}\ngoal: {{size: 6x, using: prune+codebook}}\n")
    assert arguments(path)["goal"] == "size=6x,using=prune+codebook"
    assert parse_goal(arguments(path)["goal"]).using == ("prune", "codebook")
    toml = tmp_path / "r.toml"
    toml.write_text(f'model = "{MODEL}"\ngoal = "macs=0.5"\n')
    assert arguments(toml)["goal"] == "macs=0.5"
    path.write_text(f"model: {MODEL}\ngoal: [size=6x]\n")
    with pytest.raises(RecipeError, match="goal must be a string"):
        load(path)


def test_cli_recipe_goal_reaches_the_search_and_the_flag_overrides_it(tmp_path, digits_copy):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {digits_copy}\ntarget: none\ngoal: size=0.5x\n")
    _one_line_error(_cli("--recipe", recipe, cwd=tmp_path), "--goal 'size=0.5x'")
    _one_line_error(_cli("--recipe", recipe, "--goal", "macs=3", cwd=tmp_path), "--goal 'macs=3'")


# -------------------------------------------------------------------- 7. keep= / layer_bits= parameter errors

PARAM_ERRORS = {
    "keep unknown group": ("prune(ratio=0,keep=['nope=3'])", "keep entry 'nope=3': no channel group named 'nope'"),
    "keep N=0": (f"prune(ratio=0,keep=['{FC1}=0'])", "N must be between 1 and the group's 64 channels"),
    "keep N too big": (f"prune(ratio=0,keep=['{FC1}=65'])", "N must be between 1 and the group's 64 channels"),
    "keep N not a count": (f"prune(ratio=0,keep=['{FC1}=half'])", "expected 'GROUP=N' with N a channel count"),
    "keep without =": (f"prune(keep=['{FC1}'])", "expected 'GROUP=N'"),
    "keep input group": (f"prune(ratio=0,keep=['{STEM}=1'])", f"group '{STEM}' cannot be pruned"),
    "keep output group": (f"prune(ratio=0,keep=['{FC2}=5'])", "cannot be pruned (it reaches the graph output"),
    "bits unknown layer": ("codebook(layer_bits=['nope=3'])", "layer_bits entry 'nope=3' matches no layer"),
    "bits B=0": (f"codebook(layer_bits=['{FC1}=0'])", "expected 'LAYER=B' with B in 1..8"),
    "bits B=9": (f"codebook(layer_bits=['{FC1}=9'])", "expected 'LAYER=B' with B in 1..8"),
    "bits not a number": (f"codebook(layer_bits=['{FC1}=few'])", "expected 'LAYER=B'"),
    "bits without =": (f"codebook(layer_bits=['{FC1}'])", "expected 'LAYER=B'"),
}


@pytest.mark.parametrize("case", list(PARAM_ERRORS))
def test_keep_and_layer_bits_errors_are_one_line_pass_failures(case, digits):
    spec, fragment = PARAM_ERRORS[case]
    calls = bind(spec, get_pass)  # the spec itself is well-formed: the pass rejects the entry
    result = run_pipeline(digits.model, calls, digits.calib.subset(0, 16), digits.shapes)
    name = calls[0].name
    assert result.failure is not None and result.failure.startswith(f"pass {name!r} failed: "), result.failure
    assert fragment in result.failure and "\n" not in result.failure
    assert result.steps[-1]["failed"] == result.failure and result.model is digits.model
    assert type(result.exception).__name__ == "PassError"


def test_a_bad_keep_through_compress_keeps_the_input(digits):
    result = squeeze.compress(digits.model, "prune(ratio=0,keep=['nope=3'])", calib=digits.calib.subset(0, 16),
                              targets=[], runs=2)
    assert not result.ok and result.report["failure"] == result.failure
    assert "keep entry 'nope=3'" in result.failure and "\n" not in result.failure
    assert result.report["final"]["bytes"]["packed"] == result.report["original"]["bytes"]["packed"]
    with pytest.raises(SqueezeError, match="keep entry"):
        result.raise_for_failure()


@pytest.mark.parametrize("max_drop", [None, 1.0])
def test_closest_status_names_max_drop_only_when_one_was_given(max_drop):
    """A --goal without --max-drop that falls short says 'not met', not 'not met within --max-drop'."""
    from squeeze import html, report  # noqa: PLC0415
    goal = {"goal": "latency=1.5x@cpu", "using": ["prune"], "status": "closest", "max_drop": max_drop,
            "spec": "prune(ratio=0.1)", "drop_basis": "validation", "seconds": 3, "tables": {"seconds": 1},
            "why": [], "budgets": {}, "points": []}
    text = "\n".join(report._goal_lines(goal))
    page = html._goal_section({"goal": goal})
    for shown in (text, page):
        assert ("within --max-drop" in shown) == (max_drop is not None)
        assert "not met" in shown
