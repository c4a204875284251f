"""Determinism beyond the shipped model (tests/test_determinism.py): corpus models and control flow, every pass.

Same model, passes, data and seed: byte-identical model and identical report numbers (timings and paths aside).
"""
from __future__ import annotations

import json

import pytest

import squeeze
from squeeze.registry import all_passes

from robustness import models
from test_determinism import _numbers  # the report without timings and paths, one definition



def _twice(model, passes: str, calib=None, out=None):
    runs = []
    for i in range(2):
        result = squeeze.compress(model, passes, calib=calib, targets="", seed=3, runs=1, threads=1,
                                  out_dir=None if out is None else out / f"run{i}")
        runs.append(result)
    a, b = runs
    assert a.failure == b.failure
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    assert _numbers(json.loads(json.dumps(a.report, default=str))) == \
        _numbers(json.loads(json.dumps(b.report, default=str)))
    if out is not None:
        assert (out / "run0" / "model.onnx").read_bytes() == (out / "run1" / "model.onnx").read_bytes()
    return a


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_every_pass_is_deterministic_on_an_ir3_corpus_model(name, corpus):
    _twice(corpus.model_path("mnist8_zoo"), name)


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_every_pass_is_deterministic_with_control_flow(name):
    result = _twice(models.if_after_conv_bn(), name)
    if result.ok:
        assert any("control-flow" in n for step in result.report["passes"] for n in step["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cifar10_resnet2b", "mnist_ortjava", "oval21_cifar_deep", "ultraface"])
@pytest.mark.parametrize("name", sorted(all_passes()))
def test_every_pass_is_deterministic_on_corpus_models(name, model, corpus, tmp_path):
    _twice(corpus.model_path(model), name, out=tmp_path)
