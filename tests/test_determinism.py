"""Determinism: the same model, passes, data and seed give byte-identical model.onnx and identical report numbers
(timings aside), for every registered pass."""
from __future__ import annotations

import json

import pytest

import squeeze
from squeeze.registry import all_passes

from conftest import REPO

TIMING_KEYS = {"seconds", "latency_ms", "original_latency_ms", "baseline", "speedup", "speedup_vs_original_tvm",
               "build_seconds", "onnxruntime", "path", "environment"}


def _numbers(value):
    """The report without timings and paths."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_every_pass_is_deterministic(name, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        result = squeeze.compress(REPO / "models/digits_cnn.onnx", name, calib=REPO / "models/digits_calib.npz",
                                  eval=REPO / "models/digits_test.npz", targets="", seed=7, out_dir=out)
        assert result.ok, result.failure
        runs.append(out)
    assert (runs[0] / "model.onnx").read_bytes() == (runs[1] / "model.onnx").read_bytes()
    a, b = (json.loads((r / "report.json").read_text()) for r in runs)
    assert _numbers(a) == _numbers(b)
