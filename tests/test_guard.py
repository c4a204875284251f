"""The accuracy guard backs a pass off (sensitive layers first, then strength, then revert) to meet --max-drop."""
from __future__ import annotations

from typing import Annotated

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import squeeze
from squeeze.registry import PASSES, Backoff, halve, register_pass
from squeeze.data import load_npz, input_specs
from squeeze.model import load_model

from conftest import REPO

MODEL = REPO / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def noise_pass():
    """A lossy test pass: adds relative Gaussian noise of size `strength` to every Conv/Gemm weight."""
    name = "test-noise"

    @register_pass(name, backoff=Backoff("strength", halve(0.01), skip="skip"))
    def noise(graph: gs.Graph, ctx, *, strength: Annotated[float, "relative noise"] = 1.0,
              skip: Annotated[list[str], "layers left untouched"] = []) -> None:  # noqa: B006
        """Add noise to weights."""
        rng = np.random.default_rng(ctx.seed)
        layers = []
        for node in graph.nodes:
            if node.op in ("Conv", "Gemm") and isinstance(node.inputs[1], gs.Constant):
                w = node.inputs[1].values
                layers.append(node.name)
                noise_ = rng.standard_normal(w.shape).astype(w.dtype) * np.abs(w).mean() * strength
                if node.name not in skip:
                    node.inputs[1] = gs.Constant(node.inputs[1].name + "_noisy", (w + noise_).astype(w.dtype))
        ctx.details["layers"] = layers

    yield name
    del PASSES[name]


def _drop(result) -> float:
    """The drop the guard holds: on the validation data (the evaluation data only reports; issue 19)."""
    if "validation" in result.report:
        return result.report["validation"]["drop"]
    return result.report["accuracy"]["drop_pts"]


def test_without_guard_the_noise_hurts(noise_pass):
    result = squeeze.compress(MODEL, f"{noise_pass}(strength=1.0)", eval=REPO / "models/digits_test.npz",
                              targets="")
    assert _drop(result) > 5.0


def test_guard_backs_off_to_meet_the_limit(noise_pass):
    result = squeeze.compress(MODEL, f"{noise_pass}(strength=1.0)", eval=REPO / "models/digits_test.npz",
                              calib=REPO / "models/digits_calib.npz", targets="", max_drop=0.5)
    assert _drop(result) <= 0.5
    guard = result.report["passes"][0]["guard"]
    assert guard["action"] in ("skipped sensitive layers", "weakened strength", "reverted")
    assert guard["attempts"][0]["drop"] > 0.5          # the first attempt broke the limit
    assert guard["drop"] <= 0.5                        # the chosen one does not
    assert any("accuracy guard" in n for n in result.report["passes"][0]["notes"])
    if guard["action"] == "skipped sensitive layers":
        assert set(guard["sensitivity"]) >= set(guard["skipped"])


def test_guard_reverts_when_nothing_fits(noise_pass):
    result = squeeze.compress(MODEL, f"{noise_pass}(strength=50.0)", eval=REPO / "models/digits_test.npz",
                              targets="", max_drop=0.0)
    # max_drop 0 with a noisy pass: every weaker setting still changes predictions on some sample, or not;
    # either way the final model respects the limit.
    assert _drop(result) <= 0.0 + 1e-9


def test_negative_max_drop_is_an_error():
    with pytest.raises(squeeze.SqueezeError):
        squeeze.compress(MODEL, "cleanup", targets="", max_drop=-1)


def test_guard_holds_a_lower_is_better_metric(noise_pass):
    """--metric rel-l2 (lower is better, in %): the guard backs off until the outputs stay within 2 % of the
    original's, whatever top-1 does."""
    result = squeeze.compress(MODEL, f"{noise_pass}(strength=1.0)", eval=REPO / "models/digits_test.npz",
                              calib=REPO / "models/digits_calib.npz", targets="", max_drop=2.0, metric="rel-l2")
    guard = result.report["passes"][0]["guard"]
    assert guard["metric"] == "rel-l2" and guard["basis"].startswith("rel. L2 error, pts")
    assert guard["attempts"][0]["drop"] > 2.0 >= guard["drop"]
    block = result.report["validation"]  # what the guard held; report["metric"] is on the evaluation data
    assert block["name"] == "rel-l2" and block["direction"] == "lower is better"
    assert 100 * block["final"] == pytest.approx(block["drop"]) and block["drop"] <= 2.0
    assert block["drop"] == pytest.approx(guard["drop"], abs=1e-3)  # the guard scored the same data
    assert result.report["metric"]["name"] == "rel-l2" and result.report["metric"]["n"] == 540
    assert any("rel. L2 error drop" in n for n in result.report["passes"][0]["notes"])


def test_guard_with_a_callable_metric(noise_pass):
    """A callable metric (outputs, data) → per-sample values: here the original's confidence in the label."""
    def confidence(outputs, data):
        scores = next(iter(outputs.values())).reshape(len(data), -1)
        p = np.exp(scores - scores.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(len(data)), data.labels]

    result = squeeze.compress(MODEL, f"{noise_pass}(strength=1.0)", eval=REPO / "models/digits_test.npz",
                              calib=REPO / "models/digits_calib.npz", targets="", max_drop=0.01, metric=confidence)
    block = result.report["metric"]
    assert block["label"] == "confidence (custom)" and block["n"] == 540
    held = result.report["validation"]
    assert held["n"] == 64 and held["drop"] <= 0.01 and result.report["passes"][0]["guard"]["attempts"][0]["drop"] > 0.01


@pytest.mark.parametrize("layers", [2, 3, 8, 17])
def test_fewest_sensitive_layers_by_doubling_and_bisection(layers):
    """With a drop that falls as more layers are left out, the search finds the smallest count that holds (as
    trying each count would), in O(log layers) pass runs; none when even all layers but one are not enough."""
    from squeeze.guard import Guard
    for need in range(0, layers + 1):
        guard, tried = Guard.__new__(Guard), []

        def fake_try(attempt, params, log, need=need):
            tried.append(len(params["skip"]))
            log.append({"drop": 0.5 if len(params["skip"]) >= need else 2.0})
            return ("model", "ctx") if len(params["skip"]) >= need else None

        guard._try = fake_try
        best = guard._fewest_skipped("p", None, {"skip": []}, "skip", [f"l{i}" for i in range(layers)], [],
                                     lambda message: None)
        assert (best[0] if best else None) == (max(need, 1) if max(need, 1) < layers else None)
        assert len(tried) <= 2 * layers.bit_length() + 1
