"""`--goal ...,using=prune+lowrank` (issue 21): the low-rank implant as a third choice per layer, with its measured
loss and MAC/parameter cost in the tables; and the table cache keyed by the code that measured it and the device
latency was timed on (issue 19.4)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from squeeze import goal as goal_mod
from squeeze import metrics
from squeeze.data import input_specs, load_npz, resolve_shapes
from squeeze.goal import LossModel, parse_goal, plan_calls, solve
from squeeze.goal import tables as goal_tables
from squeeze.pipeline import apply_pass

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    model = onnx.load(MODEL)
    specs = input_specs(model)
    calib = load_npz(CALIB, specs)
    return SimpleNamespace(model=model, calib=calib, shapes=resolve_shapes(specs, {}, calib))


@pytest.fixture(scope="module")
def lowrank_tables(digits, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUEEZE_CACHE", str(tmp_path_factory.mktemp("lr-cache")))
        goal = parse_goal("macs=0.65,using=prune+lowrank")
        return goal_mod.measure_tables(digits.model, goal, digits.calib, digits.shapes, seed=0, threads=None,
                                       say=lambda m: None)


def test_parse_lowrank_knob():
    assert parse_goal("macs=0.65,using=prune+lowrank").using == ("prune", "lowrank")
    assert parse_goal("macs=0.65,using=lowrank").using == ("lowrank",)
    assert parse_goal("macs=0.5").using == ("prune",)  # the default is unchanged


def test_lowrank_knobs_carry_measured_loss_and_cost(lowrank_tables):
    implants = [k for k in lowrank_tables.knobs if k.kind == "lowrank"]
    assert implants and any(k.kind == "prune" for k in lowrank_tables.knobs)
    for k in implants:
        assert k.choices[0] == 0 and k.loss[0] == 0 and k.macs_kept[0] == 1.0
        assert all(0 < r <= goal_mod.LOWRANK_LEVELS[0] for r in k.choices[1:])
        assert all(0 < m < 1 for m in k.macs_kept[1:]), k  # a choice exists only where it saves MACs
        assert k.macs_kept[1:] == sorted(k.macs_kept[1:], reverse=True)  # lower rank, fewer MACs
        assert all(v >= 0 for v in k.loss) and k.loss[-1] > 0


def test_plan_with_implants_applies_and_prices_macs(lowrank_tables, digits):
    """The solver may pick implants; their predicted MACs match what the real passes give."""
    predictor = LossModel(lowrank_tables)
    implant = next(k for k in lowrank_tables.knobs if k.kind == "lowrank")
    plan = {f"lowrank:{implant.name}": len(implant.choices) - 1}
    calls = plan_calls(predictor, plan)
    assert [c.name for c in calls] == ["lowrank"]
    current = digits.model
    for call in calls:
        current, _ = apply_pass(call, call.params, current, digits.calib, digits.shapes, 0, None)
    measured = metrics.summary(current, digits.shapes)["macs"]
    predicted = predictor.costs(plan)["macs"]
    assert abs(measured - predicted) <= 0.02 * predicted
    assert measured < metrics.summary(digits.model, digits.shapes)["macs"]

    base = predictor.costs({})["macs"]
    mixed, costs, _ = solve(predictor, {"macs": 0.65 * base})
    assert costs["macs"] <= 0.65 * base * (1 + 1e-9)
    assert set(k.split(":")[0] for k, v in mixed.items() if v) <= {"prune", "lowrank"}


def test_cache_key_changes_with_code_and_device(digits, monkeypatch):
    key = goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1], "cpu-t1 host=CPU A")
    assert key == goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1], "cpu-t1 host=CPU A")
    assert key != goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1], "cpu-t1 host=CPU B")
    assert key != goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1], "cpu-t1 device=key-rpi4")
    plain = goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1])
    # another version of the code that measures the tables
    monkeypatch.setattr(goal_tables, "CODE_VERSIONS", {k: v + "0" for k, v in goal_tables.CODE_VERSIONS.items()})
    assert goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1]) != plain
    assert goal_tables.cache_path(digits.model, digits.calib, 0, "prune", [1], "cpu-t1 host=CPU A") != key


def test_code_version_reads_the_sources(tmp_path, monkeypatch):
    """An edit to a source file is a new version (the digest is over the files, not a constant)."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = goal_tables.code_version(("fakepkg",))
    goal_tables.CODE_VERSIONS.clear()
    (pkg / "a.py").write_text("x = 2\n")
    assert goal_tables.code_version(("fakepkg",)) != first


def test_device_identity_names_the_rpc_device_or_the_host():
    class Runner:
        def identity(self):
            return "key-rpi4"

    assert goal_mod.device_identity(Runner()) == "device=key-rpi4"
    assert goal_mod.device_identity(None).startswith("host=")


def test_search_with_implants_meets_the_budget_and_weighs_the_uniform_plan(digits):
    found = goal_mod.search(digits.model, parse_goal("macs=0.65,using=prune+lowrank"), digits.calib, digits.shapes,
                            original=digits.model)
    report = found.report
    assert report["status"] == "met", report["why"]
    assert report["budgets"]["macs"]["ratio"] <= min(p["ratios"]["macs"] for p in report["points"]
                                                     if p["spec"] == report["spec"]) + 1e-9
    uniform = [p for p in report["points"] if p["label"].startswith("uniform rank")]
    assert len(uniform) == 1 and any(w.startswith("every implant at rank") for w in report["why"])
    best = min([p for p in report["points"] if p["meets_goal"]], key=lambda p: p["measured_loss"])
    assert report["measured_loss"] == best["measured_loss"]  # the lower measured loss of the two is kept
