"""Three roles for data (issue 19, item 1): calibration fits, validation chooses (--max-drop, --goal), evaluation
only reports. The evaluation data is never read to choose; every reported accuracy has n, its standard error and a
paired test against the original."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import squeeze
from squeeze.data import Dataset, holdout
from squeeze.errors import DataError
from squeeze.report import markdown, terminal_table
from squeeze.task_metrics import Score, mcnemar, paired_test, parse_metric

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
TEST = REPO / "models" / "digits_test.npz"
PASSES = "prune(ratio=0.6,scope=layer)"  # loses a few points on the digits model: the guard has to back it off


def _save(path: Path, x: np.ndarray, labels: np.ndarray | None = None) -> Path:
    np.savez(path, input=x, **({} if labels is None else {"labels": labels}))
    return path


@pytest.fixture(scope="module")
def digits():
    with np.load(CALIB) as c, np.load(TEST) as t:
        return {"calib_x": c["input"], "calib_y": c["labels"], "test_x": t["input"], "test_y": t["labels"]}


# ------------------------------------------------------------------------------------------ the held-out split


def test_holdout_split_is_deterministic_and_keeps_ground_truth():
    ds = Dataset({"x": np.arange(20, dtype=np.float32)[:, None]}, np.arange(20), "d (20 samples)",
                 texts=np.array([str(i) for i in range(20)]))
    fit, held = ds.split_holdout()
    again_fit, again_held = ds.split_holdout()
    assert held.labels.tolist() == [3, 7, 11, 15, 19] == again_held.labels.tolist()
    assert fit.labels.tolist() == [i for i in range(20) if i % 4 != 3] == again_fit.labels.tolist()
    assert held.arrays["x"][:, 0].tolist() == held.labels.tolist() and held.texts.tolist() == ["3", "7", "11", "15", "19"]
    assert not set(fit.labels) & set(held.labels)
    assert holdout(8).tolist() == [False, False, False, True] * 2
    with pytest.raises(DataError, match="too few"):
        ds.subset(0, 7).split_holdout()


# ------------------------------------------------------------------------------------------ paired tests


def test_mcnemar_on_known_tables():
    # b = 2 (original right, final wrong), c = 8: exact two-sided p = 2 · P(X ≤ 2), X ~ Bin(10, ½) = 2 · 56/1024
    original = np.array([1, 1] + [0] * 8 + [1] * 5)
    final = np.array([0, 0] + [1] * 8 + [1] * 5)
    t = mcnemar(original, final)
    assert (t["b"], t["c"], t["method"]) == (2, 8, "exact binomial") and t["p"] == pytest.approx(0.109375)
    # b = 30, c = 10: χ² = (|30 − 10| − 1)² / 40 = 9.025, p = erfc(√(χ²/2)) = 0.002663
    original = np.array([1] * 30 + [0] * 10 + [1] * 60)
    final = np.array([0] * 30 + [1] * 10 + [1] * 60)
    t = mcnemar(original, final)
    assert t["method"].startswith("chi-square") and t["statistic"] == pytest.approx(9.025)
    assert t["p"] == pytest.approx(0.0026634, rel=1e-3)
    assert mcnemar(np.ones(5), np.ones(5))["p"] == 1.0
    assert mcnemar(np.array([1, 0]), np.array([0, 1]))["p"] == 1.0  # b = c = 1: 2 · P(X ≤ 1 | n=2) = 1.5 → 1


def test_paired_test_of_a_non_binary_metric_uses_the_paired_standard_error():
    metric = parse_metric("mask-iou")
    a = np.array([0.9, 0.8, 0.7, 0.95, 0.85])
    b = a - np.array([0.1, 0.05, 0.1, 0.0, 0.05])
    original = Score(float(a.mean()), 5, float(a.std(ddof=1) / math.sqrt(5)), a)
    final = Score(float(b.mean()), 5, float(b.std(ddof=1) / math.sqrt(5)), b)
    t = paired_test(metric, original, final)
    d = a - b
    se = d.std(ddof=1) / math.sqrt(5)
    assert t["test"] == "paired z" and t["se"] == pytest.approx(se)
    assert t["z"] == pytest.approx(d.mean() / se) and t["p"] == pytest.approx(math.erfc(abs(d.mean() / se) / math.sqrt(2)))


# ------------------------------------------------------------------------------------------ roles in a run


def test_eval_is_never_read_to_choose(tmp_path, digits):
    """An evaluation set whose labels are all wrong changes the reported numbers, not the chosen model."""
    right = _save(tmp_path / "right.npz", digits["test_x"], digits["test_y"])
    wrong = _save(tmp_path / "wrong.npz", digits["test_x"], (digits["test_y"] + 1) % 10)
    runs = [squeeze.compress(MODEL, PASSES, calib=CALIB, eval=e, targets="", max_drop=0.5) for e in (right, wrong)]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    assert runs[0].report["passes"][0]["guard"] == runs[1].report["passes"][0]["guard"]
    assert runs[0].report["accuracy"]["final"]["top1"] > 0.9 > runs[1].report["accuracy"]["final"]["top1"]
    guard = runs[0].report["passes"][0]["guard"]
    assert guard["drop_basis"] == "validation" and guard["n"] == 64 and "held-out" in guard["data"]
    data = runs[0].report["data"]
    assert (data["calib_samples"], data["calib_fit_samples"], data["val_samples"], data["eval_samples"]) == (256, 192, 64, 540)
    validation = runs[0].report["validation"]
    assert validation["drop_basis"] == "validation" and validation["drop"] == pytest.approx(guard["drop"], abs=1e-3)
    assert runs[0].report["metric"]["drop_basis"] == "evaluation"


def test_the_passes_fit_without_the_validation_samples(tmp_path, digits):
    """Changing the held-out samples (labels and inputs) cannot change what the passes fit; it can change the
    guard's choice, which is the point: the choice is measured on samples the passes did not fit on."""
    x = digits["calib_x"].copy()
    x[3::4] = np.random.default_rng(0).standard_normal(x[3::4].shape).astype(x.dtype)
    changed = _save(tmp_path / "changed.npz", x, digits["calib_y"])
    runs = [squeeze.compress(MODEL, PASSES, calib=c, eval=TEST, targets="", max_drop=100.0) for c in (CALIB, changed)]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()  # nothing backed off: same fit
    without = squeeze.compress(MODEL, PASSES, calib=CALIB, targets="")  # nothing chooses: all of calib fits
    assert without.report["data"]["calib_fit_samples"] == 256 and without.report["data"]["val"] is None
    assert "validation" not in without.report


def test_val_is_used_when_given(tmp_path, digits):
    val = _save(tmp_path / "val.npz", digits["test_x"][:200], digits["test_y"][:200])
    result = squeeze.compress(MODEL, PASSES, calib=CALIB, val=val, eval=TEST, targets="", max_drop=0.5)
    guard = result.report["passes"][0]["guard"]
    assert guard["n"] == 200 and str(val) in guard["data"]
    data = result.report["data"]
    assert data["calib_fit_samples"] == 256 and data["val_samples"] == 200 and data["val_role"] == "--val"
    assert result.report["validation"]["n"] == 200


def test_goal_chooses_on_validation_data(monkeypatch, tmp_path):
    """--goal gets the validation data as its guard data and the fitting part of --calib, never --eval."""
    from squeeze import goal as goal_mod
    seen = {}

    def fake_search(model, goal, calib, shapes, **kw):
        seen.update(calib=calib, guard_data=kw["guard_data"])
        return goal_mod.SearchResult([], {"goal": goal.text, "status": "unreachable", "using": ["prune"],
                                          "budgets": {}, "points": [], "why": [], "drop_basis": "validation",
                                          "seconds": 0.0, "tables": {"seconds": 0.0}})
    monkeypatch.setattr(goal_mod, "search", fake_search)
    squeeze.compress(MODEL, calib=CALIB, eval=TEST, goal="size=2x", max_drop=1.0, targets="")
    assert len(seen["calib"]) == 192 and len(seen["guard_data"]) == 64
    assert "held-out" in seen["guard_data"].source and str(TEST) not in seen["guard_data"].source


def test_unlabelled_calib_falls_back_to_agreement_and_says_so(tmp_path, digits):
    calib = _save(tmp_path / "nolabels.npz", digits["calib_x"])
    result = squeeze.compress(MODEL, PASSES, calib=calib, eval=TEST, targets="", max_drop=0.5)
    assert result.report["passes"][0]["guard"]["metric"] == "agreement"
    assert result.report["metric"]["name"] == "top1"  # reported on the labelled evaluation data
    notes = result.report["validation"]["notes"]
    assert notes and "no labels" in notes[0] and "top-1 agreement" in notes[0]
    # an explicitly labelled metric cannot choose on unlabelled validation data: one line, before anything runs
    with pytest.raises(squeeze.SqueezeError, match="--val FILE.npz with 'labels'"):
        squeeze.compress(MODEL, PASSES, calib=calib, eval=TEST, targets="", max_drop=0.5, metric="top1")


def test_without_calib_validation_is_its_own_synthetic_draw():
    result = squeeze.compress(MODEL, PASSES, targets="", max_drop=5.0)
    data = result.report["data"]
    assert "seed 1" in data["val"] and "seed 0" in data["calib"] and data["val_role"].startswith("synthetic")
    assert result.report["validation"]["name"] == "agreement" and result.report["validation"]["notes"]


# ------------------------------------------------------------------------------------------ the report


def test_report_gives_n_stderr_and_paired_test_everywhere(tmp_path):
    out = tmp_path / "out"
    result = squeeze.compress(MODEL, PASSES, calib=CALIB, eval=TEST, targets="", max_drop=0.5, out_dir=out)
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    for side in ("original", "final"):
        assert acc[side]["n"] == 540 and 0 < acc[side]["stderr"] < 0.01
    assert acc["drop_stderr_pts"] is not None and acc["test"]["test"] == "McNemar" and 0 <= acc["test"]["p"] <= 1
    for key in ("metric", "validation"):
        assert report[key]["n"] and report[key]["stderr"]["drop"] is not None and "p" in report[key]["test"]
    md = (out / "report.md").read_text()
    assert "n = 64" in md and "n = 540" in md and "McNemar b=" in md and "validation: chose" in md
    assert "evaluation: reported" in md and "± " in md
    html = (out / "report.html").read_text()
    assert "McNemar b=" in html and "validation data (chooses)" in html and "n=540" in html
    table = terminal_table(result.report)
    assert "(eval, n=540)" in table and "(val, chose, n=64)" in table and "p=" in table
    assert markdown(result.report).count("McNemar") >= 3
    from squeeze.compare import rows
    row = rows([out])[0]
    assert row["n"] == 540 and row["top-1 SE"] > 0 and row["McNemar p"] is not None and "n=64" in row["validation drop"]


# ------------------------------------------------------------------------------------------ errors


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeeze", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "CI": "1"}, timeout=300)


@pytest.mark.parametrize("case", ["missing", "not-npz", "wrong-shape", "no-labels-for-top1"])
def test_bad_val_is_one_line_exit_2(tmp_path, case, digits):
    val = tmp_path / "val.npz"
    if case == "not-npz":
        val.write_text("not a zip")
    elif case == "wrong-shape":
        np.savez(val, input=np.zeros((4, 3, 8, 8), np.float32))
    elif case == "no-labels-for-top1":
        _save(val, digits["test_x"][:40])
    extra = ["--metric", "top1"] if case == "no-labels-for-top1" else []
    run = _cli(MODEL, "--passes", PASSES, "--calib", CALIB, "--val", val, "--max-drop", "1", "--target", "none",
               "-o", tmp_path / "out", *extra, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("squeeze: error:"), run.stderr
    assert "--val" in lines[0] or str(val) in lines[0]
    assert not (tmp_path / "out").exists()
